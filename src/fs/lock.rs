//! `LockFile`: "only one process does this", with `flock`, the owner's pid recorded and
//! the unlink race closed.

use std::error::Error;
use std::fmt;
use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::panic::Location;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::imp::{self, FileId, PathName};
use crate::Close;
use crate::io_error::{path_error, with_context};
use crate::ledger::{Kind, Ticket};

static KIND: Kind = Kind::new("custodian::fs::LockFile");

/// The longest sleep between two attempts of [`LockFile::acquire_timeout`].
const MAX_BACKOFF: Duration = Duration::from_millis(50);

/// A lock file: an `flock` on a file at a path, for "only one process does this" (a
/// daemon's pid file, a cache directory, a migration).
///
/// Exclusive by default, shared with [`LockFileBuilder::shared`]. An exclusive holder writes
/// its pid into the file, so that a process that finds the lock taken can say who holds
/// it ([`LockHeld`]). Released by [`close`](LockFile::close) or `Drop`: the file is
/// removed (or, with [`LockFileBuilder::remove_on_release`]`(false)`, emptied) **while the
/// lock is still held and only if the path still names the file we locked**, then
/// unlocked.
///
/// ```
/// use custodian::fs::LockFile;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("daemon.pid");
///
/// let lock = LockFile::acquire(&path)?;
/// assert_eq!(std::fs::read_to_string(&path)?, format!("{}\n", std::process::id()));
/// assert!(LockFile::try_acquire(&path)?.is_err()); // taken (even within a process)
/// lock.close()?;
/// assert!(!path.exists());
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Existing files
/// A lock guard must never destroy data it did not create, and a typo'd path may name a
/// config file. A lock record is **empty, or a decimal pid with optional surrounding
/// ASCII whitespace** (what `LockFile` writes: `<pid>\n`). Once the lock is held, the
/// file's content is judged before anything is written:
/// - a file this `acquire` created, an empty file (a holder that died before writing its
///   pid) or a lock record left by a holder that is gone is taken over: emptied, then our
///   pid written. A holder is gone when nobody holds the `flock` (the kernel drops it when
///   its holder dies) and the recorded pid names no running process that could have
///   written it: no such process, a zombie, our own pid, or (on Linux, from
///   `/proc/<pid>/stat`) a process that started after the record was written, so its pid
///   was reused, or a record older than this boot;
/// - anything else is refused: a non-empty file that is not a lock record, a record whose
///   pid is a process that is running, does not hold the lock and started before the
///   record was written (the pid file of a program that does not use `flock`: taking it
///   over would overwrite it, then delete it on release), or what is not a regular file
///   (a directory, a FIFO, a device). The error has kind
///   [`io::ErrorKind::AlreadyExists`] naming the path ("… exists and is not a lock file;
///   it was left untouched"), and the file is left byte-for-byte unchanged.
///
/// When in doubt, a record is refused, never taken over: a refusal names the path and the
/// pid and loses nothing, a wrong takeover deletes another program's file. Cases that
/// are refused although the holder is gone: a pid reused within two seconds of the
/// record being written (file systems date files that coarsely); a record whose pid
/// names a process of another pid namespace (a lock directory shared between
/// containers) that happens to be running here and predates the record; a record dated
/// in the future (the clock went back); on systems other than Linux, or where
/// `/proc/<pid>/stat` cannot be read (`hidepid`), any record whose pid is running; and
/// a lock given away with [`LockFile::into_inner`] whose file was then closed by a
/// process that still runs. A forward step of the clock after the record was written
/// (a device without a real-time clock, set by NTP after boot) can make a running
/// program's record look older than this boot, and so taken over.
///
/// Release removes (or empties) the file only if the path still names the inode we locked
/// **and** the file still holds our record; a file someone rewrote meanwhile is left
/// alone. If writing our pid fails (a full disk), a file this `acquire` created is
/// removed again before the error is returned, so no empty lock file is left behind.
///
/// ```
/// use custodian::fs::LockFile;
///
/// let dir = tempfile::tempdir()?;
/// let config = dir.path().join("app.toml");
/// std::fs::write(&config, "precious = true\n")?;
/// let err = LockFile::acquire(&config).unwrap_err();
/// assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
/// assert!(err.to_string().contains("is not a lock file"));
/// assert_eq!(std::fs::read_to_string(&config)?, "precious = true\n");
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # The unlink race
/// Removing a lock file on release opens a race in naive implementations: B opens the
/// file, A unlinks it and unlocks, B locks the now nameless file, C creates a new file at
/// the path and locks it — B and C both "hold" the lock. `LockFile` closes it: after
/// locking, it checks that the path still names the inode it locked (otherwise it retries
/// on the new file), and it unlinks only while holding the lock and only if the path
/// still names its own inode.
///
/// # Crashes
/// The kernel releases an `flock` when its holder dies, so a pid file left by a killed
/// process does not block anyone: the next `acquire` takes the lock at once and writes its
/// own pid (unless the dead holder's pid already names another process that predates
/// the record: see *Existing files*).
///
/// # NFS and other platforms
/// On Linux, `flock` on NFS is emulated with whole-file POSIX (`fcntl`) locks, coordinated
/// by the server: it works across clients but conflicts with POSIX locks a program takes
/// on the same file, a recorded pid is meaningless on another host, and a client that
/// loses its lease can lose the lock silently. Other systems' NFS clients may lock only
/// locally. Prefer a local file system for lock files.
/// Off Unix, the file's identity is not re-checked and the file is never removed (only
/// emptied); locks there are mandatory, so others cannot read the pid while it is held.
#[must_use = "dropping a LockFile releases the lock at once"]
pub struct LockFile {
    /// `None` once released (by `close`, `Drop` or `into_inner`).
    file: Option<File>,
    /// Kept ready for the `lstat` and `unlink` of the release.
    path: PathName,
    id: FileId,
    /// The pid we recorded (exclusive holders); release touches the file only while it
    /// still holds this record.
    pid: u32,
    shared: bool,
    remove: bool,
    ticket: Ticket,
}

