//! Waiting for a child's exit *without reaping it*.
//!
//! An exited child that is not reaped stays a zombie, and a zombie keeps its pid (and
//! its process group id) reserved: no new process can get it. So as long as the guard
//! has not reaped the child, signalling its pid or its group can never hit a stranger
//! that recycled the pid. The guard therefore observes exits with
//! `waitid(WEXITED | WNOWAIT)` and reaps only at the very end, after its last signal.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use rustix::process::{Pid, WaitId, WaitIdOptions, WaitIdStatus, waitid};

fn pid_of(pid: u32) -> io::Result<Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("bad pid {pid}")))
}

fn to_exit_status(status: &WaitIdStatus) -> ExitStatus {
    if let Some(code) = status.exit_status() {
        ExitStatus::from_raw((code & 0xff) << 8)
    } else {
        let signal = status.terminating_signal().unwrap_or(0) & 0x7f;
        let core = if status.dumped() { 0x80 } else { 0 };
        ExitStatus::from_raw(signal | core)
    }
}

/// The exit status if child `pid` has exited, leaving it unreaped.
///
/// `ECHILD` (someone else reaped it, e.g. with `SIGCHLD` ignored) is an error: the pid
/// may already belong to another process, so the caller must not signal it.
pub(crate) fn exited(pid: u32) -> io::Result<Option<ExitStatus>> {
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    loop {
        match waitid(WaitId::Pid(pid_of(pid)?), options) {
            Ok(status) => return Ok(status.as_ref().map(to_exit_status)),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::CHILD) => return Err(reaped_elsewhere(pid)),
            Err(e) => return Err(e.into()),
        }
    }
}

pub(crate) fn reaped_elsewhere(pid: u32) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "child {pid} was reaped by someone else (is SIGCHLD ignored, or does other \
             code wait for any child?); not signalling its pid, which may be reused"
        ),
    )
}

/// Waits until child `pid` has exited or `timeout` passes (`None`: no limit), leaving
/// it unreaped. On Linux it sleeps on a pidfd, so it wakes the moment the child exits;
/// elsewhere, or where pidfds are refused, it polls with a growing interval.
pub(crate) fn wait_exited(pid: u32, timeout: Option<Duration>) -> io::Result<Option<ExitStatus>> {
    if let Some(status) = exited(pid)? {
        return Ok(Some(status));
    }
    let until = timeout.map(|t| Instant::now() + t);
    let left = || until.map(|u| u.saturating_duration_since(Instant::now()));
    #[cfg(target_os = "linux")]
    if let Ok(fd) = rustix::process::pidfd_open(pid_of(pid)?, rustix::process::PidfdFlags::empty())
    {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        loop {
            let wait = left();
            if wait == Some(Duration::ZERO) {
                return exited(pid);
            }
            // A wait too long for a timespec is as good as no limit.
            let ts = wait.and_then(|w| Timespec::try_from(w).ok());
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            match poll(&mut fds, ts.as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(status) = exited(pid)? {
                return Ok(Some(status));
            }
        }
    }
    let mut nap = Duration::from_micros(50);
    loop {
        if let Some(status) = exited(pid)? {
            return Ok(Some(status));
        }
        match left() {
            Some(Duration::ZERO) => return Ok(None),
            Some(l) => std::thread::sleep(nap.min(l)),
            None => std::thread::sleep(nap),
        }
        nap = (nap * 2).min(Duration::from_millis(10));
    }
}

/// The async twin of [`wait_exited`]: a pidfd registered with tokio on Linux, a
/// growing sleep elsewhere.
#[cfg(feature = "tokio")]
pub(crate) async fn wait_exited_async(
    pid: u32,
    timeout: Option<Duration>,
) -> io::Result<Option<ExitStatus>> {
    if let Some(status) = exited(pid)? {
        return Ok(Some(status));
    }
    let until = timeout.map(|t| tokio::time::Instant::now() + t);
    let waiting = async {
        #[cfg(target_os = "linux")]
        if let Ok(fd) =
            rustix::process::pidfd_open(pid_of(pid)?, rustix::process::PidfdFlags::empty())
        {
            // SAFETY: `fd` is an `OwnedFd`, open and owned by the `AsyncFd` for its whole
            // life, and its `as_raw_fd` always returns the same descriptor.
            let registered = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            };
            if let Ok(fd) = registered {
                loop {
                    let mut ready = fd.readable().await?;
                    if let Some(status) = exited(pid)? {
                        return Ok(status);
                    }
                    ready.clear_ready();
                }
            }
        }
        let mut nap = Duration::from_micros(200);
        loop {
            if let Some(status) = exited(pid)? {
                return Ok(status);
            }
            tokio::time::sleep(nap).await;
            nap = (nap * 2).min(Duration::from_millis(10));
        }
    };
    match until {
        None => waiting.await.map(Some),
        Some(until) => match tokio::time::timeout_at(until, waiting).await {
            Ok(result) => result.map(Some),
            Err(_elapsed) => exited(pid),
        },
    }
}

/// The result of signalling what is left of a process group: `ESRCH` (nothing left) is
/// success.
pub(crate) fn nothing_left_is_ok(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::SRCH.raw_os_error()) => Ok(()),
        other => other,
    }
}
