//! What the kernel knows about a connection's bytes. `Counted` wraps an accepted TCP
//! stream (beneath TLS, if any) and counts the bytes handed to the kernel; `Wire` keeps
//! that count with the socket's fd, so a session can ask how many of them the client's
//! TCP stack has acknowledged (Linux `SIOCOUTQ`: bytes in the send queue not yet
//! acknowledged). The legacy dialects cannot acknowledge messages themselves: for them a
//! message counts as received only once those bytes were acknowledged.
//!
//! `Wire` also counts the bytes read and can hold a connection to a read budget: a
//! WebSocket in password mode that has not logged in yet may send only
//! `[limits] prelogin_bytes` (a login frame's worth); past it every read fails, so a
//! client that sends a huge login frame costs the server that budget, not the frame.
//!
//! `ReadAhead` sits between tungstenite and the upgraded socket: tungstenite reads at most
//! `[websocket] read_buffer_bytes` per call (and keeps a buffer that large per
//! connection, idle or not), so a small buffer would mean a syscall per small piece of a
//! large frame. `ReadAhead` reads the socket in pieces of `[websocket] read_ahead_bytes`
//! and gives that buffer back as soon as the socket is drained.

use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One accepted connection's byte count and fd.
#[derive(Debug)]
pub struct Wire {
    fd: RawFd,
    written: AtomicU64,
    read: AtomicU64,
    /// Reads fail once `read` reached this (`u64::MAX`: no budget).
    read_limit: AtomicU64,
}

/// The error a read gets once the connection spent its read budget.
#[derive(Debug, thiserror::Error)]
#[error("read budget spent: more bytes before login than [limits] prelogin_bytes")]
pub struct ReadBudgetSpent;

impl Wire {
    /// Bytes handed to the kernel so far (TLS records included: on a TLS connection these
    /// are ciphertext bytes, the same ones TCP acknowledges).
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// From now on, at most about `bytes` more may be read (one read of the reader's
    /// buffer may overshoot it); then reads fail with `ReadBudgetSpent`.
    pub fn limit_reads(&self, bytes: u64) {
        let read = self.read.load(Ordering::Acquire);
        self.read_limit
            .store(read.saturating_add(bytes), Ordering::Release);
    }

    /// Lifts the read budget (the client logged in).
    pub fn unlimit_reads(&self) {
        self.read_limit.store(u64::MAX, Ordering::Release);
    }

    /// Whether a read budget is set (not lifted yet).
    pub fn reads_limited(&self) -> bool {
        self.read_limit.load(Ordering::Acquire) != u64::MAX
    }

    /// Whether reads fail because the budget is spent.
    pub fn read_budget_spent(&self) -> bool {
        self.read.load(Ordering::Acquire) >= self.read_limit.load(Ordering::Acquire)
    }

    /// How many of the bytes handed to the kernel the peer's TCP has acknowledged; `None`
    /// when the kernel cannot tell (then nothing may be counted as received).
    ///
    /// Only to be called while the socket is open (the caller holds a half of the stream
    /// this `Wire` was made for), or the fd may already name another file.
    pub fn acked(&self) -> Option<u64> {
        // The count first: bytes written between the two reads then make the answer
        // smaller, never larger, than the truth.
        let written = self.written();
        let unacked = unacked_bytes(self.fd)?;
        written.checked_sub(unacked)
    }
}

/// Bytes in the socket's send queue that the peer has not acknowledged yet.
#[cfg(target_os = "linux")]
fn unacked_bytes(fd: RawFd) -> Option<u64> {
    let mut n: libc::c_int = 0;
    // SIOCOUTQ is TIOCOUTQ's number on sockets (linux/sockios.h).
    // SAFETY: it writes one c_int through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    if rc != 0 || n < 0 {
        return None;
    }
    Some(n as u64)
}

/// Elsewhere the kernel is not asked: everything handed to it counts as acknowledged
/// (a flushed legacy message counts as received, as before `SIOCOUTQ` was used).
#[cfg(not(target_os = "linux"))]
fn unacked_bytes(_fd: RawFd) -> Option<u64> {
    Some(0)
}

/// A stream that counts the bytes it writes into `Wire`.
pub struct Counted<S> {
    inner: S,
    wire: Arc<Wire>,
}

impl<S: std::os::fd::AsRawFd> Counted<S> {
    pub fn new(inner: S) -> Counted<S> {
        let wire = Arc::new(Wire {
            fd: inner.as_raw_fd(),
            written: AtomicU64::new(0),
            read: AtomicU64::new(0),
            read_limit: AtomicU64::new(u64::MAX),
        });
        Counted { inner, wire }
    }
}

impl<S> Counted<S> {
    pub fn wire(&self) -> Arc<Wire> {
        self.wire.clone()
    }

