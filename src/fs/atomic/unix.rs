//! Unix staging of an `AtomicFile`, relative to the target's directory handle.
//!
//! On Linux the new content is staged in an unnamed file (`O_TMPFILE`) and published with
//! `linkat` + `renameat`: a writer killed before publishing leaves nothing behind, so no
//! directory is ever listed. Elsewhere, or where the file system refuses `O_TMPFILE`, a
//! named temp file is used, and temp files of crashed writers are looked for once per
//! target and process.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{File, Permissions};
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::{KIND, MAX_NAME_IN_TEMP, RAND_LEN, TEMP_MARKER, temp_prefix};
use crate::fs::imp;
use crate::io_error::path_error;
use crate::ledger::events::shielded;

/// What `create` needs to know to stage the new content.
pub(super) struct Options<'a> {
    /// Permission bits to give the new file, exactly.
    pub(super) permissions: Option<Permissions>,
    /// Whether to keep the replaced file's permission bits (when `mode` is `None`).
    pub(super) keep_permissions: bool,
    /// Where to stage instead of the target's directory.
    pub(super) temp_dir: Option<&'a Path>,
    /// Whether to look for temp files of crashed writers (named temp files only).
    pub(super) remove_stale: bool,
    /// Whether to stage in a named temp file even where an unnamed one is possible.
    pub(super) named: bool,
}

/// Where the new content is staged and how it is published.
pub(super) struct Stage {
    /// The target's directory, opened once: the link, the rename and the directory's
    /// `fsync` all go through this handle, so renaming the directory meanwhile cannot
    /// misplace the file.
    dir: OwnedFd,
    /// The staging directory when it is not `dir` ([`temp_dir`](super::AtomicFileBuilder::temp_dir)).
    staging: Option<OwnedFd>,
    /// Where the target's name is in its path (the `target` that `publish` gets): no copy
    /// of the name is kept.
    name: Range<usize>,
    /// The temp file's name and path, for a named temp file (or an unnamed one linked
    /// by a commit that did not complete); `None` for an unnamed one.
    named: Option<(OsString, PathBuf)>,
    /// The staging directory's path when it is not the target's.
    staging_path: Option<PathBuf>,
    /// Whether the target existed at `create`: if not, an unsynced commit links the new
    /// file straight to the target's name, atomically, with no intermediate name.
    existed: bool,
}

impl Stage {
    /// Opens the directory, stages an empty new file: the file and how to publish it.
    pub(super) fn create(
        target: &Path,
        dir_path: &Path,
        name: &OsStr,
        options: &Options<'_>,
    ) -> io::Result<(File, Stage)> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let dir = rustix::fs::openat(CWD, dir_path, flags, Mode::empty())
            .map_err(|e| path_error("cannot open the directory of", target, e.into()))?;
        let (existed, mode) = mode_for(&dir, target, name, options)?;
        let staging = match options.temp_dir {
            Some(path) => Some(open_staging(&dir, dir_path, path)?),
            None => None,
        };
        let staging_path = options.temp_dir.unwrap_or(dir_path);
        let staging_fd = staging.as_ref().unwrap_or(&dir);
        let create_mode = Mode::from_raw_mode(mode.as_ref().map_or(0o600, PermissionsExt::mode));

