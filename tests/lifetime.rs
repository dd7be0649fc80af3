//! No process outlives its owner: the `warmpool serve` binary with real agents and jobs, then an
//! agent killed with SIGKILL, `serve` killed with SIGKILL (and started again: the stale work dir
//! goes), and a second SIGINT (forced exit). Every test kills what it started, even on failure
//! (a guard kills `serve`, the `warmpool run` client and every process carrying its marker).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_warmpool");

/// Pids of `sleep <marker>` processes.
fn sleeps(marker: &str) -> Vec<i32> {
    let argv = format!("sleep\0{marker}\0");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(raw) = std::fs::read(format!("/proc/{p}/cmdline"))
            && raw == argv.as_bytes()
            && alive(p)
        {
            out.push(p);
        }
    }
    out
}

/// Pids whose command line contains `marker`.
fn pids_with(marker: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(raw) = std::fs::read(format!("/proc/{p}/cmdline"))
            && String::from_utf8_lossy(&raw).contains(marker)
            && alive(p)
        {
            out.push(p);
        }
    }
    out
}

/// True while `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace()
                .next()
                .map(|st| st != "Z" && st != "X")
        })
        .unwrap_or(false)
}

fn ppid(pid: i32) -> i32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    s.rfind(')')
        .and_then(|i| s[i + 1..].split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Polls `f` until it holds or `within` passes; false on timeout.
fn poll(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A `serve` with one job running `sleep <marker>` under `sh`; everything killed on drop.
struct Setup {
    tmp: tempfile::TempDir,
    serve: Option<Child>,
    run: Option<Child>,
    marker: String,
    listen: String,
    stderr: Option<std::sync::mpsc::Receiver<String>>,
}

impl Setup {
    fn serve(&mut self) -> Child {
        let mut serve = Command::new(EXE)
            .args(["serve", "--listen", &self.listen, "--shutdown-grace", "30s"])
            .env("TMPDIR", self.tmp.path())
            .env("WARMPOOL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = serve.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        self.stderr = Some(rx);
        serve
    }

    /// Starts `serve` and a job; returns once the job's `sleep` runs.
    fn start() -> Setup {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = Setup {
            tmp: tempfile::tempdir().unwrap(),
            serve: None,
            run: None,
            // A sleep nobody else runs: its argument is the marker.
            marker: format!("7211.{}", rand_digits()),
            listen: format!("127.0.0.1:{port}"),
            stderr: None,
        };
        s.serve = Some(s.serve());
        s.wait_log("warmpool serving");
        let script = format!("echo started; sleep {}; echo never", s.marker);
        s.run = Some(
            Command::new(EXE)
                .args(["run", "--wait", "20s", "--", "sh", "-c", &script])
                .env("WARMPOOL_SERVER", format!("http://{}", s.listen))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(s.tmp.path().join("run.stderr")).unwrap())
                .spawn()
                .unwrap(),
        );
        assert!(
            poll(Duration::from_secs(30), || sleeps(&s.marker).len() == 1),
            "the job's sleep never started; warmpool run said: {}",
            std::fs::read_to_string(s.tmp.path().join("run.stderr")).unwrap_or_default()
        );
        s
    }

    fn sleep_pid(&self) -> i32 {
        sleeps(&self.marker)[0]
    }

    /// The instance's default work dir (`$TMPDIR/warmpool-*`).
    fn work_dirs(&self) -> Vec<PathBuf> {
        work_dirs(self.tmp.path())
    }

    fn serve_pid(&self) -> i32 {
        self.serve.as_ref().unwrap().id() as i32
    }

    /// Waits for a log line containing `text`.
    fn wait_log(&self, text: &str) {
        let rx = self.stderr.as_ref().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if line.contains(text) {
                return;
            }
        }
        panic!("serve never logged {text:?}");
    }
}

fn work_dirs(tmp: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(tmp)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("warmpool-"))
        .map(|e| e.path())
        .collect()
}

/// Unique per test and per test process.
fn rand_digits() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}{n}", std::process::id())
}

