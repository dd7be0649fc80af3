//! The outbound queue of one agent connection: bounded, first in first out, one reader (the
//! connection's writer half) and any number of senders.
//!
//! It holds no memory while empty, which is how an idle connection spends its life: tokio's
//! `mpsc` allocates its slots 32 at a time when the channel is made, which for ten thousand
//! idle agents is megabytes of empty slots. It never blocks a sender that does not ask to
//! wait: `try_send` on a full queue fails at once (the hub then disconnects the agent).
//!
//! A frame may also be queued *deferred* (`try_send_deferred`): it does not wake the reader,
//! and goes out with the next frame queued normally, or when the hub's flusher calls
//! `wake_deferred` (see `Hub::send_deferred`). The reader takes every frame it finds
//! (`try_recv`) and writes them in one go.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

/// Why a frame was not queued; the frame comes back.
#[derive(Debug)]
pub(super) enum SendError<T> {
    /// The queue holds its capacity.
    Full(T),
    /// The writer is gone; nothing more is sent on this connection.
    Closed(T),
}

struct Inner<T> {
    items: VecDeque<T>,
    closed: bool,
    /// Holds a deferred frame that no wake-up has announced to the reader yet.
    deferred: bool,
}

/// A bounded queue that allocates only while it holds frames.
pub(super) struct Queue<T> {
    inner: Mutex<Inner<T>>,
    cap: usize,
    /// Wakes the reader.
    ready: Notify,
    /// Wakes senders waiting for room.
    room: Notify,
}

/// Capacity kept by an emptied queue; a larger buffer (left by a burst) is freed.
const KEEP: usize = 8;

impl<T> Queue<T> {
    /// An empty queue of at most `cap` frames (at least one).
    pub(super) fn new(cap: usize) -> Queue<T> {
        Queue {
            inner: Mutex::new(Inner {
                items: VecDeque::new(),
                closed: false,
                deferred: false,
            }),
            cap: cap.max(1),
            ready: Notify::new(),
            room: Notify::new(),
        }
    }

    /// Queues a frame without waiting.
    pub(super) fn try_send(&self, item: T) -> Result<(), SendError<T>> {
        drop(self.push(item)?);
        self.ready.notify_one();
        Ok(())
    }

