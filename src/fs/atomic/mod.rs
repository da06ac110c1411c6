//! `AtomicFile`: replace a file so that readers and crashes see the old content or the
//! new one, never a torn mix.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{File, Permissions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::panic::Location;
use std::path::{Path, PathBuf};

use super::{Poison, imp};
use crate::Close;
use crate::io_error::path_error;
use crate::ledger::{Kind, Ticket};

#[cfg(not(unix))]
mod other;
#[cfg(not(unix))]
use other::{Options, Publish, Stage};
#[cfg(unix)]
mod unix;
#[cfg(unix)]
use unix::{Options, Publish, Stage};

static KIND: Kind = Kind::new("custodian::fs::AtomicFile");

/// Default size of the write buffer, as `std::io::BufWriter`'s.
const DEFAULT_BUFFER: usize = 8 * 1024;
/// At most this many bytes of the target's name go into the temp file's name, so that
/// the temp name stays under `NAME_MAX` (255) whatever the target's name.
const MAX_NAME_IN_TEMP: usize = 128;
/// Length of the random part of the temp file's name (tempfile's default).
const RAND_LEN: usize = 6;

/// A file being rewritten: written to a temp file in the target's directory, then
/// renamed over the target by [`commit`](AtomicFile::commit). A reader, or a crash at any
/// moment, sees the complete old content or the complete new content, never a mix.
///
/// On Linux the temp file is *unnamed* (`O_TMPFILE`): it has no name in the directory
/// until `commit` links it there, so a writer killed before committing leaves nothing
/// behind. Elsewhere, or where the file system refuses unnamed files, it is a named
/// temp file (see *Crashes* below). Either way the cost of a write does not depend on
/// how many files the directory holds.
///
/// `commit` = flush the buffer → `fsync` the file → `rename` over the target → `fsync`
/// the directory (so that the rename itself survives a power loss). Dropped without
/// `commit`, the temp file is removed and the target is untouched (rollback); a failure to
/// remove a named temp file is reported (tracing `error` event and the ledger's failed
/// count).
///
/// The target's directory is opened once, by `create`: the link, the rename and the
/// directory's `fsync` go through that handle, so a directory renamed (or replaced) while
/// the file is being written still receives the new file.
///
/// ```
/// use custodian::fs::AtomicFile;
/// use std::io::Write;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("state.json");
///
/// let mut file = AtomicFile::create(&path)?;
/// write!(file, "{{\"version\": 2}}")?;
/// file.commit()?;
/// assert_eq!(std::fs::read_to_string(&path)?, "{\"version\": 2}");
///
/// // Not committed: rolled back, the old content stays.
/// let mut file = AtomicFile::create(&path)?;
/// file.write_all(b"half of a new vers")?;
/// drop(file);
/// assert_eq!(std::fs::read_to_string(&path)?, "{\"version\": 2}");
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Permissions
/// The new file gets the old file's permission bits when the target exists (see
/// [`AtomicFileBuilder::keep_permissions`]), `0o600` otherwise, or what
/// [`AtomicFileBuilder::permissions`] says. The owner is the writing process's user, so
/// the setuid and setgid bits are not kept (they would grant the writer's privileges);
/// the sticky bit is.
///
/// # Symbolic links
/// The temp file is created in the directory that the target's parent path resolves to
/// when `create` runs, which is where `rename` puts the result, so the rename never
/// crosses file systems. If
/// the target itself is a symbolic link, the **link is replaced** by the new file and the
/// file it pointed to is left unchanged, as `rename(2)` and `mv` do; this also means a
/// link planted at the target path is never followed. To rewrite the file a link points
/// to, pass [`std::fs::canonicalize`]`(path)`.
///
/// # Crashes
/// With an unnamed temp file (Linux), a writer killed before `commit` leaves nothing. One
/// killed *during* `commit`, in the microseconds between linking the new (already
/// `fsync`ed) file into the directory and renaming it over the target, leaves the
/// complete new content as `.<target name>.custodian.tmp`; the next durable commit of the
/// same target, or of a target that already exists, removes it without listing the
/// directory (a `sync(false)` commit of a new target links straight to its name and does
/// not look).
///
/// A named temp file (other systems, file systems without unnamed files, or
/// [`AtomicFileBuilder::named_temp_file`]) is called
/// `.<target name>.custodian.<random>.<pid>.tmp`,
/// and a writer killed before `commit` leaves it behind. The first `AtomicFile` a process
/// creates with a named temp file in a directory removes such files, of any target, whose writer is gone (no
/// process with that pid, and the file not locked: each writer holds a `flock` on its
/// temp file). That costs one directory listing per directory and process, however many
/// targets are written there, never one per write. Turn this off with
/// [`AtomicFileBuilder::remove_stale`].
#[must_use = "dropping an AtomicFile without `commit` discards what was written"]
pub struct AtomicFile {
    /// The staged content; `None` only once `commit`, `discard` or `into_inner` took it.
    temp: Option<BufWriter<File>>,
    /// The configured capacity of the write buffer.
    buffer: usize,
    /// The directory handle and names that `commit` publishes through.
    stage: Stage,
    target: PathBuf,
    sync: bool,
    /// Set by a failed write: `commit` then refuses to publish a partial content.
    poison: Poison,
    ticket: Ticket,
}

