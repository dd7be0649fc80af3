//! `warmpool run` behaves like ssh / kubectl exec: signals cancel and release at once with the
//! shell's exit codes, a closed stdout cancels, 126/127 as a shell reports them, `--cwd` stays
//! inside the workspace, stdin is forwarded.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const POOL: &str = "pools:\n  - name: linux\n    labels: [linux]\n    minIdle: 1\n    maxTotal: 2\n    maxUses: 0\n";

fn run_cmd(server: &str, args: &[&str]) -> Command {
    let mut c = Command::new(EXE);
    c.arg("run")
        .args(args)
        .env("WARMPOOL_SERVER", server)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

async fn output(mut c: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap()
}

async fn released(h: &Harness) {
    wait_until("lease released", Duration::from_secs(5), || {
        let p = h.pool("linux");
        p.leased == 0 && p.cleaning == 0
    })
    .await;
}

#[tokio::test]
async fn sigterm_and_sighup_cancel_release_and_exit_like_a_shell() {
    let h = start_pools(POOL).await;
    h.wait_idle("linux", 1).await;
    for (sig, code, marker) in [
        (libc::SIGTERM, 143, "sleep 7531"),
        (libc::SIGHUP, 129, "sleep 7532"),
    ] {
        let script = format!("echo started; {marker}");
        let mut child = run_cmd(&h.server.base_url(), &["--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let line = tokio::task::spawn_blocking(move || {
            let mut l = String::new();
            stdout.read_line(&mut l).unwrap();
            l
        })
        .await
        .unwrap();
        assert_eq!(line, "started\n");
        let t = Instant::now();
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        assert_eq!(status.code(), Some(code), "signal {sig}");
        assert!(t.elapsed() < Duration::from_secs(5));
        // Released at once, not when the TTL runs out.
        released(&h).await;
        wait_until("remote command gone", Duration::from_secs(5), || {
            pids_matching(marker).is_empty()
        })
        .await;
    }
    h.server.shutdown().await;
}

#[tokio::test]
async fn a_closed_stdout_cancels_the_remote_command() {
    let h = start_pools(POOL).await;
    h.wait_idle("linux", 1).await;
    // The remote `yes` prints "yes-42"; the needle is not in the local shell's command line.
    let pipeline = format!("'{EXE}' run -- sh -c 'exec yes yes-$((6*7))' | head -1");
    let mut child = Command::new("sh")
        .args(["-c", &pipeline])
        .env("WARMPOOL_SERVER", h.server.base_url())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`warmpool run -- yes | head -1` never returned");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "yes-42\n");
    assert!(status.success(), "head's status");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "",
        "nothing to report"
    );
    released(&h).await;
    wait_until("remote yes gone", Duration::from_secs(5), || {
        pids_matching("yes yes-42").is_empty()
    })
    .await;
    h.server.shutdown().await;
}

#[tokio::test]
async fn exit_codes_as_a_shell_reports_them_and_cwd_stays_in_the_workspace() {
    let h = start_pools(POOL).await;
    h.wait_idle("linux", 1).await;
    let base = h.server.base_url();
    // A file that is not executable: 126.
    let out = output(run_cmd(&base, &["--", "/etc/passwd"])).await;
    assert_eq!(out.status.code(), Some(126));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/etc/passwd"), "{err}");
    // A command that does not exist: 127.
    let out = output(run_cmd(&base, &["--", "no-such-command-4242"])).await;
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-command-4242"));
    // A missing directory is a missing directory, not a missing command.
    let out = output(run_cmd(&base, &["--cwd", "missing/dir", "--", "true"])).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("working directory missing/dir does not exist"),
        "{err}"
    );
    // Absolute paths and `..` above the workspace are refused before anything runs.
    for (cwd, why) in [
        ("/etc", "absolute"),
        ("../../..", "outside"),
        ("a/../../b", "outside"),
    ] {
        let out = output(run_cmd(&base, &["--cwd", cwd, "--", "ls"])).await;
        assert_eq!(out.status.code(), Some(2), "{cwd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{cwd}: {err}");
    }
    // The service refuses them too (for clients other than `warmpool run`).
    let l = h.lease("linux", 5.0, 60.0).await;
    let spec = warmpool::protocol::ExecSpec {
        argv: Some(vec!["ls".into()]),
        cwd: Some("../..".into()),
        ..Default::default()
    };
    let r = h
        .client
        .exec(&l.id, spec, |_, _| {}, std::future::pending())
        .await;
    match r {
        Err(warmpool::client::Error::Exec { code, message, .. }) => {
            assert_eq!(code, "invalid_request");
            assert!(message.contains("outside"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    h.client.release(&l.id).await.unwrap();
    h.server.shutdown().await;
}

#[tokio::test]
async fn stdin_is_forwarded_with_its_end() {
    let h = start_pools(POOL).await;
    h.wait_idle("linux", 1).await;
    // A script piped into a remote shell, as `printf ... | warmpool run -- bash` in CI.
    let mut child = run_cmd(&h.server.base_url(), &["--", "sh"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"echo building; exit 9\n").unwrap();
    drop(stdin);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "building\n");
    assert_eq!(out.status.code(), Some(9));
    // EOF reaches the command: `cat` ends, and every byte arrives.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut child = run_cmd(&h.server.base_url(), &["--", "cat"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let d = data.clone();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&d).unwrap();
    });
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    writer.join().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout == data, "cat echoed {} bytes", out.stdout.len());
    // An empty stdin ends at once: a command reading it does not hang.
    let mut c = run_cmd(&h.server.base_url(), &["--", "cat"]);
    c.stdin(Stdio::null());
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
    h.server.shutdown().await;
}

#[tokio::test]
async fn tty_runs_on_a_pseudo_terminal_sized_as_ours_in_raw_mode_then_restored() {
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let h = start_pools(POOL).await;
    h.wait_idle("linux", 1).await;
    // Our terminal: a pseudo-terminal of 33 rows and 101 columns.
    let (mut m, mut s) = (-1, -1);
    let ws = libc::winsize {
        ws_row: 33,
        ws_col: 101,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    assert_eq!(
        unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) },
        0
    );
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
    let lflag = |fd: i32| unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        libc::tcgetattr(fd, &mut t);
        t.c_lflag
    };
    let before = lflag(slave.as_raw_fd());
    assert_ne!(before & libc::ECHO, 0);
    let mut child = Command::new(EXE)
        .args([
            "run",
            "-t",
            "--",
            "sh",
            "-c",
            "tty; stty size; read x; echo got-$x",
        ])
        .env("WARMPOOL_SERVER", h.server.base_url())
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave.try_clone().unwrap()))
        .spawn()
        .unwrap();
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut reader = std::fs::File::from(master.try_clone().unwrap());
    let o = out.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                return;
            }
            o.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let text = || String::from_utf8_lossy(&out.lock().unwrap()).to_string();
    wait_until("remote size printed", Duration::from_secs(10), || {
        text().contains("33 101")
    })
    .await;
    assert!(text().contains("/dev/pts/"), "{}", text());
    assert_eq!(
        lflag(slave.as_raw_fd()) & libc::ECHO,
        0,
        "our terminal is raw meanwhile"
    );
    // Input goes to the remote terminal (a raw Enter is \r; the remote terminal maps it).
    std::fs::File::from(master.try_clone().unwrap())
        .write_all(b"hello\r")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "run -t never ended: {}", text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0), "{}", text());
    wait_until("remote echo", Duration::from_secs(5), || {
        text().contains("got-hello")
    })
    .await;
    assert_eq!(lflag(slave.as_raw_fd()), before, "our terminal restored");
    h.server.shutdown().await;
}
