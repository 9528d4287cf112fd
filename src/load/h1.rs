//! The generator's HTTP/1.1 client: one task per keep-alive connection writes a request that
//! was serialized once and reads the answer with `httparse`, as wrk does. No channel between a
//! sender and a connection task (hyper's client has one per request), so a request costs one
//! write, one read and one wake-up; that is what lets the generator drive a proxy as hard as
//! wrk and measure what wrk measures.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::workload::{DEGRADED_HEADER, IDENTITY_HEADER, UPSTREAMS_HEADER};

/// Most header lines an answer may carry.
const MAX_HEADERS: usize = 64;
/// Largest header block accepted (Envoy's default request limit, applied to answers).
const MAX_HEAD_BYTES: usize = 60 * 1024;

/// A request serialized once for every send. `None` when a header cannot be sent as given
/// (a name or value HTTP does not allow, e.g. with a line break).
pub fn request(host: &str, path: &str, headers: &[(String, String)]) -> Option<Vec<u8>> {
    let ok_value = |v: &str| http::HeaderValue::from_str(v).is_ok();
    if !ok_value(host) || path.is_empty() || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return None;
    }
    let mut out = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n");
    for (k, v) in headers {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err() || !ok_value(v) {
            return None;
        }
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    Some(out.into_bytes())
}

/// One answer: its status and every workload identity it names (the answering workload, then
/// those it called), in that order.
#[derive(Debug, Default, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub versions: Vec<String>,
    /// The services `x-meshbench-degraded` names.
    pub degraded: Vec<String>,
    /// Refused by the mesh to protect itself: a 429 (rate limit) or an answer with
    /// `x-envoy-overloaded` (a circuit breaker's overflow 503).
    pub shed: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(std::io::ErrorKind),
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Io(e.kind())
    }
}

/// How an answer's body ends.
enum Framing {
    Length(usize),
    Chunked,
    /// No length: the body runs to the end of the connection.
    Close,
}

/// A keep-alive HTTP/1.1 connection.
pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    /// The last answer said `connection: close` or had no length: do not reuse.
    done: bool,
}