    /// Appends a frame if the queue is open and has room; the lock stays held.
    fn push(&self, item: T) -> Result<std::sync::MutexGuard<'_, Inner<T>>, SendError<T>> {
        let mut i = self.inner.lock().expect("queue lock");
        if i.closed {
            return Err(SendError::Closed(item));
        }
        if i.items.len() >= self.cap {
            return Err(SendError::Full(item));
        }
        i.items.push_back(item);
        Ok(i)
    }

    /// Queues a frame without waiting and without waking the reader: it goes out with the next
    /// frame queued by [`Queue::try_send`], or at [`Queue::wake_deferred`]. True when the queue
    /// held no deferred frame yet (the caller then arranges for that wake-up).
    pub(super) fn try_send_deferred(&self, item: T) -> Result<bool, SendError<T>> {
        let mut i = self.push(item)?;
        Ok(!std::mem::replace(&mut i.deferred, true))
    }

    /// Wakes the reader for the deferred frames still queued; false when there were none (a
    /// later frame took them out already).
    pub(super) fn wake_deferred(&self) -> bool {
        let mut i = self.inner.lock().expect("queue lock");
        if !std::mem::take(&mut i.deferred) || i.items.is_empty() {
            return false;
        }
        drop(i);
        self.ready.notify_one();
        true
    }

    /// The next frame if one is queued, without waiting (None also once closed).
    pub(super) fn try_recv(&self) -> Option<T> {
        self.take().ok().flatten()
    }

    /// Takes the next frame: `Ok(None)` when empty, `Err(())` once closed.
    fn take(&self) -> Result<Option<T>, ()> {
        let mut i = self.inner.lock().expect("queue lock");
        if i.closed {
            return Err(());
        }
        let Some(item) = i.items.pop_front() else {
            return Ok(None);
        };
        if i.items.is_empty() {
            i.deferred = false;
            if i.items.capacity() > KEEP {
                i.items.shrink_to(KEEP);
            }
        }
        drop(i);
        self.room.notify_one();
        Ok(Some(item))
    }

    /// Queues a frame, waiting for room; gives it back when the queue closes.
    pub(super) async fn send(&self, mut item: T) -> Result<(), T> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            // Registered before the check, so a frame taken in between still wakes it.
            room.as_mut().enable();
            match self.try_send(item) {
                Ok(()) => return Ok(()),
                Err(SendError::Closed(t)) => return Err(t),
                Err(SendError::Full(t)) => item = t,
            }
            room.await;
        }
    }

    /// The next frame; None once the queue is closed.
    pub(super) async fn recv(&self) -> Option<T> {
        loop {
            let ready = self.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            match self.take() {
                Ok(Some(item)) => return Some(item),
                Err(()) => return None,
                Ok(None) => {}
            }
            ready.await;
        }
    }

    /// Closes the queue: what it holds is dropped, senders fail from now on, waiting ones wake.
    pub(super) fn close(&self) {
        let items = {
            let mut i = self.inner.lock().expect("queue lock");
            i.closed = true;
            std::mem::take(&mut i.items)
        };
        drop(items);
        self.room.notify_waiters();
        self.ready.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_fifo_that_closes() {
        let q = Queue::new(2);
        q.try_send(1).unwrap();
        q.try_send(2).unwrap();
        assert!(matches!(q.try_send(3), Err(SendError::Full(3))));
        assert_eq!(q.recv().await, Some(1));
        q.try_send(3).unwrap();
        assert_eq!(q.recv().await, Some(2));
        assert_eq!(q.recv().await, Some(3));
        q.close();
        assert!(matches!(q.try_send(4), Err(SendError::Closed(4))));
        assert_eq!(q.recv().await, None);
    }

    #[tokio::test]
    async fn a_waiting_sender_gets_room_or_its_frame_back() {
        let q = std::sync::Arc::new(Queue::new(1));
        q.try_send(1).unwrap();
        let sender = {
            let q = q.clone();
            tokio::spawn(async move { q.send(2).await })
        };
        // The sender waits until the reader takes a frame.
        assert_eq!(q.recv().await, Some(1));
        assert_eq!(sender.await.unwrap(), Ok(()));
        assert_eq!(q.recv().await, Some(2));

        q.try_send(3).unwrap();
        let sender = {
            let q = q.clone();
            tokio::spawn(async move { q.send(4).await })
        };
        q.close();
        assert_eq!(sender.await.unwrap(), Err(4));
    }

    /// Polls once with a waker that does nothing.
    fn poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        f.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    }

    #[tokio::test]
    async fn a_deferred_frame_waits_for_the_next_frame_or_its_wake_up() {
        let q = Queue::new(4);
        // Deferred: the reader is not woken.
        assert_eq!(q.try_send_deferred(1).map_err(|_| ()), Ok(true));
        assert_eq!(
            q.try_send_deferred(2).map_err(|_| ()),
            Ok(false),
            "one wake-up asked"
        );
        let recv = q.recv();
        tokio::pin!(recv);
        // The first poll takes what is queued (the reader was busy before): what a deferred
        // frame saves is the wake-up, not the read.
        assert_eq!(poll_once(recv.as_mut()), std::task::Poll::Ready(Some(1)));
        assert_eq!(q.try_recv(), Some(2));
        assert_eq!(q.try_recv(), None);
        assert!(!q.wake_deferred(), "taken out already: nothing to wake for");

        // A waiting reader sleeps through a deferred frame...
        let recv = q.recv();
        tokio::pin!(recv);
        assert!(poll_once(recv.as_mut()).is_pending());
        assert_eq!(q.try_send_deferred(3).map_err(|_| ()), Ok(true));
        assert!(poll_once(recv.as_mut()).is_pending(), "not woken");
        // ...until the flusher's wake-up, or the next ordinary frame.
        assert!(q.wake_deferred());
        assert_eq!(recv.await, Some(3));
        assert_eq!(q.try_send_deferred(4).map_err(|_| ()), Ok(true));
        q.try_send(5).unwrap();
        assert_eq!(q.recv().await, Some(4));
        assert_eq!(q.try_recv(), Some(5));
        // Full and closed as for `try_send`.
        for i in 0..4 {
            q.try_send(i).unwrap();
        }
        assert!(matches!(q.try_send_deferred(9), Err(SendError::Full(9))));
        q.close();
        assert!(matches!(q.try_send_deferred(9), Err(SendError::Closed(9))));
        assert_eq!(q.try_recv(), None);
    }

    #[test]
    fn an_empty_queue_holds_no_buffer() {
        let q: Queue<u64> = Queue::new(256);
        assert_eq!(q.inner.lock().unwrap().items.capacity(), 0);
    }
}