/// Options for a [`LockFile`]: shared or exclusive, remove or keep the file on release.
///
/// ```
/// use custodian::fs::LockFile;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("cache.lock");
/// let readers = LockFile::builder().shared(true);
/// let a = readers.acquire(&path)?;
/// let b = readers.acquire(&path)?; // shared locks coexist
/// assert!(LockFile::try_acquire(&path)?.is_err()); // but exclude a writer
/// drop((a, b));
/// assert!(LockFile::try_acquire(&path)?.is_ok());
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until an acquire"]
pub struct LockFileBuilder {
    shared: bool,
    remove: bool,
}

impl Default for LockFileBuilder {
    fn default() -> Self {
        LockFileBuilder {
            shared: false,
            remove: true,
        }
    }
}

#[derive(Clone, Copy)]
enum Wait {
    Block,
    Try,
    Until(Instant),
}

impl LockFileBuilder {
    /// Exclusive, file removed on release.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let lock = custodian::fs::LockFileBuilder::new().acquire(dir.path().join("job.lock"))?;
    /// assert!(!lock.is_shared());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the lock is shared (many holders at once, no exclusive one; no pid
    /// recorded) or exclusive (default).
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("cache.lock");
    /// let reader = custodian::fs::LockFile::builder().shared(true).acquire(&path)?;
    /// assert!(reader.is_shared());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn shared(mut self, shared: bool) -> Self {
        self.shared = shared;
        self
    }

    /// Whether releasing the lock removes the file (default `true`) or only empties it
    /// (so that no stale pid is left in it). A shared holder removes the file only when it
    /// is the last holder.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("daemon.pid");
    /// let lock = custodian::fs::LockFile::builder().remove_on_release(false).acquire(&path)?;
    /// lock.close()?;
    /// assert_eq!(std::fs::read(&path)?, b""); // kept, emptied
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn remove_on_release(mut self, remove: bool) -> Self {
        self.remove = remove;
        self
    }

    /// Takes the lock, waiting as long as it takes.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("job.lock");
    /// let lock = custodian::fs::LockFile::builder().acquire(&path)?;
    /// assert_eq!(custodian::fs::LockFile::owner_pid(&path)?, Some(std::process::id()));
    /// lock.close()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// Opening, locking or writing the pid failed: a missing directory (`NotFound`), no
    /// permission (`PermissionDenied`), a symbolic link at `path` (`ELOOP`: never
    /// followed), ... each naming the path.
    #[track_caller]
    #[must_use = "dropping a LockFile releases the lock at once"]
    pub fn acquire(&self, path: impl AsRef<Path>) -> io::Result<LockFile> {
        let lock = self.lock(path.as_ref(), Wait::Block, Location::caller())?;
        Ok(lock.expect("a blocking acquire never gives up"))
    }

    /// Takes the lock if it is free now; `Ok(Err(held))` if someone holds it, saying who
    /// ([`LockHeld::pid`]: the pid an exclusive holder recorded).
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("job.lock");
    /// let options = custodian::fs::LockFile::builder();
    /// let held = options.try_acquire(&path)?.expect("free");
    /// match options.try_acquire(&path)? {
    ///     Ok(_) => unreachable!("held above"),
    ///     Err(holder) => assert_eq!(holder.pid(), Some(std::process::id())),
    /// }
    /// # drop(held);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire); a lock held by someone else is not an error of the
    /// outer `Result`.
    #[track_caller]
    #[must_use = "dropping a LockFile releases the lock at once"]
    pub fn try_acquire(&self, path: impl AsRef<Path>) -> io::Result<Result<LockFile, LockHeld>> {
        let path = path.as_ref();
        match self.lock(path, Wait::Try, Location::caller())? {
            Some(lock) => Ok(Ok(lock)),
            None => Ok(Err(LockHeld::now(path, Duration::ZERO))),
        }
    }

    /// Takes the lock without blocking a runtime thread: tries, then sleeps on tokio's
    /// timer (backoff from 1 ms up to 50 ms) until it is free. Wrap it in
    /// `tokio::time::timeout` for a deadline.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// use custodian::fs::LockFile;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("job.lock");
    /// let first = LockFile::builder().acquire_async(&path).await?;
    /// let second = tokio::spawn(LockFile::builder().acquire_async(path.clone()));
    /// first.close()?; // the waiter gets it within its backoff
    /// second.await.unwrap()?.close()?;
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire).
    ///
    /// # Cancel safety
    /// Cancel-safe: each attempt takes the lock or leaves it in one non-blocking step, and
    /// a lock taken is returned without another `.await`; a cancelled wait holds nothing.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    #[track_caller]
    pub fn acquire_async<P: AsRef<Path>>(
        &self,
        path: P,
    ) -> impl Future<Output = io::Result<LockFile>> + Send + use<P> {
        let site = Location::caller();
        let options = self.clone();
        let path = path.as_ref().to_path_buf();
        async move {
            let mut backoff = Duration::from_millis(1);
            loop {
                if let Some(lock) = options.lock(&path, Wait::Try, site)? {
                    return Ok(lock);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// Takes the lock, waiting at most `timeout` (polling, with a backoff up to 50 ms).
    ///
    /// ```
    /// use custodian::fs::{LockFile, LockHeld};
    /// use std::time::Duration;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("job.lock");
    /// let options = LockFile::builder();
    /// let _held = options.acquire(&path)?;
    /// let err = options.acquire_timeout(&path, Duration::from_millis(20)).unwrap_err();
    /// assert_eq!(LockHeld::of(&err).unwrap().pid(), Some(std::process::id()));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire), and when the lock is still held after `timeout`: an
    /// error of kind [`io::ErrorKind::WouldBlock`] whose inner error is a [`LockHeld`]
    /// naming the path and the holder's pid ("lock file /run/app.pid is held by pid 4242").
    #[track_caller]
    #[must_use = "dropping a LockFile releases the lock at once"]
    pub fn acquire_timeout(
        &self,
        path: impl AsRef<Path>,
        timeout: Duration,
    ) -> io::Result<LockFile> {
        let path = path.as_ref();
        let start = Instant::now();
        let deadline = start.checked_add(timeout);
        let wait = deadline.map_or(Wait::Block, Wait::Until);
        match self.lock(path, wait, Location::caller()) {
            Ok(Some(lock)) => Ok(lock),
            Ok(None) => Err(LockHeld::now(path, start.elapsed()).into()),
            Err(e) => Err(e),
        }
    }

    fn lock(
        &self,
        path: &Path,
        wait: Wait,
        site: &'static Location<'static>,
    ) -> io::Result<Option<LockFile>> {
        let name =
            PathName::new(path).map_err(|e| path_error("cannot open the lock file", path, e))?;
        loop {
            let (file, created) = open(&name)?;
            if !lock(&file, self.shared, wait).map_err(|e| path_error("cannot lock", path, e))? {
                return Ok(None);
            }
            let meta = imp::file_info(&file)
                .map_err(|e| path_error("cannot inspect the lock file", path, e))?;
            let id = meta.id();
            if imp::CHECKS_IDENTITY {
                match imp::path_id(&name) {
                    Ok(now) if now == id => {}
                    // Released and removed (or replaced) between our open and our lock: the
                    // lock we hold is on a file nobody else will look at. Retry on the new one.
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(path_error("cannot inspect", path, e)),
                }
            }
            // Judged with the lock held, before anything is written (see `# Existing files`).
            if !meta.is_file() {
                return Err(not_a_lock_file(path, "is not a regular file"));
            }
            let record = match meta.size() {
                0 => Record::Empty,
                _ => read_record(&file, path)?
                    .ok_or_else(|| not_a_lock_file(path, "holds something other than a pid"))?,
            };
            if let Record::Pid(writer) = record
                && imp::record_writer_running(writer, meta.modified())
            {
                return Err(not_a_lock_file(
                    path,
                    &format!(
                        "records pid {writer}, a running process that does not hold the lock: \
                         the pid file of another program?"
                    ),
                ));
            }
            if self.shared && record != Record::Empty {
                // A pid left by an exclusive holder that is gone (we hold a shared lock, so
                // no exclusive one exists): emptied, so nobody reads it as the holder.
                file.set_len(0)
                    .map_err(|e| path_error("cannot empty the stale lock record in", path, e))?;
            }
            let pid = std::process::id();
            if !self.shared
                && let Err(e) = record_pid(&file, pid, meta.size())
            {
                let error = path_error("cannot write our pid into", path, e);
                // Leave nothing behind that we created: the file is ours (we created it,
                // we hold the lock, and the path named it a moment ago).
                if created && let Err(rm) = remove_if_ours(&name, id) {
                    return Err(with_context(
                        error,
                        format_args!("and the empty lock file it created was left ({rm})"),
                    ));
                }
                return Err(error);
            }
            return Ok(Some(LockFile {
                file: Some(file),
                path: name,
                id,
                pid,
                shared: self.shared,
                remove: self.remove,
                ticket: Ticket::at(&KIND, site),
            }));
        }
    }
}

impl LockFile {
    /// Takes the exclusive lock at `path`, waiting as long as it takes; the file is created
    /// if needed (mode `0o644`, a symbolic link at `path` is refused).
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let lock = custodian::fs::LockFile::acquire(dir.path().join("job.lock"))?;
    /// // ... only one process runs this ...
    /// lock.close()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`LockFileBuilder::acquire`].
    #[track_caller]
    #[must_use = "dropping a LockFile releases the lock at once"]
    pub fn acquire(path: impl AsRef<Path>) -> io::Result<LockFile> {
        let lock = LockFileBuilder::new().lock(path.as_ref(), Wait::Block, Location::caller())?;
        Ok(lock.expect("a blocking acquire never gives up"))
    }

    /// Takes the exclusive lock if it is free now; `Ok(Err(held))` naming the holder if
    /// it is held.
    ///
    /// ```
    /// use custodian::fs::LockFile;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("job.lock");
    /// let first = LockFile::try_acquire(&path)?.expect("free");
    /// let held = LockFile::try_acquire(&path)?.unwrap_err();
    /// assert_eq!(held.pid(), Some(std::process::id()));
    /// assert!(held.to_string().contains("is held by pid"));
    /// # drop(first);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`LockFileBuilder::acquire`]; a lock held by someone else is not an error of the
    /// outer `Result`.
    #[track_caller]
    #[must_use = "dropping a LockFile releases the lock at once"]
    pub fn try_acquire(path: impl AsRef<Path>) -> io::Result<Result<LockFile, LockHeld>> {
        LockFileBuilder::new().try_acquire(path)
    }

    /// Takes the exclusive lock without blocking a runtime thread; see
    /// [`LockFileBuilder::acquire_async`].
    ///
    /// ```
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let dir = tempfile::tempdir()?;
    /// let lock = custodian::fs::LockFile::acquire_async(dir.path().join("job.lock")).await?;
    /// lock.close()?;
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`LockFileBuilder::acquire`].
    ///
    /// # Cancel safety
    /// Cancel-safe: a cancelled wait holds nothing.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    #[track_caller]
    pub fn acquire_async<P: AsRef<Path>>(
        path: P,
    ) -> impl Future<Output = io::Result<LockFile>> + Send + use<P> {
        LockFileBuilder::new().acquire_async(path)
    }

    /// Takes the exclusive lock, waiting at most `timeout`.
    ///
    /// ```
    /// use custodian::fs::{LockFile, LockHeld};
    /// use std::time::Duration;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("job.lock");
    /// let _held = LockFile::acquire(&path)?;
    /// let err = LockFile::acquire_timeout(&path, Duration::from_millis(20)).unwrap_err();
    /// assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    /// assert_eq!(LockHeld::of(&err).unwrap().pid(), Some(std::process::id()));
    /// assert!(err.to_string().contains(&format!("held by pid {}", std::process::id())));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`LockFileBuilder::acquire_timeout`]: a [`LockHeld`] (kind `WouldBlock`) naming the
    /// holder's pid when the time is up.
    #[track_caller]
    #[must_use = "dropping a LockFile releases the lock at once"]
    pub fn acquire_timeout(path: impl AsRef<Path>, timeout: Duration) -> io::Result<LockFile> {
        LockFileBuilder::new().acquire_timeout(path, timeout)
    }

    /// A builder: shared, keep the file on release.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("pid");
    /// let lock = custodian::fs::LockFile::builder().remove_on_release(false).acquire(&path)?;
    /// lock.close()?;
    /// assert_eq!(std::fs::read(&path)?, b""); // kept, emptied
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn builder() -> LockFileBuilder {
        LockFileBuilder::new()
    }

    /// The pid recorded in the lock file at `path` by its exclusive holder, if any. The
    /// process may have died since (then the lock is free).
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("pid");
    /// assert_eq!(custodian::fs::LockFile::owner_pid(&path)?, None);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// Reading the file failed (other than it not existing), naming the path.
    pub fn owner_pid(path: impl AsRef<Path>) -> io::Result<Option<u32>> {
        let path = path.as_ref();
        let mut options = OpenOptions::new();
        let file = match imp::no_follow_inert(options.read(true)).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(path_error("cannot read the lock file", path, e)),
        };
        let mut buf = [0; 24];
        let n = imp::read_at_start(&file, &mut buf)
            .map_err(|e| path_error("cannot read the lock file", path, e))?;
        Ok(std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|s| s.trim().parse().ok()))
    }

    /// The lock file's path.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("job.lock");
    /// assert_eq!(custodian::fs::LockFile::acquire(&path)?.path(), path);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn path(&self) -> &Path {
        self.path.as_path()
    }

    /// Whether this is a shared lock.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let lock = custodian::fs::LockFile::acquire(dir.path().join("job.lock"))?;
    /// assert!(!lock.is_shared());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// The locked file, to read it. Writing into it makes it no longer a lock record: release
    /// then leaves it in place, and the next `acquire` refuses it (see `# Existing files`
    /// on [`LockFile`]).
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let lock = custodian::fs::LockFile::acquire(dir.path().join("job.lock"))?;
    /// assert!(lock.as_file().metadata()?.len() > 0); // our pid
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn as_file(&self) -> &File {
        match &self.file {
            Some(file) => file,
            None => unreachable!("a LockFile's file is only taken by consuming it"),
        }
    }

    /// Releases the lock now: removes (or empties) the file if it is still ours, unlocks,
    /// closes; returns what went wrong.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("job.lock");
    /// custodian::fs::LockFile::acquire(&path)?.close()?;
    /// assert!(!path.exists());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// Removing or emptying the file, unlocking or closing failed, naming the path. The
    /// lock is released anyway.
    pub fn close(mut self) -> io::Result<()> {
        self.release()
    }

    /// Escape hatch: the locked file, still locked, no longer managed (nothing is removed;
    /// the lock goes when the file is closed). The file keeps this process's pid: while
    /// this process runs, an `acquire` in another process refuses it as a record of a
    /// running process
    /// (see *Existing files*); empty it before closing it to hand the lock on.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("job.lock");
    /// let file = custodian::fs::LockFile::into_inner(custodian::fs::LockFile::acquire(&path)?);
    /// drop(file);
    /// assert!(path.exists()); // left in place
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn into_inner(mut this: Self) -> File {
        match this.file.take() {
            Some(file) => file,
            None => unreachable!("a LockFile's file is only taken by consuming it"),
        }
    }

    fn release(&mut self) -> io::Result<()> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        let mut result = Ok(());
        let removes = self.remove && imp::CHECKS_IDENTITY;
        // A shared holder may touch the file only when it is the last one: then the
        // upgrade to exclusive succeeds, and nobody else can hold the lock meanwhile.
        let sole_holder = !self.shared || (removes && file.try_lock().is_ok());
        if sole_holder {
            // Only a file that still holds our record (or, for a shared lock, nothing or
            // a stale record) is ours to remove or empty: one rewritten meanwhile is not.
            let path = self.path.as_path();
            let ours = match read_record(&file, path) {
                Ok(Some(Record::Pid(pid))) => self.shared || pid == self.pid,
                Ok(Some(Record::Empty)) => self.shared,
                Ok(None) => false,
                Err(e) => {
                    result = Err(e);
                    false
                }
            };
            if ours && removes {
                result = remove_if_ours(&self.path, self.id);
            } else if ours
                && !self.shared
                && let Err(e) = file.set_len(0)
            {
                result = Err(path_error("cannot empty the lock file", path, e));
            }
        }
        let unlocked = file
            .unlock()
            .map_err(|e| path_error("cannot unlock", self.path.as_path(), e));
        let closed = imp::close(file)
            .map_err(|e| path_error("cannot close the lock file", self.path.as_path(), e));
        result.and(unlocked).and(closed)
    }
}