/// Options for an [`AtomicFile`]: durability, permissions, staging directory, buffer.
///
/// ```
/// use custodian::fs::AtomicFile;
/// use std::io::Write;
/// # #[cfg(unix)] {
/// use std::os::unix::fs::PermissionsExt;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("public.txt");
/// let mut file = AtomicFile::builder()
///     .permissions(std::fs::Permissions::from_mode(0o644))
///     .sync(false) // atomic for readers and crashes, not durable across power loss
///     .create(&path)?;
/// file.write_all(b"hello")?;
/// file.commit()?;
/// assert_eq!(std::fs::metadata(&path)?.permissions().mode() & 0o777, 0o644);
/// # }
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until `create`"]
pub struct AtomicFileBuilder {
    sync: bool,
    permissions: Option<Permissions>,
    keep_permissions: bool,
    temp_dir: Option<PathBuf>,
    buffer: usize,
    remove_stale: bool,
    named: bool,
}

impl Default for AtomicFileBuilder {
    fn default() -> Self {
        AtomicFileBuilder {
            sync: true,
            permissions: None,
            keep_permissions: true,
            temp_dir: None,
            buffer: DEFAULT_BUFFER,
            remove_stale: imp::CLEANS_STALE,
            named: false,
        }
    }
}

impl AtomicFileBuilder {
    /// The defaults: durable commit, old permissions kept, temp file next to the target
    /// (unnamed where possible), 8 KiB buffer, stale named temp files removed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `commit` makes the new content durable (`fsync` of the file and of the
    /// directory; default `true`). With `false` the replacement is still atomic for
    /// readers and survives a crash of the process, but not a power loss or a kernel
    /// crash: use it for caches and tests.
    pub fn sync(mut self, sync: bool) -> Self {
        self.sync = sync;
        self
    }

    /// The permission bits of the new file, set exactly: a umask that removes group or
    /// other bits does not apply (one that removes the owner's own bits still does to an
    /// owner-only mode such as `0o600`). Overrides [`keep_permissions`](Self::keep_permissions).
    pub fn permissions(mut self, permissions: Permissions) -> Self {
        self.permissions = Some(permissions);
        self
    }

    /// Whether the new file gets the permission bits of the file it replaces (default
    /// `true`; when the target is a symbolic link, those of the file it points to). A new
    /// target gets `0o600`. Unix only: elsewhere the new file gets the default ones.
    pub fn keep_permissions(mut self, keep: bool) -> Self {
        self.keep_permissions = keep;
        self
    }

