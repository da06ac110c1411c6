//! `CheckedFile`: a file whose close reports what `std::fs::File`'s `Drop` throws away.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::panic::Location;
use std::path::{Path, PathBuf};

use super::{Poison, imp};
use crate::Close;
use crate::GuardError;
use crate::io_error::path_error;
use crate::ledger::{Kind, Ticket};

static KIND: Kind = Kind::new("custodian::fs::CheckedFile");

/// A buffered file whose [`close`](CheckedFile::close) reports every error on the way
/// out: the buffer's flush, the optional `fsync`, and `close(2)` itself — the last one is
/// where NFS and some FUSE file systems report a failed write-back, and std's `Drop`
/// discards it.
///
/// `close(2)` is never retried on `EINTR`: the descriptor is released already (Linux), and
/// a second close could close a descriptor another thread just got. The `EINTR` is
/// reported. Dropped without `close`, the same work is done and any error becomes a
/// tracing `error` event naming the path, and a failure in the ledger.
///
/// ```
/// use custodian::fs::CheckedFile;
/// use std::io::Write;
///
/// let dir = tempfile::tempdir()?;
/// let mut file = CheckedFile::create(dir.path().join("report.csv"))?;
/// writeln!(file, "id,total")?;
/// file.close()?; // flush + close(2), each checked
///
/// // On a full disk the error is not lost (Linux's /dev/full is a disk that is always full).
/// # #[cfg(target_os = "linux")] {
/// let mut full = CheckedFile::create("/dev/full")?;
/// writeln!(full, "id,total")?; // buffered
/// let err = full.close().unwrap_err();
/// assert_eq!(err.kind(), std::io::ErrorKind::StorageFull);
/// assert!(err.to_string().contains("/dev/full"));
/// # }
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// To keep the buffered data when the flush fails (and retry after freeing space), call
/// `flush` first: it leaves the data in the buffer on error; `close` cannot, since it
/// consumes the file.
///
/// A `write`, `write_all`, `write_vectored` or `seek` that failed leaves the file with an
/// unknown part of that data: `close` (and `Drop`) then report that failure, even if the
/// final flush and `close(2)` succeed, so a caller that ignored the first error cannot be
/// told the file is complete. A failed `flush` is forgiven by a later one that succeeds
/// (the buffer kept the data).
#[must_use = "dropping a CheckedFile closes it at once; call `close` to see its errors"]
pub struct CheckedFile {
    /// `None` once closed (or given away by `into_inner`).
    writer: Option<BufWriter<File>>,
    path: PathBuf,
    sync: bool,
    /// Set by a failed write: `close` then reports it instead of success.
    poison: Poison,
    ticket: Ticket,
}

impl CheckedFile {
    /// Creates (or truncates) the file at `path` for writing, like
    /// [`File::create`](std::fs::File::create) (a new file gets `0o666` minus the umask),
    /// except that a symbolic link at `path` is refused (`ELOOP`) rather than followed.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let file = custodian::fs::CheckedFile::create(dir.path().join("out.txt"))?;
    /// file.close()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// Opening failed: missing directory, permission denied, a symbolic link, ... naming
    /// the path.
    #[track_caller]
    #[must_use = "dropping a CheckedFile closes it at once; call `close` to see its errors"]
    pub fn create(path: impl AsRef<Path>) -> io::Result<CheckedFile> {
        let path = path.as_ref();
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        imp::no_follow(&mut options);
        let file = options
            .open(path)
            .map_err(|e| path_error("cannot create", path, e))?;
        Ok(CheckedFile::at(file, path, Location::caller()))
    }

    /// Opens `path` with `options` (yours, used as given).
    ///
    /// ```
    /// use std::fs::OpenOptions;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("log.txt");
    /// let log = custodian::fs::CheckedFile::open_with(&path, OpenOptions::new().append(true).create(true))?;
    /// log.close()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// Opening failed, naming the path.
    #[track_caller]
    #[must_use = "dropping a CheckedFile closes it at once; call `close` to see its errors"]
    pub fn open_with(path: impl AsRef<Path>, options: &OpenOptions) -> io::Result<CheckedFile> {
        let path = path.as_ref();
        let file = options
            .open(path)
            .map_err(|e| path_error("cannot open", path, e))?;
        Ok(CheckedFile::at(file, path, Location::caller()))
    }

