//! Unix: `close(2)` with its result, `O_NOFOLLOW`, inode identity, `pwrite`, liveness of a pid.

use std::fs::{File, Metadata, OpenOptions, Permissions};
use std::io;
use std::os::fd::IntoRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};

use rustix::fs::OFlags;
use rustix::io::Errno;
use rustix::process::Pid;

/// Whether the result of closing a descriptor is visible on this platform.
pub(crate) const CHECKS_CLOSE: bool = true;

/// Closes `file`'s descriptor and returns what `close(2)` said. Never retried: on
/// `EINTR` the descriptor is already released on Linux (and unspecified elsewhere), and a
/// second `close` could close a descriptor another thread just opened.
pub(crate) fn close(file: File) -> io::Result<()> {
    let fd = file.into_raw_fd();
    // SAFETY: `fd` comes from `into_raw_fd`, so this function owns it and nothing else
    // uses or closes it; it is not used again whatever `close` returns.
    unsafe { rustix::io::try_close(fd) }.map_err(io::Error::from)
}

/// Makes `open` refuse a symbolic link as the last path component (`ELOOP`).
pub(crate) fn no_follow(options: &mut OpenOptions) -> &mut OpenOptions {
    options.custom_flags(OFlags::NOFOLLOW.bits() as i32)
}

/// As [`no_follow`], and without side effects on what is not a regular file: a FIFO
/// does not block the `open` (`O_NONBLOCK`), a terminal does not become the controlling
/// one (`O_NOCTTY`). Neither changes anything for a regular file (`flock` still waits).
pub(crate) fn no_follow_inert(options: &mut OpenOptions) -> &mut OpenOptions {
    options.custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32)
}

/// Sets the mode used when `options` creates a file.
pub(crate) fn create_mode(options: &mut OpenOptions, mode: u32) -> &mut OpenOptions {
    options.mode(mode)
}

/// The identity of a file: device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    pub(crate) fn of(meta: &Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// Writes `bytes` at offset 0 without moving the cursor.
pub(crate) fn write_at_start(file: &File, bytes: &[u8]) -> io::Result<()> {
    file.write_all_at(bytes, 0)
}

/// Reads at most `buf.len()` bytes from offset 0 without moving the cursor.
pub(crate) fn read_at_start(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    file.read_at(buf, 0)
}

/// Whether creating a file with these permissions may have given it fewer bits, through
/// the umask. Owner-only modes (`0o600`, `0o400`, `0o700`) are taken as safe: no umask in
/// use masks the owner's bits, and tempfile's own default (`0o600`) relies on that too.
pub(crate) fn umask_may_change(permissions: &Permissions) -> bool {
    permissions.mode() & 0o7077 != 0
}

/// Whether a process with this pid may exist (in this pid namespace). `false` only when
/// the kernel says there is none (`ESRCH`).
pub(crate) fn process_may_exist(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return true;
    };
    !matches!(rustix::process::test_kill_process(pid), Err(Errno::SRCH))
}

/// Whether the pid recorded in an unlocked lock file may name the process that wrote
/// it, still running: a pid file of another program that does not use `flock` (taking it
/// over would overwrite it, then delete it on release). `written` is the file's
/// modification time.
///
/// `false` (a stale record, safe to take over) when the pid is ours (a record of this
/// process, or of an earlier one that had our pid), when no such process exists (or
/// can: past `i32::MAX`) or it is a zombie, and on Linux when the record is older than
/// this boot or the process started after the record was written (the pid was reused:
/// the writer died before it started). Otherwise `true`: a process with that pid that
/// started before the record was written may be its writer, and so may one whose start
/// cannot be read (no `/proc`, another system) or a record dated in the future (the
/// clock went back since), which cannot be placed in time.
pub(crate) fn record_writer_running(pid: u32, written: Option<std::time::SystemTime>) -> bool {
    // A pid past `i32::MAX` names no process (`pid_t` is an `i32`).
    if pid == std::process::id() || i32::try_from(pid).is_err() || !process_may_exist(pid) {
        return false;
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some(written) = written
        && let Some(judged) = linux::may_have_written(pid, written)
    {
        return judged;
    }
    let _ = written;
    true
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod linux {
    use std::time::{Duration, SystemTime};

    /// How much later than the record a process may seem to have started and still be
    /// taken for its writer: file systems date files coarsely (a second on ext3 and
    /// HFS+, two on FAT; a clock tick on Linux before 6.13), and `/proc` dates starts to
    /// a hundredth of a second. A pid reused this soon after its record was written is
    /// refused rather than taken over.
    const MARGIN: Duration = Duration::from_secs(2);

    /// Whether process `pid` may have written a record dated `written` (wall clock):
    /// `Some(false)` for a record older than this boot, a zombie, or a process that
    /// started after the record (judged on the boot-time clock `/proc/<pid>/stat` dates
    /// starts with); `None` when it cannot be told.
    pub(super) fn may_have_written(pid: u32, written: SystemTime) -> Option<bool> {
        // The record's time on the boot-time clock: how long ago it was written, taken
        // from now. A record from the future cannot be placed: `None`.
        let age = SystemTime::now().duration_since(written).ok()?;
        let Some(written) = boot_time_now()?.checked_sub(age) else {
            return Some(false); // written before this boot: its writer is gone
        };
        let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ...`: `comm` may hold spaces and parentheses, so fields are
        // counted after its last `)`.
        let after = &stat[stat.iter().rposition(|&b| b == b')')? + 1..];
        let mut fields = after.split(|&b| b == b' ').filter(|f| !f.is_empty());
        let state = fields.next()?;
        if matches!(state, b"Z" | b"X" | b"x") {
            return Some(false); // dead, waiting to be reaped: its pid names no writer
        }
        // `starttime` is field 22; `state` was field 3.
        let ticks: u64 = std::str::from_utf8(fields.nth(22 - 4)?)
            .ok()?
            .parse()
            .ok()?;
        // SAFETY: `sysconf` has no memory-safety preconditions.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
        if hz == 0 {
            return None;
        }
        let started = Duration::from_secs(ticks / hz)
            + Duration::from_nanos((ticks % hz) * 1_000_000_000 / hz);
        Some(started <= written + MARGIN)
    }

    /// Time since boot, on the clock `/proc/<pid>/stat` dates process starts with.
    fn boot_time_now() -> Option<Duration> {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `t` is a valid, writable `timespec`.
        if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut t) } != 0 {
            return None;
        }
        Some(Duration::new(
            u64::try_from(t.tv_sec).ok()?,
            u32::try_from(t.tv_nsec).ok()?,
        ))
    }
}

/// Whether removing files of crashed writers is supported here.
pub(crate) const CLEANS_STALE: bool = true;

/// Whether a lock file's identity can be re-checked (and so safely unlinked) here.
pub(crate) const CHECKS_IDENTITY: bool = true;
