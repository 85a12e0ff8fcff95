//! A lean HTTP/1.1 client for the reads the gateway relays to plain-HTTP sources (a FHIR
//! server on the same host or private network, the usual place for one behind a gateway).
//!
//! A relayed read is the gateway's hottest path, and a general client spends more on it than
//! the request itself: URL parsing, a pool keyed by origin, and a connection task that hands
//! every answer across tasks (often across threads). Here the request's own task writes the
//! request on a pooled connection and reads the answer from it; an answer that has already
//! arrived whole comes back as one buffer and the connection goes straight back to the pool,
//! a longer one streams and returns it when it ends. Only `GET` and `HEAD` use it: they may be
//! sent again on a fresh connection when a pooled one turns out closed before any answer
//! came, which writes may not. `https` sources and writes stay on the general client.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::RemoteError;

/// The most header bytes an answer may have.
const MAX_HEAD: usize = 64 * 1024;
/// Idle connections kept per source.
const MAX_IDLE: usize = 64;
/// How much is read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// The pooled connections to one plain-HTTP source.
pub struct H1 {
    /// `host:port` to connect to.
    address: String,
    /// The `Host` header: the authority as configured.
    host: String,
    /// The base URL's path, without a trailing `/` (`/fhir`, or empty).
    base_path: String,
    idle: Mutex<Vec<Conn>>,
    timeout: Duration,
    connect_timeout: Duration,
}

struct Conn {
    stream: TcpStream,
    /// Bytes read but not yet used.
    buf: BytesMut,
}

/// How an answer's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    /// Until the server closes the connection.
    Eof,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailer,
}

impl H1 {
    /// A client for `base` when it is a plain `http://` URL.
    pub fn for_base(base: &str, timeout: Duration, connect_timeout: Duration) -> Option<Self> {
        let uri: http::Uri = base.parse().ok()?;
        if uri.scheme_str() != Some("http") || uri.query().is_some() {
            return None;
        }
        let authority = uri.authority()?;
        let port = authority.port_u16().unwrap_or(80);
        Some(Self {
            address: format!("{}:{port}", authority.host()),
            host: authority.as_str().to_owned(),
            base_path: uri.path().trim_end_matches('/').to_owned(),
            idle: Mutex::new(Vec::new()),
            timeout,
            connect_timeout,
        })
    }

    /// Sends `GET` or `HEAD` for `path_and_query` (relative to the base) and answers with the
    /// status, headers and body as they arrive.
    pub async fn read(
        self: &Arc<Self>,
        method: &Method,
        path_and_query: &str,
        headers: &[(HeaderName, HeaderValue)],
        token: Option<&str>,
    ) -> Result<http::Response<H1Body>, RemoteError> {
        debug_assert!(matches!(*method, Method::GET | Method::HEAD));
        let request = self.request_bytes(method, path_and_query, headers, token);
        let deadline = Instant::now() + self.timeout;
        loop {
            let pooled = self.idle.lock().ok().and_then(|mut idle| idle.pop());
            let reused = pooled.is_some();
            let mut conn = match pooled {
                Some(conn) => conn,
                None => self.connect(deadline).await?,
            };
            let exchanged = tokio::time::timeout_at(deadline, conn.exchange(&request)).await;
            match exchanged {
                Err(_) => {
                    return Err(RemoteError::Transport(
                        "the source did not answer in time".into(),
                    ))
                }
                Ok(Ok(head)) => return Ok(self.answer(method, head, conn, deadline)),
                // A pooled connection the server had closed: nothing was answered, so the
                // read goes again on a new one.
                Ok(Err(Exchange::Closed)) if reused => continue,
                Ok(Err(Exchange::Closed)) => {
                    return Err(RemoteError::Transport(
                        "the source closed the connection without answering".into(),
                    ))
                }
                Ok(Err(Exchange::Io(e)))
                    if reused && e.kind() != std::io::ErrorKind::InvalidData =>
                {
                    continue
                }
                Ok(Err(Exchange::Io(e))) => return Err(RemoteError::Transport(e.to_string())),
            }
        }
    }

