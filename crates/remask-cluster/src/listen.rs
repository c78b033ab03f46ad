//! Accepting connections on the gRPC and HTTP ports, so that clients that
//! connect and then stall cannot hold the server:
//!
//! - the accept loop never waits on a client: each connection gets its own
//!   task for the TLS handshake and its first bytes;
//! - a connection has `header_timeout` from the accept to finish its TLS
//!   handshake and send its first bytes (all of the HTTP/2 preface; on the
//!   HTTP port, the first byte of an HTTP/1 request, after which hyper's own
//!   header read timeout runs for every request head);
//! - at most `max_connections` are open per listener; beyond, new ones are
//!   closed at once (a plain HTTP port answers 503 first, a plain gRPC port
//!   an HTTP/2 GOAWAY; over TLS there is no handshake to spend on them);
//! - accept errors back off (10 ms, doubling to 100 ms) instead of retrying
//!   at once: at the descriptor limit (EMFILE) the connection stays queued
//!   and an immediate retry fails again, which spins a core.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;

/// Default of `--header-timeout-s`: hyper's is 30 s; a legitimate client
/// sends its request head well within 10.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// HTTP/2 keep-alive pings: a peer that stops answering for
/// `header_timeout` after one is disconnected (half-open connections).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// What a plain gRPC connection beyond the limit reads before the close: the
/// server's HTTP/2 preface (an empty SETTINGS frame) and a GOAWAY with no
/// stream processed, ENHANCE_YOUR_CALM and a reason, so that an HTTP/2
/// client reports why instead of a reset.
const GOAWAY: &[u8] = &{
    const REASON: &[u8] = b"too many open connections";
    const PAYLOAD: usize = 8 + REASON.len();
    let mut f = [0u8; 9 + 9 + PAYLOAD];
    // SETTINGS: length 0, type 0x4, flags 0, stream 0.
    f[3] = 0x4;
    // GOAWAY: length, type 0x7, flags 0, stream 0; last stream 0, error 0xb.
    f[9] = (PAYLOAD >> 16) as u8;
    f[10] = (PAYLOAD >> 8) as u8;
    f[11] = PAYLOAD as u8;
    f[12] = 0x7;
    f[9 + 9 + 7] = 0xb;
    let mut i = 0;
    while i < REASON.len() {
        f[9 + 9 + 8 + i] = REASON[i];
        i += 1;
    }
    f
};

/// Connections refused at the limit that get their 503 at the same time, at
/// most; beyond, they are closed without one.
const MAX_REFUSING: usize = 64;
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
connection: close\r\ncontent-length: 95\r\n\r\n\
{\"error\":{\"message\":\"too many open connections\",\"type\":\"server_error\",\"param\":null,\"code\":503}}";

/// What a listener tolerates from its clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// From the accept to the end of the TLS handshake and the first bytes
    /// of a request; also the limit on each HTTP/1 request head and on the
    /// answer to an HTTP/2 keep-alive ping.
    pub header_timeout: Duration,
    /// Open connections per listener at most.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// The next connection. Errors do not end the loop and are retried after a
/// pause that grows from 10 ms to 100 ms while they last (see the module doc).
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    let mut pause = Duration::from_millis(10);
    let mut failures = 0u64;
    loop {
        match listener.accept().await {
            Ok(conn) => {
                if failures > 0 {
                    tracing::info!(failures, "accepting again");
                }
                return conn;
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(error = %e, "accept failed; backing off while it fails");
                } else {
                    tracing::debug!(error = %e, "accept failed");
                }
                failures += 1;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        }
    }
}