/// Closing a `LockFile` releases it.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let mut stack = custodian::CleanupStack::new();
/// stack.push(custodian::fs::LockFile::acquire(dir.path().join("job.lock"))?);
/// stack.close()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
impl Close for LockFile {
    type Error = io::Error;

    fn close(self) -> io::Result<()> {
        LockFile::close(self)
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            self.ticket
                .dropped_without_close(&self.path.as_path().display());
            if let Err(e) = self.release() {
                self.ticket.failure(&self.path.as_path().display(), &e);
            }
        }
    }
}

impl fmt::Debug for LockFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockFile")
            .field("path", &self.path.as_path())
            .field("shared", &self.shared)
            .field("remove_on_release", &self.remove)
            .finish()
    }
}

/// The lock is held by another process (or another `LockFile` in this one): the path,
/// and the holder's pid when it recorded one.
///
/// What [`LockFile::try_acquire`] gives when the lock is held, and the inner error of the
/// `io::Error` (kind [`io::ErrorKind::WouldBlock`]) returned by
/// [`LockFile::acquire_timeout`] when the time is up; get it with [`LockHeld::of`].
///
/// ```
/// use custodian::fs::{LockFile, LockHeld};
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("job.lock");
/// let _held = LockFile::acquire(&path)?;
/// let err = LockFile::acquire_timeout(&path, std::time::Duration::ZERO).unwrap_err();
/// let held = LockHeld::of(&err).unwrap();
/// assert_eq!(held.path(), path);
/// assert_eq!(held.pid(), Some(std::process::id()));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct LockHeld {
    path: PathBuf,
    pid: Option<u32>,
    waited: Duration,
}