    fn request_bytes(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &[(HeaderName, HeaderValue)],
        token: Option<&str>,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.base_path.as_bytes());
        out.push(b'/');
        out.extend_from_slice(path_and_query.trim_start_matches('/').as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(self.host.as_bytes());
        out.extend_from_slice(b"\r\naccept: application/fhir+json\r\n");
        for (name, value) in headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if let Some(token) = token {
            out.extend_from_slice(b"authorization: Bearer ");
            out.extend_from_slice(token.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    async fn connect(&self, deadline: Instant) -> Result<Conn, RemoteError> {
        let limit = deadline.min(Instant::now() + self.connect_timeout);
        let stream = tokio::time::timeout_at(limit, TcpStream::connect(self.address.as_str()))
            .await
            .map_err(|_| RemoteError::Transport("connecting to the source timed out".into()))?
            .map_err(|e| RemoteError::Transport(format!("connecting to the source: {e}")))?;
        stream
            .set_nodelay(true)
            .map_err(|e| RemoteError::Transport(e.to_string()))?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
        })
    }

    fn answer(
        self: &Arc<Self>,
        method: &Method,
        head: Head,
        mut conn: Conn,
        deadline: Instant,
    ) -> http::Response<H1Body> {
        let no_body = *method == Method::HEAD
            || head.status == StatusCode::NO_CONTENT
            || head.status == StatusCode::NOT_MODIFIED;
        let framing = if no_body {
            Framing::Done
        } else if head.chunked {
            Framing::Chunked(Chunk::Size)
        } else if let Some(length) = head.length {
            Framing::Length(length)
        } else {
            Framing::Eof
        };
        let keep_alive = head.keep_alive && framing != Framing::Eof;
        let body = match framing {
            // The whole body is here (the usual case for a resource): one buffer, and the
            // connection is free again at once.
            Framing::Length(n) if n <= conn.buf.len() as u64 => {
                let data = conn.buf.split_to(n as usize).freeze();
                self.put_back(conn, keep_alive);
                H1Body::full(data)
            }
            Framing::Done => {
                self.put_back(conn, keep_alive);
                H1Body::full(Bytes::new())
            }
            _ => H1Body {
                framing,
                ready: None,
                conn: Some(conn),
                keep_alive,
                pool: Some(self.clone()),
                deadline,
                timer: None,
            },
        };
        let mut response = http::Response::new(body);
        *response.status_mut() = head.status;
        *response.headers_mut() = head.headers;
        response
    }

    fn put_back(&self, conn: Conn, keep_alive: bool) {
        // Bytes beyond the answer mean the server said more than it should: not reused.
        if !keep_alive || !conn.buf.is_empty() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < MAX_IDLE {
                idle.push(conn);
            }
        }
    }
}

struct Head {
    status: StatusCode,
    headers: HeaderMap,
    length: Option<u64>,
    chunked: bool,
    keep_alive: bool,
}

enum Exchange {
    /// The connection ended before any byte of an answer.
    Closed,
    Io(std::io::Error),
}

fn invalid(what: &str) -> Exchange {
    Exchange::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("the source's answer is not valid HTTP/1.1: {what}"),
    ))
}

impl Conn {
    /// Writes `request` and reads the answer's head (skipping interim `1xx` answers).
    async fn exchange(&mut self, request: &[u8]) -> Result<Head, Exchange> {
        if let Err(e) = self.stream.write_all(request).await {
            return Err(match e.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    Exchange::Closed
                }
                _ => Exchange::Io(e),
            });
        }
        let mut answered = false;
        loop {
            if !self.buf.is_empty() {
                answered = true;
                if let Some(head) = self.parse_head()? {
                    if head.status.is_informational() {
                        continue;
                    }
                    return Ok(head);
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(invalid("the header is too large"));
                }
            }
            self.buf.reserve(READ_CHUNK);
            match tokio::io::AsyncReadExt::read_buf(&mut self.stream, &mut self.buf).await {
                Ok(0) if !answered => return Err(Exchange::Closed),
                Ok(0) => return Err(invalid("the connection ended inside the header")),
                Ok(_) => {}
                Err(e) if !answered && e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(Exchange::Closed)
                }
                Err(e) => return Err(Exchange::Io(e)),
            }
        }
    }

    /// The head at the start of the buffer, once it is all there (and removed from it).
    fn parse_head(&mut self) -> Result<Option<Head>, Exchange> {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut slots);
        let used = match parsed.parse(&self.buf) {
            Ok(httparse::Status::Complete(used)) => used,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(invalid(&e.to_string())),
        };
        let status = parsed
            .code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| invalid("no status"))?;
        let mut head = Head {
            status,
            headers: HeaderMap::with_capacity(parsed.headers.len()),
            length: None,
            chunked: false,
            keep_alive: parsed.version == Some(1),
        };
        for header in parsed.headers.iter() {
            let name = HeaderName::from_bytes(header.name.as_bytes())
                .map_err(|_| invalid("a header name"))?;
            let value = header.value;
            if name == http::header::CONTENT_LENGTH {
                let length = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| invalid("Content-Length"))?;
                if head.length.is_some_and(|l| l != length) {
                    return Err(invalid("conflicting Content-Length"));
                }
                head.length = Some(length);
            } else if name == http::header::TRANSFER_ENCODING {
                let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
                if !last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    return Err(invalid("a transfer coding other than chunked"));
                }
                head.chunked = true;
                continue;
            } else if name == http::header::CONNECTION {
                if value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
                {
                    head.keep_alive = false;
                }
                continue;
            } else if name.as_str() == "keep-alive" {
                continue;
            }
            let value = HeaderValue::from_bytes(value).map_err(|_| invalid("a header value"))?;
            head.headers.append(name, value);
        }
        if head.chunked {
            // Chunked framing wins over a length (RFC 9112 §6.3), and the length is not sent on.
            head.length = None;
            head.headers.remove(http::header::CONTENT_LENGTH);
        }
        self.buf.advance(used);
        Ok(Some(head))
    }
}

