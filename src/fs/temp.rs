//! `TempDir` and `TempFile`: tempfile's, with a failed removal reported instead of ignored.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::{Deref, DerefMut};
use std::panic::Location;
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

use crate::io_error::path_error;
use crate::ledger::{Kind, Ticket};
use crate::{Close, GuardError};

static DIR_KIND: Kind = Kind::new("custodian::fs::TempDir");
static FILE_KIND: Kind = Kind::new("custodian::fs::TempFile");

/// A temporary directory, removed with its content on [`close`](TempDir::close) or drop —
/// [`tempfile::TempDir`], whose `Drop` ignores a failed removal, with the failure reported
/// (tracing `error` event naming the path, and the ledger's failed count) or returned by
/// `close`.
///
/// It dereferences to the `tempfile::TempDir`, so `path()` and the rest work as usual.
///
/// ```
/// use custodian::fs::TempDir;
///
/// let dir = TempDir::new()?;
/// std::fs::write(dir.path().join("scratch"), "data")?;
/// let path = dir.path().to_path_buf();
/// dir.close()?; // the removal's error, if any, is returned
/// assert!(!path.exists());
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// For a prefix, a suffix or permissions, build one with [`tempfile::Builder`] and wrap it
/// with [`TempDir::from_tempfile`].
#[must_use = "dropping a TempDir removes it at once"]
pub struct TempDir {
    /// `None` once closed or given away.
    inner: Option<tempfile::TempDir>,
    ticket: Ticket,
    /// Set when `close` returned a failed removal with the guard: its `Drop` then tries
    /// again without reporting that failure a second time (it only counts it).
    failure_returned: bool,
}

impl TempDir {
    /// Creates a temporary directory in [`std::env::temp_dir`].
    ///
    /// ```
    /// let dir = custodian::fs::TempDir::new()?;
    /// assert!(dir.path().is_dir());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// tempfile's, naming the path.
    #[track_caller]
    #[must_use = "dropping a TempDir removes it at once"]
    pub fn new() -> io::Result<TempDir> {
        Ok(TempDir::at(tempfile::TempDir::new()?, Location::caller()))
    }

    /// Creates a temporary directory in `dir`.
    ///
    /// ```
    /// let parent = tempfile::tempdir()?;
    /// let dir = custodian::fs::TempDir::new_in(parent.path())?;
    /// assert_eq!(dir.path().parent(), Some(parent.path()));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// tempfile's, naming the path: `dir` missing, not writable, ...
    #[track_caller]
    #[must_use = "dropping a TempDir removes it at once"]
    pub fn new_in(dir: impl AsRef<Path>) -> io::Result<TempDir> {
        Ok(TempDir::at(
            tempfile::TempDir::new_in(dir)?,
            Location::caller(),
        ))
    }

    /// Wraps a `tempfile::TempDir` (made with [`tempfile::Builder`], for instance).
    ///
    /// ```
    /// let dir = tempfile::Builder::new().prefix("job-").tempdir()?;
    /// let dir = custodian::fs::TempDir::from_tempfile(dir);
    /// assert!(dir.path().file_name().unwrap().to_str().unwrap().starts_with("job-"));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[track_caller]
    #[must_use = "dropping a TempDir removes it at once"]
    pub fn from_tempfile(dir: tempfile::TempDir) -> TempDir {
        TempDir::at(dir, Location::caller())
    }

    fn at(dir: tempfile::TempDir, site: &'static Location<'static>) -> TempDir {
        TempDir {
            inner: Some(dir),
            ticket: Ticket::at(&DIR_KIND, site),
            failure_returned: false,
        }
    }

    /// Removes the directory and its content now, returning what went wrong.
    ///
    /// ```
    /// let dir = custodian::fs::TempDir::new()?;
    /// dir.close()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// The removal's error, naming the path (e.g. `PermissionDenied` for a read-only
    /// subdirectory, `EMFILE` with no descriptor left to read a directory with), with the
    /// `TempDir` given back ([`GuardError::into_guard`]): what could not be removed is
    /// still there, and the guard can close it again once the cause is fixed. Dropped,
    /// the error's guard tries once more and counts a failure in the ledger if that fails
    /// too, without a second error event. `?` in a function returning `io::Result`
    /// converts it into the `io::Error`.
    ///
    /// ```
    /// # #[cfg(unix)] {
    /// use std::os::unix::fs::PermissionsExt;
    /// let dir = custodian::fs::TempDir::new()?;
    /// let sub = dir.path().join("read-only");
    /// std::fs::create_dir(&sub)?;
    /// std::fs::write(sub.join("stuck"), "x")?;
    /// std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o555))?;
    /// let dir = match dir.close() {
    ///     Ok(()) => return Ok(()), // as root: removed anyway
    ///     Err(e) => e.into_guard(),
    /// };
    /// std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755))?;
    /// dir.close()?; // the second try removes it
    /// assert!(!sub.exists());
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn close(mut self) -> Result<(), GuardError<TempDir>> {
        let Some(dir) = &self.inner else {
            return Ok(());
        };
        if let Err(e) = std::fs::remove_dir_all(dir.path()) {
            let error = path_error("cannot remove the temp directory", dir.path(), e);
            self.failure_returned = true;
            return Err(GuardError::new(error, self));
        }
        if let Some(dir) = self.inner.take() {
            // Removed: nothing left for tempfile's `Drop` to do.
            let _ = dir.keep();
        }
        Ok(())
    }

