//! A TCP listener that caps open connections.
//!
//! Each accepted connection holds a semaphore permit until it closes; when all permits are out,
//! `accept` waits, so excess clients queue in the kernel's backlog instead of exhausting memory
//! or file descriptors.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct CappedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
}

impl CappedListener {
    pub fn new(inner: TcpListener, max_connections: usize) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(max_connections.max(1))),
        }
    }
}

/// A connection and the permit it holds.
pub struct CappedStream {
    stream: TcpStream,
    slot: Slot,
}

/// A connection's place among the open ones: given back (and counted) when dropped.
struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!("fhirgate_http_open_connections").decrement(1.0);
    }
}

/// A connection on its way to the thread that will serve it: detached from the event loop
/// that accepted it, still holding its place.
pub struct Handoff {
    stream: std::net::TcpStream,
    slot: Slot,
}

impl CappedStream {
    pub fn handoff(self) -> io::Result<Handoff> {
        Ok(Handoff {
            stream: self.stream.into_std()?,
            slot: self.slot,
        })
    }
}

impl Handoff {
    /// The connection registered with the event loop of the calling thread.
    pub fn into_stream(self) -> io::Result<CappedStream> {
        Ok(CappedStream {
            stream: TcpStream::from_std(self.stream)?,
            slot: self.slot,
        })
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = CappedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok(permit) = self.permits.clone().acquire_owned().await else {
                // The semaphore is never closed; wait for the next connection anyway.
                continue;
            };
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    metrics::gauge!("fhirgate_http_open_connections").increment(1.0);
                    return (
                        CappedStream {
                            stream,
                            slot: Slot { _permit: permit },
                        },
                        addr,
                    );
                }
                Err(e) => {
                    // Out of file descriptors and similar: back off briefly, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    drop(permit);
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Who is at the other end of a request's connection, in the request's extensions.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The SHA-256 (hex) of the verified TLS client certificate, if one was presented.
    pub client_cert: Option<String>,
}

/// The HTTP/2 connection preface.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl CappedStream {
    /// Waits until the client has sent enough to tell HTTP/1 from HTTP/2, without consuming
    /// it; `false` when the client closed or sent nothing usable in time. (The protocol
    /// sniffing of the HTTP server has no time limit of its own.)
    pub async fn first_bytes(&self, within: std::time::Duration) -> bool {
        let waited = tokio::time::timeout(within, async {
            let mut buf = [0u8; 24];
            loop {
                let n = self.stream.peek(&mut buf).await.ok()?;
                if n == 0 {
                    return None;
                }
                // Enough to decide: a full preface, or bytes that cannot begin one.
                if n >= H2_PREFACE.len() || buf[..n] != H2_PREFACE[..n] {
                    return Some(());
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await;
        matches!(waited, Ok(Some(())))
    }
}

/// A connection whose client must send its first `needed` bytes before a deadline (an HTTP/2
/// client its connection preface); after that, reads pass straight through.
pub struct FirstBytesDeadline<I> {
    inner: I,
    needed: usize,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> FirstBytesDeadline<I> {
    pub fn new(inner: I, needed: usize, within: std::time::Duration) -> Self {
        Self {
            inner,
            needed,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FirstBytesDeadline<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(deadline) = this.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client did not start in time",
                )));
            }
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.deadline.is_some() {
            let read = buf.filled().len() - before;
            this.needed = this.needed.saturating_sub(read);
            if this.needed == 0 {
                this.deadline = None;
            }
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FirstBytesDeadline<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl AsyncRead for CappedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
