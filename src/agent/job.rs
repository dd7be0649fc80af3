//! One exec as the agent keeps it across hub connections: its output in a bounded buffer with
//! absolute offsets (stdout and stderr counted together, in the order written), its exit once
//! known, and the sender that streams both to the hub from any offset (`exec` starts at 0,
//! `attach` resumes where the hub says).
//!
//! While a sender is attached, a full buffer slows the job down (the pipe fills), exactly as
//! without a buffer: output is never dropped under a reader. While nobody reads (the connection
//! is down), the oldest bytes make room and the next `attached` says how many were dropped.
//! This module owns no process and no socket: `exec` writes into it, the session reads from it.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::protocol::{
    AgentMessage, ExecReport, ExitStatus, OUTPUT_CHUNK_BYTES, Stream, encode_output,
};

/// Output kept per exec for a hub that reconnects or a client that re-attaches.
pub const BUFFER_BYTES: usize = 8 * 1024 * 1024;

struct Chunk {
    start: u64,
    stream: Stream,
    data: Vec<u8>,
}

/// The last `cap` bytes of an exec's output, by absolute offset.
pub struct Output {
    chunks: VecDeque<Chunk>,
    first: u64,
    next: u64,
    cap: usize,
}

impl Output {
    /// An empty buffer holding at most `cap` bytes.
    pub fn new(cap: usize) -> Output {
        Output {
            chunks: VecDeque::new(),
            first: 0,
            next: 0,
            cap: cap.max(OUTPUT_CHUNK_BYTES),
        }
    }

    /// Offset of the oldest byte held.
    pub fn first(&self) -> u64 {
        self.first
    }

    /// Offset of the next byte to be written.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// How many bytes the oldest ones must make room for if `n` more arrive.
    fn excess(&self, n: usize) -> u64 {
        ((self.next - self.first) as usize + n).saturating_sub(self.cap) as u64
    }

    /// Appends, dropping the oldest bytes beyond the capacity.
    pub fn push(&mut self, stream: Stream, data: &[u8]) {
        let mut evict = self.excess(data.len());
        match self.chunks.back_mut() {
            Some(c) if c.stream == stream && c.data.len() + data.len() <= OUTPUT_CHUNK_BYTES => {
                c.data.extend_from_slice(data)
            }
            _ => self.chunks.push_back(Chunk {
                start: self.next,
                stream,
                data: data.to_vec(),
            }),
        }
        self.next += data.len() as u64;
        while evict > 0 {
            let c = self.chunks.front_mut().expect("bytes to evict are held");
            if c.data.len() as u64 <= evict {
                evict -= c.data.len() as u64;
                self.chunks.pop_front();
            } else {
                c.data.drain(..evict as usize);
                c.start += evict;
                evict = 0;
            }
        }
        self.first = self.chunks.front().map_or(self.next, |c| c.start);
    }

    /// Up to `max` bytes of one stream starting at `from` (which must be held).
    pub fn read(&self, from: u64, max: usize) -> Option<(Stream, &[u8])> {
        if from < self.first || from >= self.next {
            return None;
        }
        let i = self.chunks.partition_point(|c| c.start <= from) - 1;
        let c = &self.chunks[i];
        let at = (from - c.start) as usize;
        let end = (at + max).min(c.data.len());
        Some((c.stream, &c.data[at..end]))
    }
}

struct State {
    out: Output,
    exit: Option<ExitStatus>,
    /// The attached sender: (generation, offset of the next byte it sends).
    reader: Option<(u64, u64)>,
}

/// One exec: output, exit, cancel.
pub struct Job {
    /// The exec id the hub gave it.
    pub id: u64,
    /// The lease it runs for.
    pub lease: Option<String>,
    /// Fired by `cancel` or a release.
    pub cancel: CancellationToken,
    state: Mutex<State>,
    changed: watch::Sender<()>,
    generation: AtomicU64,
    /// Where stdin frames go (an empty chunk ends it), queued from the start: input may
    /// arrive before the command is spawned.
    stdin: Mutex<Option<mpsc::UnboundedSender<Vec<u8>>>>,
    stdin_rx: Mutex<Option<mpsc::UnboundedReceiver<Vec<u8>>>>,
    /// The pseudo-terminal's master side, when the exec runs on one.
    pub pty: Mutex<Option<std::os::fd::OwnedFd>>,
}

