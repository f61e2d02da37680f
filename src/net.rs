//! Connections that can be ended from outside.
//!
//! [`Listener`] wraps the gateway's TCP listener so that every connection carries a
//! [`Connection`] handle in the request's `ConnectInfo`, which engine.io keeps in the socket's
//! request parts. The slow-consumer sweep (`deliver::slow`) kills the connection of a socket
//! that stopped reading: its reads and writes fail, engine.io ends the session (dropping its
//! queue) and the client sees the connection close.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The gateway's TCP listener, handing out connections that [`Connection::kill`] can end.
pub struct Listener(TcpListener);

impl Listener {
    pub fn new(listener: TcpListener) -> Self {
        Listener(listener)
    }
}

impl axum::serve::Listener for Listener {
    type Io = KillableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.0).await;
        let stream = KillableStream {
            inner: stream,
            switch: Connection {
                switch: Arc::new(Switch::default()),
                peer: addr,
            },
        };
        (stream, addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// One accepted connection, as request `ConnectInfo`: its peer and the switch that ends it.
#[derive(Clone, Debug)]
pub struct Connection {
    switch: Arc<Switch>,
    pub peer: SocketAddr,
}

#[derive(Debug, Default)]
struct Switch {
    killed: AtomicBool,
    reader: AtomicWaker,
    writer: AtomicWaker,
}

impl Connection {
    /// Every read and write of the connection fails from now on, including one already waiting
    /// for a peer that does not read: the tasks serving it end and drop it.
    pub fn kill(&self) {
        self.switch.killed.store(true, Ordering::Release);
        self.switch.reader.wake();
        self.switch.writer.wake();
    }
}

impl Connected<IncomingStream<'_, Listener>> for Connection {
    fn connect_info(stream: IncomingStream<'_, Listener>) -> Self {
        stream.io().switch.clone()
    }
}

/// A TCP stream whose reads and writes fail once its [`Connection`] is killed.
pub struct KillableStream {
    inner: TcpStream,
    switch: Connection,
}

impl KillableStream {
    /// Registers the waker first, so a kill between the check and the wait is not missed.
    fn killed(&self, waker: &AtomicWaker, cx: &Context<'_>) -> bool {
        waker.register(cx.waker());
        self.switch.switch.killed.load(Ordering::Acquire)
    }
}

fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "closed: the client stopped reading",
    )
}

impl AsyncRead for KillableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.killed(&this.switch.switch.reader, cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.killed(&this.switch.switch.writer, cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.killed(&this.switch.switch.writer, cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.killed(&this.switch.switch.writer, cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A write blocked on a peer that does not read fails as soon as the connection is killed.
    #[tokio::test]
    async fn kill_ends_a_blocked_write() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = Listener::new(tcp);
        let _peer = TcpStream::connect(addr).await.unwrap(); // never reads
        let (mut stream, _) = axum::serve::Listener::accept(&mut listener).await;
        let conn = stream.switch.clone();
        let writer = tokio::spawn(async move {
            let chunk = vec![0u8; 1 << 20];
            loop {
                stream.write_all(&chunk).await?;
            }
            #[allow(unreachable_code)]
            Ok::<(), io::Error>(())
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !writer.is_finished(),
            "the write should be waiting on the peer"
        );
        conn.kill();
        let err = tokio::time::timeout(Duration::from_secs(2), writer)
            .await
            .expect("kill did not wake the blocked write")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }

    #[tokio::test]
    async fn kill_ends_reads() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = Listener::new(tcp);
        let _peer = TcpStream::connect(addr).await.unwrap(); // never writes
        let (mut stream, _) = axum::serve::Listener::accept(&mut listener).await;
        let conn = stream.switch.clone();
        let reader = tokio::spawn(async move { stream.read(&mut [0u8; 16]).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        conn.kill();
        let res = tokio::time::timeout(Duration::from_secs(2), reader)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(res.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
    }
}
