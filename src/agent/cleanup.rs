//! The agent's housekeeping between leases: what runs below it, its health, and the cleanup
//! after a release, each costing what it must.
//!
//! Owns the set of running exec and hook leaders (left alone by housekeeping while they run)
//! and a count of exec and hook starts and ends. Only execs and hooks start processes below
//! the agent, so a [`Housekeeping::quiet`] agent (none running, and none started or ended
//! since a walk of `/proc` found nothing below it) provably has no descendant: no leftover to
//! kill, no orphan to reap. Then a release or a heartbeat reads no `/proc` at all and, when the
//! workspace is empty (one directory read, on the async thread), needs no blocking thread
//! either. Otherwise one walk ([`crate::procs::sweep`]) finds leftovers, reaps orphans and
//! gives the health report its count, on a blocking thread together with the workspace wipe.
//! Does not decide anything about reuse: it reports, the service decides.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::engine::Health;
use crate::hooks::{HookResult, Hooks};
use crate::procs;

/// What the agent knows about the processes below it.
#[derive(Debug)]
pub struct Housekeeping {
    workspace: PathBuf,
    /// Leaders of the running exec and hooks (housekeeping leaves their trees alone).
    pub pids: Arc<Mutex<HashSet<i32>>>,
    /// Exec and hook starts and ends so far.
    changes: AtomicU64,
    /// `changes` as read before the last walk that found nothing below the agent (with
    /// nothing running); `u64::MAX` before the first (a wrapper may have left children).
    clean_at: AtomicU64,
    /// Blocking-thread hops taken (for tests and diagnostics).
    hops: AtomicU64,
}

/// Reads nothing but the directory itself: true when `dir` exists and has no entry.
fn empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none())
}

impl Housekeeping {
    /// Housekeeping for an agent with this workspace.
    pub fn new(workspace: PathBuf) -> Housekeeping {
        Housekeeping {
            workspace,
            pids: Arc::default(),
            changes: AtomicU64::new(0),
            clean_at: AtomicU64::new(u64::MAX),
            hops: AtomicU64::new(0),
        }
    }

    /// Records that an exec or a hook is about to start, or has ended: call it before
    /// spawning one and after it ended (its leader reaped), so a walk that began while it ran
    /// can never vouch for what it left.
    pub fn changed(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
    }

    /// Nothing can be below the agent: nothing runs, and nothing started or ended since a
    /// walk found no descendant.
    pub fn quiet(&self) -> bool {
        self.pids.lock().expect("lock").is_empty()
            && self.clean_at.load(Ordering::SeqCst) == self.changes.load(Ordering::SeqCst)
    }

    /// Nothing can be left after a lease: the agent is [`quiet`](Self::quiet) and its
    /// workspace is empty (checked, not assumed: another container of a pod may share the
    /// volume). One directory read; no `/proc`, no blocking thread.
    pub fn nothing_left(&self) -> bool {
        self.quiet() && empty_dir(&self.workspace)
    }

    /// Blocking-thread hops taken so far.
    pub fn hops(&self) -> u64 {
        self.hops.load(Ordering::Relaxed)
    }

    /// One walk below the agent (blocking): reaps orphans, returns the live descendants
    /// outside the running exec's and hooks' trees, and marks the agent quiet when there are
    /// none and nothing ran.
    fn sweep(&self) -> Vec<i32> {
        let at = self.changes.load(Ordering::SeqCst);
        let keep = self.pids.lock().expect("lock").clone();
        let left = procs::sweep(&keep);
        if keep.is_empty() && left.is_empty() {
            self.clean_at.store(at, Ordering::SeqCst);
        }
        left
    }

    /// The health to report now (heartbeats, `hello`). A quiet agent with an empty
    /// workspace answers at once; otherwise one walk and a workspace measure, off the async
    /// threads.
    pub async fn health(self: &Arc<Self>) -> Health {
        if self.nothing_left() {
            return Health::default();
        }
        self.hops.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        tokio::task::spawn_blocking(move || Health {
            leftover_processes: me.sweep().len() as u32,
            workspace_bytes: procs::dir_bytes(&me.workspace),
        })
        .await
        .unwrap_or_default()
    }