    /// Stages the temp file in `dir` instead of the target's directory (the name it has
    /// while being published is in `dir` too). `dir` must be on the target's file system,
    /// since `rename` cannot cross file systems: `create` checks this and fails with
    /// [`io::ErrorKind::CrossesDevices`] otherwise.
    pub fn temp_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.temp_dir = Some(dir.into());
        self
    }

    /// The capacity of the write buffer (default 8 KiB; 0 writes straight through). As
    /// with `std::io::BufWriter`, a write at least this large goes straight to the file;
    /// the buffer is only allocated by the first write smaller than it.
    pub fn buffer_capacity(mut self, bytes: usize) -> Self {
        self.buffer = bytes;
        self
    }

    /// Whether `create` removes named temp files left by crashed writers in the
    /// directory (default `true` on Unix; a no-op elsewhere). Only where a named temp
    /// file is used, and once per directory and process: one directory listing then,
    /// none for later writes (see *Crashes* on [`AtomicFile`]).
    pub fn remove_stale(mut self, remove: bool) -> Self {
        self.remove_stale = remove && imp::CLEANS_STALE;
        self
    }

    /// Whether to stage in a named temp file, `.<name>.custodian.<random>.<pid>.tmp`, even where an
    /// unnamed one is possible (default `false`; only Linux has unnamed ones): for a
    /// staged file that other programs can open by its path
    /// ([`AtomicFile::temp_path`]). A writer killed before `commit` then leaves it behind
    /// (see *Crashes* on [`AtomicFile`]).
    ///
    /// ```
    /// use std::io::Write;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let mut file = custodian::fs::AtomicFile::builder()
    ///     .named_temp_file(true)
    ///     .create(dir.path().join("a.txt"))?;
    /// file.write_all(b"visible while staged")?;
    /// file.flush()?;
    /// let temp = file.temp_path().expect("a named temp file");
    /// assert_eq!(std::fs::read(temp)?, b"visible while staged");
    /// file.commit()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn named_temp_file(mut self, named: bool) -> Self {
        self.named = named;
        self
    }

    /// Starts rewriting `path`: creates the temp file, with the options.
    ///
    /// # Errors
    /// An error naming the path, with the original kind, when `path` has no file name
    /// (`InvalidInput`), is a directory (`IsADirectory`), cannot be inspected, when its
    /// directory or the staging directory is missing (`NotFound`), cannot be opened or
    /// written (`PermissionDenied`, `ReadOnlyFilesystem`), or when the staging directory
    /// is on another file system (`CrossesDevices`).
    #[track_caller]
    #[must_use = "dropping an AtomicFile without `commit` discards what was written"]
    pub fn create(&self, path: impl AsRef<Path>) -> io::Result<AtomicFile> {
        self.create_at(path.as_ref(), Location::caller())
    }

    fn create_at(&self, target: &Path, site: &'static Location<'static>) -> io::Result<AtomicFile> {
        let Some((dir, name)) = split_target(target) else {
            return Err(path_error(
                "cannot rewrite",
                target,
                io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"),
            ));
        };
        let options = Options {
            permissions: self.permissions.clone(),
            keep_permissions: self.keep_permissions,
            temp_dir: self.temp_dir.as_deref(),
            remove_stale: self.remove_stale,
            named: self.named,
        };
        let (file, stage) = Stage::create(target, dir, name, &options)?;
        Ok(AtomicFile {
            // The buffer is allocated by the first write that needs it (see `buffered`).
            temp: Some(BufWriter::with_capacity(0, file)),
            buffer: self.buffer,
            stage,
            target: target.to_path_buf(),
            sync: self.sync,
            poison: Poison::default(),
            ticket: Ticket::at(&KIND, site),
        })
    }
}

