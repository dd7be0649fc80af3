//! `warmpool run` on this process's side: leases an agent, runs the command through
//! [`Client::exec_with`], streams its output to stdout/stderr and stdin to it, renews the lease
//! while it runs, cancels on a signal or a closed stdout, releases the lease and returns the
//! exit code as a shell reports it. With `-t`: a pseudo-terminal on the agent, this terminal
//! in raw mode meanwhile and its size followed.
//!
//! Owns the local terminal and signals only; everything on the wire is [`crate::client`]'s.

use std::io::Write;
use std::time::Duration;

use crate::api::CreateLease;
use crate::client::{Client, Error, ExecOptions, ExecOutput, Result, retryable};
use crate::protocol::{ExecSpec, Stream, TtySize};

/// This process's terminal in raw mode until dropped (then restored as it was).
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    fn enter() -> Option<RawMode> {
        // SAFETY: tcgetattr/cfmakeraw/tcsetattr on fd 0 with a termios we own.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) < 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(0, libc::TCSANOW, &raw) < 0 {
                return None;
            }
            Some(RawMode { saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// The size of this process's terminal (fd 0), or 24x80.
fn terminal_size() -> TtySize {
    // SAFETY: TIOCGWINSZ writes a winsize.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
            return TtySize {
                rows: ws.ws_row,
                cols: ws.ws_col,
            };
        }
    }
    TtySize { rows: 24, cols: 80 }
}

/// Sizes of this terminal each time it changes (SIGWINCH).
fn follow_terminal_size() -> tokio::sync::mpsc::Receiver<TtySize> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut winch) = signal(SignalKind::window_change()) else {
            return;
        };
        while winch.recv().await.is_some() {
            if tx.send(terminal_size()).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// Reads this process's stdin on a thread of its own (a blocked read never holds up exit)
/// into chunks for [`ExecOptions::stdin`]; the end of input is an empty chunk.
pub fn forward_stdin() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut input = std::io::stdin().lock();
        let mut buf = vec![0u8; crate::protocol::OUTPUT_CHUNK_BYTES];
        loop {
            let n = match input.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => 0,
            };
            if tx.blocking_send(buf[..n].to_vec()).is_err() || n == 0 {
                return;
            }
        }
    });
    rx
}

/// What `warmpool run` does.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Selector.
    pub selector: String,
    /// Wait for an agent up to this long.
    pub wait: Duration,
    /// Lease TTL (renewed every third of it while the command runs).
    pub ttl: Duration,
    /// Holder text.
    pub holder: String,
    /// The command.
    pub spec: ExecSpec,
    /// How long to keep re-attaching when the exec socket breaks (service restart).
    pub reattach: Duration,
    /// Forward this process's stdin to the command (EOF included).
    pub stdin: bool,
    /// Run the command on a pseudo-terminal sized as this terminal, in raw mode meanwhile.
    pub tty: bool,
}

/// Leases, runs, streams, releases; returns the job's exit code (128+signal when killed).
pub async fn run_job(client: &Client, opts: RunOptions) -> Result<i32> {
    let lease = client
        .lease(&CreateLease {
            selector: opts.selector.clone(),
            wait_seconds: Some(opts.wait.as_secs_f64()),
            ttl_seconds: Some(opts.ttl.as_secs_f64()),
            holder: Some(opts.holder.clone()),
            idempotency_key: None,
        })
        .await?;
    tracing::debug!(lease = %lease.id, agent = %lease.agent, "leased");
    let renewer = {
        let (c, id, every) = (client.clone(), lease.id.clone(), opts.ttl / 3);
        tokio::spawn(async move {
            let mut iv = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                iv.tick().await;
                match c.renew(&id).await {
                    Ok(_) => {}
                    // A restart or takeover in progress: the next renewal gets through.
                    Err(e) if retryable(&e) => {
                        tracing::debug!(lease = %id, error = %e, "renewal failed; retrying")
                    }
                    Err(e) => tracing::warn!(lease = %id, error = %e, "renewal failed"),
                }
            }
        })
    };
    // Set when this process is told to stop (a signal, or its stdout closed): the command is
    // cancelled, the lease released at once, and the exit code is what a shell reports for
    // the signal (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP, 141 closed pipe).
    let stdout_closed = tokio_util::sync::CancellationToken::new();
    let stopped_by = std::sync::Mutex::new(None::<i32>);
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let mut spec = opts.spec;
    let mut raw = None;
    let mut resize = None;
    if opts.tty {
        spec.tty = Some(terminal_size());
        if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            raw = RawMode::enter();
            resize = Some(follow_terminal_size());
        }
    }
    let exec_opts = ExecOptions {
        reattach: opts.reattach,
        stdin: opts.stdin.then(forward_stdin),
        resize,
    };
    let result = client
        .exec_with(
            &lease.id,
            spec,
            exec_opts,
            |o| match o {
                ExecOutput::Data(Stream::Stdout, data) => {
                    if !stdout_closed.is_cancelled()
                        && let Err(e) = stdout.write_all(data).and_then(|_| stdout.flush())
                        && e.kind() == std::io::ErrorKind::BrokenPipe
                    {
                        stdout_closed.cancel();
                    }
                }
                ExecOutput::Data(_, data) => {
                    let _ = stderr.write_all(data).and_then(|_| stderr.flush());
                }
                ExecOutput::Dropped(n) => {
                    let _ = writeln!(
                        stderr,
                        "warmpool: {n} bytes of output were lost (the agent's buffer overflowed while the service was unreachable)"
                    );
                }
            },
            async {
                let (code, what) = stop_signal(&stdout_closed).await;
                *stopped_by.lock().expect("lock") = Some(code);
                // A closed stdout is a normal end of a pipeline (`| head`): nothing to say.
                if code != 128 + libc::SIGPIPE {
                    eprintln!(
                        "warmpool: {what}; cancelling the command on {}",
                        lease.agent
                    );
                }
            },
        )
        .await;
    drop(raw);
    renewer.abort();
    if let Err(e) = client.release(&lease.id).await {
        // An already-ended lease (agent lost, expired) is not worth a second error.
        if !matches!(&e, Error::Api { code, .. } if code == "lease_ended") {
            tracing::warn!(lease = %lease.id, error = %e, "release failed");
        }
    }
    let status = result?;
    if let Some(code) = *stopped_by.lock().expect("lock") {
        return Ok(code);
    }
    if let Some(err) = &status.error {
        eprintln!("warmpool: {err} (agent {})", lease.agent);
    }
    if status.timed_out {
        eprintln!("warmpool: command timed out on {}", lease.agent);
    }
    Ok(status.shell_code())
}

/// Waits for a reason to stop: SIGINT, SIGTERM (how CI runners cancel), SIGHUP (the terminal
/// went away), or stdout closed. Returns the shell's exit code for it and a description.
async fn stop_signal(stdout_closed: &tokio_util::sync::CancellationToken) -> (i32, &'static str) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        std::future::pending::<()>().await;
        unreachable!("pending never resolves");
    };
    tokio::select! {
        _ = int.recv() => (128 + libc::SIGINT, "interrupted"),
        _ = term.recv() => (128 + libc::SIGTERM, "terminated"),
        _ = hup.recv() => (128 + libc::SIGHUP, "hung up"),
        _ = stdout_closed.cancelled() => (128 + libc::SIGPIPE, "stdout closed"),
    }
}