impl LockHeld {
    /// The lock at `path` found held after waiting `waited`: the holder's pid is read now.
    fn now(path: &Path, waited: Duration) -> Self {
        LockHeld {
            path: path.to_path_buf(),
            pid: LockFile::owner_pid(path).ok().flatten(),
            waited,
        }
    }

    /// The `LockHeld` inside `error`, if it is one.
    pub fn of(error: &io::Error) -> Option<&LockHeld> {
        error.get_ref()?.downcast_ref()
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pid the holder recorded: `None` for shared holders, or if it had not written it
    /// yet.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// How long the acquire waited before giving up.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl fmt::Display for LockHeld {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lock file {} is held by ", self.path.display())?;
        match self.pid {
            Some(pid) => write!(f, "pid {pid}")?,
            None => write!(f, "another process (no pid recorded)")?,
        }
        write!(f, " (waited {:?})", self.waited)
    }
}

impl Error for LockHeld {}

/// An `io::Error` of kind `WouldBlock` holding the `LockHeld`.
impl From<LockHeld> for io::Error {
    fn from(held: LockHeld) -> io::Error {
        io::Error::new(io::ErrorKind::WouldBlock, held)
    }
}

/// Opens the lock file, creating it if needed, refusing a symbolic link; `true` if this
/// call created it. `O_EXCL` first, since a lock file is usually absent (removed on
/// release): one `open` in the common case. Inert on a FIFO or a terminal met at the
/// path, which is then refused untouched.
fn open(name: &PathName) -> io::Result<(File, bool)> {
    let path = name.as_path();
    loop {
        match imp::open_rw_inert(name, true) {
            Ok(file) => return Ok((file, true)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(path_error("cannot open the lock file", path, e)),
        }
        match imp::open_rw_inert(name, false) {
            Ok(file) => return Ok((file, false)),
            // Removed between the two opens (a holder released it): create it again.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            // A directory: refused like any other file that is not a lock file.
            Err(e) if e.kind() == io::ErrorKind::IsADirectory => {
                return Err(not_a_lock_file(path, "is a directory"));
            }
            Err(e) => return Err(path_error("cannot open the lock file", path, e)),
        }
    }
}

/// The longest lock record: a pid (at most 10 digits) with some whitespace around it.
const MAX_RECORD: usize = 32;

/// What a lock file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Record {
    Empty,
    Pid(u32),
}