    /// Wraps an open file; `path` is only used to name it in errors and events.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("out.txt");
    /// let file = custodian::fs::CheckedFile::from_file(std::fs::File::create(&path)?, &path);
    /// file.close()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[track_caller]
    #[must_use = "dropping a CheckedFile closes it at once; call `close` to see its errors"]
    pub fn from_file(file: File, path: impl Into<PathBuf>) -> CheckedFile {
        CheckedFile::at(file, path.into(), Location::caller())
    }

    fn at(file: File, path: impl Into<PathBuf>, site: &'static Location<'static>) -> CheckedFile {
        CheckedFile {
            writer: Some(BufWriter::new(file)),
            path: path.into(),
            sync: false,
            poison: Poison::default(),
            ticket: Ticket::at(&KIND, site),
        }
    }

    /// Whether closing also `fsync`s the file (`sync_all`) before closing it; off by
    /// default.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let file = custodian::fs::CheckedFile::create(dir.path().join("ledger.dat"))?.sync_on_close(true);
    /// file.close()?; // flush, fsync, close
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[must_use = "dropping a CheckedFile closes it at once; call `close` to see its errors"]
    pub fn sync_on_close(mut self, sync: bool) -> CheckedFile {
        self.sync = sync;
        self
    }

    /// The file's path.
    ///
    /// ```
    /// let file = custodian::fs::CheckedFile::create("/dev/null")?;
    /// assert_eq!(file.path(), std::path::Path::new("/dev/null"));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file. Data still in the buffer is not in it yet: call `flush` first.
    ///
    /// ```
    /// let file = custodian::fs::CheckedFile::create("/dev/null")?;
    /// assert!(!file.get_ref().metadata()?.is_dir());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn get_ref(&self) -> &File {
        self.writer().get_ref()
    }

    /// Flushes the buffer and `fsync`s the file now, keeping it open.
    ///
    /// ```
    /// use std::io::Write;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let mut file = custodian::fs::CheckedFile::create(dir.path().join("out.txt"))?;
    /// file.write_all(b"checkpoint")?;
    /// file.sync_all()?;
    /// # file.close()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// The flush's or the `fsync`'s, naming the path. The buffered data stays buffered if
    /// the flush failed.
    pub fn sync_all(&mut self) -> io::Result<()> {
        self.flush()?;
        self.writer()
            .get_ref()
            .sync_all()
            .map_err(|e| path_error("cannot sync", &self.path, e))
    }

    /// Flushes, optionally `fsync`s, and closes the file, checking each step; returns the
    /// first error (a later one is reported as a tracing `error` event).
    ///
    /// ```
    /// use std::io::Write;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let mut file = custodian::fs::CheckedFile::create(dir.path().join("out.txt"))?;
    /// file.write_all(b"done")?;
    /// file.close()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// An earlier failed write (see above; of that failure's kind, saying "an earlier
    /// write to … failed"), the flush's (the buffered data is lost: flush first to keep
    /// it), the `fsync`'s, or `close(2)`'s, naming the path, with the original kind. The
    /// descriptor is closed in every case.
    pub fn close(mut self) -> io::Result<()> {
        self.finish()
    }

    /// Escape hatch: the file, buffer written out, no longer checked on close.
    ///
    /// ```
    /// use std::io::Write;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let mut file = custodian::fs::CheckedFile::create(dir.path().join("out.txt"))?;
    /// file.write_all(b"abc")?;
    /// let file = custodian::fs::CheckedFile::into_inner(file)?;
    /// assert_eq!(file.metadata()?.len(), 3);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// When the flush fails: the error and the `CheckedFile`, data still buffered. When
    /// an earlier write failed (see [`CheckedFile`]): that failure, with the file back, so
    /// the escape hatch cannot pass an incomplete file off as complete either.
    pub fn into_inner(mut this: Self) -> Result<File, GuardError<CheckedFile>> {
        if let Err(e) = this.flush() {
            return Err(GuardError::new(e, this));
        }
        if let Some(e) = this.poison.error("the file is incomplete", &this.path) {
            return Err(GuardError::new(e, this));
        }
        let Some(writer) = this.writer.take() else {
            unreachable!("a CheckedFile's file is only taken by consuming it")
        };
        Ok(writer.into_parts().0)
    }

    fn finish(&mut self) -> io::Result<()> {
        let Some(mut writer) = self.writer.take() else {
            return Ok(());
        };
        let flushed = writer.flush();
        if flushed.is_ok() {
            // Everything buffered is written: a poison left by an earlier flush is repaired.
            let _ = self.poison.check_flush(Ok(()));
        }
        let mut first = self.poison.error("the file is incomplete", &self.path);
        let report = |e: io::Error, first: &mut Option<io::Error>| match first {
            None => *first = Some(e),
            Some(_) => self.ticket.failure(&self.path.display(), &e),
        };
        if let Err(e) = flushed {
            report(path_error("cannot write to", &self.path, e), &mut first);
        }
        let (file, _unwritten) = writer.into_parts();
        if self.sync
            && first.is_none()
            && let Err(e) = file.sync_all()
        {
            report(path_error("cannot sync", &self.path, e), &mut first);
        }
        if let Err(e) = imp::close(file) {
            report(path_error("cannot close", &self.path, e), &mut first);
        }
        first.map_or(Ok(()), Err)
    }

    fn writer(&self) -> &BufWriter<File> {
        match &self.writer {
            Some(writer) => writer,
            None => unreachable!("a CheckedFile's file is only taken by consuming it"),
        }
    }

    fn writer_mut(&mut self) -> &mut BufWriter<File> {
        match &mut self.writer {
            Some(writer) => writer,
            None => unreachable!("a CheckedFile's file is only taken by consuming it"),
        }
    }
}

