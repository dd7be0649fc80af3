//! What `warmpool bench agents` reads about a local server from /proc: resident memory, CPU
//! time, and which process listens on a loopback port. Also raises this process's open-file
//! limit (thousands of agent connections need thousands of descriptors).

use std::time::Duration;

/// Resident set size of a process, bytes (`VmRSS` in /proc/PID/status).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = procfs::process::Process::new(pid as i32)
        .ok()?
        .status()
        .ok()?;
    Some(status.vmrss? * 1024)
}

/// User + system CPU time a process has used (/proc/PID/stat fields 14 and 15).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let st = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    let hz = procfs::ticks_per_second().max(1);
    Some(Duration::from_nanos(
        (st.utime + st.stime).saturating_mul(1_000_000_000) / hz,
    ))
}

/// The process listening on TCP `port` (IPv4 or IPv6), found through /proc/net/tcp* and the
/// socket inodes in /proc/*/fd. None when it is not visible (another user's process).
pub fn listener_pid(port: u16) -> Option<u32> {
    use procfs::net::TcpState;
    use procfs::process::FDTarget;
    let inodes: Vec<u64> = [procfs::net::tcp(), procfs::net::tcp6()]
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.local_address.port() == port && e.state == TcpState::Listen)
        .map(|e| e.inode)
        .collect();
    if inodes.is_empty() {
        return None;
    }
    for p in procfs::process::all_processes().ok()?.flatten() {
        let Ok(fds) = p.fd() else { continue };
        if fds
            .flatten()
            .any(|fd| matches!(fd.target, FDTarget::Socket(i) if inodes.contains(&i)))
        {
            return Some(p.pid as u32);
        }
    }
    None
}

/// Raises the soft open-file limit to the hard one; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_bytes(me).unwrap() > 1024 * 1024);
        assert!(cpu_time(me).is_some());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(listener_pid(port), Some(me));
        assert!(raise_nofile() >= 256);
    }
}