impl Job {
    /// A job with an empty buffer of `cap` bytes.
    pub fn new(id: u64, lease: Option<String>, cap: usize) -> Job {
        let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
        Job {
            id,
            lease,
            cancel: CancellationToken::new(),
            state: Mutex::new(State {
                out: Output::new(cap),
                exit: None,
                reader: None,
            }),
            changed: watch::Sender::new(()),
            generation: AtomicU64::new(0),
            stdin: Mutex::new(Some(stdin_tx)),
            stdin_rx: Mutex::new(Some(stdin_rx)),
            pty: Mutex::new(None),
        }
    }

    /// Resizes the exec's pseudo-terminal (nothing without one).
    pub fn resize(&self, size: crate::protocol::TtySize) {
        use std::os::fd::AsRawFd;
        if let Some(fd) = self.pty.lock().expect("lock").as_ref() {
            super::exec::set_size(fd.as_raw_fd(), size);
        }
    }

    /// The input queued for the command's stdin pipe (once).
    pub fn take_stdin(&self) -> Option<mpsc::UnboundedReceiver<Vec<u8>>> {
        self.stdin_rx.lock().expect("lock").take()
    }

    /// Input for the command; an empty chunk closes its stdin. Ignored once it is closed.
    pub fn stdin(&self, data: &[u8]) {
        let mut s = self.stdin.lock().expect("lock");
        if let Some(tx) = s.as_ref() {
            let _ = tx.send(data.to_vec());
        }
        if data.is_empty() {
            s.take();
        }
    }

    /// Adds output. Waits while an attached sender has not yet sent the bytes that would make
    /// room (backpressure); drops the oldest bytes when nobody is attached.
    pub async fn write(&self, stream: Stream, data: &[u8]) {
        let mut changed = self.changed.subscribe();
        loop {
            changed.borrow_and_update();
            {
                let mut st = self.state.lock().expect("lock");
                let evict = st.out.excess(data.len());
                let blocked = st
                    .reader
                    .is_some_and(|(_, at)| evict > 0 && st.out.first() + evict > at);
                if !blocked {
                    st.out.push(stream, data);
                    drop(st);
                    self.changed.send_replace(());
                    return;
                }
            }
            if changed.changed().await.is_err() {
                return;
            }
        }
    }

    /// Records how the exec ended (after all its output was written).
    pub fn finish(&self, status: ExitStatus) {
        self.state.lock().expect("lock").exit = Some(status);
        self.changed.send_replace(());
    }

    /// True until the exit is known.
    pub fn running(&self) -> bool {
        self.state.lock().expect("lock").exit.is_none()
    }

    /// What `hello` says about this job.
    pub fn report(&self) -> ExecReport {
        let st = self.state.lock().expect("lock");
        ExecReport {
            exec_id: self.id,
            lease: self.lease.clone(),
            running: st.exit.is_none(),
            first: st.out.first(),
            next: st.out.next(),
        }
    }