        let mut named = None;
        let file = match unnamed(staging_fd, create_mode, options.named) {
            Some(Ok(fd)) => fd,
            Some(Err(e)) => {
                return Err(path_error("cannot create a temp file in", staging_path, e));
            }
            None => {
                if options.remove_stale && first_look(staging_fd) {
                    remove_stale(staging_fd, staging_path);
                }
                let prefix = temp_prefix(name);
                let (fd, temp_name) = create_named(staging_fd, &prefix, create_mode)
                    .map_err(|e| path_error("cannot create a temp file in", staging_path, e))?;
                let path = join(staging_path, &temp_name);
                named = Some((temp_name, path));
                fd
            }
        };
        let file = File::from(file);
        if named.is_some() {
            // Tells `remove_stale` of other writers that this temp file is in use, even
            // when they cannot see our pid (another pid namespace). A brand-new file:
            // never blocks.
            let _ = file.try_lock();
        }
        // `name` is a part of `target` (`split_target`): where it starts.
        let target_bytes = target.as_os_str().as_bytes();
        let start = name.as_bytes().as_ptr() as usize - target_bytes.as_ptr() as usize;
        debug_assert_eq!(
            target_bytes.get(start..start + name.len()),
            Some(name.as_bytes())
        );
        let stage = Stage {
            dir,
            staging,
            name: start..start + name.len(),
            named,
            staging_path: options.temp_dir.map(Path::to_path_buf),
            existed,
        };
        if let Some(mode) = mode
            && imp::umask_may_change(&mode)
        {
            // Exactly these bits: the umask applied at creation may have removed some.
            if let Err(e) = rustix::fs::fchmod(&file, Mode::from_raw_mode(mode.mode())) {
                let mut stage = stage;
                let _ = stage.discard(); // the error that matters is the one returned
                return Err(path_error(
                    "cannot set the permissions of the new",
                    target,
                    e.into(),
                ));
            }
        }
        Ok((file, stage))
    }

    /// The named temp file's path; `None` for an unnamed one.
    pub(super) fn temp_path(&self) -> Option<&Path> {
        self.named.as_ref().map(|(_, path)| path.as_path())
    }

    fn staging(&self) -> &OwnedFd {
        self.staging.as_ref().unwrap_or(&self.dir)
    }

    /// Puts `file` (complete, flushed) at the target's name: `fsync`s it first when
    /// `sync`. On error nothing was published and `file` is intact, except after a
    /// failed `fsync` ([`Publish::Sync`]).
    pub(super) fn publish(
        &mut self,
        file: &File,
        target: &Path,
        sync: bool,
    ) -> Result<(), Publish> {
        let name = OsStr::from_bytes(&target.as_os_str().as_bytes()[self.name.clone()]);
        let Some((temp_name, _)) = &self.named else {
            return self.publish_unnamed(file, target, name, sync);
        };
        if sync {
            file.sync_all().map_err(Publish::Sync)?;
        }
        rename(self.staging(), temp_name, &self.dir, name, target)?;
        self.named = None; // it is the target now
        Ok(())
    }

    /// Links the unnamed file into the directory, then renames it over the target (see
    /// [`Stage::publish`]).
    ///
    /// A new target, without `sync`: one `linkat` to its name. Otherwise `fsync`, `linkat`
    /// to the *publish name* `.<name>.custodian.tmp` (in the staging directory),
    /// `fdatasync` (some file systems, btrfs among them, skip the `fsync` of a file with
    /// no name; elsewhere nothing is left to write), then `renameat` over the target, as
    /// atomic-write-file does. From the link on, the file is a named
    /// temp file, locked (`flock`) so that another writer of the same target finding it
    /// there knows it is in use; a writer killed in between leaves it unlocked, and the
    /// next commit of the same target removes it. The publish name is built on the stack
    /// and only copied into `named` if the commit fails after the link.
    fn publish_unnamed(
        &mut self,
        file: &File,
        target: &Path,
        name: &OsStr,
        sync: bool,
    ) -> Result<(), Publish> {
        let linked = |e: Errno| {
            Publish::Rename(path_error(
                "cannot link the new content of",
                target,
                e.into(),
            ))
        };
        if !sync && !self.existed {
            match link(file, &self.dir, name) {
                Ok(()) => return Ok(()),
                Err(Errno::EXIST) => {} // created meanwhile: replace it
                Err(e) => return Err(linked(e)),
            }
        }
        // Durable before it has a name: a failed `fsync` leaves nothing to clean up, and the
        // time the file spends under its publish name shrinks to the link, an `fdatasync`
        // with nothing left to write, and the rename.
        if sync {
            file.sync_all().map_err(Publish::Sync)?;
        }
        // Never blocks: nobody else has this file open.
        let _ = file.try_lock();
        let staging = self.staging.as_ref().unwrap_or(&self.dir);
        let link_name = link_publish(file, staging, name).map_err(|e| {
            Publish::Rename(path_error("cannot link the new content of", target, e))
        })?;
        let published = if sync {
            // Some file systems (btrfs) ignore the `fsync` of a file with no name: once more
            // now that it has one. Cheap where the first one counted.
            file.sync_data().map_err(Publish::Sync)
        } else {
            Ok(())
        }
        .and_then(|()| rename(staging, link_name.as_os_str(), &self.dir, name, target));
        if published.is_err() {
            // A named temp file from now on, removed by `discard` (its path for `temp_path`).
            let link_name = link_name.as_os_str().to_os_string();
            let staging_path = match &self.staging_path {
                Some(staging) => staging.as_path(),
                None => super::parent_dir(target),
            };
            let path = join(staging_path, &link_name);
            self.named = Some((link_name, path));
        }
        published
    }

    /// `fsync`s the target's directory, so that the rename survives a power loss.
    pub(super) fn sync_dir(&self) -> io::Result<()> {
        rustix::fs::fsync(&self.dir).map_err(io::Error::from)
    }

    /// Removes the named temp file, if any (an unnamed one goes with its last descriptor).
    pub(super) fn discard(&mut self) -> io::Result<()> {
        match self.named.take() {
            Some((temp_name, _)) => {
                rustix::fs::unlinkat(self.staging(), &temp_name, AtFlags::empty())
                    .map_err(io::Error::from)
            }
            None => Ok(()),
        }
    }
}