    /// Kills every descendant (nothing may run now: the release stopped the exec), waiting up
    /// to `timeout` for them to go; one walk per round, a single one when nothing is left.
    /// Returns how many survived. Blocking.
    fn kill_leftovers(&self, timeout: Duration) -> usize {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = self.sweep();
            if left.is_empty() {
                return 0;
            }
            if std::time::Instant::now() >= deadline {
                return left.len();
            }
            for pid in &left {
                // SAFETY: signalling processes that are our own descendants.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The cleanup after a release, once the exec is stopped: leftovers killed and orphans
    /// reaped, workspace wiped, the pool's hooks run; returns the health to report and the
    /// hooks' results. Skips every walk and blocking hop when provably nothing is left:
    /// the agent is [`quiet`](Self::quiet) (no exec or hook ran since a walk found nothing) and
    /// its workspace is empty (checked, not assumed: another container of a pod may share
    /// the volume). Otherwise one blocking hop with one walk when the job left nothing; the
    /// walk's count is the health report's, unless hooks ran (they may leave processes or
    /// files: one more measure after them).
    pub async fn after_release(
        self: &Arc<Self>,
        hooks: &Hooks,
        lease: &str,
    ) -> (Health, Vec<HookResult>) {
        let mut health = Health::default();
        if !self.nothing_left() {
            self.hops.fetch_add(1, Ordering::Relaxed);
            let me = self.clone();
            health = tokio::task::spawn_blocking(move || {
                let left = me.kill_leftovers(Duration::from_secs(5));
                if left > 0 {
                    tracing::warn!(left, "leftover processes survived SIGKILL");
                }
                if let Err(e) = procs::wipe(&me.workspace) {
                    tracing::warn!(error = %e, "workspace not fully wiped");
                }
                Health {
                    leftover_processes: left as u32,
                    workspace_bytes: procs::dir_bytes(&me.workspace),
                }
            })
            .await
            .unwrap_or_default();
        }
        if hooks.is_empty() {
            return (health, Vec::new());
        }
        self.changed();
        let results = super::hooks::run(hooks, &self.workspace, lease, &self.pids).await;
        self.changed();
        (self.health().await, results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A release after a lease in which nothing ran reads no /proc and takes no blocking
    /// thread; a heartbeat of such an agent neither. (Only this path is exercised here: a
    /// walk in the test binary would see, and the release kill, other tests' processes.)
    #[tokio::test(flavor = "current_thread")]
    async fn a_release_after_nothing_ran_reads_no_proc_and_takes_no_blocking_thread() {
        let ws = tempfile::tempdir().unwrap();
        let hk = Arc::new(Housekeeping::new(ws.path().to_path_buf()));
        assert!(!hk.quiet(), "unknown until a first walk");
        // Mark it quiet as a first walk finding nothing would (without walking here).
        hk.clean_at
            .store(hk.changes.load(Ordering::SeqCst), Ordering::SeqCst);
        assert!(hk.quiet());
        let (health, hooks) = hk.after_release(&Hooks::default(), "l-1").await;
        assert_eq!(health, Health::default());
        assert!(hooks.is_empty());
        assert_eq!(hk.health().await, Health::default());
        assert_eq!(hk.hops(), 0, "no blocking-thread hop");
        // An exec started (or a file appeared): no longer provably clean.
        hk.changed();
        assert!(!hk.quiet());
        hk.clean_at
            .store(hk.changes.load(Ordering::SeqCst), Ordering::SeqCst);
        std::fs::write(ws.path().join("f"), b"x").unwrap();
        assert!(!empty_dir(ws.path()));
        hk.pids.lock().unwrap().insert(1);
        assert!(!hk.quiet(), "a running exec");
    }
}