impl Drop for Setup {
    fn drop(&mut self) {
        for c in [self.run.as_mut(), self.serve.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Agents die with serve; whatever the job left is found by its marker.
        for p in pids_with(&self.marker) {
            // SAFETY: plain kill of a process this test started.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
}

#[test]
fn killing_an_agent_kills_its_jobs_grandchildren_at_once() {
    let s = Setup::start();
    let sleep = s.sleep_pid();
    let sh = ppid(sleep);
    let agent = ppid(sh);
    assert_ne!(agent, s.serve_pid(), "the job runs under its agent");
    assert_eq!(ppid(agent), s.serve_pid(), "the agent is serve's child");
    // SAFETY: killing the agent this test's serve started.
    unsafe { libc::kill(agent, libc::SIGKILL) };
    let t = Instant::now();
    assert!(
        poll(Duration::from_secs(5), || !alive(sleep) && !alive(sh)),
        "the job's sleep (pid {sleep}, parent {}) outlived its agent",
        ppid(sleep)
    );
    eprintln!("job tree gone {:?} after the agent's SIGKILL", t.elapsed());
}

#[test]
fn sigkill_of_serve_leaves_no_process_and_the_next_start_removes_its_work_dir() {
    let mut s = Setup::start();
    let sleep = s.sleep_pid();
    let agent = ppid(ppid(sleep));
    let dirs = s.work_dirs();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let mut serve = s.serve.take().unwrap();
    serve.kill().unwrap();
    serve.wait().unwrap();
    let t = Instant::now();
    assert!(
        poll(Duration::from_secs(10), || !alive(sleep) && !alive(agent)),
        "after SIGKILL of serve: job sleep {sleep} alive {}, agent {agent} alive {}",
        alive(sleep),
        alive(agent)
    );
    eprintln!("agent and job gone {:?} after serve's SIGKILL", t.elapsed());
    assert!(
        dirs[0].exists(),
        "a SIGKILL leaves the work dir (for the next start)"
    );
    // The next start (same temporary directory) removes it, and keeps its own.
    s.serve = Some(s.serve());
    s.wait_log("warmpool serving");
    assert!(
        poll(Duration::from_secs(5), || !dirs[0].exists()),
        "the stale work dir {} is still there",
        dirs[0].display()
    );
    let now = s.work_dirs();
    assert_eq!(now.len(), 1, "the live instance's dir stays: {now:?}");
}

#[test]
fn a_second_sigint_kills_agents_and_jobs_and_removes_the_work_dir() {
    let mut s = Setup::start();
    let sleep = s.sleep_pid();
    let agent = ppid(ppid(sleep));
    let dirs = s.work_dirs();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let pid = s.serve_pid();
    // SAFETY: signalling the serve this test started.
    unsafe { libc::kill(pid, libc::SIGINT) };
    // The lease keeps running through the 30 s grace; the second signal cuts it short.
    s.wait_log("shutting down");
    unsafe { libc::kill(pid, libc::SIGINT) };
    let t = Instant::now();
    let mut serve = s.serve.take().unwrap();
    let mut status = None;
    assert!(
        poll(Duration::from_secs(5), || {
            status = serve.try_wait().unwrap();
            status.is_some()
        }),
        "serve did not exit at once on a second SIGINT"
    );
    eprintln!("serve exited {:?} after the second SIGINT", t.elapsed());
    assert_eq!(status.unwrap().code(), Some(130));
    assert!(
        poll(Duration::from_secs(2), || !alive(sleep) && !alive(agent)),
        "after the forced exit: job sleep {sleep} alive {}, agent {agent} alive {}",
        alive(sleep),
        alive(agent)
    );
    assert!(
        !dirs[0].exists(),
        "work dir {} left behind",
        dirs[0].display()
    );
}

/// `GET path` over plain HTTP/1.0; None while nothing answers.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.").then_some(out)
}

/// The pools file is applied before the API answers: a client (`bench agents`, a script
/// waiting for `/healthz`) that sees the service up sees every pool of the file, never part
/// of them. Before, the HTTP server started first and `/v1/pools` could list a few.
#[test]
fn the_api_answers_only_once_every_pool_of_the_file_is_served() {
    const POOLS: usize = 1500;
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = String::from("pools:\n");
    for i in 0..POOLS {
        yaml.push_str(&format!(
            "  - name: p{i}\n    labels: [l{i}]\n    external: true\n    minIdle: 0\n    maxTotal: 1\n"
        ));
    }
    let file = dir.path().join("pools.yaml");
    std::fs::write(&file, yaml).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _serve = Kill(
        Command::new(EXE)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--pools"])
            .arg(&file)
            .env("WARMPOOL_LOG", "error")
            .env("TMPDIR", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let healthy = loop {
        if http_get(port, "/healthz").is_some() {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(healthy, "serve did not answer /healthz within 30 s");
    let pools = http_get(port, "/v1/pools").expect("/v1/pools answered");
    let body = &pools[pools.find("\r\n\r\n").expect("a body") + 4..];
    let listed: Vec<serde_json::Value> = serde_json::from_str(body).unwrap();
    assert_eq!(
        listed.len(),
        POOLS,
        "the API answered before every pool of the file was served"
    );
}
