//! ADS over mutual TLS (istiod's 15012): each accepted connection does a TLS handshake that
//! requires a client certificate of the mesh's root; the certificate's URI SAN travels with the
//! connection to the streams, which serve a node only the config of the identity it proves.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::net::Conn;

/// Longest a client may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection after its handshake, with the identity the client proved.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<Conn>,
    info: XdsConnectInfo,
}

/// What a stream learns of its connection (`Request::extensions`).
#[derive(Clone, Debug)]
pub struct XdsConnectInfo {
    pub remote_addr: SocketAddr,
    /// The client certificate's URI SAN.
    pub identity: Option<String>,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = XdsConnectInfo;
    fn connect_info(&self) -> XdsConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Handshakes each connection of `plain` on its own task (a slow client delays no other);
/// failed handshakes are dropped.
pub fn incoming(
    mut plain: ReceiverStream<io::Result<Conn>>,
    cfg: Arc<rustls::ServerConfig>,
) -> ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    tokio::spawn(async move {
        while let Some(conn) = plain.next().await {
            let Ok(conn) = conn else { continue };
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            tokio::spawn(async move {
                let remote_addr = conn.peer;
                let Ok(Ok(inner)) =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await
                else {
                    tracing::debug!(peer = %remote_addr, "xDS TLS handshake failed");
                    return;
                };
                let identity = inner
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| crate::security::uri_san(c));
                let info = XdsConnectInfo {
                    remote_addr,
                    identity,
                };
                let _ = tx.send(Ok(TlsConn { inner, info })).await;
            });
        }
    });
    ReceiverStream::new(rx)
}