/// Parses a lock record: empty, or a decimal pid with optional ASCII whitespace around
/// it; `None` for anything else.
fn parse_record(bytes: &[u8]) -> Option<Record> {
    if bytes.is_empty() {
        return Some(Record::Empty);
    }
    let digits = bytes.trim_ascii();
    if digits.is_empty() {
        return None;
    }
    // Decimal digits only, no sign, no overflow: what `str::parse::<u32>` accepts minus
    // the sign, without its UTF-8 check and generic code (the record is read twice per
    // lock).
    let mut pid: u32 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        pid = pid.checked_mul(10)?.checked_add(u32::from(d - b'0'))?;
    }
    (pid != 0).then_some(Record::Pid(pid))
}

/// Reads and parses the record in `file`; `Ok(None)` when it holds something else.
fn read_record(file: &File, path: &Path) -> io::Result<Option<Record>> {
    // One byte more than a record can have, to tell a long file from a record.
    let mut buf = [0u8; MAX_RECORD + 1];
    let n = imp::read_at_start(file, &mut buf)
        .map_err(|e| path_error("cannot read the lock file", path, e))?;
    Ok(if n > MAX_RECORD {
        None
    } else {
        parse_record(&buf[..n])
    })
}

/// The error for a path that exists and is not a lock file (see `# Existing files`).
#[cold]
fn not_a_lock_file(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "{} exists and is not a lock file (it {what}); it was left untouched",
            path.display()
        ),
    )
}

