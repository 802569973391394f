//! Processes: whether one exists, signals, joining a cgroup between fork
//! and exec, and giving back the agent's own start-up pages. The system
//! calls behind the CLI and the agent's lifecycle, nothing more.

use std::ffi::CString;
use std::io;
use std::os::unix::process::CommandExt;

/// Whether a process with this pid exists (ours to signal or not).
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Send `signal` to `pid`.
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: plain signal send.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// Let the terminal's Ctrl-C and Ctrl-\\ reach a child we wait for, not us.
pub fn ignore_interrupts() {
    // SAFETY: plain signal disposition changes.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
}

/// Make `cmd`'s process join the cgroup whose `cgroup.procs` file is
/// `procs` before it execs, so its first connect is already captured.
pub fn join_cgroup_before_exec(cmd: &mut std::process::Command, procs: CString) {
    // SAFETY: only async-signal-safe calls (open, write, close) between fork
    // and exec; the path was prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if rc != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Give back the pages of the agent's own executable that start-up touched
/// (command line, loader, kernel feature probes, config parsing, the
/// Kubernetes client's discovery): `MADV_PAGEOUT` on the executable's
/// read-only and executable mappings. What the data path runs faults back
/// in as it runs; the rest leaves the resident set (about 5.7 MB of file
/// pages at idle). Kernels before 5.4 refuse the advice; nothing changes
/// then. Returns the bytes advised.
pub fn release_startup_pages() -> usize {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else { return 0 };
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { return 0 };
    let mut advised = 0;
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else { continue };
        if parts.nth(3).map(std::path::Path::new) != Some(exe.as_path()) || perms.contains('w') {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else { continue };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else { continue };
        // SAFETY: an advice on a mapping of our own; the pages stay
        // valid and fault back in from the file when used.
        if unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_PAGEOUT) } == 0 {
            advised += b - a;
        }
    }
    advised
}