impl AtomicFile {
    /// Starts rewriting `path` with the default options (durable commit, old permissions
    /// kept): creates a temp file in the same directory.
    ///
    /// ```
    /// use std::io::Write;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let mut file = custodian::fs::AtomicFile::create(dir.path().join("a.txt"))?;
    /// file.write_all(b"all or nothing")?;
    /// file.commit()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`AtomicFileBuilder::create`]: a missing or read-only directory, a target that
    /// is a directory, ... each naming the path.
    #[track_caller]
    #[must_use = "dropping an AtomicFile without `commit` discards what was written"]
    pub fn create(path: impl AsRef<Path>) -> io::Result<AtomicFile> {
        AtomicFileBuilder::new().create_at(path.as_ref(), Location::caller())
    }

    /// Options: durability, permissions, staging directory, buffer size.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let file = custodian::fs::AtomicFile::builder()
    ///     .sync(false)
    ///     .create(dir.path().join("cache.bin"))?;
    /// file.commit()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn builder() -> AtomicFileBuilder {
        AtomicFileBuilder::new()
    }

    /// The file this one replaces on `commit`.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("a.txt");
    /// let file = custodian::fs::AtomicFile::create(&path)?;
    /// assert_eq!(file.path(), path);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn path(&self) -> &Path {
        &self.target
    }

    /// Where the new content is staged until `commit`, for a named temp file; `None` for
    /// an unnamed one, which has no path (the default on Linux; see
    /// [`AtomicFileBuilder::named_temp_file`]). An unnamed one that a failed `commit`
    /// already linked into the directory (`.<name>.custodian.tmp`) has that path from
    /// then on.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let file = custodian::fs::AtomicFile::create(dir.path().join("a.txt"))?;
    /// if let Some(temp) = file.temp_path() {
    ///     assert_eq!(temp.parent(), Some(dir.path()));
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn temp_path(&self) -> Option<&Path> {
        self.stage.temp_path()
    }

    /// The temp file, after writing out the buffer (to seek, `set_len`, read back...).
    /// Writes made through it bypass the poisoning of a failed write: check their results.
    ///
    /// ```
    /// use std::io::Write;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let mut file = custodian::fs::AtomicFile::create(dir.path().join("a.txt"))?;
    /// file.write_all(b"12345")?;
    /// assert_eq!(file.as_file_mut()?.metadata()?.len(), 5);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// The flush's error, naming the target (the data stays buffered).
    pub fn as_file_mut(&mut self) -> io::Result<&mut File> {
        self.flush()
            .map_err(|e| path_error("cannot write the new content of", &self.target, e))?;
        Ok(self.writer_mut().get_mut())
    }

    /// Replaces the target with what was written: flush → `fsync` the file → `rename`
    /// over the target → `fsync` the directory (the two `fsync`s unless
    /// [`sync(false)`](AtomicFileBuilder::sync)).
    ///
    /// ```
    /// use std::io::Write;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("a.txt");
    /// let mut file = custodian::fs::AtomicFile::create(&path)?;
    /// file.write_all(b"new")?;
    /// file.commit()?;
    /// assert_eq!(std::fs::read(&path)?, b"new");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// A [`CommitError`] with the error, naming the target, and:
    /// - when the flush or the rename failed, the `AtomicFile` itself, content intact, to
    ///   retry ([`CommitError::into_guard`]) — e.g. after freeing disk space;
    /// - when the file's `fsync` failed, no file: after a failed `fsync` the kernel may have
    ///   dropped the unwritten pages, so the staged content can no longer be trusted; it is
    ///   removed and the target is untouched;
    /// - when the directory's `fsync` (or closing the file) failed, no file: the target
    ///   already has the new content ([`CommitError::is_replaced`]), but the rename may not
    ///   survive a power loss;
    /// - when an earlier `write`, `write_all`, `write_vectored` or `seek` failed (the
    ///   file is *poisoned*: how much of that write reached the temp file is unknown), an
    ///   error of that failure's kind saying so, and the file back; the target keeps its
    ///   old content. Committing it again fails the same way: start over with
    ///   [`reset`](AtomicFile::reset) or a new `AtomicFile`, or drop it to remove the temp
    ///   file. A failed `flush` does not poison once a later flush succeeds, since the
    ///   buffer keeps what it could not write; so a commit whose own flush failed (a full
    ///   disk) can be retried once space is freed.
    ///
    /// ```
    /// use std::io::Write;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("a.txt");
    /// std::fs::write(&path, "old")?;
    /// let mut file = custodian::fs::AtomicFile::create(&path)?;
    /// file.write_all(b"new")?;
    /// assert!(file.seek(std::io::SeekFrom::Current(-10)).is_err()); // a failed seek
    /// let err = file.commit().unwrap_err();
    /// assert_eq!(err.error().kind(), std::io::ErrorKind::InvalidInput);
    /// assert!(err.to_string().contains("an earlier write"));
    /// assert_eq!(std::fs::read(&path)?, b"old"); // nothing half-done published
    /// # use std::io::Seek;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn commit(mut self) -> Result<(), CommitError> {
        if let Some(error) = self.poisoned("nothing was published") {
            return Err(CommitError::kept(error, self));
        }
        let Some(mut writer) = self.temp.take() else {
            unreachable!("an AtomicFile's temp file is only taken by consuming it")
        };
        if let Err(e) = self.poison.check_flush(writer.flush()) {
            self.temp = Some(writer);
            let error = path_error("cannot write the new content of", &self.target, e);
            return Err(CommitError::kept(error, self));
        }
        let capacity = writer.capacity();
        let (file, _empty) = writer.into_parts();
        match self.stage.publish(&file, &self.target, self.sync) {
            Ok(()) => {}
            Err(Publish::Sync(e)) => {
                let error = path_error("cannot sync the new content of", &self.target, e);
                drop(file);
                if let Err(rm) = self.stage.discard() {
                    self.ticket.failure(&self.target.display(), &rm);
                }
                return Err(CommitError::lost(error, false));
            }
            Err(Publish::Rename(error)) => {
                self.temp = Some(BufWriter::with_capacity(capacity, file));
                return Err(CommitError::kept(error, self));
            }
        }
        if let Err(e) = imp::close(file) {
            return Err(CommitError::lost(
                path_error("cannot close the new content of", &self.target, e),
                true,
            ));
        }
        if self.sync
            && let Err(e) = self.stage.sync_dir()
        {
            return Err(CommitError::lost(
                path_error(
                    "replaced, but cannot sync the directory",
                    parent_dir(&self.target),
                    e,
                ),
                true,
            ));
        }
        Ok(())
    }

    /// Rolls back now: removes the temp file (an unnamed one is simply closed), leaving
    /// the target untouched, and returns the error of the removal (which `Drop` can only
    /// report).
    ///
    /// ```
    /// use std::io::Write;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("a.txt");
    /// let mut file = custodian::fs::AtomicFile::create(&path)?;
    /// file.write_all(b"draft")?;
    /// file.discard()?;
    /// assert!(!path.exists());
    /// assert_eq!(std::fs::read_dir(dir.path())?.count(), 0);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// The removal's error, naming the target.
    pub fn discard(mut self) -> io::Result<()> {
        let Some(writer) = self.temp.take() else {
            unreachable!("an AtomicFile's temp file is only taken by consuming it")
        };
        drop(writer.into_parts());
        self.stage
            .discard()
            .map_err(|e| path_error("cannot remove the staged copy of", &self.target, e))
    }

    /// Escape hatch: the staged content as an open [`File`], buffer written out, no longer
    /// managed (no commit, no rollback by this guard). The file has no name: a named temp
    /// file is removed first, so that nothing is left behind once the `File` is closed.
    /// The cursor is at the end of what was written.
    ///
    /// ```
    /// use std::io::{Read, Seek, SeekFrom, Write};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let mut file = custodian::fs::AtomicFile::create(dir.path().join("a.txt"))?;
    /// file.write_all(b"kept aside")?;
    /// let mut staged = custodian::fs::AtomicFile::into_inner(file)?;
    /// staged.seek(SeekFrom::Start(0))?;
    /// let mut content = String::new();
    /// staged.read_to_string(&mut content)?;
    /// assert_eq!(content, "kept aside");
    /// assert!(!dir.path().join("a.txt").exists());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// When the flush fails, an earlier write failed (see [`commit`](Self::commit)), or
    /// a named temp file cannot be removed: a [`CommitError`] with the `AtomicFile` back.
    pub fn into_inner(mut this: Self) -> Result<File, CommitError> {
        if let Some(error) = this.poisoned("the staged content is incomplete") {
            return Err(CommitError::kept(error, this));
        }
        let Some(mut writer) = this.temp.take() else {
            unreachable!("an AtomicFile's temp file is only taken by consuming it")
        };
        if let Err(e) = this.poison.check_flush(writer.flush()) {
            this.temp = Some(writer);
            let error = path_error("cannot write the new content of", &this.target, e);
            return Err(CommitError::kept(error, this));
        }
        if let Err(e) = this.stage.discard() {
            this.temp = Some(writer);
            let error = path_error("cannot remove the staged copy of", &this.target, e);
            return Err(CommitError::kept(error, this));
        }
        Ok(writer.into_parts().0)
    }

    /// Starts the content over: empties the temp file, drops what is buffered, and clears
    /// the poison left by a failed write (see [`commit`](Self::commit)), e.g. to retry
    /// after freeing disk space. The target is untouched.
    ///
    /// ```
    /// use std::io::{Seek, SeekFrom, Write};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("a.txt");
    /// let mut file = custodian::fs::AtomicFile::create(&path)?;
    /// file.write_all(b"first try")?;
    /// assert!(file.seek(SeekFrom::Current(-100)).is_err()); // poisoned
    /// file.reset()?;
    /// file.write_all(b"second try")?;
    /// file.commit()?;
    /// assert_eq!(std::fs::read(&path)?, b"second try");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// Emptying the temp file failed, naming the target; the file stays poisoned.
    pub fn reset(&mut self) -> io::Result<()> {
        let Some(writer) = self.temp.take() else {
            unreachable!("an AtomicFile's temp file is only taken by consuming it")
        };
        let capacity = writer.capacity();
        let (mut temp, _dropped) = writer.into_parts();
        let emptied = temp.set_len(0).and_then(|()| temp.seek(SeekFrom::Start(0)));
        self.temp = Some(BufWriter::with_capacity(capacity, temp));
        emptied.map_err(|e| path_error("cannot empty the staged copy of", &self.target, e))?;
        self.poison.clear();
        Ok(())
    }

    /// The error to return instead of publishing, if a write failed.
    fn poisoned(&self, what: &str) -> Option<io::Error> {
        self.poison.error(what, &self.target)
    }

    fn writer_mut(&mut self) -> &mut BufWriter<File> {
        match &mut self.temp {
            Some(writer) => writer,
            None => unreachable!("an AtomicFile's temp file is only taken by consuming it"),
        }
    }

    /// The writer for a write of `len` bytes, its buffer allocated by the first write
    /// that goes into it: one smaller than the buffer. Larger ones go straight to the file
    /// as `BufWriter` sends them, so an `AtomicFile` written in large pieces never
    /// allocates a buffer.
    fn writer_for(&mut self, len: usize) -> &mut BufWriter<File> {
        if len < self.buffer && self.writer_mut().capacity() == 0 {
            let Some(writer) = self.temp.take() else {
                unreachable!("an AtomicFile's temp file is only taken by consuming it")
            };
            // A writer without a buffer holds nothing: there is nothing to carry over.
            let (file, _empty) = writer.into_parts();
            self.temp = Some(BufWriter::with_capacity(self.buffer, file));
        }
        self.writer_mut()
    }
}