/// Renames `from` in `staging` over `name` in `dir`, the error naming the target.
fn rename(
    staging: &OwnedFd,
    from: &OsStr,
    dir: &OwnedFd,
    name: &OsStr,
    target: &Path,
) -> Result<(), Publish> {
    rustix::fs::renameat(staging, from, dir, name).map_err(|e| {
        Publish::Rename(path_error(
            "cannot rename the new content over",
            target,
            e.into(),
        ))
    })
}

/// Why [`Stage::publish`] failed.
pub(super) enum Publish {
    /// The `fsync` of the staged file: its content can no longer be trusted.
    Sync(io::Error),
    /// Linking or renaming, the error naming the target: nothing published, the staged
    /// file intact.
    Rename(io::Error),
}

/// The mode bits a rewrite keeps: permissions and the sticky bit, not setuid/setgid. The
/// new file belongs to the writing user, so a kept setuid bit would hand the old owner's
/// privilege to the writer's (root rewriting a 4755 file of `games` would make it
/// setuid-root), as `install` and editors that write a new file also drop them.
const KEPT_BITS: u32 = 0o1777;

/// Whether the target existed, and the permission bits the new file gets; fails if the
/// target is a directory.
fn mode_for(
    dir: &OwnedFd,
    target: &Path,
    name: &OsStr,
    options: &Options<'_>,
) -> io::Result<(bool, Option<Permissions>)> {
    let stat = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => Some(stat),
        Err(Errno::NOENT) => None,
        Err(e) => return Err(path_error("cannot inspect", target, e.into())),
    };
    let file_type = stat.as_ref().map(|s| FileType::from_raw_mode(s.st_mode));
    if file_type == Some(FileType::Directory) {
        return Err(path_error(
            "cannot replace",
            target,
            io::Error::new(io::ErrorKind::IsADirectory, "it is a directory"),
        ));
    }
    if options.permissions.is_some() || !options.keep_permissions {
        return Ok((stat.is_some(), options.permissions.clone()));
    }
    let mode = match (&stat, file_type) {
        (Some(_), Some(FileType::Symlink)) => rustix::fs::statat(dir, name, AtFlags::empty())
            .ok()
            .map(|s| Permissions::from_mode(s.st_mode & KEPT_BITS)),
        (Some(stat), _) => Some(Permissions::from_mode(stat.st_mode & KEPT_BITS)),
        (None, _) => None,
    };
    Ok((stat.is_some(), mode))
}