/// A failed `write`, `write_all`, `write_vectored` (or `seek`) is reported again by
/// `close` (see [`CheckedFile`]).
impl Write for CheckedFile {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let result = self.writer_mut().write(buf);
        self.poison.check(result)
    }

    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let result = self.writer_mut().write_all(buf);
        self.poison.check(result)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let result = self.writer_mut().write_vectored(bufs);
        self.poison.check(result)
    }

    /// Writes out the buffer; on error the data stays buffered. The error names the path.
    fn flush(&mut self) -> io::Result<()> {
        let path = &self.path;
        match &mut self.writer {
            Some(writer) => {
                let result = writer.flush();
                self.poison
                    .check_flush(result)
                    .map_err(|e| path_error("cannot write to", path, e))
            }
            None => Ok(()),
        }
    }
}

/// Seeks after writing out the buffer; a failure is reported again by `close`.
impl Seek for CheckedFile {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let result = self.writer_mut().seek(pos);
        self.poison.check(result)
    }
}

/// Closing a `CheckedFile` flushes, optionally syncs and closes it, each step checked.
///
/// ```
/// use custodian::Close;
///
/// let file = custodian::fs::CheckedFile::create("/dev/null")?;
/// Close::close(file)?;
/// # Ok::<(), std::io::Error>(())
/// ```
impl Close for CheckedFile {
    type Error = io::Error;

    fn close(self) -> io::Result<()> {
        CheckedFile::close(self)
    }
}

impl Drop for CheckedFile {
    fn drop(&mut self) {
        if self.writer.is_some() {
            self.ticket.dropped_without_close(&self.path.display());
            if let Err(e) = self.finish() {
                self.ticket.failure(&self.path.display(), &e);
            }
        }
    }
}

impl fmt::Debug for CheckedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckedFile")
            .field("path", &self.path)
            .field("sync_on_close", &self.sync)
            .field("checks_close", &imp::CHECKS_CLOSE)
            .finish()
    }
}