/// A TCP connection, in the clear or TLS.
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection after its first bytes: they are read ahead to
/// tell HTTP/2 from HTTP/1 and replayed to the server. Holds the
/// listener's connection slot until it is dropped.
pub struct Conn {
    io: Io,
    ahead: Vec<u8>,
    pos: usize,
    local: Option<SocketAddr>,
    remote: SocketAddr,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.ahead.len() {
            let n = (this.ahead.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.ahead[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.ahead.len() {
                this.ahead = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.local,
            remote_addr: Some(self.remote),
        }
    }
}

/// Reads until the bytes are the whole HTTP/2 preface or depart from it:
/// (the bytes, whether they are the preface). The end of the stream first is
/// an error.
async fn read_preface(io: &mut Io) -> io::Result<(Vec<u8>, bool)> {
    let mut ahead = Vec::with_capacity(H2_PREFACE.len());
    let mut chunk = [0u8; 24];
    loop {
        let n = io
            .read(&mut chunk[..H2_PREFACE.len() - ahead.len()])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        ahead.extend_from_slice(&chunk[..n]);
        if ahead[..] != H2_PREFACE[..ahead.len()] {
            return Ok((ahead, false));
        }
        if ahead.len() == H2_PREFACE.len() {
            return Ok((ahead, true));
        }
    }
}

/// The TLS handshake (with `tls`) and the first bytes, within the header
/// timeout of the accept: (the connection, whether it speaks HTTP/2).
async fn open(
    stream: TcpStream,
    remote: SocketAddr,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    slot: OwnedSemaphorePermit,
) -> Result<(Conn, bool), String> {
    let local = stream.local_addr().ok();
    let opening = async {
        let mut io = match tls {
            Some(acceptor) => Io::Tls(Box::new(
                acceptor
                    .accept(stream)
                    .await
                    .map_err(|e| format!("TLS handshake failed: {e}"))?,
            )),
            None => Io::Plain(stream),
        };
        let (ahead, h2) = read_preface(&mut io)
            .await
            .map_err(|e| format!("closed before a request: {e}"))?;
        Ok::<_, String>((io, ahead, h2))
    };
    let (io, ahead, h2) = tokio::time::timeout(limits.header_timeout, opening)
        .await
        .map_err(|_| {
            format!(
                "no request within the header timeout ({:?})",
                limits.header_timeout
            )
        })??;
    Ok((
        Conn {
            io,
            ahead,
            pos: 0,
            local,
            remote,
            _slot: slot,
        },
        h2,
    ))
}

/// The gRPC port's connections for tonic's `serve_with_incoming`: only those
/// that sent the HTTP/2 preface in time (TLS already done with `tls`).
/// Accepting stops when tonic drops the stream.
pub fn grpc_incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    limits: Limits,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tls.map(TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    tokio::spawn(async move {
        loop {
            let (stream, remote) = tokio::select! {
                conn = accept(&listener) => conn,
                _ = tx.closed() => return,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%remote, limit = limits.max_connections, "gRPC connection refused: too many open connections");
                if acceptor.is_none() {
                    refuse(stream, GOAWAY, &refusing);
                }
                continue;
            };
            // A step is a chain of small request/response exchanges: delayed
            // ACKs would add ~40 ms to each.
            let _ = stream.set_nodelay(true);
            let tx = tx.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match open(stream, remote, acceptor, limits, slot).await {
                    Ok((conn, true)) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok((_, false)) => {
                        tracing::debug!(%remote, "gRPC connection closed: not HTTP/2")
                    }
                    Err(e) => tracing::debug!(%remote, "gRPC connection closed: {e}"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Serves `router` (HTTP/1.1 and HTTP/2, over TLS with `tls`) on `listener`
/// until `shutdown` resolves, then waits for the open connections.
pub async fn serve_http(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    limits: Limits,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let acceptor = tls.map(TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            conn = accept(&listener) => conn,
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, limit = limits.max_connections, "HTTP connection refused: too many open connections");
            if acceptor.is_none() {
                refuse(stream, BUSY, &refusing);
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        let router = router.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let (conn, h2) = match open(stream, remote, acceptor, limits, slot).await {
                Ok(opened) => opened,
                Err(e) => {
                    tracing::debug!(%remote, "HTTP connection closed: {e}");
                    return;
                }
            };
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(KEEPALIVE_INTERVAL))
                .keep_alive_timeout(limits.header_timeout);
            let builder = if h2 {
                builder.http2_only()
            } else {
                builder.http1_only()
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let served = builder.serve_connection(TokioIo::new(conn), service);
            if let Err(e) = watcher.watch(served).await {
                tracing::debug!(%remote, error = %e, "HTTP connection ended");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The refusal of a connection beyond the limit (a 503, a GOAWAY), in its
/// own task (a second or less): written, then the request is drained until
/// the client closes, so the client reads the answer instead of a reset.
fn refuse(mut stream: TcpStream, answer: &'static [u8], refusing: &Arc<Semaphore>) {
    let Ok(permit) = refusing.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let answer = async {
            stream.write_all(answer).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 1024];
            while stream.read(&mut sink).await? > 0 {}
            io::Result::Ok(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goaway_is_two_frames() {
        // SETTINGS: 9 bytes, empty.
        assert_eq!(&GOAWAY[..9], &[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        let len = u32::from_be_bytes([0, GOAWAY[9], GOAWAY[10], GOAWAY[11]]) as usize;
        assert_eq!((GOAWAY[12], len), (7, GOAWAY.len() - 18));
        assert_eq!(&GOAWAY[18..26], &[0, 0, 0, 0, 0, 0, 0, 0xb]);
        assert_eq!(&GOAWAY[26..], b"too many open connections");
    }

    #[test]
    fn busy_answer_has_its_length() {
        let text = std::str::from_utf8(BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }
}