impl Conn {
    pub async fn connect(addr: std::net::SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(8192),
            done: false,
        })
    }

    /// Whether the connection can carry another request.
    pub fn reusable(&self) -> bool {
        !self.done
    }

    /// Sends `req` and reads its whole answer.
    pub async fn round_trip(&mut self, req: &[u8]) -> Result<Answer, Error> {
        self.stream.write_all(req).await?;
        let (answer, framing, head_len, close) = loop {
            if let Some(parsed) = parse_head(&self.buf)? {
                break parsed;
            }
            if self.buf.len() > MAX_HEAD_BYTES {
                return Err(Error::Malformed("header block too large"));
            }
            self.fill().await?;
        };
        self.buf.advance(head_len);
        match framing {
            Framing::Length(n) => {
                while self.buf.len() < n {
                    self.fill().await?;
                }
                self.buf.advance(n);
            }
            Framing::Chunked => self.skip_chunked().await?,
            Framing::Close => {
                self.done = true;
                loop {
                    self.buf.clear();
                    match self.fill().await {
                        Ok(()) => {}
                        Err(Error::Closed) => break,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        self.done |= close;
        Ok(answer)
    }

    /// Reads more bytes; `Closed` at the end of the stream.
    async fn fill(&mut self) -> Result<(), Error> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(8192);
        }
        match self.stream.read_buf(&mut self.buf).await? {
            0 => Err(Error::Closed),
            _ => Ok(()),
        }
    }

    async fn skip_chunked(&mut self) -> Result<(), Error> {
        loop {
            let (skip, size) = loop {
                match httparse::parse_chunk_size(&self.buf) {
                    Ok(httparse::Status::Complete((n, size))) => break (n, size),
                    Ok(httparse::Status::Partial) => {
                        if self.buf.len() > MAX_HEAD_BYTES {
                            return Err(Error::Malformed("chunk size line too long"));
                        }
                        self.fill().await?
                    }
                    Err(_) => return Err(Error::Malformed("chunk size")),
                }
            };
            self.buf.advance(skip);
            if size == 0 {
                // Trailers (if any), then the empty line.
                loop {
                    if let Some(end) = find_crlf(&self.buf) {
                        let line_empty = end == 0;
                        self.buf.advance(end + 2);
                        if line_empty {
                            return Ok(());
                        }
                    } else {
                        if self.buf.len() > MAX_HEAD_BYTES {
                            return Err(Error::Malformed("trailers too large"));
                        }
                        self.fill().await?;
                    }
                }
            }
            let size = usize::try_from(size).map_err(|_| Error::Malformed("chunk size"))?;
            let want = size.checked_add(2).ok_or(Error::Malformed("chunk size"))?;
            // The chunk's data and its CRLF, read and dropped as they come.
            let mut left = want;
            loop {
                let n = left.min(self.buf.len());
                self.buf.advance(n);
                left -= n;
                if left == 0 {
                    break;
                }
                self.fill().await?;
            }
        }
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// A parsed head: the answer, how its body ends, the head's length, and whether the server
/// closes the connection after it.
type Head = (Answer, Framing, usize, bool);

/// The answer's status line and headers, if complete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::Malformed("too many headers")),
        Err(_) => return Err(Error::Malformed("status line or header")),
    };
    let status = resp.code.unwrap_or(0);
    let mut framing = Framing::Close;
    let mut close = resp.version == Some(0);
    let (mut identity, mut upstreams, mut degraded) = (None, None, None);
    let mut shed = status == 429;
    for h in resp.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or(Error::Malformed("content-length"))?;
            if !matches!(framing, Framing::Chunked) {
                framing = Framing::Length(n);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding is what frames the body.
            if h.value
                .to_ascii_lowercase()
                .trim_ascii_end()
                .ends_with(b"chunked")
            {
                framing = Framing::Chunked;
            }
        } else if name.eq_ignore_ascii_case("connection") {
            let v = h.value.to_ascii_lowercase();
            if v.windows(5).any(|w| w == b"close") {
                close = true;
            } else if v.windows(10).any(|w| w == b"keep-alive") {
                close = false;
            }
        } else if name.eq_ignore_ascii_case(IDENTITY_HEADER) {
            identity = std::str::from_utf8(h.value).ok();
        } else if name.eq_ignore_ascii_case(UPSTREAMS_HEADER) {
            upstreams = std::str::from_utf8(h.value).ok();
        } else if name.eq_ignore_ascii_case(DEGRADED_HEADER) {
            degraded = std::str::from_utf8(h.value).ok();
        } else if name.eq_ignore_ascii_case("x-envoy-overloaded") {
            shed = true;
        }
    }
    // 1xx, 204 and 304 have no body whatever the headers say.
    if status < 200 || status == 204 || status == 304 {
        framing = Framing::Length(0);
    }
    let list = |vs: &[Option<&str>]| -> Vec<String> {
        vs.iter()
            .flatten()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    let versions = list(&[identity, upstreams]);
    let degraded = list(&[degraded]);
    Ok(Some((
        Answer {
            status,
            versions,
            degraded,
            shed,
        },
        framing,
        head_len,
        close,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A server that answers every request on one connection with `answers` in turn.
    async fn serve(answers: Vec<&'static [u8]>) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            for a in answers {
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                // Split the answer in two writes to exercise partial reads.
                let mid = a.len() / 2;
                s.write_all(&a[..mid]).await.unwrap();
                s.flush().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                s.write_all(&a[mid..]).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn reads_length_chunked_and_bodyless_answers_on_one_connection() {
        let addr = serve(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-meshbench-workload: reviews-v1\r\nx-meshbench-upstreams: ratings-v1,\r\nx-meshbench-degraded: ratings, details\r\n\r\nhello",
            b"HTTP/1.1 503 Service Unavailable\r\nx-envoy-overloaded: true\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nx-trailer: 1\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\ncontent-length: 99\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        ])
        .await;
        let req = request("reviews:9080", "/", &[]).unwrap();
        let mut c = Conn::connect(addr).await.unwrap();
        let a = c.round_trip(&req).await.unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(a.versions, ["reviews-v1", "ratings-v1"]);
        assert_eq!(a.degraded, ["ratings", "details"]);
        assert!(!a.shed);
        let overflow = c.round_trip(&req).await.unwrap();
        assert_eq!((overflow.status, overflow.shed), (503, true));
        assert_eq!(c.round_trip(&req).await.unwrap().status, 204);
        assert_eq!(c.round_trip(&req).await.unwrap().status, 200);
        assert!(c.reusable());
        assert_eq!(c.round_trip(&req).await, Err(Error::Closed));
    }

    #[tokio::test]
    async fn an_answer_without_length_runs_to_the_close() {
        let addr = serve(vec![b"HTTP/1.0 200 OK\r\n\r\nall of it"]).await;
        let mut c = Conn::connect(addr).await.unwrap();
        let a = c.round_trip(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        // The server task ends after its answers, closing the connection.
        assert_eq!(a.unwrap().status, 200);
        assert!(!c.reusable());
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_hang() {
        let addr = serve(vec![b"SSH-2.0-OpenSSH\r\n\r\n"]).await;
        let mut c = Conn::connect(addr).await.unwrap();
        let r = c.round_trip(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(matches!(r, Err(Error::Malformed(_))), "{r:?}");
    }

    #[test]
    fn requests_with_line_breaks_are_refused() {
        assert!(request("a\r\nb", "/", &[]).is_none());
        assert!(request("a", "/ x", &[]).is_none());
        assert!(request("a", "/", &[("x-a".into(), "1\r\nx-b: 2".into())]).is_none());
        let r = request("a:1", "/p?q=1", &[("end-user".into(), "jason".into())]).unwrap();
        assert_eq!(
            r,
            b"GET /p?q=1 HTTP/1.1\r\nhost: a:1\r\nend-user: jason\r\n\r\n"
        );
    }
}
