//! Process-tree and workspace housekeeping (Linux `/proc`), shared by the agent and the process
//! backend.
//!
//! The agent makes itself a child subreaper, so every process a job leaves behind (even a
//! double-forked daemon) stays its descendant and can be counted and killed on release. The
//! service does the same with the process backend, so the jobs of an agent that died hard are
//! re-parented to it and swept ([`kill_orphans`]). This module reads `/proc` (through the
//! `procfs` crate: the one /proc parser of warmpool, also used by `bench/sysinfo.rs`), sends
//! signals and walks directories; it keeps no state.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// Puts a command in its own process group (so its whole tree can be signalled at once) and
/// has it sent `death_signal` when the thread that spawned it dies (`PR_SET_PDEATHSIG`).
pub fn isolate(cmd: &mut tokio::process::Command, death_signal: i32) {
    cmd.process_group(0).kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, death_signal);
            Ok(())
        });
    }
}

/// Makes this process the reaper of its orphaned descendants.
pub fn become_subreaper() {
    // SAFETY: prctl with plain integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// (pid, parent pid, state char, process group) of one process, from its `stat`.
type Row = (i32, i32, char, i32);

fn row(p: &procfs::process::Process) -> Option<Row> {
    let st = p.stat().ok()?;
    Some((st.pid, st.ppid, st.state, st.pgrp))
}

/// Every process's [`Row`] (processes that vanish during the walk are skipped).
fn table() -> Vec<Row> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.flatten().filter_map(|p| row(&p)).collect()
}

/// Live process-group leaders whose environment has `marker` (a `NAME=` prefix is added), with
/// their whole environment: how agents that outlive the service are found again. Processes of
/// other users (environ unreadable) are skipped.
pub fn group_leaders_with_env(marker: &str) -> Vec<(i32, HashMap<String, String>)> {
    let marker = std::ffi::OsStr::new(marker);
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in all.flatten() {
        let Some((pid, _, state, pgid)) = row(&p) else {
            continue;
        };
        if pid != pgid || state == 'Z' || state == 'X' {
            continue;
        }
        let Ok(env) = p.environ() else { continue };
        if !env.contains_key(marker) {
            continue;
        }
        let env = env
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                )
            })
            .collect();
        out.push((pid, env));
    }
    out
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    stat_of(pid).is_some_and(|(_, _, st, _)| st != 'Z' && st != 'X')
}

/// When `pid` started (clock ticks since boot, `/proc/PID/stat` field 22): with the pid, it
/// names one process for good (a pid alone may be reused).
pub fn start_time(pid: i32) -> Option<u64> {
    Some(
        procfs::process::Process::new(pid)
            .ok()?
            .stat()
            .ok()?
            .starttime,
    )
}

/// The [`Row`] of one process.
fn stat_of(pid: i32) -> Option<Row> {
    row(&procfs::process::Process::new(pid).ok()?)
}

/// Direct children of `pid` from /proc/PID/task/*/children; None when the kernel has no such
/// files (CONFIG_PROC_CHILDREN).
fn children_of(pid: i32) -> Option<Vec<i32>> {
    let tasks = procfs::process::Process::new(pid).ok()?.tasks().ok()?;
    let mut out = Vec::new();
    let mut any = false;
    for t in tasks.flatten() {
        let Ok(c) = t.children() else { continue };
        any = true;
        out.extend(c.into_iter().map(|p| p as i32));
    }
    any.then_some(out)
}

/// The process table below this process: its descendants, read through the children files
/// (a few reads instead of one per process on the machine: one `children` file per thread of
/// ours, then one per descendant), or the whole table when those files do not exist.
fn table_below_me() -> Vec<Row> {
    let me = std::process::id() as i32;
    let Some(mine) = children_of(me) else {
        return table();
    };
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for c in mine {
        if let Some(row) = stat_of(c) {
            out.push(row);
            stack.push(c);
        }
    }
    while let Some(p) = stack.pop() {
        for c in children_of(p).unwrap_or_default() {
            if let Some(row) = stat_of(c) {
                out.push(row);
                stack.push(c);
            }
        }
    }
    out
}