    /// Escape hatch: keeps the directory on disk and returns its path.
    ///
    /// ```
    /// let dir = custodian::fs::TempDir::new()?;
    /// let path = custodian::fs::TempDir::keep(dir);
    /// assert!(path.is_dir());
    /// # std::fs::remove_dir(path)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn keep(this: Self) -> PathBuf {
        Self::into_inner(this).keep()
    }

    /// Escape hatch: the `tempfile::TempDir`, no longer watched (its own `Drop` still
    /// removes it, ignoring errors).
    ///
    /// ```
    /// let dir = custodian::fs::TempDir::new()?;
    /// let dir: tempfile::TempDir = custodian::fs::TempDir::into_inner(dir);
    /// # drop(dir);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn into_inner(mut this: Self) -> tempfile::TempDir {
        match this.inner.take() {
            Some(dir) => dir,
            None => unreachable!("a TempDir's directory is only taken by consuming it"),
        }
    }
}

impl Deref for TempDir {
    type Target = tempfile::TempDir;

    fn deref(&self) -> &tempfile::TempDir {
        match &self.inner {
            Some(dir) => dir,
            None => unreachable!("a TempDir's directory is only taken by consuming it"),
        }
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        self.path()
    }
}

/// Closing a `TempDir` removes it.
///
/// ```
/// let mut stack = custodian::CleanupStack::new();
/// stack.push(custodian::fs::TempDir::new()?);
/// stack.close()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
impl Close for TempDir {
    type Error = io::Error;

    fn close(self) -> io::Result<()> {
        TempDir::close(self).map_err(io::Error::from)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(dir) = self.inner.take() {
            let path = dir.path().to_path_buf();
            remove_on_drop(&self.ticket, self.failure_returned, &path, || dir.close());
        }
    }
}

/// What `Drop` does for both guards: `remove` the path, reporting a failure (tracing
/// `error` event and the ledger), or, when `close` already returned the failure with the
/// guard, only counting it if this last try fails too (one failure, one report).
fn remove_on_drop(
    ticket: &Ticket,
    failure_returned: bool,
    path: &Path,
    remove: impl FnOnce() -> io::Result<()>,
) {
    if failure_returned {
        if remove().is_err() {
            ticket.count_failure();
        }
        return;
    }
    ticket.dropped_without_close(&path.display());
    if let Err(e) = remove() {
        ticket.failure(&path.display(), &e);
    }
}

impl fmt::Debug for TempDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TempDir")
            .field("path", &self.inner.as_ref().map(|d| d.path()))
            .finish()
    }
}

/// A named temporary file, removed on [`close`](TempFile::close) or drop —
/// [`tempfile::NamedTempFile`], whose `Drop` ignores a failed removal, with the failure
/// reported (tracing `error` event naming the path, and the ledger's failed count) or
/// returned by `close`.
///
/// It dereferences to the `NamedTempFile` (`path()`, `as_file()`, `reopen()`, ...) and
/// reads, writes and seeks like it.
///
/// ```
/// use custodian::fs::TempFile;
/// use std::io::{Read, Seek, Write};
///
/// let mut file = TempFile::new()?;
/// file.write_all(b"spill")?;
/// file.rewind()?;
/// let mut back = String::new();
/// file.read_to_string(&mut back)?;
/// assert_eq!(back, "spill");
/// file.close()?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[must_use = "dropping a TempFile removes it at once"]
pub struct TempFile {
    /// `None` once closed or given away.
    inner: Option<NamedTempFile>,
    ticket: Ticket,
    /// As `TempDir`'s: `close` returned a failed removal with the guard.
    failure_returned: bool,
}

impl TempFile {
    /// Creates a named temporary file in [`std::env::temp_dir`].
    ///
    /// ```
    /// let file = custodian::fs::TempFile::new()?;
    /// assert!(file.path().exists());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// tempfile's, naming the path.
    #[track_caller]
    #[must_use = "dropping a TempFile removes it at once"]
    pub fn new() -> io::Result<TempFile> {
        Ok(TempFile::at(NamedTempFile::new()?, Location::caller()))
    }

