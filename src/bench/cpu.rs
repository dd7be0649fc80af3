//! CPU time from /proc for `warmpool bench --floor`: this process's threads summed by thread
//! name (the floor and the embedded warmpool each run on a runtime whose threads carry their
//! own name, so the load generator's threads are told apart), and the processes below one
//! (warmpool's agents). It only reads /proc; it starts and names nothing itself.

use std::time::Duration;

/// Thread name of the embedded warmpool server's runtime (worker and blocking threads).
pub const SERVER_THREADS: &str = "wp-server";
/// Thread name of the floor server's runtime.
pub const FLOOR_THREADS: &str = "wp-floor";

fn ticks(t: u64) -> Duration {
    let hz = procfs::ticks_per_second().max(1);
    Duration::from_nanos(t.saturating_mul(1_000_000_000) / hz)
}

/// CPU time (user + system) used so far, split the way the bench reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    /// Threads of this process named [`SERVER_THREADS`], or the whole server process when it
    /// runs apart (`--server` on this machine).
    pub server: Duration,
    /// Threads of this process named [`FLOOR_THREADS`].
    pub floor: Duration,
    /// The other threads of this process: the load generator.
    pub client: Duration,
    /// The processes below the server (agents, and their jobs once reaped by an agent),
    /// plus the children the server process has reaped.
    pub agents: Duration,
}

impl Snapshot {
    /// What was used from `before` to `self` (a thread that exited in between counts zero).
    pub fn since(&self, before: &Snapshot) -> Snapshot {
        Snapshot {
            server: self.server.saturating_sub(before.server),
            floor: self.floor.saturating_sub(before.floor),
            client: self.client.saturating_sub(before.client),
            agents: self.agents.saturating_sub(before.agents),
        }
    }
}

/// Where the warmpool server runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServerCpu {
    /// In this process, on threads named [`SERVER_THREADS`] (`--embedded`).
    InProcess,
    /// Another process of this machine.
    Pid(u32),
    /// Not visible (a remote server): server and agent figures stay zero.
    Unknown,
}

/// Reads the figures now.
pub fn snapshot(server: ServerCpu) -> Snapshot {
    let mut s = Snapshot::default();
    let me = std::process::id();
    if let Ok(p) = procfs::process::Process::myself()
        && let Ok(tasks) = p.tasks()
    {
        for t in tasks.flatten() {
            let Ok(st) = t.stat() else { continue };
            let used = ticks(st.utime + st.stime);
            match group(&st.comm) {
                Group::Server => s.server += used,
                Group::Floor => s.floor += used,
                Group::Client => s.client += used,
            }
        }
    }
    let root = match server {
        ServerCpu::InProcess => Some(me),
        ServerCpu::Pid(pid) => {
            s.server = process_time(pid, false).unwrap_or_default();
            Some(pid)
        }
        ServerCpu::Unknown => None,
    };
    if let Some(root) = root {
        s.agents = descendants(root)
            .into_iter()
            .filter_map(|pid| process_time(pid, true))
            .sum::<Duration>()
            + reaped(root).unwrap_or_default();
    }
    s
}

enum Group {
    Server,
    Floor,
    Client,
}

/// The group of a thread by its name (`comm`, at most 15 bytes).
fn group(comm: &str) -> Group {
    if comm.starts_with(SERVER_THREADS) {
        Group::Server
    } else if comm.starts_with(FLOOR_THREADS) {
        Group::Floor
    } else {
        Group::Client
    }
}

/// utime + stime of a process (all its threads), plus with `with_reaped` the children it has
/// waited for (cutime + cstime).
fn process_time(pid: u32, with_reaped: bool) -> Option<Duration> {
    let st = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    let mut t = st.utime + st.stime;
    if with_reaped {
        t += (st.cutime + st.cstime).max(0) as u64;
    }
    Some(ticks(t))
}

/// cutime + cstime of a process: its children that have exited and been waited for.
fn reaped(pid: u32) -> Option<Duration> {
    let st = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    Some(ticks((st.cutime + st.cstime).max(0) as u64))
}

/// Every process below `pid` (children, grandchildren, ...), through each thread's
/// `/proc/PID/task/TID/children`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(proc_) = procfs::process::Process::new(p as i32) else {
            continue;
        };
        let Ok(tasks) = proc_.tasks() else { continue };
        for t in tasks.flatten() {
            for c in t.children().unwrap_or_default() {
                if !out.contains(&c) {
                    out.push(c);
                    todo.push(c);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_grouped_by_name_and_children_found() {
        // The spinning thread stays alive while it is read (an exited thread leaves
        // /proc/self/task).
        let (spun_tx, spun_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let before = snapshot(ServerCpu::InProcess);
        let spinner = std::thread::Builder::new()
            .name(format!("{SERVER_THREADS}-1"))
            .spawn(move || {
                let t = std::time::Instant::now();
                let mut x = 0u64;
                while t.elapsed() < Duration::from_millis(60) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
                spun_tx.send(()).unwrap();
                let _ = done_rx.recv();
            })
            .unwrap();
        spun_rx.recv().unwrap();
        let mid = snapshot(ServerCpu::InProcess);
        done_tx.send(()).unwrap();
        spinner.join().unwrap();
        // A thread that ran is counted in its group (tick granularity: 10 ms at 100 Hz).
        assert!(
            mid.since(&before).server >= Duration::from_millis(20),
            "{mid:?}"
        );
        assert_eq!(mid.since(&before).floor, Duration::ZERO);
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let found = descendants(std::process::id()).contains(&child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(found, "sleep is a child of this process");
        assert_eq!(
            Snapshot {
                server: Duration::from_millis(5),
                ..Snapshot::default()
            }
            .since(&Snapshot {
                server: Duration::from_millis(9),
                floor: Duration::from_millis(1),
                ..Snapshot::default()
            }),
            Snapshot::default(),
            "an exited thread never makes a negative figure"
        );
    }
}