/// Live (non-zombie) descendants of this process in `table`, excluding `keep` and their
/// descendants.
fn leftovers_in(table: &[Row], keep: &HashSet<i32>) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut children: HashMap<i32, Vec<(i32, char)>> = HashMap::new();
    for (pid, ppid, st, _) in table {
        children.entry(*ppid).or_default().push((*pid, *st));
    }
    let mut out = Vec::new();
    let mut stack = vec![me];
    while let Some(p) = stack.pop() {
        for (c, st) in children.get(&p).cloned().unwrap_or_default() {
            if keep.contains(&c) {
                continue;
            }
            if st != 'Z' {
                out.push(c);
            }
            stack.push(c);
        }
    }
    out
}

/// Live (non-zombie) descendants of this process, excluding `keep` and their descendants.
pub fn leftovers(keep: &HashSet<i32>) -> Vec<i32> {
    leftovers_in(&table_below_me(), keep)
}

/// One walk below this process: reaps the zombie children nobody else waits for (orphans
/// re-parented to us, not in `keep`) and returns the live descendants outside `keep` and their
/// trees, as [`leftovers`] does.
pub fn sweep(keep: &HashSet<i32>) -> Vec<i32> {
    let me = std::process::id() as i32;
    let table = table_below_me();
    for (pid, ppid, st, _) in &table {
        if *ppid == me && *st == 'Z' && !keep.contains(pid) {
            // SAFETY: waitpid on a specific zombie child, non-blocking.
            unsafe {
                libc::waitpid(*pid, std::ptr::null_mut(), libc::WNOHANG);
            }
        }
    }
    leftovers_in(&table, keep)
}

/// Kills and reaps what dead agents left behind: every child re-parented to this process (a
/// child in another process group than ours that is not one of `spawned`, the children we
/// started ourselves, each leading its own group), with its whole subtree and every process
/// group in it. Level-triggered: call it again until it returns 0 (a forking tree may add
/// members between the walk and the signals). Returns how many processes were signalled.
pub fn kill_orphans(spawned: &std::collections::BTreeSet<i32>) -> usize {
    let me = std::process::id() as i32;
    // SAFETY: getpgrp has no preconditions.
    let my_group = unsafe { libc::getpgrp() };
    // Direct children only (cheap: one read per thread of ours); the subtrees below the
    // orphans are walked only when there are orphans.
    let direct = direct_children(me);
    let mut n = 0;
    for pid in direct {
        if spawned.contains(&pid) {
            continue;
        }
        let Some((_, _, st, pgid)) = stat_of(pid) else {
            continue;
        };
        if pgid == my_group || spawned.contains(&pgid) {
            continue;
        }
        if st == 'Z' {
            // SAFETY: reaping a specific zombie child of ours, non-blocking.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            continue;
        }
        n += kill_tree(pid, &|g| g != my_group && !spawned.contains(&g));
    }
    n
}

/// The direct children of `pid`: from its `children` files, or from the whole process table
/// where those are missing (kernels without `CONFIG_PROC_CHILDREN`).
fn direct_children(pid: i32) -> Vec<i32> {
    match children_of(pid) {
        Some(c) => c,
        None => table()
            .into_iter()
            .filter(|(_, ppid, _, _)| *ppid == pid)
            .map(|(p, ..)| p)
            .collect(),
    }
}

/// SIGKILLs `root`, everything below it, and every process group among them for which
/// `group_ok` holds. Returns how many processes were signalled.
fn kill_tree(root: i32, group_ok: &dyn Fn(i32) -> bool) -> usize {
    let mut stack = vec![root];
    let mut seen = HashSet::new();
    let mut groups = HashSet::new();
    while let Some(p) = stack.pop() {
        if !seen.insert(p) {
            continue;
        }
        if let Some((_, _, st, pgid)) = stat_of(p) {
            if pgid > 1 && group_ok(pgid) {
                groups.insert(pgid);
            }
            if st != 'Z' {
                // SAFETY: stopping a descendant of ours (children first would let it fork on).
                unsafe { libc::kill(p, libc::SIGSTOP) };
            }
        }
        stack.extend(children_of(p).unwrap_or_default());
    }
    for g in &groups {
        // SAFETY: a process group found below us, not ours and not a live agent's.
        unsafe { libc::killpg(*g, libc::SIGKILL) };
    }
    let mut n = 0;
    for p in &seen {
        // SAFETY: a descendant of ours.
        if unsafe { libc::kill(*p, libc::SIGKILL) } == 0 {
            n += 1;
        }
    }
    n
}

