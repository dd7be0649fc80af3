//! `warmpool run` as a child process, its stdout read line by line as it arrives.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `warmpool run` with stdout read line by line into a shared buffer as it arrives.
pub struct Run {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: std::thread::JoinHandle<String>,
}

/// `warmpool run -s SELECTOR -- sh -c SCRIPT` against `server`.
pub fn spawn_run(server: &str, selector: &str, script: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_warmpool"))
        .args(["run", "-s", selector, "--", "sh", "-c", script])
        .env("WARMPOOL_SERVER", server)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let out = BufReader::new(child.stdout.take().unwrap());
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in out.lines() {
            l.lock().unwrap().push(line.unwrap());
        }
    });
    let mut err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    Run {
        child,
        lines,
        stderr,
    }
}

impl Run {
    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }
    pub async fn wait(mut self) -> (i32, Vec<String>, String) {
        let status = tokio::task::spawn_blocking(move || {
            let s = self.child.wait().unwrap();
            (s, self.stderr.join().unwrap())
        })
        .await
        .unwrap();
        // The reader thread finishes at EOF, right after the exit.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let n = loop {
            let n = Arc::strong_count(&self.lines);
            if n == 1 || std::time::Instant::now() > deadline {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(n, 1, "stdout reader finished");
        let lines = self.lines.lock().unwrap().clone();
        (status.0.code().unwrap_or(-1), lines, status.1)
    }
}