/// Removes the lock file at `name` if it still names the file `id` (the caller holds the
/// lock). Already gone or replaced: not ours, nothing to do.
fn remove_if_ours(name: &PathName, id: FileId) -> io::Result<()> {
    let path = name.as_path();
    match imp::path_id(name) {
        Ok(now) if now == id => {
            imp::remove(name).map_err(|e| path_error("cannot remove the lock file", path, e))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(path_error("cannot inspect the lock file", path, e)),
    }
}

/// Locks `file`; `false` when the lock stayed held (never for `Wait::Block`).
fn lock(file: &File, shared: bool, wait: Wait) -> io::Result<bool> {
    let try_lock = || {
        let result = if shared {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        match result {
            Ok(()) => Ok(true),
            Err(TryLockError::WouldBlock) => Ok(false),
            Err(TryLockError::Error(e)) => Err(e),
        }
    };
    match wait {
        Wait::Block => {
            if shared {
                file.lock_shared()?;
            } else {
                file.lock()?;
            }
            Ok(true)
        }
        Wait::Try => try_lock(),
        Wait::Until(deadline) => {
            let mut backoff = Duration::from_millis(1);
            loop {
                if try_lock()? {
                    return Ok(true);
                }
                let now = Instant::now();
                if now >= deadline {
                    return Ok(false);
                }
                std::thread::sleep(backoff.min(deadline - now));
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Writes `<pid>\n` into the locked file, emptying it first when a previous holder left
/// a record: a crash between the two steps leaves an empty file, which the next `acquire`
/// takes over, never a torn record it would have to refuse.
fn record_pid(file: &File, pid: u32, old_len: u64) -> io::Result<()> {
    let mut buf = [0u8; 16];
    let record = format_record(pid, &mut buf);
    if old_len > 0 {
        file.set_len(0)?;
    }
    imp::write_at_start(file, record)
}

/// `<pid>\n` in `buf`, written by hand: `writeln!` would go through the formatting
/// machinery (about 450 instructions, a third of what `LockFile` adds to the system
/// calls).
fn format_record(pid: u32, buf: &mut [u8; 16]) -> &[u8] {
    // u32::MAX has 10 digits: they and the newline fit in 16 bytes.
    let mut start = buf.len() - 1;
    buf[start] = b'\n';
    let mut rest = pid;
    loop {
        start -= 1;
        buf[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    &buf[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_written_as_decimal_pid_and_newline() {
        let mut buf = [0u8; 16];
        for pid in [1, 9, 10, 4242, 65_536, u32::MAX] {
            assert_eq!(format_record(pid, &mut buf), format!("{pid}\n").as_bytes());
            assert_eq!(
                parse_record(format_record(pid, &mut buf)),
                Some(Record::Pid(pid))
            );
        }
    }

    #[test]
    fn records_are_empty_or_a_pid() {
        assert_eq!(parse_record(b""), Some(Record::Empty));
        assert_eq!(parse_record(b"4242\n"), Some(Record::Pid(4242)));
        assert_eq!(parse_record(b"4242"), Some(Record::Pid(4242)));
        assert_eq!(parse_record(b" 17\r\n"), Some(Record::Pid(17)));
        for foreign in [
            &b"precious = true\n"[..],
            b"\n",
            b"0\n",
            b"-3\n",
            b"+3\n",
            b"12 34\n",
            b"99999999999\n",
            b"4242\nmore",
        ] {
            assert_eq!(parse_record(foreign), None, "{foreign:?}");
        }
    }
}