/// Kills every descendant of this process but those in `keep` (with their own descendants),
/// and every process group among them, at once, then waits up to `wait` for them to be gone
/// (reaping our own children). For an exit that cannot wait for a graceful stop. Returns how
/// many were still alive afterwards.
pub fn kill_all_descendants(keep: &std::collections::BTreeSet<i32>, wait: Duration) -> usize {
    let me = std::process::id() as i32;
    // SAFETY: getpgrp has no preconditions.
    let my_group = unsafe { libc::getpgrp() };
    let deadline = Instant::now() + wait;
    loop {
        let direct = direct_children(me);
        let mut left = 0;
        for pid in direct {
            if keep.contains(&pid) {
                continue;
            }
            match stat_of(pid) {
                Some((_, _, 'Z', _)) => {
                    // SAFETY: reaping a specific zombie child of ours, non-blocking.
                    unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
                }
                Some(_) => {
                    left += 1;
                    kill_tree(pid, &|g| g != my_group && !keep.contains(&g));
                }
                None => {}
            }
        }
        if left == 0 || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills every descendant except `keep`, waiting up to `timeout` for them to go.
/// Returns how many were still alive afterwards.
pub async fn kill_leftovers(keep: &HashSet<i32>, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let left = sweep(keep);
        if left.is_empty() {
            return 0;
        }
        if Instant::now() >= deadline {
            return left.len();
        }
        for pid in &left {
            // SAFETY: signalling processes that are our own descendants.
            unsafe {
                libc::kill(*pid, libc::SIGKILL);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Bytes under `dir` (files and symlinks themselves; links are not followed).
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for ent in rd.flatten() {
            let Ok(md) = ent.path().symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                stack.push(ent.path());
            } else {
                total += md.len();
            }
        }
    }
    total
}

/// Removes everything inside `dir`, keeping `dir` itself. Returns the first error.
pub fn wipe(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut first_err = None;
    for ent in std::fs::read_dir(dir)?.flatten() {
        let p = ent.path();
        let r = match p.symlink_metadata() {
            Ok(md) if md.is_dir() => std::fs::remove_dir_all(&p),
            Ok(_) => std::fs::remove_file(&p),
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn workspace_bytes_and_wipe() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/b/f"), vec![0u8; 1000]).unwrap();
        std::fs::write(d.path().join("g"), vec![0u8; 24]).unwrap();
        assert_eq!(dir_bytes(d.path()), 1024);
        wipe(d.path()).unwrap();
        assert_eq!(dir_bytes(d.path()), 0);
        assert!(d.path().exists());
    }

    #[test]
    fn marked_group_leaders_are_found_with_their_environment() {
        // A command name with spaces and parentheses: `stat` fields follow the last ')'.
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("odd (name) x");
        std::fs::copy("/bin/sleep", &exe).unwrap();
        let marker = format!("WARMPOOL_PROCS_TEST_{}", std::process::id());
        let mut child = std::process::Command::new(&exe)
            .arg("30")
            .env(&marker, "yes")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let mut found = Vec::new();
        for _ in 0..200 {
            found = group_leaders_with_env(&marker);
            if !found.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, pid);
        assert_eq!(found[0].1.get(&marker).map(String::as_str), Some("yes"));
        assert!(alive(pid));
        assert!(
            start_time(pid).is_some_and(|t| t >= start_time(std::process::id() as i32).unwrap())
        );
        let _ = child.kill();
        let _ = child.wait();
        assert!(!alive(pid));
        assert!(group_leaders_with_env(&marker).is_empty());
    }

    #[test]
    fn descendants_are_found_through_children_files() {
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("sleep 30 & wait")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let mut found = Vec::new();
        for _ in 0..100 {
            found = leftovers(&HashSet::new());
            if found.len() >= 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(found.contains(&pid), "{found:?}");
        assert!(found.len() >= 2, "the sleep under sh: {found:?}");
        assert!(!leftovers(&HashSet::from([pid])).contains(&pid));
        let _ = child.kill();
        let _ = child.wait();
    }
}