    /// Streams output from `from`, then the exit, into `tx` (the session's writer). With
    /// `announce`, first says where the output resumes (`attached`). Returns when the exit is
    /// queued or `tx` closes; dropping the future detaches the sender (the buffer then makes
    /// room by dropping the oldest bytes instead of waiting).
    pub async fn stream(&self, from: u64, tx: mpsc::Sender<Message>, announce: bool) {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let _detach = Detach {
            job: self,
            generation,
        };
        let start = {
            let mut st = self.state.lock().expect("lock");
            if announce && from > st.out.next() {
                Err(format!(
                    "exec {} has written {} bytes; cannot resume at {from}",
                    self.id,
                    st.out.next()
                ))
            } else {
                let at = from.clamp(st.out.first(), st.out.next());
                st.reader = Some((generation, at));
                Ok(at)
            }
        };
        let mut at = match start {
            Ok(at) => at,
            Err(error) => {
                let _ = tx.send(attached(self.id, 0, 0, Some(error))).await;
                return;
            }
        };
        self.changed.send_replace(());
        if announce
            && tx
                .send(attached(self.id, at, at - from, None))
                .await
                .is_err()
        {
            return;
        }
        let mut changed = self.changed.subscribe();
        loop {
            changed.borrow_and_update();
            let next = {
                let mut st = self.state.lock().expect("lock");
                // Only this sender moves the reader, and the buffer never drops past it.
                match st.out.read(at, OUTPUT_CHUNK_BYTES) {
                    Some((stream, data)) => {
                        let frame = encode_output(stream, self.id, data);
                        at += data.len() as u64;
                        st.reader = Some((generation, at));
                        Some(Message::Binary(frame.into()))
                    }
                    None => st.exit.clone().map(|status| {
                        let m = AgentMessage::Exit {
                            exec_id: self.id,
                            status,
                        };
                        Message::Text(serde_json::to_string(&m).expect("serialisable").into())
                    }),
                }
            };
            match next {
                Some(m) => {
                    let is_exit = matches!(m, Message::Text(_));
                    self.changed.send_replace(());
                    if tx.send(m).await.is_err() || is_exit {
                        return;
                    }
                }
                None => {
                    if changed.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

fn attached(exec_id: u64, offset: u64, dropped: u64, error: Option<String>) -> Message {
    let m = AgentMessage::Attached {
        exec_id,
        offset,
        dropped,
        error,
    };
    Message::Text(serde_json::to_string(&m).expect("serialisable").into())
}

/// Clears the reader when its sender stops (returns, or is aborted with its session).
struct Detach<'a> {
    job: &'a Job,
    generation: u64,
}

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        let mut st = self.job.state.lock().expect("lock");
        if st.reader.is_some_and(|(g, _)| g == self.generation) {
            st.reader = None;
        }
        drop(st);
        self.job.changed.send_replace(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(o: &Output, mut from: u64) -> Vec<u8> {
        let mut v = Vec::new();
        while let Some((_, d)) = o.read(from, 7) {
            v.extend_from_slice(d);
            from += d.len() as u64;
        }
        v
    }

    #[test]
    fn output_keeps_the_newest_bytes_by_absolute_offset() {
        let mut o = Output::new(OUTPUT_CHUNK_BYTES);
        o.push(Stream::Stdout, b"hello ");
        o.push(Stream::Stderr, b"warn ");
        o.push(Stream::Stdout, b"world");
        assert_eq!((o.first(), o.next()), (0, 16));
        assert_eq!(all(&o, 0), b"hello warn world");
        assert_eq!(o.read(6, 100), Some((Stream::Stderr, &b"warn "[..])));
        assert_eq!(o.read(8, 100), Some((Stream::Stderr, &b"rn "[..])));
        assert_eq!(o.read(16, 100), None);
        // Overflow: the oldest bytes go, offsets stay absolute.
        let big = vec![b'x'; OUTPUT_CHUNK_BYTES - 4];
        o.push(Stream::Stdout, &big);
        assert_eq!(o.next(), 16 + big.len() as u64);
        assert_eq!(o.first(), o.next() - OUTPUT_CHUNK_BYTES as u64);
        assert_eq!(o.first(), 12);
        assert_eq!(o.read(0, 10), None);
        assert_eq!(&all(&o, 12)[..4], b"orld");
    }

    #[tokio::test]
    async fn a_sender_resumes_at_an_offset_and_reports_dropped_bytes() {
        let job = Job::new(9, None, OUTPUT_CHUNK_BYTES);
        let big = vec![b'y'; OUTPUT_CHUNK_BYTES];
        job.write(Stream::Stdout, b"0123456789").await;
        // Nobody attached: writing never waits, the oldest bytes go.
        job.write(Stream::Stdout, &big).await;
        job.finish(ExitStatus {
            code: Some(4),
            ..Default::default()
        });
        let (tx, mut rx) = mpsc::channel(64);
        job.stream(3, tx, true).await;
        let Some(Message::Text(t)) = rx.recv().await else {
            panic!("attached first")
        };
        let m: AgentMessage = serde_json::from_str(&t).unwrap();
        assert_eq!(
            m,
            AgentMessage::Attached {
                exec_id: 9,
                offset: 10,
                dropped: 7,
                error: None
            }
        );
        let mut got = Vec::new();
        loop {
            match rx.recv().await.unwrap() {
                Message::Binary(b) => got.extend_from_slice(&b[9..]),
                Message::Text(t) => {
                    assert!(t.contains(r#""code":4"#), "{t}");
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, big);
    }

    #[tokio::test]
    async fn an_attached_sender_slows_the_writer_instead_of_dropping() {
        let job = std::sync::Arc::new(Job::new(1, None, OUTPUT_CHUNK_BYTES));
        let (tx, mut rx) = mpsc::channel(1);
        let sender = {
            let job = job.clone();
            tokio::spawn(async move { job.stream(0, tx, false).await })
        };
        let writer = {
            let job = job.clone();
            tokio::spawn(async move {
                for i in 0..200u32 {
                    job.write(Stream::Stdout, &[i as u8; 1000]).await;
                }
                job.finish(ExitStatus::default());
            })
        };
        let mut got = Vec::new();
        while let Some(m) = rx.recv().await {
            match m {
                Message::Binary(b) => got.extend_from_slice(&b[9..]),
                _ => break,
            }
        }
        writer.await.unwrap();
        sender.await.unwrap();
        assert_eq!(got.len(), 200_000, "nothing dropped under a reader");
        for (i, c) in got.chunks(1000).enumerate() {
            assert!(c.iter().all(|b| *b == i as u8));
        }
    }
}
