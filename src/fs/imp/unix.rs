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

/// Whether removing files of crashed writers is supported here.
pub(crate) const CLEANS_STALE: bool = true;

/// Whether a lock file's identity can be re-checked (and so safely unlinked) here.
pub(crate) const CHECKS_IDENTITY: bool = true;
