//! Runs one exec on the agent: its own process group in the workspace, output written into its
//! [`Job`] buffer (the session streams it from there), timeout and cancel enforced on the whole
//! group.
//!
//! Owns nothing beyond the one child process; the agent decides when to run and cancel.

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::watch;

use super::job::Job;
use crate::protocol::{ExecSpec, ExitStatus, OUTPUT_CHUNK_BYTES, Stream};

/// Time a cancelled job gets between SIGTERM and SIGKILL.
pub const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// How long a pipe may stay silent after the job exited before the pump stops: a background
/// process that inherited the pipe must not hold the exit back (it is a leftover, killed on
/// release). Output that is flowing, or waiting for a slow reader, is never cut off.
pub const DRAIN_IDLE: Duration = Duration::from_millis(500);

async fn pump<R: AsyncRead + Unpin>(
    mut r: R,
    stream: Stream,
    job: Arc<Job>,
    mut exited: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; OUTPUT_CHUNK_BYTES];
    loop {
        let n = tokio::select! {
            n = r.read(&mut buf) => n,
            _ = async {
                let _ = exited.wait_for(|e| *e).await;
                tokio::time::sleep(DRAIN_IDLE).await;
            } => return,
        };
        match n {
            Ok(0) | Err(_) => return,
            // Backpressure: waits for an attached reader however long it takes.
            Ok(n) => job.write(stream, &buf[..n]).await,
        }
    }
}

fn killpg(pgid: i32, sig: i32) {
    // SAFETY: signalling the job's own process group.
    unsafe {
        libc::killpg(pgid, sig);
    }
}

/// Runs `spec`; its output goes into `job`, the returned status is the exit to report.
/// `pids` holds the job's leader pid while it runs (so housekeeping leaves it alone).
pub async fn run(
    job: Arc<Job>,
    spec: ExecSpec,
    workspace: &Path,
    pids: Arc<Mutex<HashSet<i32>>>,
) -> ExitStatus {
    let cancel = job.cancel.clone();
    let mut cmd = match (&spec.argv, &spec.script) {
        (Some(argv), _) if !argv.is_empty() => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
        (_, Some(script)) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(script);
            c
        }
        _ => {
            return ExitStatus {
                error: Some("exec names no program".into()),
                ..Default::default()
            };
        }
    };
    let cwd = match &spec.cwd {
        Some(c) if Path::new(c).is_absolute() => Path::new(c).to_path_buf(),
        Some(c) => workspace.join(c),
        None => workspace.to_path_buf(),
    };
    cmd.current_dir(&cwd)
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.process_group(0).kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let what = spec
                .argv
                .as_ref()
                .map(|a| a[0].clone())
                .unwrap_or_else(|| "sh".into());
            return ExitStatus {
                error: Some(format!("cannot start {what} in {}: {e}", cwd.display())),
                ..Default::default()
            };
        }
    };
    let pid = child.id().unwrap_or(0) as i32;
    pids.lock().expect("lock").insert(pid);
    let (exited_tx, exited) = watch::channel(false);
    let readers = [
        tokio::spawn(pump(
            child.stdout.take().expect("piped"),
            Stream::Stdout,
            job.clone(),
            exited.clone(),
        )),
        tokio::spawn(pump(
            child.stderr.take().expect("piped"),
            Stream::Stderr,
            job.clone(),
            exited,
        )),
    ];
    let timeout = async {
        match spec.timeout_ms {
            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            None => std::future::pending().await,
        }
    };
    let mut st = ExitStatus::default();
    let status = tokio::select! {
        s = child.wait() => s,
        _ = timeout => {
            st.timed_out = true;
            killpg(pid, libc::SIGKILL);
            child.wait().await
        }
        _ = cancel.cancelled() => {
            st.cancelled = true;
            killpg(pid, libc::SIGTERM);
            match tokio::time::timeout(CANCEL_GRACE, child.wait()).await {
                Ok(s) => s,
                Err(_) => {
                    killpg(pid, libc::SIGKILL);
                    child.wait().await
                }
            }
        }
    };
    // Everything the job wrote is forwarded before the exit is reported (see DRAIN_IDLE).
    let _ = exited_tx.send(true);
    for r in readers {
        let _ = r.await;
    }
    if st.timed_out || st.cancelled {
        killpg(pid, libc::SIGKILL);
    }
    pids.lock().expect("lock").remove(&pid);
    match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            st.code = s.code();
            st.signal = s.signal();
        }
        Err(e) => st.error = Some(format!("wait failed: {e}")),
    }
    st
}