/// Opens the staging directory; fails with `CrossesDevices` if it is not on `dir`'s file
/// system.
fn open_staging(dir: &OwnedFd, dir_path: &Path, staging: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(CWD, staging, flags, Mode::empty())
        .map_err(|e| path_error("cannot open the temp dir", staging, e.into()))?;
    let a = rustix::fs::fstat(&fd)
        .map_err(|e| path_error("cannot inspect the temp dir", staging, e.into()))?;
    let b = rustix::fs::fstat(dir).map_err(|e| path_error("cannot inspect", dir_path, e.into()))?;
    if a.st_dev == b.st_dev {
        return Ok(fd);
    }
    Err(path_error(
        "cannot stage the new file in",
        staging,
        io::Error::new(
            io::ErrorKind::CrossesDevices,
            format!(
                "it is on another file system than {}, so the rename could not be atomic",
                dir_path.display()
            ),
        ),
    ))
}

/// An unnamed file in `dir` (`O_TMPFILE`): `None` when not asked for or refused by the
/// kernel or the file system, so that a named one is used instead.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn unnamed(dir: &OwnedFd, mode: Mode, named: bool) -> Option<io::Result<OwnedFd>> {
    if named {
        return None;
    }
    let flags = OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC;
    match rustix::fs::openat(dir, c".", flags, mode) {
        Ok(fd) => Some(Ok(fd)),
        // EOPNOTSUPP: this file system has no unnamed files; EISDIR, EINVAL, ENOENT: a
        // kernel that predates them (3.11) or a file system that reports it this way.
        Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL | Errno::NOENT) => None,
        Err(e) => Some(Err(e.into())),
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn unnamed(_dir: &OwnedFd, _mode: Mode, _named: bool) -> Option<io::Result<OwnedFd>> {
    None
}

/// Links the unnamed `file` to `name` in `dir`.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn link(file: &File, dir: &OwnedFd, name: &OsStr) -> rustix::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicBool;
    /// Set once `AT_EMPTY_PATH` was refused (it needs `CAP_DAC_READ_SEARCH` before
    /// Linux 6.10): from then on, link through `/proc/self/fd`, which needs no privilege.
    static THROUGH_PROC: AtomicBool = AtomicBool::new(false);
    if !THROUGH_PROC.load(Ordering::Relaxed) {
        match rustix::fs::linkat(file, c"", dir, name, AtFlags::EMPTY_PATH) {
            Err(Errno::NOENT | Errno::PERM) => THROUGH_PROC.store(true, Ordering::Relaxed),
            other => return other,
        }
    }
    let mut path = *b"/proc/self/fd/\0\0\0\0\0\0\0\0\0\0\0";
    let len = write_decimal(&mut path[14..], file.as_raw_fd().unsigned_abs());
    rustix::fs::linkat(
        CWD,
        OsStr::from_bytes(&path[..14 + len]),
        dir,
        name,
        AtFlags::SYMLINK_FOLLOW,
    )
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn link(_file: &File, _dir: &OwnedFd, _name: &OsStr) -> rustix::io::Result<()> {
    unreachable!("unnamed temp files exist on Linux only")
}

/// Writes `n` in decimal at the start of `out`; returns the length.
fn write_decimal(out: &mut [u8], mut n: u32) -> usize {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for (i, d) in digits[..len].iter().rev().enumerate() {
        out[i] = *d;
    }
    len
}

/// `.<name>.custodian.tmp`, the name the staged file has between `linkat` and
/// `renameat`, built on the stack; `None` when that would be longer than a file name may
/// be.
fn publish_name(name: &OsStr) -> Option<PublishName> {
    const SUFFIX: &[u8] = b".custodian.tmp";
    let len = 1 + name.len() + SUFFIX.len();
    if len > 255 {
        return None;
    }
    let mut buf = [0; 255];
    buf[0] = b'.';
    buf[1..=name.len()].copy_from_slice(name.as_bytes());
    buf[1 + name.len()..len].copy_from_slice(SUFFIX);
    Some(PublishName { buf, len })
}

/// A file name of at most 255 bytes, without allocating.
struct PublishName {
    buf: [u8; 255],
    len: usize,
}

/// The name the staged file was linked under: the publish name, or a random one.
// A local of `publish_unnamed` only: the inline buffer is what spares the allocation.
#[allow(clippy::large_enum_variant)]
enum LinkName {
    Publish(PublishName),
    Random(OsString),
}