/// An answer's body: one buffer, or read from the connection as it arrives.
pub struct H1Body {
    framing: Framing,
    /// A body that arrived whole.
    ready: Option<Bytes>,
    conn: Option<Conn>,
    keep_alive: bool,
    pool: Option<Arc<H1>>,
    deadline: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

enum Step {
    Data(Bytes),
    More,
    End,
}

impl H1Body {
    fn full(data: Bytes) -> Self {
        Self {
            framing: Framing::Done,
            ready: (!data.is_empty()).then_some(data),
            conn: None,
            keep_alive: false,
            pool: None,
            deadline: Instant::now(),
            timer: None,
        }
    }

    /// What the buffered bytes give next.
    fn step(&mut self) -> std::io::Result<Step> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Step::End);
        };
        let buf = &mut conn.buf;
        loop {
            match self.framing {
                Framing::Done => return Ok(Step::End),
                Framing::Length(0) => self.framing = Framing::Done,
                Framing::Length(n) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let take = (n.min(buf.len() as u64)) as usize;
                    self.framing = Framing::Length(n - take as u64);
                    return Ok(Step::Data(buf.split_to(take).freeze()));
                }
                Framing::Eof => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                Framing::Chunked(Chunk::Size) => {
                    let Some(end) = find_crlf(buf) else {
                        return too_long_or_more(buf.len());
                    };
                    let line = &buf[..end];
                    let digits = line
                        .split(|&b| b == b';')
                        .next()
                        .unwrap_or_default()
                        .trim_ascii();
                    let size = std::str::from_utf8(digits)
                        .ok()
                        .and_then(|d| u64::from_str_radix(d, 16).ok())
                        .ok_or_else(|| bad_body("a chunk size"))?;
                    buf.advance(end + 2);
                    self.framing = Framing::Chunked(if size == 0 {
                        Chunk::Trailer
                    } else {
                        Chunk::Data(size)
                    });
                }
                Framing::Chunked(Chunk::Data(n)) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let take = (n.min(buf.len() as u64)) as usize;
                    let left = n - take as u64;
                    self.framing = Framing::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    return Ok(Step::Data(buf.split_to(take).freeze()));
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(bad_body("a chunk's end"));
                    }
                    buf.advance(2);
                    self.framing = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(Chunk::Trailer) => {
                    let Some(end) = find_crlf(buf) else {
                        return too_long_or_more(buf.len());
                    };
                    buf.advance(end + 2);
                    if end == 0 {
                        self.framing = Framing::Done;
                    }
                }
            }
        }
    }

    /// The body ended as framed: the connection may serve another request.
    fn finish(&mut self) {
        if let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.take()) {
            pool.put_back(conn, self.keep_alive);
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

fn too_long_or_more(len: usize) -> std::io::Result<Step> {
    if len > 4096 {
        Err(bad_body("a chunk line is too long"))
    } else {
        Ok(Step::More)
    }
}

fn bad_body(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("the source's body is not valid HTTP/1.1: {what}"),
    )
}

