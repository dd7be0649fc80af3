//! Runs one exec on the agent: its own process group in the workspace, output written into its
//! [`Job`] buffer (the session streams it from there), timeout and cancel enforced on the whole
//! group.
//!
//! Owns nothing beyond the one child process; the agent decides when to run and cancel.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::watch;

use super::job::Job;
use std::os::fd::{FromRawFd, OwnedFd};

use crate::protocol::{ExecSpec, ExitStatus, OUTPUT_CHUNK_BYTES, Stream, TtySize};

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

/// The directory an exec runs in: `cwd` inside the workspace (relative, and still inside once
/// `..` and symlinks are resolved), which must exist. The error says which rule it broke.
pub fn working_dir(workspace: &Path, cwd: Option<&str>) -> Result<PathBuf, String> {
    let Some(c) = cwd.filter(|c| !c.is_empty()) else {
        return Ok(workspace.to_path_buf());
    };
    crate::protocol::check_cwd(c)?;
    let dir = workspace.join(c);
    let real = match dir.canonicalize() {
        Ok(r) => r,
        Err(_) => {
            return Err(format!(
                "working directory {c} does not exist in the workspace"
            ));
        }
    };
    let root = workspace
        .canonicalize()
        .unwrap_or_else(|_| workspace.to_path_buf());
    if !real.starts_with(&root) {
        return Err(format!(
            "working directory {c} leads outside the workspace (to {})",
            real.display()
        ));
    }
    if !real.is_dir() {
        return Err(format!("working directory {c} is not a directory"));
    }
    Ok(real)
}

/// Opens a pseudo-terminal of `size`: (master, slave).
fn open_pty(size: TtySize) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (mut m, mut s) = (-1, -1);
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two fds we then own.
    let r = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just opened and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) })
}