/// A failed `write`, `write_all`, `write_vectored` (or `seek`) poisons the file: `commit`
/// then refuses to publish (see [`AtomicFile::commit`]'s `# Errors`).
impl Write for AtomicFile {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let result = self.writer_for(buf.len()).write(buf);
        self.poison.check(result)
    }

    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let result = self.writer_for(buf.len()).write_all(buf);
        self.poison.check(result)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let len = bufs.iter().map(|b| b.len()).sum();
        let result = self.writer_for(len).write_vectored(bufs);
        self.poison.check(result)
    }

    /// Writes out the buffer to the temp file (the target is only replaced by `commit`).
    /// On error the unwritten data stays buffered, for a later flush or `commit`.
    fn flush(&mut self) -> io::Result<()> {
        let result = self.writer_mut().flush();
        self.poison.check_flush(result)
    }
}

/// Seeks within the temp file (after writing out the buffer); a failure poisons the file.
impl Seek for AtomicFile {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let result = self.writer_mut().seek(pos);
        self.poison.check(result)
    }
}

/// Closing an `AtomicFile` commits it.
///
/// ```
/// use custodian::Close;
/// use std::io::Write;
///
/// let dir = tempfile::tempdir()?;
/// let mut stack = custodian::CleanupStack::new();
/// let mut file = custodian::fs::AtomicFile::create(dir.path().join("a.txt"))?;
/// file.write_all(b"committed when the stack closes")?;
/// stack.push(file);
/// stack.close()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
impl Close for AtomicFile {
    type Error = CommitError;