impl LinkName {
    fn as_os_str(&self) -> &OsStr {
        match self {
            LinkName::Publish(name) => OsStr::from_bytes(&name.buf[..name.len]),
            LinkName::Random(name) => name,
        }
    }
}

/// Links `file` (locked) into `dir` under the publish name `.<name>.custodian.tmp`; a
/// file left there by a writer killed while publishing (unlocked) is removed first. Under
/// a random named-temp-file name instead when the publish name is in use by a live
/// writer, is not a regular file, or would be too long.
fn link_publish(file: &File, dir: &OwnedFd, target_name: &OsStr) -> io::Result<LinkName> {
    if let Some(publish_name) = publish_name(target_name) {
        let publish_name = LinkName::Publish(publish_name);
        for _ in 0..4 {
            match link(file, dir, publish_name.as_os_str()) {
                Ok(()) => return Ok(publish_name),
                Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            if !remove_unfinished(dir, publish_name.as_os_str())? {
                break;
            }
        }
    }
    let prefix = temp_prefix(target_name);
    loop {
        let name = random_name(&prefix);
        match link(file, dir, &name) {
            Ok(()) => return Ok(LinkName::Random(name)),
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Removes `name` from `dir` if it is a regular file that nobody holds locked (left by a
/// writer killed while publishing). Whether it is gone.
fn remove_unfinished(dir: &OwnedFd, name: &OsStr) -> io::Result<bool> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(true),
        Err(_) => return Ok(false),
    };
    let Ok(stat) = rustix::fs::fstat(&fd) else {
        return Ok(false);
    };
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Ok(false);
    }
    let file = File::from(fd);
    if file.try_lock().is_err() {
        return Ok(false); // a live writer is publishing it
    }
    // Still the file we locked (not a live writer's, linked after another one removed
    // the one we opened)?
    let same = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|now| now.st_dev == stat.st_dev && now.st_ino == stat.st_ino);
    if !same {
        return Ok(true); // try the link again
    }
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => {
            let (kind, name) = (KIND.name(), Path::new(name).display());
            let message = "removed the complete new content a writer killed while publishing left";
            shielded(
                || tracing::debug!(target: "custodian", kind, resource = %name, "{message}"),
                format_args!("{message} kind={kind} resource={name}"),
            );
            Ok(true)
        }
        Err(e) => Err(e.into()),
    }
}

/// `<prefix><random>.<pid>.tmp` (`.<name>.custodian.<random>.<pid>.tmp`): a named temp
/// file's name.
fn random_name(prefix: &OsStr) -> OsString {
    const ALPHANUMERIC: &[u8; 62] =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut x = RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut random = [0u8; RAND_LEN];
    for b in &mut random {
        *b = ALPHANUMERIC[(x % 62) as usize];
        x /= 62;
    }
    let mut pid = [0u8; 10];
    let pid_len = write_decimal(&mut pid, std::process::id());
    let mut name = OsString::with_capacity(prefix.len() + RAND_LEN + pid_len + 5);
    name.push(prefix);
    name.push(OsStr::from_bytes(&random));
    name.push(".");
    name.push(OsStr::from_bytes(&pid[..pid_len]));
    name.push(".tmp");
    name
}

/// `dir/name`, allocated once.
fn join(dir: &Path, name: &OsStr) -> PathBuf {
    let mut path = PathBuf::with_capacity(dir.as_os_str().len() + 1 + name.len());
    path.push(dir);
    path.push(name);
    path
}

