//! Unix: `close(2)` with its result, `O_NOFOLLOW`, paths kept NUL-terminated, inode identity,
//! `pwrite`, liveness of a pid.

use std::ffi::{CStr, CString, OsStr};
use std::fs::{File, OpenOptions, Permissions};
use std::io;
use std::os::fd::IntoRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, Stat};
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

/// A path a guard keeps for the system calls it makes on it later: NUL-terminated once,
/// when the guard is created, in one allocation of the exact size.
///
/// std's path functions copy a path onto the stack and scan it for a NUL at each call
/// (about 120 instructions for a 30-byte path); a guard that stats and removes its path
/// again on release pays that once here instead.
pub(crate) struct PathName(CString);

impl PathName {
    /// `path`, NUL-terminated. `InvalidInput` if it holds a NUL byte (no system call can
    /// name it), as std says for such a path.
    pub(crate) fn new(path: &Path) -> io::Result<PathName> {
        CString::new(path.as_os_str().as_bytes())
            .map(PathName)
            .map_err(|_| nul_in_path())
    }

    pub(crate) fn as_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(self.0.to_bytes()))
    }

    fn as_c_str(&self) -> &CStr {
        &self.0
    }
}

impl std::fmt::Debug for PathName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_path().fmt(f)
    }
}

#[cold]
fn nul_in_path() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "file name contained an unexpected NUL byte",
    )
}

/// Opens `name` for reading and writing with [`no_follow_inert`]'s flags (and
/// `O_CLOEXEC`, as std does); with `create_new`, creates it (`O_CREAT | O_EXCL`, mode
/// `0o644` before the umask). Retried on `EINTR`, as std does.
pub(crate) fn open_rw_inert(name: &PathName, create_new: bool) -> io::Result<File> {
    let mut flags = OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK;
    flags |= OFlags::NOCTTY;
    if create_new {
        flags |= OFlags::CREATE | OFlags::EXCL;
    }
    loop {
        match rustix::fs::openat(CWD, name.as_c_str(), flags, Mode::from_raw_mode(0o644)) {
            Ok(fd) => return Ok(File::from(fd)),
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// What `fstat` says about an open file: its identity, type, size and modification time.
///
/// rustix's `fstat` rather than `File::metadata`: std tries `statx` first on every call
/// and converts its answer into a `Metadata` (about 200 instructions); one `fstat` is a
/// system call and nothing more.
pub(crate) struct FileInfo(Stat);

impl FileInfo {
    pub(crate) fn id(&self) -> FileId {
        FileId::of(&self.0)
    }

    pub(crate) fn is_file(&self) -> bool {
        FileType::from_raw_mode(self.0.st_mode) == FileType::RegularFile
    }

    pub(crate) fn size(&self) -> u64 {
        u64::try_from(self.0.st_size).unwrap_or(0)
    }

    /// The modification time; `None` where it cannot be a `SystemTime`.
    // The fields' types differ between platforms (`i64` here, narrower elsewhere).
    #[allow(clippy::unnecessary_cast)]
    pub(crate) fn modified(&self) -> Option<SystemTime> {
        let (secs, nanos) = (self.0.st_mtime as i64, self.0.st_mtime_nsec as u32);
        if secs >= 0 {
            SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs.unsigned_abs(), nanos))
        } else {
            SystemTime::UNIX_EPOCH
                .checked_sub(Duration::from_secs(secs.unsigned_abs()))?
                .checked_add(Duration::from_nanos(u64::from(nanos)))
        }
    }
}

/// `fstat` of `file`.
pub(crate) fn file_info(file: &File) -> io::Result<FileInfo> {
    rustix::fs::fstat(file)
        .map(FileInfo)
        .map_err(io::Error::from)
}

/// The identity of what `name` names now, without following a symbolic link (`lstat`).
pub(crate) fn path_id(name: &PathName) -> io::Result<FileId> {
    let stat = rustix::fs::statat(CWD, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(FileId::of(&stat))
}

/// Removes the file `name` names (`unlink`).
pub(crate) fn remove(name: &PathName) -> io::Result<()> {
    rustix::fs::unlinkat(CWD, name.as_c_str(), AtFlags::empty()).map_err(io::Error::from)
}

/// The identity of a file: device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    // `dev_t` and `ino_t` are narrower than `u64` on some platforms.
    #[allow(clippy::unnecessary_cast)]
    fn of(stat: &Stat) -> FileId {
        FileId {
            dev: stat.st_dev as u64,
            ino: stat.st_ino as u64,
        }
    }
}

/// Writes `bytes` at offset 0 without moving the cursor: `pwrite` until all is written,
/// retried on `EINTR`, as std's `write_all_at` (whose loop and error conversion cost
/// about 50 instructions more for a lock record).
pub(crate) fn write_at_start(file: &File, mut bytes: &[u8]) -> io::Result<()> {
    let mut offset = 0;
    while !bytes.is_empty() {
        match rustix::io::pwrite(file, bytes, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                bytes = &bytes[n..];
                offset += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads at most `buf.len()` bytes from offset 0 without moving the cursor (`pread`).
pub(crate) fn read_at_start(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    rustix::io::pread(file, buf, 0).map_err(io::Error::from)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    /// `fstat` and `lstat` through rustix agree with std's `Metadata` on what the lock
    /// file and the socket path judge: identity, type, size and modification time.
    #[test]
    fn file_info_and_path_id_agree_with_std() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let name = PathName::new(&path).unwrap();
        let file = open_rw_inert(&name, true).unwrap();
        assert_eq!(
            open_rw_inert(&name, true).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        file.write_all_at(b"4242\n", 0).unwrap();
        let epoch = SystemTime::UNIX_EPOCH;
        for mtime in [
            SystemTime::now() - Duration::from_secs(3600),
            epoch + Duration::new(1, 5),
            epoch - Duration::from_millis(1500), // before 1970: a negative `st_mtime`
        ] {
            file.set_modified(mtime).unwrap();
            let (info, meta) = (file_info(&file).unwrap(), file.metadata().unwrap());
            assert_eq!(info.modified(), meta.modified().ok());
            assert_eq!(info.modified(), Some(mtime));
            assert_eq!((info.is_file(), info.size()), (true, 5));
            let id = FileId {
                dev: meta.dev(),
                ino: meta.ino(),
            };
            assert_eq!((info.id(), path_id(&name).unwrap()), (id, id));
        }

        let other = dir.path().join("b");
        std::fs::write(&other, "").unwrap();
        assert_ne!(
            path_id(&PathName::new(&other).unwrap()).unwrap(),
            path_id(&name).unwrap()
        );
        let here = File::open(dir.path()).unwrap();
        assert!(!file_info(&here).unwrap().is_file());

        assert_eq!(name.as_path(), path);
        remove(&name).unwrap();
        assert_eq!(path_id(&name).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(remove(&name).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_path_with_a_nul_byte_is_invalid_input() {
        let err = PathName::new(Path::new("a\0b")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
