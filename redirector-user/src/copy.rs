//! Copying bytes between two sockets (or a socket and an HBONE stream):
//! buffers that start small and grow for bulk transfers, the idle timeout,
//! and byte counts. It owns no connection and decides nothing about where
//! bytes go.

#![forbid(unsafe_code)]

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Run `copy` until it ends, or until nothing has moved for `idle` (by
/// `activity`, milliseconds since `epoch`): `Ok(None)`.
pub(crate) async fn until_idle<F, T>(
    copy: F,
    activity: &AtomicU64,
    epoch: Instant,
    idle: Duration,
) -> io::Result<Option<T>>
where
    F: std::future::Future<Output = io::Result<T>>,
{
    tokio::pin!(copy);
    loop {
        let last = Duration::from_millis(activity.load(Ordering::Relaxed));
        let idle_left = idle.saturating_sub(epoch.elapsed().saturating_sub(last));
        tokio::select! {
            r = &mut copy => return r.map(Some),
            () = tokio::time::sleep(idle_left) => {
                let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                if epoch.elapsed().saturating_sub(last) >= idle {
                    return Ok(None);
                }
            }
        }
    }
}

/// A connection starts with small copy buffers (most carry requests and
/// responses); one that keeps filling them, a bulk transfer, gets large
/// ones, so it crosses the proxy in fewer, larger reads and writes.
pub(crate) const SMALL_BUFFER: usize = 16 * 1024;
pub(crate) const LARGE_BUFFER: usize = 256 * 1024;
/// Consecutive reads that fill the small buffer before it grows.
pub(crate) const FULL_READS_TO_GROW: u32 = 4;

/// Copy until `from` ends, then half-close `to` (the other direction may
/// go on). Returns the bytes copied.
pub(crate) async fn copy_one_way<R, W>(mut from: R, mut to: W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Read into the buffer's spare capacity: nothing is zeroed first.
    let mut buf = Vec::with_capacity(SMALL_BUFFER);
    let mut full_reads = 0;
    let mut total = 0u64;
    loop {
        buf.clear();
        let n = from.read_buf(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(total);
        }
        to.write_all(&buf[..n]).await?;
        total += n as u64;
        if n == buf.capacity() && buf.capacity() < LARGE_BUFFER {
            full_reads += 1;
            if full_reads >= FULL_READS_TO_GROW {
                buf.reserve_exact(LARGE_BUFFER - buf.len());
            }
        } else {
            full_reads = 0;
        }
    }
}

/// One half of a stream that records the time of its last read or write,
/// for the idle timeout, and counts what it read (or, made with
/// `counting_writes`, what was written to it).
pub(crate) struct Tracked<T> {
    inner: T,
    activity: Arc<AtomicU64>,
    epoch: Instant,
    read_bytes: Arc<AtomicU64>,
    written_bytes: Option<Arc<AtomicU64>>,
    /// Set while waiting to retry a write the kernel refused with ENOMEM.
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Tracked<T> {
    pub(crate) fn new(inner: T, activity: Arc<AtomicU64>, epoch: Instant, read_bytes: Arc<AtomicU64>) -> Self {
        Tracked { inner, activity, epoch, read_bytes, written_bytes: None, retry: None }
    }
    pub(crate) fn counting_writes(inner: T, activity: Arc<AtomicU64>, epoch: Instant, written: Arc<AtomicU64>) -> Self {
        Tracked { written_bytes: Some(written), ..Tracked::new(inner, activity, epoch, Arc::default()) }
    }
    fn touch(&self) {
        self.activity.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read_bytes.fetch_add(n as u64, Ordering::Relaxed);
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            if let Some(sleep) = self.retry.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.retry = None;
            }
            let r = Pin::new(&mut self.inner).poll_write(cx, buf);
            match r {
                // The same-node shortcut (sockmap ingress redirect) has no
                // flow control: a receiver that falls behind makes the
                // kernel refuse the write with ENOMEM. Back off and retry,
                // as a full send buffer would have made us wait.
                Poll::Ready(Err(e)) if e.raw_os_error() == Some(libc::ENOMEM) => {
                    self.retry = Some(Box::pin(tokio::time::sleep(Duration::from_millis(1))));
                }
                Poll::Ready(Ok(n)) if n > 0 => {
                    if let Some(w) = &self.written_bytes {
                        w.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    self.touch();
                    return Poll::Ready(Ok(n));
                }
                other => return other,
            }
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
