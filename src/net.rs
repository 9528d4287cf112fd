//! Accepting connections without being held hostage by them, for every server meshbench runs
//! (pilot's ADS and REST ports, the proxy's listeners and admin port):
//! - a connection limit per listener (a semaphore permit travels with the connection), so
//!   idle connections cannot exhaust the process's file descriptors;
//! - a first-byte deadline: a connection that sends nothing is closed (every protocol here
//!   has the client speak first: HTTP/1 request lines, the HTTP/2 preface);
//! - accept errors (EMFILE at the fd limit, ECONNABORTED) back off instead of spinning.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

/// How long a new connection may stay silent before it is closed.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (the fd table is full, or the peer went away).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Bounds of one listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub first_byte: Duration,
}

impl Limits {
    /// `max_connections`, but never more than half the descriptors this process may open
    /// (the rest are for upstream connections, files and the other listeners).
    pub fn new(max_connections: usize) -> Limits {
        Limits {
            max_connections: max_connections.min(fd_limit() / 2).max(1),
            first_byte: FIRST_BYTE_TIMEOUT,
        }
    }
}

/// The soft limit on open files (RLIMIT_NOFILE).
pub fn fd_limit() -> usize {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
        usize::try_from(r.rlim_cur).unwrap_or(usize::MAX)
    } else {
        1024
    }
}

/// An accepted connection that has sent its first byte; holds its listener's permit.
#[derive(Debug)]
pub struct Conn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub local: Option<SocketAddr>,
    _permit: OwnedSemaphorePermit,
}

/// A connection between runtimes: its socket out of the accepting runtime's reactor, with its
/// place under the connection limit, to be registered with another's ([`Detached::attach`]).
pub struct Detached {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    permit: OwnedSemaphorePermit,
}

impl Conn {
    pub fn detach(self) -> io::Result<Detached> {
        Ok(Detached {
            stream: self.stream.into_std()?,
            peer: self.peer,
            local: self.local,
            permit: self._permit,
        })
    }
}

impl Detached {
    /// Registers the connection with the runtime this runs on.
    pub fn attach(self) -> io::Result<Conn> {
        Ok(Conn {
            stream: TcpStream::from_std(self.stream)?,
            peer: self.peer,
            local: self.local,
            _permit: self.permit,
        })
    }
}

/// Accepts on `listener` until `stop` completes, yielding connections that spoke within the
/// deadline. At most `limits.max_connections` are open at once: beyond that, new ones wait
/// in the kernel's backlog.
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("never closed"),
                _ = &mut stop => return,
            };
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!("accept failed: {e}; backing off");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
                _ = &mut stop => return,
                _ = tx.closed() => return,
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut byte = [0u8; 1];
                match tokio::time::timeout(limits.first_byte, stream.peek(&mut byte)).await {
                    Ok(Ok(n)) if n > 0 => {
                        let local = stream.local_addr().ok();
                        let _ = tx
                            .send(Ok(Conn {
                                stream,
                                peer,
                                local,
                                _permit: permit,
                            }))
                            .await;
                    }
                    // Silent, closed or failed: dropping it closes it and frees the permit.
                    _ => {}
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Whether `headers` carry `Authorization: Bearer TOKEN` with `token`, compared in time
/// independent of where they differ.
pub fn bearer_is(headers: &http::HeaderMap, token: &str) -> bool {
    let given = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or("");
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Whether a peer address is this host's loopback.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V4(a) => a.is_loopback(),
        std::net::IpAddr::V6(a) => {
            a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Where a connection redirected by iptables (`REDIRECT`) was going: `SO_ORIGINAL_DST`
/// (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6). `None` when the socket was not redirected and
/// the kernel has nothing to say (the caller then uses the local address).
pub fn original_dst(stream: &tokio::net::TcpStream) -> Option<SocketAddr> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let local = stream.local_addr().ok()?;
    // SAFETY: getsockopt writes at most `len` bytes into the zeroed storage we own.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let (level, opt) = if local.is_ipv4() {
            (libc::SOL_IP, libc::SO_ORIGINAL_DST)
        } else {
            (libc::SOL_IPV6, libc::IP6T_SO_ORIGINAL_DST)
        };
        let rc = libc::getsockopt(
            fd,
            level,
            opt,
            &mut storage as *mut _ as *mut libc::c_void,
            &mut len,
        );
        if rc != 0 {
            return None;
        }
        match storage.ss_family as libc::c_int {
            libc::AF_INET => {
                let a = &*(&storage as *const _ as *const libc::sockaddr_in);
                Some(SocketAddr::new(
                    std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
                    u16::from_be(a.sin_port),
                ))
            }
            libc::AF_INET6 => {
                let a = &*(&storage as *const _ as *const libc::sockaddr_in6);
                Some(SocketAddr::new(
                    std::net::Ipv6Addr::from(a.sin6_addr.s6_addr).into(),
                    u16::from_be(a.sin6_port),
                ))
            }
            _ => None,
        }
    }
}
