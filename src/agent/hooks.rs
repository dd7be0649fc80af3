//! Runs the pool's cleanup and health hooks between leases, on the agent.
//!
//! Called once per release, after leftover processes are killed and the workspace is wiped.
//! Each hook runs in the workspace in its own process group with `WARMPOOL_HOOK`,
//! `WARMPOOL_LEASE` and `WARMPOOL_WORKSPACE` set and stdin closed; at its timeout the whole
//! group is killed, and when it ends whatever it left in its group is killed too, so a hook
//! can never hold the agent in cleanup. Output is counted and only its last
//! [`EXCERPT_BYTES`] per stream are kept. This module reports what happened
//! ([`HookResult`]); whether the agent is reused is decided by the service
//! ([`crate::hooks::verdict`]).

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use crate::hooks::{EXCERPT_BYTES, HookKind, HookResult, Hooks};

/// How long output still held open by an escaped descendant is read after the hook ended.
const DRAIN: Duration = Duration::from_secs(1);

/// Runs `hooks.cleanup`, then `hooks.health` unless the cleanup failed; returns a result per
/// hook run. `pids` holds each hook's pid while it runs, so housekeeping (orphan reaping in
/// heartbeats) leaves it to this module.
pub async fn run(
    hooks: &Hooks,
    workspace: &Path,
    lease: &str,
    pids: &Arc<Mutex<HashSet<i32>>>,
) -> Vec<HookResult> {
    let mut out = Vec::new();
    if let Some(c) = &hooks.cleanup {
        let r = run_one(
            HookKind::Cleanup,
            &c.command,
            c.timeout.0,
            workspace,
            lease,
            pids,
        )
        .await;
        let failed = !r.exited_zero();
        out.push(r);
        if failed {
            // Not clean: the agent is recycled whatever the health check would say.
            return out;
        }
    }
    if let Some(h) = &hooks.health {
        out.push(
            run_one(
                HookKind::Health,
                &h.command,
                h.timeout.0,
                workspace,
                lease,
                pids,
            )
            .await,
        );
    }
    out
}

/// The last [`EXCERPT_BYTES`] of a stream and its total size.
#[derive(Default)]
struct Tail {
    buf: Vec<u8>,
    total: u64,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        self.buf.extend_from_slice(data);
        if self.buf.len() > 2 * EXCERPT_BYTES {
            self.buf.drain(..self.buf.len() - EXCERPT_BYTES);
        }
    }

    fn excerpt(&self) -> String {
        let from = self.buf.len().saturating_sub(EXCERPT_BYTES);
        String::from_utf8_lossy(&self.buf[from..]).into_owned()
    }
}

async fn read_into(mut r: impl AsyncRead + Unpin, tail: Arc<Mutex<Tail>>) {
    let mut chunk = vec![0u8; 8192];
    while let Ok(n) = r.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        tail.lock().expect("lock").push(&chunk[..n]);
    }
}

fn killpg(pgid: i32) {
    if pgid > 0 {
        // SAFETY: signalling the hook's own process group.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
    }
}