/// Creates a new named temp file in `dir`.
fn create_named(dir: &OwnedFd, prefix: &OsStr, mode: Mode) -> io::Result<(OwnedFd, OsString)> {
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    loop {
        let name = random_name(prefix);
        match rustix::fs::openat(dir, &name, flags, mode) {
            Ok(fd) => return Ok((fd, name)),
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether this process has not yet looked for stale temp files in this directory (and
/// notes that it now does). At most 4096 directories are remembered; past that the
/// memory starts over, which only costs a second look.
fn first_look(dir: &OwnedFd) -> bool {
    /// Directories seen.
    static SEEN: Mutex<Option<HashSet<DirId>>> = Mutex::new(None);
    let Some(dir) = DirId::of(dir) else {
        return true;
    };
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let seen = seen.get_or_insert_with(HashSet::new);
    if seen.contains(&dir) {
        return false; // the common case: no allocation
    }
    if seen.len() >= 4096 {
        seen.clear();
    }
    seen.insert(dir)
}

/// A directory as `first_look` remembers it: device, inode and, where the file system
/// records it, birth time. A directory removed and created again often gets the same
/// inode number at once; the birth time tells the new one from the one already looked
/// at.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct DirId {
    dev: u64,
    ino: u64,
    born: (i64, u32),
}

impl DirId {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn of(dir: &OwnedFd) -> Option<DirId> {
        use rustix::fs::StatxFlags;
        let mask = StatxFlags::INO | StatxFlags::BTIME;
        let Ok(stat) = rustix::fs::statx(dir, c"", AtFlags::EMPTY_PATH, mask) else {
            // No statx (an old kernel, a seccomp filter): device and inode alone, rather
            // than a listing on every `create`.
            return DirId::of_fstat(dir);
        };
        let dev = (u64::from(stat.stx_dev_major) << 32) | u64::from(stat.stx_dev_minor);
        let born = if StatxFlags::from_bits_retain(stat.stx_mask).contains(StatxFlags::BTIME) {
            (stat.stx_btime.tv_sec, stat.stx_btime.tv_nsec)
        } else {
            (0, 0) // not recorded here: device and inode alone
        };
        Some(DirId {
            dev,
            ino: stat.stx_ino,
            born,
        })
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn of(dir: &OwnedFd) -> Option<DirId> {
        DirId::of_fstat(dir)
    }

    fn of_fstat(dir: &OwnedFd) -> Option<DirId> {
        let stat = rustix::fs::fstat(dir).ok()?;
        #[allow(clippy::unnecessary_cast)] // `st_dev` and `st_ino` are not `u64` everywhere
        Some(DirId {
            dev: stat.st_dev as u64,
            ino: stat.st_ino as u64,
            born: (0, 0),
        })
    }
}

/// Removes named temp files (of any target) whose writer is gone: no process with their
/// pid, and not locked. Best effort: a failure is reported as a `warn` event, never fails
/// the new write.
fn remove_stale(dir: &OwnedFd, dir_path: &Path) {
    let Ok(entries) = rustix::fs::Dir::read_from(dir) else {
        return; // creating the temp file reports the problem with the directory
    };
    for entry in entries.flatten() {
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        let Some(pid) = stale_candidate(name) else {
            continue;
        };
        if imp::process_may_exist(pid) {
            continue;
        }
        // Non-blocking: a FIFO under such a name must not hang the open.
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let Ok(fd) = rustix::fs::openat(dir, name, flags, Mode::empty()) else {
            continue;
        };
        // Only a regular file of ours: what `create_named` makes, as this user.
        let ours = rustix::fs::fstat(&fd).is_ok_and(|st| {
            FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
                && st.st_uid == rustix::process::geteuid().as_raw()
        });
        if !ours || File::from(fd).try_lock().is_err() {
            continue; // not ours, or a live writer we cannot see (another pid namespace)
        }
        let path = dir_path.join(name);
        let (kind, path) = (KIND.name(), path.display());
        match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) => {
                let message = "removed a temp file left by a crashed writer";
                shielded(
                    || tracing::debug!(target: "custodian", kind, resource = %path, pid, "{message}"),
                    format_args!("{message} kind={kind} resource={path} pid={pid}"),
                );
            }
            Err(Errno::NOENT) => {}
            Err(e) => {
                let error = io::Error::from(e);
                let message = "cannot remove a temp file left by a crashed writer";
                shielded(
                    || tracing::warn!(target: "custodian", kind, resource = %path, %error, "{message}"),
                    format_args!("{message} kind={kind} resource={path} error={error}"),
                );
            }
        }
    }
}

/// The writer's pid if `file_name` is a named temp file,
/// `.<name>.custodian.<random>.<pid>.tmp` (`temp_prefix` + `random_name`) for some
/// non-empty `<name>` and a pid a process can have.
fn stale_candidate(file_name: &OsStr) -> Option<u32> {
    /// The largest pid Linux hands out (`PID_MAX_LIMIT` on 64-bit systems).
    const PID_MAX: u32 = 1 << 22;
    let rest = file_name
        .as_encoded_bytes()
        .strip_prefix(b".")?
        .strip_suffix(b".tmp")?;
    let dot = rest.iter().rposition(|&b| b == b'.')?;
    let (rest, pid) = (&rest[..dot], &rest[dot + 1..]);
    if pid.is_empty() || pid.len() > 10 || !pid.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let (name, random) = rest.split_at_checked(rest.len().checked_sub(RAND_LEN)?)?;
    if !random.iter().all(u8::is_ascii_alphanumeric) {
        return None;
    }
    // `<name>.custodian.`: at least one byte of name before the marker.
    let name = name.strip_suffix(TEMP_MARKER.as_bytes())?;
    if name.len() < 2 || name.last() != Some(&b'.') {
        return None;
    }
    let pid: u32 = std::str::from_utf8(pid).ok()?.parse().ok()?;
    (pid <= PID_MAX).then_some(pid)
}

const _: () = assert!(MAX_NAME_IN_TEMP + 2 + TEMP_MARKER.len() + RAND_LEN + 16 <= 255);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_parse_back_to_their_pid() {
        let prefix = temp_prefix(OsStr::new("app.toml"));
        assert_eq!(prefix, ".app.toml.custodian.");
        for (name, pid) in [
            (".app.toml.custodian.aZ09xy.4242.tmp", 4242),
            (".a.custodian.aZ09xy.1.tmp", 1),
            (".app.toml.b.custodian.aZ09xy.4242.tmp", 4242), // of `app.toml.b`
            (".x.custodian.custodian.aZ09xy.7.tmp", 7),      // of `x.custodian`
        ] {
            assert_eq!(stale_candidate(OsStr::new(name)), Some(pid), "{name}");
        }
        for other in [
            // Without the marker: a user's file, or a temp file of another program.
            ".app.toml.aZ09xy.4242.tmp",
            ".report.final1.2024.tmp",
            ".app.toml.custodian.aZ09xy.99999999.tmp", // no process has that pid
            ".custodian.aZ09xy.4242.tmp",
            "..custodian.aZ09xy.4242.tmp",
            ".app.toml.custodian.aZ09xy.tmp",
            ".app.toml.custodian.aZ09x.4242.tmp",
            ".app.toml.custodian.aZ0-xy.4242.tmp",
            ".app.toml.custodian.aZ09xy.42a2.tmp",
            ".app.toml.custodian.aZ09xy.4242",
            ".app.toml.custodian.aZ09xy.42424242424.tmp",
            "app.toml.custodian.aZ09xy.4242.tmp",
            ".aZ09xy.4242.tmp",
            ".app.toml.custodian.tmp",
            "app.toml",
        ] {
            assert_eq!(stale_candidate(OsStr::new(other)), None, "{other}");
        }
    }

    #[test]
    fn publish_names_fit_or_are_refused() {
        let name = LinkName::Publish(publish_name(OsStr::new("app.toml")).unwrap());
        assert_eq!(name.as_os_str(), ".app.toml.custodian.tmp");
        assert!(publish_name(OsStr::new(&"a".repeat(240))).is_some());
        assert!(publish_name(OsStr::new(&"a".repeat(241))).is_none());
    }

    #[test]
    fn random_names_parse_back_to_our_pid() {
        let prefix = temp_prefix(OsStr::new("a.txt"));
        let name = random_name(&prefix);
        assert_eq!(stale_candidate(&name), Some(std::process::id()));
        assert_ne!(name, random_name(&prefix));
    }

    #[test]
    fn decimals() {
        let mut out = [0u8; 10];
        let len = write_decimal(&mut out, 0);
        assert_eq!(&out[..len], b"0");
        let len = write_decimal(&mut out, 4_294_967_295);
        assert_eq!(&out[..len], b"4294967295");
    }
}
