//! Per-connection state: TCP_NODELAY, and noticing that an HTTP/1 client hung up while its
//! non-streamed request is still running.
//!
//! hyper does not read from a connection while the handler of its request runs, so a client that
//! closes the socket goes unnoticed until the response is written, and the worker would keep
//! generating for nobody. Each connection therefore keeps a duplicate of its socket handle (the
//! connect info), and [`ClientConn::closed`] polls it with a non-consuming `peek`: 0 bytes
//! readable means the peer closed its side.

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Clone, Debug)]
pub struct ClientConn {
    /// A duplicate handle of the client's socket (None if duplicating failed: never reports closed).
    socket: Option<Arc<std::net::TcpStream>>,
}

impl Connected<IncomingStream<'_, TcpListener>> for ClientConn {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        // Per-connection setup happens here too: without TCP_NODELAY, Nagle's algorithm holds small
        // SSE writes until the client's delayed ACK (~40 ms per response on Linux).
        let _ = stream.io().set_nodelay(true);
        #[cfg(unix)]
        let socket = {
            use std::os::fd::AsFd;
            stream.io().as_fd().try_clone_to_owned().ok().map(|fd| Arc::new(std::net::TcpStream::from(fd)))
        };
        #[cfg(not(unix))]
        let socket = {
            let _ = stream;
            None
        };
        Self { socket }
    }
}

impl ClientConn {
    /// Resolves once the client has closed the connection (checked every `every`).
    pub async fn closed(&self, every: Duration) {
        let Some(sock) = &self.socket else { return std::future::pending().await };
        // The duplicate shares the original's non-blocking mode (tokio sets it), so peek never blocks.
        let mut buf = [0u8; 1];
        loop {
            tokio::time::sleep(every).await;
            match sock.peek(&mut buf) {
                Ok(0) => return,
                Ok(_) => {} // the client sent more (a pipelined request): still there
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return, // reset or otherwise broken
            }
        }
    }

    /// For requests that did not come through the TCP listener (never reports closed).
    pub fn unknown() -> Self {
        Self { socket: None }
    }
}