impl http_body::Body for H1Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        if let Some(data) = this.ready.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
        }
        loop {
            match this.step() {
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(Step::Data(data)) => {
                    if this.framing == Framing::Done || this.framing == Framing::Length(0) {
                        this.framing = Framing::Done;
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
            }
            let deadline = this.deadline;
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.as_mut().poll(cx).is_ready() {
                this.conn = None;
                return Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the source's body did not arrive in time",
                ))));
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            ready!(conn.stream.poll_read_ready(cx))?;
            conn.buf.reserve(READ_CHUNK);
            match conn.stream.try_read_buf(&mut conn.buf) {
                Ok(0) => {
                    this.conn = None;
                    if this.framing == Framing::Eof {
                        this.framing = Framing::Done;
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the source closed the connection inside the body",
                    ))));
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_none() && self.framing == Framing::Done
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match (&self.ready, self.framing) {
            (Some(data), _) => http_body::SizeHint::with_exact(data.len() as u64),
            (None, Framing::Done) => http_body::SizeHint::with_exact(0),
            (None, Framing::Length(n)) => http_body::SizeHint::with_exact(n),
            _ => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A server answering each request on a connection with the next of `answers`, raw.
    async fn server(answers: Vec<&'static [u8]>) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            let (mut socket, _) = listener.accept().await.expect("accept");
            for answer in answers {
                let mut request = Vec::new();
                while !request.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8; 1];
                    if socket.read(&mut byte).await.expect("read") == 0 {
                        return seen;
                    }
                    request.push(byte[0]);
                }
                seen.push(String::from_utf8(request).expect("utf-8"));
                // Sent in two writes, so bodies arrive in pieces.
                let (a, b) = answer.split_at(answer.len() / 2);
                socket.write_all(a).await.expect("write");
                socket.flush().await.expect("flush");
                tokio::time::sleep(Duration::from_millis(5)).await;
                socket.write_all(b).await.expect("write");
            }
            seen
        });
        (address, task)
    }

    fn client(address: &str) -> Arc<H1> {
        Arc::new(
            H1::for_base(
                &format!("http://{address}/fhir/"),
                Duration::from_secs(5),
                Duration::from_secs(5),
            )
            .expect("plain http"),
        )
    }

    async fn body_of(response: http::Response<H1Body>) -> Vec<u8> {
        response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec()
    }

    #[tokio::test]
    async fn lengths_chunks_and_reuse() {
        let (address, server) = server(vec![
            b"HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: 11\r\netag: W/\"1\"\r\n\r\n{\"id\":\"p1\"}",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4;ext=1\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\nx-trailer: y\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\netag: W/\"1\"\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
        ])
        .await;
        let h1 = client(&address);
        let token = Some("t0k");
        let first = h1
            .read(&Method::GET, "Patient/p1", &[], token)
            .await
            .expect("first");
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(first.headers()["etag"], "W/\"1\"");
        assert_eq!(body_of(first).await, b"{\"id\":\"p1\"}");
        let second = h1
            .read(&Method::GET, "Patient?name=x", &[], None)
            .await
            .expect("second");
        assert!(second.headers().get("transfer-encoding").is_none());
        assert_eq!(body_of(second).await, b"{\"a\":1}");
        let third = h1
            .read(
                &Method::GET,
                "Patient/p1",
                &[(
                    http::header::IF_NONE_MATCH,
                    HeaderValue::from_static("W/\"1\""),
                )],
                None,
            )
            .await
            .expect("third");
        assert_eq!(third.status(), StatusCode::NOT_MODIFIED);
        assert!(body_of(third).await.is_empty());
        let fourth = h1
            .read(&Method::GET, "Patient/none", &[], None)
            .await
            .expect("fourth");
        assert_eq!(fourth.status(), StatusCode::NOT_FOUND);
        assert_eq!(body_of(fourth).await, b"{}");
        // All four went over one connection; the last said close, so none is kept.
        let seen = server.await.expect("server");
        assert_eq!(seen.len(), 4);
        assert!(seen[0].starts_with("GET /fhir/Patient/p1 HTTP/1.1\r\n"));
        assert!(seen[0].contains(&format!("host: {address}\r\n")));
        assert!(seen[0].contains("authorization: Bearer t0k\r\n"));
        assert!(seen[1].starts_with("GET /fhir/Patient?name=x HTTP/1.1\r\n"));
        assert!(!seen[1].contains("authorization"));
        assert!(seen[2].contains("if-none-match: W/\"1\"\r\n"));
        assert!(h1.idle.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn a_closed_pooled_connection_is_replaced() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        tokio::spawn(async move {
            // Each connection answers one request and then closes without saying so.
            loop {
                let (mut socket, _) = listener.accept().await.expect("accept");
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                drop(socket);
            }
        });
        let h1 = client(&address);
        for _ in 0..3 {
            let answer = h1
                .read(&Method::GET, "metadata", &[], None)
                .await
                .expect("answer");
            assert_eq!(body_of(answer).await, b"ok");
        }
    }

    #[tokio::test]
    async fn broken_answers_are_errors_not_bodies() {
        let (address, _server) =
            server(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"]).await;
        let h1 = client(&address);
        let answer = h1
            .read(&Method::GET, "Patient/1", &[], None)
            .await
            .expect("head");
        // The server stops after five of ten bytes: the body fails instead of ending early.
        let body = answer.into_body().collect().await;
        assert!(body.is_err());
        let (address, _server) =
            server(vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"]).await;
        let Err(error) = client(&address)
            .read(&Method::GET, "Patient/1", &[], None)
            .await
        else {
            panic!("a transfer coding other than chunked was accepted");
        };
        assert!(error.to_string().contains("transfer coding"), "{error}");
    }
}
