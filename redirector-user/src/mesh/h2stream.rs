//! One HBONE stream (an HTTP/2 CONNECT stream) as a byte stream the proxy
//! copies to and from, on the h2 crate directly: hyper's upgrade machinery
//! costs a task, a channel and two boxes per tunnel, which shows at
//! thousands of new connections a second.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Both halves of a CONNECT stream.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read.
    pending: Bytes,
    /// END_STREAM sent.
    shut: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> H2Stream {
        H2Stream { send, recv, pending: Bytes::new(), shut: false }
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().expect("an I/O error")
    } else {
        io::Error::other(e)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                // END_STREAM: the peer's side is done.
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => {
                    // The window opens again as soon as the bytes are ours:
                    // the copy's buffer, not h2's, bounds what is held.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
                Some(Err(e)) => {
                    return Poll::Ready(match e.reason() {
                        // A peer that cancels or ends cleanly ends the stream.
                        Some(Reason::NO_ERROR) | Some(Reason::CANCEL) => Ok(()),
                        _ => Err(to_io(e)),
                    })
                }
            }
        }
        let n = buf.remaining().min(this.pending.len());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl H2Stream {
    /// The error for a stream that can no longer send.
    fn poll_send_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        Poll::Ready(match ready!(self.send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR) | Ok(Reason::CANCEL) | Ok(Reason::STREAM_CLOSED) => io::ErrorKind::BrokenPipe.into(),
            Ok(reason) => io::Error::other(h2::Error::from(reason)),
            Err(e) => to_io(e),
        })
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        // Ask for room for the whole write; take what the peer's window
        // gives now.
        this.send.reserve_capacity(buf.len());
        loop {
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(room)) => {
                    let n = room.min(buf.len());
                    return match this.send.send_data(Bytes::copy_from_slice(&buf[..n]), false) {
                        Ok(()) => Poll::Ready(Ok(n)),
                        Err(_) => this.poll_send_error(cx).map(Err),
                    };
                }
                None | Some(Err(_)) => return this.poll_send_error(cx).map(Err),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes frames as the connection task gets to them.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.shut {
            return Poll::Ready(Ok(()));
        }
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => {
                this.shut = true;
                Poll::Ready(Ok(()))
            }
            Err(_) => match ready!(this.send.poll_reset(cx)) {
                Ok(Reason::NO_ERROR) => Poll::Ready(Ok(())),
                Ok(_) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Err(e) => Poll::Ready(Err(to_io(e))),
            },
        }
    }
}

/// HTTP/2 keep-alive: a PING every `interval`; a connection whose peer
/// does not answer within `timeout` is ended (`dead` is notified).
pub async fn keep_alive(mut ping_pong: h2::PingPong, interval: Duration, timeout: Duration, dead: Arc<Notify>) {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            // The connection is gone already: its task ends by itself.
            Ok(Err(_)) => return,
            Err(_) => {
                dead.notify_one();
                return;
            }
        }
    }
}
