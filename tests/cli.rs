//! The `warmpool` binary end to end: `run` (exit codes, streams, Ctrl-C), `status`, and `serve`
//! (built-in pool, clean SIGTERM shutdown with no orphans, pools-file validation).

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const POOL: &str =
    "pools:\n  - name: default\n    labels: [linux, x86_64]\n    minIdle: 2\n    maxTotal: 4\n";

fn warmpool(args: &[&str], server: &str) -> std::process::Output {
    Command::new(EXE)
        .args(args)
        .env("WARMPOOL_SERVER", server)
        .output()
        .expect("warmpool runs")
}

#[tokio::test]
async fn run_prints_output_and_exits_with_the_job_code() {
    let h = start_pools(POOL).await;
    h.wait_idle("default", 2).await;
    let base = h.server.base_url();
    let out = tokio::task::spawn_blocking(move || {
        warmpool(
            &[
                "run",
                "--selector",
                "linux",
                "--",
                "sh",
                "-c",
                "echo hello; echo warn >&2; exit 3",
            ],
            &base,
        )
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "warn\n");
    assert_eq!(out.status.code(), Some(3));
    // The lease was released.
    wait_until("lease released", Duration::from_secs(5), || {
        h.pool("default").leased == 0
    })
    .await;

    let base = h.server.base_url();
    let out = tokio::task::spawn_blocking(move || {
        warmpool(&["run", "-s", "windows", "--", "true"], &base)
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no pool can satisfy selector \"windows\""),
        "{err}"
    );
    h.server.shutdown().await;
}

#[test]
fn run_against_no_server_exits_255_with_a_message() {
    let out = warmpool(&["run", "--", "true"], "http://127.0.0.1:9");
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http://127.0.0.1:9"), "{err}");
    assert!(
        err.to_lowercase().contains("connection refused"),
        "the cause is named: {err}"
    );
}

#[test]
fn an_unreachable_server_is_one_line_naming_the_url_and_the_way_out() {
    for args in [&["status"][..], &["run", "--", "true"][..]] {
        let out = warmpool(args, "http://127.0.0.1:9");
        assert_eq!(out.status.code(), Some(255), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        for part in [
            "http://127.0.0.1:9",
            "`warmpool serve`",
            "--server",
            "WARMPOOL_SERVER",
        ] {
            assert!(err.contains(part), "{args:?}: {part:?} in {err}");
        }
        // Not reqwest's chain ("error sending request for url (...): client error (Connect)").
        assert!(!err.contains("error sending request"), "{args:?}: {err}");
        assert!(!err.contains("(Connect)"), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn a_server_without_a_scheme_is_http() {
    let h = start_pools(POOL).await;
    h.wait_idle("default", 2).await;
    let addr = h
        .server
        .base_url()
        .strip_prefix("http://")
        .unwrap()
        .to_string();
    let out = tokio::task::spawn_blocking(move || warmpool(&["status"], &addr))
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(t.lines().nth(1).unwrap().starts_with("default "), "{t}");
    h.server.shutdown().await;
}

#[tokio::test]
async fn ctrl_c_cancels_the_remote_command_and_releases_the_lease() {
    let h = start_pools(POOL).await;
    h.wait_idle("default", 2).await;
    let mut child = Command::new(EXE)
        .args([
            "run",
            "--selector",
            "linux",
            "--",
            "sh",
            "-c",
            "echo started; sleep 6543",
        ])
        .env("WARMPOOL_SERVER", h.server.base_url())
        .stdout(Stdio::piped())
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
    assert_eq!(h.pool("default").leased, 1);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t = Instant::now();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(130), "as a shell reports Ctrl-C");
    assert!(t.elapsed() < Duration::from_secs(5));
    wait_until("lease released", Duration::from_secs(5), || {
        let p = h.pool("default");
        p.leased == 0 && p.cleaning == 0
    })
    .await;
    wait_until("remote command gone", Duration::from_secs(5), || {
        pids_matching("sleep 6543").is_empty()
    })
    .await;
    h.server.shutdown().await;
}

#[tokio::test]
async fn status_prints_a_table_and_json() {
    let h = start_pools(POOL).await;
    h.wait_idle("default", 2).await;
    let base = h.server.base_url();
    let (table, json) = tokio::task::spawn_blocking(move || {
        (
            warmpool(&["status"], &base),
            warmpool(&["status", "--output", "json"], &base),
        )
    })
    .await
    .unwrap();
    let t = String::from_utf8_lossy(&table.stdout);
    let mut lines = t.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "LABELS",
            "IDLE",
            "LEASED",
            "CONNECTING",
            "PROVISIONING",
            "WAITING",
            "TOTAL",
            "MIN",
            "MAX",
            "DESIRED",
            "SOURCE",
            "RATE/MIN",
            "REFILL",
            "WARM-HIT",
            "LEAKS",
            "ERROR"
        ]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        row[..12],
        [
            "default",
            "linux,x86_64",
            "2",
            "0",
            "0",
            "0",
            "0",
            "2",
            "2",
            "4",
            "2",
            "minIdle"
        ]
    );
    // No request yet: no rate, and no warm-hit ratio (the refill time is measured); no leak
    // and no error.
    assert_eq!(
        (row[12], row[14], row[15], row[16]),
        ("0.0", "-", "0", "-"),
        "{row:?}"
    );
    // Process agents register in milliseconds: the refill time reads as such, never "0s".
    let refill = humantime::parse_duration(row[13]).unwrap_or_else(|e| panic!("{row:?}: {e}"));
    assert!(refill > std::time::Duration::ZERO, "{row:?}");
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v[0]["name"], "default");
    assert_eq!(v[0]["idle"], 2);
    h.server.shutdown().await;
}

/// A pool whose agents all fail to start shows the request waiting for it and why.
#[tokio::test]
async fn status_shows_waiting_requests_and_the_last_error_of_a_failing_pool() {
    let h = start_pools(
        "pools:\n  - name: broken\n    labels: [broken]\n    minIdle: 1\n    maxTotal: 2\n    agentCommand: [/nonexistent/warmpool-test-agent]\n",
    )
    .await;
    let client = h.client.clone();
    let waiter = tokio::spawn(async move {
        client
            .lease(&warmpool::api::CreateLease {
                selector: "broken".into(),
                wait_seconds: Some(60.0),
                ..Default::default()
            })
            .await
    });
    wait_until(
        "a waiting request and an error",
        Duration::from_secs(20),
        || {
            let p = h.pool("broken");
            p.waiting == 1 && p.last_error.is_some()
        },
    )
    .await;
    let base = h.server.base_url();
    let out = tokio::task::spawn_blocking(move || warmpool(&["status"], &base))
        .await
        .unwrap();
    waiter.abort();
    let t = String::from_utf8_lossy(&out.stdout);
    let header: Vec<&str> = t.lines().next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = t.lines().nth(1).unwrap().split_whitespace().collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    assert_eq!(row[col("IDLE")], "0", "{t}");
    assert_eq!(row[col("WAITING")], "1", "{t}");
    let error = row[col("ERROR")..].join(" ");
    assert!(
        error.starts_with("cannot start /nonexistent/warmpool-test-agent"),
        "{t}"
    );
    assert!(error.chars().count() <= 80, "shortened: {error}");
    h.server.shutdown().await;
}

/// `run` whose wait expires says where the pool stood and why, not only that it waited: the
/// README's old example failed every provision and `run` said only "became free within".
#[tokio::test]
async fn run_whose_wait_expires_names_the_pool_state_and_its_last_error() {
    let h = start_pools(
        "pools:\n  - name: broken\n    labels: [broken]\n    minIdle: 1\n    maxTotal: 2\n    agentCommand: [/nonexistent/warmpool-test-agent]\n",
    )
    .await;
    wait_until("the pool's error", Duration::from_secs(20), || {
        h.pool("broken").last_error.is_some()
    })
    .await;
    let base = h.server.base_url();
    let out = tokio::task::spawn_blocking(move || {
        warmpool(
            &["run", "--wait", "1s", "--selector", "broken", "--", "true"],
            &base,
        )
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{err}");
    assert!(err.contains("became free within"), "{err}");
    assert!(err.contains("pool broken: 0 idle"), "{err}");
    assert!(err.contains("of maxTotal 2"), "{err}");
    assert!(
        err.contains("last error: agent broken-") && err.contains("cannot start /nonexistent/"),
        "{err}"
    );
    h.server.shutdown().await;
}

/// Kills the child when the test ends, passing or not.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn status_watch_prints_again_until_interrupted() {
    let h = start_pools(POOL).await;
    h.wait_idle("default", 2).await;
    let mut child = Kill(
        Command::new(EXE)
            .args(["status", "--watch", "100ms"])
            .env("WARMPOOL_SERVER", h.server.base_url())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Read on a blocking thread: the server runs on this test's runtime.
    let (headers, rows) = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut headers, mut rows) = (0, 0);
        while headers < 2 {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                break;
            };
            if line.starts_with("NAME ") {
                headers += 1;
            } else if line.starts_with("default ") {
                rows += 1;
            }
        }
        (headers, rows)
    })
    .await
    .unwrap();
    assert_eq!(headers, 2, "two refreshes before the deadline");
    assert!(rows >= 1, "a row under the first header");
    // Still running: only an interrupt ends it.
    assert!(child.0.try_wait().unwrap().is_none());
    drop(child);
    h.server.shutdown().await;
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat"))
            && let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..])
            && rest.split_whitespace().nth(1) == Some(&pid.to_string())
        {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn serve_binary_starts_the_default_pool_and_stops_cleanly_on_sigterm() {
    let listen = free_listen_addr();
    let base = format!("http://{listen}");
    let mut child = Command::new(EXE)
        .args(["serve", "--listen", &listen, "--shutdown-grace", "1s"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = warmpool::client::Client::new(&base, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(p) = client.pools().await
            && p.len() == 1
            && p[0].idle == 2
        {
            assert_eq!(p[0].name, "default");
            assert!(p[0].labels.contains(&"linux".to_string()));
            assert!(p[0].labels.contains(&std::env::consts::ARCH.to_string()));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "default pool never had 2 idle agents"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let agents = children_of(child.id());
    assert_eq!(agents.len(), 2, "two agent child processes");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    for p in agents {
        assert!(!alive(p), "agent {p} outlived the service");
    }
}

/// `--hub-url` as a person writes it (host and port, no scheme, no path) reaches the hub: the
/// agents used to dial the bare URL and got 404 forever, the pool never warm.
#[tokio::test]
async fn a_hub_url_without_scheme_or_path_reaches_the_hub() {
    let listen = free_listen_addr();
    let child = Command::new(EXE)
        .args(["serve", "--listen", &listen, "--hub-url", &listen])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let serve = Term(child);
    let client = warmpool::client::Client::new(&format!("http://{listen}"), None);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pools = client.pools().await;
        if let Ok(p) = &pools
            && p.len() == 1
            && p[0].idle == 2
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agents given --hub-url {listen} never connected: {pools:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(serve);
}

/// Stops a `serve` child with SIGTERM (it stops its agents) and waits, passing or not.
struct Term(std::process::Child);

impl Drop for Term {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

#[test]
fn serve_rejects_an_invalid_pools_file_naming_each_field() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pools.yaml");
    std::fs::write(
        &f,
        "pools:\n  - name: ok\n    minIdle: 9\n    maxTotal: 2\n    idleTtl: whenever\n",
    )
    .unwrap();
    let out = Command::new(EXE)
        .args(["serve", "--listen", "127.0.0.1:0", "--pools"])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pools[0].idleTtl"), "{err}");
    assert!(err.contains("whenever"), "{err}");
}

#[test]
fn a_missing_pools_file_is_named_with_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("missing.yaml");
    let out = Command::new(EXE)
        .args(["serve", "--listen", "127.0.0.1:0", "--pools"])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&*f.to_string_lossy()), "{err}");
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "the cause once: {err}"
    );
}

#[test]
fn serve_rejects_a_connection_reserve_that_leaves_no_ordinary_slot() {
    for (args, want) in [
        (
            [
                "--max-connections",
                "10",
                "--agent-reserved-connections",
                "10",
            ],
            "--agent-reserved-connections 10 must be at least 1 and below --max-connections 10",
        ),
        (
            [
                "--max-connections",
                "1",
                "--agent-reserved-connections",
                "1",
            ],
            "--max-connections 1 is too low",
        ),
    ] {
        let out = Command::new(EXE)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(255), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// Flags with no environment variable twin, as README.md names them: `run --env` (KEY=VALUE
/// pairs, repeatable) and `bench`'s measurement flags (a one-off experiment is its command
/// line; its `--server`, `--api-token-file` and `--ca-file` do have twins).
fn without_env_twin(path: &str, flag: &str) -> bool {
    (path == "warmpool run" && flag == "env")
        || (path.starts_with("warmpool bench")
            && !["server", "api-token-file", "ca-file"].contains(&flag))
}

#[test]
fn every_flag_has_an_env_twin_but_the_ones_the_readme_names() {
    use clap::CommandFactory;
    fn walk(cmd: &clap::Command, path: String, missing: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["help", "version"].contains(&long) || arg.is_hide_set() {
                continue;
            }
            if arg.get_env().is_none() && !without_env_twin(&path, long) {
                missing.push(format!("{path} --{long}"));
            }
        }
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, format!("{path} {}", sub.get_name()), missing);
        }
    }
    let mut missing = Vec::new();
    walk(
        &warmpool::cli::Cli::command(),
        "warmpool".into(),
        &mut missing,
    );
    assert!(missing.is_empty(), "flags with no env twin: {missing:?}");
    // Both exceptions are real (the list is not stale) and README.md says which they are.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let sentence = readme
        .lines()
        .skip_while(|l| !l.starts_with("Every flag has an environment variable twin"))
        .take(4)
        .collect::<Vec<_>>()
        .join(" ");
    for named in [
        "`run --env`",
        "`bench`",
        "`--server`, `--api-token-file` and `--ca-file`",
    ] {
        assert!(sentence.contains(named), "README names {named}: {sentence}");
    }
    let cmd = warmpool::cli::Cli::command();
    let run = cmd.find_subcommand("run").unwrap();
    let env = run.get_arguments().find(|a| a.get_long() == Some("env"));
    assert!(env.is_some_and(|a| a.get_env().is_none()));
}

/// A loopback address with a port free right now, for a `serve` child to listen on.
fn free_listen_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}