    fn close(self) -> Result<(), CommitError> {
        self.commit()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if let Some(writer) = self.temp.take() {
            self.ticket.dropped_without_close(&self.target.display());
            drop(writer.into_parts());
            if let Err(e) = self.stage.discard() {
                self.ticket.failure(&self.target.display(), &e);
            }
        }
    }
}

impl fmt::Debug for AtomicFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AtomicFile")
            .field("path", &self.target)
            .field("temp_path", &self.stage.temp_path())
            .field("sync", &self.sync)
            .finish()
    }
}

/// A failed [`AtomicFile::commit`]: the error (naming the target, original kind kept) and,
/// when the staged content is still intact, the `AtomicFile` to retry with.
///
/// Converting it into an `io::Error` (as `?` does) drops the file, which rolls it back.
///
/// ```
/// use custodian::fs::AtomicFile;
/// use std::io::Write;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("a.txt");
/// let mut file = AtomicFile::create(&path)?;
/// file.write_all(b"precious")?;
/// std::fs::create_dir(&path)?; // something made the target a directory meanwhile
///
/// let err = file.commit().unwrap_err();
/// assert_eq!(err.error().kind(), std::io::ErrorKind::IsADirectory);
/// let file = err.into_guard().expect("content intact: the rename failed");
/// std::fs::remove_dir(&path)?;
/// file.commit()?; // nothing was lost
/// assert_eq!(std::fs::read(&path)?, b"precious");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct CommitError {
    error: io::Error,
    /// Boxed to keep `Result<(), CommitError>` small on the success path.
    file: Option<Box<AtomicFile>>,
    replaced: bool,
}