/// Sets a terminal's size (the kernel signals SIGWINCH to its foreground group).
pub fn set_size(fd: i32, size: TtySize) {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

/// The environment a job starts with, before the user's `--env`: nothing of the agent's own
/// (its token, or whatever its parent had) except `PATH`, `HOME`, the locale variables,
/// `WARMPOOL_AGENT_ID`/`WARMPOOL_POOL` and the variables the pool configured for jobs (named
/// in [`JOB_ENV`], e.g. what a pod template sets on the agent container); plus
/// `WARMPOOL_WORKSPACE` and `WARMPOOL_LEASE`. Documented in SECURITY.md.
pub fn job_env(workspace: &Path, lease: Option<&str>) -> Vec<(String, String)> {
    job_env_from(|k| std::env::var(k).ok(), workspace, lease)
}

/// The variable naming, comma-separated, the agent's variables its jobs get too (the pool's
/// configured ones). Credentials are never passed, even when named.
pub const JOB_ENV: &str = "WARMPOOL_JOB_ENV";

/// [`job_env`] with the agent's environment read through `var`.
pub fn job_env_from(
    var: impl Fn(&str) -> Option<String>,
    workspace: &Path,
    lease: Option<&str>,
) -> Vec<(String, String)> {
    let base = [
        "PATH",
        "HOME",
        "LANG",
        "LC_ALL",
        "TZ",
        "WARMPOOL_AGENT_ID",
        "WARMPOOL_POOL",
    ];
    let configured = var(JOB_ENV).unwrap_or_default();
    let configured = configured
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty() && !k.starts_with("WARMPOOL_"));
    let mut env: Vec<(String, String)> = Vec::new();
    for k in base.into_iter().chain(configured) {
        if env.iter().any(|(have, _)| have == k) {
            continue;
        }
        if let Some(v) = var(k) {
            env.push((k.to_string(), v));
        }
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    }
    let ws = std::path::absolute(workspace).unwrap_or_else(|_| workspace.to_path_buf());
    env.push(("WARMPOOL_WORKSPACE".into(), ws.display().to_string()));
    if let Some(l) = lease {
        env.push(("WARMPOOL_LEASE".into(), l.to_string()));
    }
    env
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
    let cwd = match working_dir(workspace, spec.cwd.as_deref()) {
        Ok(c) => c,
        Err(error) => {
            return ExitStatus {
                // What a shell's failed `cd` exits with: not a missing command.
                code: Some(1),
                error: Some(error),
                ..Default::default()
            };
        }
    };
    cmd.current_dir(&cwd)
        .env_clear()
        .envs(job_env(workspace, job.lease.as_deref()))
        .envs(&spec.env)
        .kill_on_drop(true);
    let mut master = None;
    match spec.tty {
        Some(size) => {
            let (m, slave) = match open_pty(size) {
                Ok(p) => p,
                Err(e) => {
                    return ExitStatus {
                        error: Some(format!("cannot open a pseudo-terminal: {e}")),
                        ..Default::default()
                    };
                }
            };
            let (a, b) = match (slave.try_clone(), slave.try_clone()) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) => {
                    return ExitStatus {
                        error: Some(format!("cannot open a pseudo-terminal: {e}")),
                        ..Default::default()
                    };
                }
            };
            cmd.stdin(Stdio::from(a))
                .stdout(Stdio::from(b))
                .stderr(Stdio::from(slave));
            if !spec.env.contains_key("TERM") {
                cmd.env("TERM", "xterm-256color");
            }
            // Its own session (so its own process group, pgid = pid, as without a terminal)
            // with the terminal as its controlling one: job control and Ctrl-C work.
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            master = Some(m);
        }
        None => {
            cmd.stdin(if spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let what = spec
                .argv
                .as_ref()
                .map(|a| a[0].clone())
                .unwrap_or_else(|| "sh".into());
            // As a shell reports it: 126 found but not executable, 127 not found.
            let code = match e.kind() {
                std::io::ErrorKind::PermissionDenied => 126,
                _ => 127,
            };
            return ExitStatus {
                code: Some(code),
                error: Some(format!("cannot start {what} in {}: {e}", cwd.display())),
                ..Default::default()
            };
        }
    };
    let pid = child.id().unwrap_or(0) as i32;
    if let Some(mut pipe) = child.stdin.take()
        && let Some(mut input) = job.take_stdin()
    {
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            // Ends at the end of stdin (an empty chunk), or when the command stops reading.
            while let Some(chunk) = input.recv().await {
                if chunk.is_empty() || pipe.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
    }
    pids.lock().expect("lock").insert(pid);
    let (exited_tx, exited) = watch::channel(false);
    let mut readers = Vec::new();
    if let Some(m) = master {
        // Output from the master side (it fails with EIO once the terminal is gone); input
        // written to it; the master kept for resizes.
        if let (Ok(r), Ok(w)) = (m.try_clone(), m.try_clone()) {
            readers.push(tokio::spawn(pump(
                tokio::fs::File::from_std(std::fs::File::from(r)),
                Stream::Stdout,
                job.clone(),
                exited.clone(),
            )));
            if let Some(mut input) = job.take_stdin() {
                let mut w = tokio::fs::File::from_std(std::fs::File::from(w));
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    while let Some(chunk) = input.recv().await {
                        if chunk.is_empty()
                            || w.write_all(&chunk).await.is_err()
                            || w.flush().await.is_err()
                        {
                            break;
                        }
                    }
                });
            }
        }
        *job.pty.lock().expect("lock") = Some(m);
    } else {
        readers.push(tokio::spawn(pump(
            child.stdout.take().expect("piped"),
            Stream::Stdout,
            job.clone(),
            exited.clone(),
        )));
        readers.push(tokio::spawn(pump(
            child.stderr.take().expect("piped"),
            Stream::Stderr,
            job.clone(),
            exited,
        )));
    }
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
    job.pty.lock().expect("lock").take();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_dirs_stay_inside_the_workspace() {
        let ws = tempfile::tempdir().unwrap();
        std::fs::create_dir(ws.path().join("src")).unwrap();
        std::fs::write(ws.path().join("file"), "").unwrap();
        std::os::unix::fs::symlink("/", ws.path().join("up")).unwrap();
        let wd = |c: Option<&str>| working_dir(ws.path(), c);
        let root = ws.path().canonicalize().unwrap();
        assert_eq!(wd(None).unwrap(), ws.path());
        assert_eq!(wd(Some("src")).unwrap(), root.join("src"));
        assert_eq!(wd(Some("src/..")).unwrap(), root);
        assert!(wd(Some("/etc")).unwrap_err().contains("absolute"));
        assert!(wd(Some("..")).unwrap_err().contains("outside"));
        assert!(
            wd(Some("up"))
                .unwrap_err()
                .contains("outside the workspace")
        );
        assert!(wd(Some("nope")).unwrap_err().contains("does not exist"));
        assert!(wd(Some("file")).unwrap_err().contains("not a directory"));
    }

    #[test]
    fn jobs_get_the_pools_configured_variables_and_never_credentials() {
        let agent: std::collections::HashMap<&str, &str> = [
            ("PATH", "/bin"),
            ("DOCKER_HOST", "unix:///var/run/dind/docker.sock"),
            ("GRADLE_OPTS", "-Xmx1g"),
            ("SECRET_OF_THE_NODE", "no"),
            ("WARMPOOL_TOKEN", "tok"),
            ("WARMPOOL_TOKEN_FILE", "/t"),
            (
                JOB_ENV,
                "DOCKER_HOST, GRADLE_OPTS,,WARMPOOL_TOKEN,WARMPOOL_TOKEN_FILE,UNSET,PATH",
            ),
        ]
        .into();
        let env = job_env_from(
            |k| agent.get(k).map(|v| v.to_string()),
            Path::new("/w"),
            Some("lease-1"),
        );
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "PATH",
                "DOCKER_HOST",
                "GRADLE_OPTS",
                "WARMPOOL_WORKSPACE",
                "WARMPOOL_LEASE"
            ]
        );
        assert!(env.contains(&(
            "DOCKER_HOST".into(),
            "unix:///var/run/dind/docker.sock".into()
        )));
        // Without the list, nothing but the base.
        let env = job_env_from(
            |k| (k == "DOCKER_HOST").then(|| "x".into()),
            Path::new("/w"),
            None,
        );
        assert!(!env.iter().any(|(k, _)| k == "DOCKER_HOST"));
    }
}