async fn run_one(
    hook: HookKind,
    command: &[String],
    timeout: Duration,
    workspace: &Path,
    lease: &str,
    pids: &Arc<Mutex<HashSet<i32>>>,
) -> HookResult {
    let started = Instant::now();
    let mut result = HookResult {
        hook,
        exit_code: None,
        signal: None,
        timed_out: false,
        error: None,
        duration_ms: 0,
        stdout_bytes: 0,
        stderr_bytes: 0,
        stdout: String::new(),
        stderr: String::new(),
    };
    let Some(program) = command.first() else {
        result.error = Some(format!("hooks.{}.command is empty", hook.as_str()));
        return result;
    };
    let mut cmd = Command::new(program);
    cmd.args(&command[1..])
        .current_dir(workspace)
        .env("WARMPOOL_HOOK", hook.as_str())
        .env("WARMPOOL_LEASE", lease)
        .env("WARMPOOL_WORKSPACE", workspace)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            result.error = Some(format!("{program}: {e}"));
            return result;
        }
    };
    let pid = child.id().unwrap_or(0) as i32;
    pids.lock().expect("lock").insert(pid);
    let (out, err) = (Arc::new(Mutex::default()), Arc::new(Mutex::default()));
    let readers = [
        tokio::spawn(read_into(child.stdout.take().expect("piped"), out.clone())),
        tokio::spawn(read_into(child.stderr.take().expect("piped"), err.clone())),
    ];
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(s) => s,
        Err(_) => {
            result.timed_out = true;
            killpg(pid);
            child.wait().await
        }
    };
    // Whatever the hook started in its group goes with it (and closes the pipes it held).
    killpg(pid);
    pids.lock().expect("lock").remove(&pid);
    let drained_by = tokio::time::Instant::now() + DRAIN;
    for r in readers {
        let abort = r.abort_handle();
        if tokio::time::timeout_at(drained_by, r).await.is_err() {
            // An escaped descendant (setsid) keeps the pipe open; it is a leftover process
            // the health report counts.
            abort.abort();
        }
    }
    match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            result.exit_code = s.code();
            result.signal = s.signal();
        }
        Err(e) => result.error = Some(format!("waiting for {program}: {e}")),
    }
    result.duration_ms = started.elapsed().as_millis() as u64;
    let (out, err) = (out.lock().expect("lock"), err.lock().expect("lock"));
    let (out, err): (&Tail, &Tail) = (&out, &err);
    result.stdout_bytes = out.total;
    result.stderr_bytes = err.total;
    result.stdout = out.excerpt();
    result.stderr = err.excerpt();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::{CleanupHook, HealthHook};
    use crate::spec::Dur;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    fn hooks(cleanup: Option<&str>, health: Option<&str>, timeout: Duration) -> Hooks {
        Hooks {
            cleanup: cleanup.map(|s| CleanupHook {
                command: sh(s),
                timeout: Dur(timeout),
            }),
            health: health.map(|s| HealthHook {
                command: sh(s),
                timeout: Dur(timeout),
                max_output_bytes: None,
            }),
        }
    }

    #[tokio::test]
    async fn runs_cleanup_then_health_in_the_workspace_with_its_environment() {
        let ws = tempfile::tempdir().unwrap();
        let pids = Arc::default();
        let h = hooks(
            Some("echo $WARMPOOL_HOOK $WARMPOOL_LEASE > order; pwd -P"),
            Some("cat order; echo $WARMPOOL_HOOK >&2; exit 3"),
            Duration::from_secs(10),
        );
        let r = run(&h, ws.path(), "l-1", &pids).await;
        assert_eq!(r.len(), 2);
        assert!(r[0].exited_zero(), "{:?}", r[0]);
        let pwd = std::fs::canonicalize(ws.path()).unwrap();
        assert_eq!(r[0].stdout.trim(), pwd.to_str().unwrap());
        assert_eq!(r[1].exit_code, Some(3));
        assert_eq!(r[1].stdout, "cleanup l-1\n");
        assert_eq!(r[1].stderr, "health\n");
        assert_eq!(r[1].stdout_bytes, 12);
        assert!(pids.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_failed_cleanup_skips_the_health_check() {
        let ws = tempfile::tempdir().unwrap();
        let h = hooks(Some("exit 1"), Some("touch ran"), Duration::from_secs(10));
        let r = run(&h, ws.path(), "l", &Arc::default()).await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].exit_code, Some(1));
        assert!(!ws.path().join("ran").exists());
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let ws = tempfile::tempdir().unwrap();
        // A background child that would outlive its parent, and a parent that never ends.
        let h = hooks(
            Some("sleep 9871 & echo $! > bg; sleep 9872"),
            None,
            Duration::from_millis(300),
        );
        let r = run(&h, ws.path(), "l", &Arc::default()).await;
        assert!(r[0].timed_out, "{:?}", r[0]);
        assert_eq!(r[0].signal, Some(libc::SIGKILL));
        assert!(
            r[0].ending().contains("timed out after"),
            "{}",
            r[0].ending()
        );
        let bg: i32 = std::fs::read_to_string(ws.path().join("bg"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Killed by the group kill; reaped by whoever reaps orphans (here: nobody, so a zombie
        // or gone). Poll: the kill is asynchronous.
        let deadline = Instant::now() + Duration::from_secs(5);
        while crate::procs::alive(bg) {
            assert!(Instant::now() < deadline, "background child {bg} survived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn an_escaped_descendant_holding_the_pipes_does_not_hold_the_hook() {
        let ws = tempfile::tempdir().unwrap();
        // setsid leaves the hook's process group (the hook ends only once it has, so the group
        // kill cannot catch it first); the sleep keeps stdout open after the hook.
        let h = hooks(
            Some(
                "setsid sh -c 'echo $$ > escaped; exec sleep 9873' & \
                 while [ ! -s escaped ]; do sleep 0.01; done; echo done",
            ),
            None,
            Duration::from_secs(60),
        );
        let r = run(&h, ws.path(), "l", &Arc::default()).await;
        let escaped: i32 = std::fs::read_to_string(ws.path().join("escaped"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: the test's own stray process.
        unsafe { libc::kill(escaped, libc::SIGKILL) };
        assert!(r[0].exited_zero(), "{:?}", r[0]);
        assert_eq!(r[0].stdout, "done\n");
        assert!(!r[0].timed_out);
    }

    #[tokio::test]
    async fn output_is_counted_and_only_its_tail_kept() {
        let ws = tempfile::tempdir().unwrap();
        let h = hooks(
            None,
            Some("head -c 100000 /dev/zero | tr '\\0' a; printf END"),
            Duration::from_secs(10),
        );
        let r = run(&h, ws.path(), "l", &Arc::default()).await;
        assert_eq!(r[0].stdout_bytes, 100_003);
        assert_eq!(r[0].stdout.len(), EXCERPT_BYTES);
        assert!(r[0].stdout.ends_with("aaEND"));
    }

    #[tokio::test]
    async fn a_missing_program_is_an_error_not_a_hang() {
        let ws = tempfile::tempdir().unwrap();
        let h = Hooks {
            health: Some(HealthHook {
                command: vec!["/nonexistent/check".into()],
                timeout: Dur::secs(5),
                max_output_bytes: None,
            }),
            ..Default::default()
        };
        let r = run(&h, ws.path(), "l", &Arc::default()).await;
        assert!(!r[0].exited_zero());
        assert!(
            r[0].ending()
                .contains("could not start: /nonexistent/check"),
            "{}",
            r[0].ending()
        );
    }
}