impl CommitError {
    fn kept(error: io::Error, file: AtomicFile) -> Self {
        CommitError {
            error,
            file: Some(Box::new(file)),
            replaced: false,
        }
    }

    fn lost(error: io::Error, replaced: bool) -> Self {
        CommitError {
            error,
            file: None,
            replaced,
        }
    }

    /// What went wrong.
    pub fn error(&self) -> &io::Error {
        &self.error
    }

    /// The `AtomicFile` given back: when the flush or the rename failed (content intact),
    /// or when an earlier write poisoned it. The name every error that gives a guard back
    /// uses ([`GuardError::guard`](crate::GuardError::guard)).
    pub fn guard(&self) -> Option<&AtomicFile> {
        self.file.as_deref()
    }

    /// Takes the `AtomicFile` back, if it came back (see [`guard`](Self::guard)).
    pub fn into_guard(self) -> Option<AtomicFile> {
        self.file.map(|file| *file)
    }

    /// The error and the `AtomicFile`, if it came back.
    pub fn into_parts(self) -> (io::Error, Option<AtomicFile>) {
        (self.error, self.file.map(|file| *file))
    }

    /// Whether the target already has the new content (the rename was done; closing the
    /// file or syncing the directory failed, so it may not survive a power loss).
    pub fn is_replaced(&self) -> bool {
        self.replaced
    }
}

