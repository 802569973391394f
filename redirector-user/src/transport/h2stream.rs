//! One HBONE stream (an HTTP/2 CONNECT stream) as a byte stream the proxy
//! copies to and from, on the h2 crate directly: hyper's upgrade machinery
//! costs a task, a channel and two boxes per tunnel, which shows at
//! thousands of new connections a second.

#![forbid(unsafe_code)]

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;

use crate::copy::{FULL_READS_TO_GROW, LARGE_BUFFER, SMALL_BUFFER};

/// Both halves of a CONNECT stream.
pub struct H2Stream {
    reader: H2Reader,
    writer: H2Writer,
}

/// What the peer sends on a stream.
pub struct H2Reader {
    recv: RecvStream,
    /// Received and not yet read (the byte-stream view of [`H2Stream`]).
    pending: Bytes,
}

/// What we send on a stream.
pub struct H2Writer {
    send: SendStream<Bytes>,
    /// END_STREAM sent.
    shut: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> H2Stream {
        H2Stream { reader: H2Reader { recv, pending: Bytes::new() }, writer: H2Writer { send, shut: false } }
    }

    /// The two directions, to be driven at once.
    pub fn into_split(self) -> (H2Reader, H2Writer) {
        (self.reader, self.writer)
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().expect("an I/O error")
    } else {
        io::Error::other(e)
    }
}

impl H2Reader {
    /// Give the peer back `n` bytes of window: called once they are written
    /// onward (or handed to the reader), so a slow reader on our side
    /// slows the peer instead of filling the proxy's memory.
    fn release(&mut self, n: usize) {
        let _ = self.recv.flow_control().release_capacity(n);
    }

    /// The next DATA the peer sent (its window not yet given back, see
    /// [`H2Reader::release`]); `None` once it has ended its side.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        loop {
            let next = match ready!(self.recv.poll_data(cx)) {
                // END_STREAM: the peer's side is done.
                None => Ok(None),
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => Ok(Some(data)),
                Some(Err(e)) => match e.reason() {
                    // A peer that cancels or ends cleanly ends the stream.
                    Some(Reason::NO_ERROR | Reason::CANCEL) => Ok(None),
                    _ => Err(to_io(e)),
                },
            };
            return Poll::Ready(next);
        }
    }
}

impl H2Writer {
    /// The error for a stream that can no longer send.
    fn poll_send_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        Poll::Ready(match ready!(self.send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED) => io::ErrorKind::BrokenPipe.into(),
            Ok(reason) => io::Error::other(h2::Error::from(reason)),
            Err(e) => to_io(e),
        })
    }

    /// Send all of `data` as the peer's window allows, without copying it:
    /// what has been handed to h2 is split off the front of `data`, so a
    /// pending call resumes where it stopped.
    fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        while !data.is_empty() {
            // Ask for room for all of it; take what the window gives now.
            self.send.reserve_capacity(data.len());
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(room)) => {
                    let part = data.split_to(room.min(data.len()));
                    if self.send.send_data(part, false).is_err() {
                        return self.poll_send_error(cx).map(Err);
                    }
                }
                None | Some(Err(_)) => return self.poll_send_error(cx).map(Err),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// End our side (END_STREAM).
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.shut {
            return Poll::Ready(Ok(()));
        }
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => {
                self.shut = true;
                Poll::Ready(Ok(()))
            }
            Err(_) => match ready!(self.send.poll_reset(cx)) {
                Ok(Reason::NO_ERROR) => Poll::Ready(Ok(())),
                Ok(_) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Err(e) => Poll::Ready(Err(to_io(e))),
            },
        }
    }
}

/// The stream as a byte stream, for a client that speaks a protocol over it
/// (the L7 path's HTTP client): reads hand out what the peer sent, writes
/// send as the peer's window allows, shutdown ends our side.
impl AsyncRead for H2Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let reader = &mut self.reader;
        if reader.pending.is_empty() {
            match ready!(reader.poll_chunk(cx))? {
                Some(data) => reader.pending = data,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = reader.pending.len().min(buf.remaining());
        buf.put_slice(&reader.pending.split_to(n));
        reader.release(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let writer = &mut self.writer;
        writer.send.reserve_capacity(buf.len());
        loop {
            match ready!(writer.send.poll_capacity(cx)) {
                Some(Ok(0)) => {}
                Some(Ok(room)) => {
                    let n = room.min(buf.len());
                    if writer.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).is_err() {
                        return writer.poll_send_error(cx).map(Err);
                    }
                    return Poll::Ready(Ok(n));
                }
                None | Some(Err(_)) => return writer.poll_send_error(cx).map(Err),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 sends what it was handed as the connection task writes.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.writer.poll_end(cx)
    }
}

/// Copy `from` into the stream until `from` ends, then end the stream.
/// Bytes are read straight into buffers h2 sends from (no copy into
/// frames); buffers start small and grow for a bulk transfer, as the
/// proxy's other copies do. Returns the bytes copied.
pub async fn copy_into<R: AsyncRead + Unpin>(mut from: R, to: &mut H2Writer) -> io::Result<u64> {
    let mut size = SMALL_BUFFER;
    let mut buf = BytesMut::new();
    let mut full_reads = 0;
    let mut total = 0u64;
    loop {
        // Reuses the allocation once h2 has written what was read into it.
        buf.reserve(size);
        let room = buf.capacity();
        let n = from.read_buf(&mut buf).await?;
        if n == 0 {
            return std::future::poll_fn(|cx| to.poll_end(cx)).await.map(|()| total);
        }
        let mut chunk = buf.split().freeze();
        std::future::poll_fn(|cx| to.poll_send(cx, &mut chunk)).await?;
        total += n as u64;
        if n == room && size < LARGE_BUFFER {
            full_reads += 1;
            if full_reads >= FULL_READS_TO_GROW {
                size = LARGE_BUFFER;
            }
        } else {
            full_reads = 0;
        }
    }
}

/// Copy the stream into `to` until the peer ends it, then half-close
/// `to`. Each DATA frame is written as h2 received it (no copy through a
/// buffer of ours). Returns the bytes copied.
pub async fn copy_out<W: AsyncWrite + Unpin>(from: &mut H2Reader, mut to: W) -> io::Result<u64> {
    let mut total = 0u64;
    while let Some(data) = std::future::poll_fn(|cx| from.poll_chunk(cx)).await? {
        to.write_all(&data).await?;
        from.release(data.len());
        total += data.len() as u64;
    }
    to.shutdown().await?;
    Ok(total)
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