    fn count(&self, r: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = r {
            self.wire.written.fetch_add(*n as u64, Ordering::AcqRel);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.wire.read_budget_spent() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                ReadBudgetSpent,
            )));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let n = buf.filled().len().saturating_sub(before);
            self.wire.read.fetch_add(n as u64, Ordering::AcqRel);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.count(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.count(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A stream whose small reads are served from one large read of the socket (see the
/// module doc). Idle, it holds no buffer.
pub struct ReadAhead<S> {
    inner: S,
    /// Bytes read from `inner` and not yet taken: `ahead[pos..]`. Allocated when the
    /// caller asks for bytes, freed once the socket is drained (idle: unallocated).
    ahead: Vec<u8>,
    pos: usize,
    /// How much to read at once while reading ahead.
    chunk: usize,
    /// While the connection has a read budget (before login), reads are not made larger
    /// than the caller's, so the budget is overshot by no more than before.
    wire: Option<Arc<Wire>>,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S, chunk: usize, wire: Option<Arc<Wire>>) -> ReadAhead<S> {
        ReadAhead {
            inner,
            ahead: Vec::new(),
            pos: 0,
            chunk,
            wire,
        }
    }

    /// Gives the read-ahead buffer back (nothing is waiting in it).
    fn release(&mut self) {
        self.ahead = Vec::new();
        self.pos = 0;
    }

    /// Copies what was read ahead into `buf`; `false` when nothing was waiting.
    fn take_ahead(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let waiting = &self.ahead[self.pos.min(self.ahead.len())..];
        if waiting.is_empty() {
            return false;
        }
        let n = waiting.len().min(buf.remaining());
        buf.put_slice(&waiting[..n]);
        self.pos += n;
        true
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.take_ahead(buf) {
            return Poll::Ready(Ok(()));
        }
        let wanted = buf.remaining();
        let limited = this.wire.as_ref().is_some_and(|w| w.reads_limited());
        if wanted >= this.chunk || limited {
            // Straight into the caller's buffer.
            this.release();
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        // Whatever the socket holds, in one read (a flood of small frames too, so that
        // the kernel's queue is drained as before the read buffer was made small).
        this.ahead.clear();
        this.ahead.reserve(this.chunk);
        this.pos = 0;
        // Not zero-filled first (it is allocated at every wake-up of a session): only
        // what the read filled counts.
        let spare = this.ahead.spare_capacity_mut();
        let room = spare.len().min(this.chunk);
        let mut ahead = ReadBuf::uninit(&mut spare[..room]);
        match Pin::new(&mut this.inner).poll_read(cx, &mut ahead) {
            Poll::Ready(Ok(())) => {
                let n = ahead.filled().len();
                if n == 0 {
                    this.release(); // the end of the stream
                    return Poll::Ready(Ok(()));
                }
                // SAFETY: `ReadBuf` guarantees its first `filled().len()` bytes, the start
                // of `ahead`'s spare capacity, were initialized by the read.
                unsafe { this.ahead.set_len(n) };
                this.take_ahead(buf);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                this.release();
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                // Drained: the connection is idle again and holds no buffer.
                this.release();
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes the peer's kernel took count as acknowledged; bytes stuck in our send queue
    /// (the peer does not read and its buffer is full) do not.
    #[tokio::test]
    async fn acked_counts_only_what_the_peer_took() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut peer = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        let mut s = Counted::new(socket);
        let wire = s.wire();
        s.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        peer.read_exact(&mut buf).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(wire.acked(), Some(5));
        // Fill both buffers.
        let chunk = vec![0u8; 64 * 1024];
        while tokio::time::timeout(std::time::Duration::from_millis(100), s.write(&chunk))
            .await
            .is_ok()
        {}
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let acked = wire.acked().unwrap();
        assert!(
            acked > 5 && acked < wire.written(),
            "{acked} of {}",
            wire.written()
        );
    }

    /// Past the read budget reads fail (overshooting by at most one read); lifted, they
    /// go on.
    #[tokio::test]
    async fn read_budget_stops_reads_until_lifted() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut peer = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        let mut s = Counted::new(socket);
        let wire = s.wire();
        peer.write_all(&[7u8; 64 * 1024]).await.unwrap();
        wire.limit_reads(4096);
        let mut got = 0usize;
        let mut buf = [0u8; 1024];
        let err = loop {
            match s.read(&mut buf).await {
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        assert!((4096..4096 + 1024).contains(&got), "{got} bytes read");
        assert!(wire.read_budget_spent());
        assert!(
            err.get_ref().is_some_and(|e| e.is::<ReadBudgetSpent>()),
            "{err}"
        );
        wire.unlimit_reads();
        assert!(!wire.read_budget_spent());
        s.read_exact(&mut buf).await.unwrap();
    }

    /// Small reads of a large write come from one read ahead, in order, and the buffer
    /// is given back once the socket is drained.
    #[tokio::test]
    async fn read_ahead_serves_small_reads_and_lets_go_when_drained() {
        let (mut peer, socket) = tokio::io::duplex(1 << 20);
        let mut s = ReadAhead::new(socket, 64 * 1024, None);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&data).await.unwrap();
        let mut got = Vec::new();
        let mut piece = [0u8; 1000];
        while got.len() < data.len() {
            let n = s.read(&mut piece).await.unwrap();
            got.extend_from_slice(&piece[..n]);
        }
        assert_eq!(got, data);
        assert!(
            s.ahead.capacity() > 0,
            "reads ahead while data keeps coming"
        );
        // Drained: the next read waits, and waiting holds no buffer.
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), s.read(&mut piece)).await;
        assert!(waiting.is_err());
        assert_eq!(s.ahead.capacity(), 0);
        peer.write_all(b"after").await.unwrap();
        let n = s.read(&mut piece).await.unwrap();
        assert_eq!(&piece[..n], b"after");
    }
}