impl fmt::Debug for CommitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommitError")
            .field("error", &self.error)
            .field("file", &self.file)
            .field("replaced", &self.replaced)
            .finish()
    }
}

impl fmt::Display for CommitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for CommitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

/// Keeps the error; the `AtomicFile`, if any, is dropped (rolled back).
impl From<CommitError> for io::Error {
    fn from(e: CommitError) -> io::Error {
        e.error
    }
}

/// The directory `path` is in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// `target`'s directory (as [`parent_dir`]) and file name (as [`Path::file_name`]);
/// `None` when it has no file name. A path ending in a plain name is split at its last
/// `/` without parsing its components.
fn split_target(target: &Path) -> Option<(&Path, &OsStr)> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let bytes = target.as_os_str().as_bytes();
        let start = bytes.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
        let name = &bytes[start..];
        if !matches!(name, b"" | b"." | b"..") {
            let dir = match bytes[..start].iter().rposition(|&b| b != b'/') {
                Some(last) => &bytes[..=last],
                None if start == 0 => b".",
                None => b"/",
            };
            return Some((Path::new(OsStr::from_bytes(dir)), OsStr::from_bytes(name)));
        }
    }
    Some((parent_dir(target), target.file_name()?))
}

/// `.<name>.custodian.`: the start of every temp file's name for target `name`. The
/// marker keeps the names of files a crashed writer leaves (which `create` may remove)
/// apart from anything a user would name a file.
fn temp_prefix(name: &OsStr) -> OsString {
    let mut prefix =
        OsString::with_capacity(TEMP_MARKER.len() + 2 + name.len().min(MAX_NAME_IN_TEMP));
    prefix.push(".");
    if name.len() <= MAX_NAME_IN_TEMP {
        prefix.push(name);
    } else {
        let lossy = name.to_string_lossy();
        let mut end = MAX_NAME_IN_TEMP;
        while !lossy.is_char_boundary(end) {
            end -= 1;
        }
        prefix.push(&lossy[..end]);
    }
    prefix.push(".");
    prefix.push(TEMP_MARKER);
    prefix
}

/// In every temp file's name, after the target's name (see `temp_prefix`).
const TEMP_MARKER: &str = "custodian.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_cut_on_a_char_boundary() {
        let name = "é".repeat(100); // 200 bytes
        let prefix = temp_prefix(OsStr::new(&name));
        assert!(prefix.len() <= MAX_NAME_IN_TEMP + 2 + TEMP_MARKER.len());
        assert!(prefix.to_str().is_some());
    }

    #[test]
    fn targets_split_as_path_methods_do() {
        for path in [
            "a.txt",
            "/a.txt",
            "/etc/a.txt",
            "etc//a.txt",
            "./a",
            "../a",
            "a/b/",
            "a/b/.",
            "//a",
            "a/./b",
            "/",
            ".",
            "..",
            "a/..",
            "",
        ] {
            let path = Path::new(path);
            let expected = path.file_name().map(|name| (parent_dir(path), name));
            assert_eq!(split_target(path), expected, "{}", path.display());
        }
    }

    #[test]
    fn bare_names_live_in_the_current_directory() {
        assert_eq!(parent_dir(Path::new("a.txt")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/etc/a.txt")), Path::new("/etc"));
    }
}