    /// Creates a named temporary file in `dir`.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let file = custodian::fs::TempFile::new_in(dir.path())?;
    /// assert_eq!(file.path().parent(), Some(dir.path()));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// tempfile's, naming the path.
    #[track_caller]
    #[must_use = "dropping a TempFile removes it at once"]
    pub fn new_in(dir: impl AsRef<Path>) -> io::Result<TempFile> {
        Ok(TempFile::at(
            NamedTempFile::new_in(dir)?,
            Location::caller(),
        ))
    }

    /// Wraps a `NamedTempFile` (made with [`tempfile::Builder`], for instance).
    ///
    /// ```
    /// let file = tempfile::Builder::new().suffix(".json").tempfile()?;
    /// let file = custodian::fs::TempFile::from_tempfile(file);
    /// assert_eq!(file.path().extension().unwrap(), "json");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[track_caller]
    #[must_use = "dropping a TempFile removes it at once"]
    pub fn from_tempfile(file: NamedTempFile) -> TempFile {
        TempFile::at(file, Location::caller())
    }

    fn at(file: NamedTempFile, site: &'static Location<'static>) -> TempFile {
        TempFile {
            inner: Some(file),
            ticket: Ticket::at(&FILE_KIND, site),
            failure_returned: false,
        }
    }

    /// Closes and removes the file now, returning what went wrong.
    ///
    /// ```
    /// let file = custodian::fs::TempFile::new()?;
    /// let path = file.path().to_path_buf();
    /// file.close()?;
    /// assert!(!path.exists());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// The removal's error, naming the path, with the `TempFile` given back
    /// ([`GuardError::into_guard`]) to close again once the cause is fixed (its content
    /// is untouched). Dropped, the error's guard tries once more and counts a failure in
    /// the ledger if that fails too, without a second error event.
    pub fn close(mut self) -> Result<(), GuardError<TempFile>> {
        let Some(file) = &self.inner else {
            return Ok(());
        };
        if let Err(e) = std::fs::remove_file(file.path()) {
            let error = path_error("cannot remove the temp file", file.path(), e);
            self.failure_returned = true;
            return Err(GuardError::new(error, self));
        }
        if let Some(file) = self.inner.take() {
            // Removed: tempfile's `Drop` has nothing left to remove; the file closes.
            let (file, path) = file.into_parts();
            let _ = path.keep();
            drop(file);
        }
        Ok(())
    }

    /// Escape hatch: the `NamedTempFile`, no longer watched (to `persist` or `keep` it; its
    /// own `Drop` still removes it, ignoring errors).
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let file = custodian::fs::TempFile::new_in(dir.path())?;
    /// custodian::fs::TempFile::into_inner(file).persist(dir.path().join("kept"))?;
    /// assert!(dir.path().join("kept").exists());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn into_inner(mut this: Self) -> NamedTempFile {
        match this.inner.take() {
            Some(file) => file,
            None => unreachable!("a TempFile's file is only taken by consuming it"),
        }
    }

    fn file(&mut self) -> &mut File {
        self.deref_mut().as_file_mut()
    }
}

impl Deref for TempFile {
    type Target = NamedTempFile;

    fn deref(&self) -> &NamedTempFile {
        match &self.inner {
            Some(file) => file,
            None => unreachable!("a TempFile's file is only taken by consuming it"),
        }
    }
}

impl DerefMut for TempFile {
    fn deref_mut(&mut self) -> &mut NamedTempFile {
        match &mut self.inner {
            Some(file) => file,
            None => unreachable!("a TempFile's file is only taken by consuming it"),
        }
    }
}

impl AsRef<Path> for TempFile {
    fn as_ref(&self) -> &Path {
        self.path()
    }
}

impl Read for TempFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file().read(buf)
    }
}

impl Write for TempFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file().flush()
    }
}

impl Seek for TempFile {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file().seek(pos)
    }
}

/// Closing a `TempFile` removes it.
///
/// ```
/// let mut stack = custodian::CleanupStack::new();
/// stack.push(custodian::fs::TempFile::new()?);
/// stack.close()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
impl Close for TempFile {
    type Error = io::Error;

    fn close(self) -> io::Result<()> {
        TempFile::close(self).map_err(io::Error::from)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(file) = self.inner.take() {
            let path = file.path().to_path_buf();
            remove_on_drop(&self.ticket, self.failure_returned, &path, || file.close());
        }
    }
}

impl fmt::Debug for TempFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TempFile")
            .field("path", &self.inner.as_ref().map(|d| d.path()))
            .finish()
    }
}
