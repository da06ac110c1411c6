//! Files that never lose data or an error: atomic replacement, lock files, checked close,
//! and temporary files whose removal errors are reported.
//!
//! Use this module when:
//! - a file must be replaced so that a reader or a crash sees the old content or the new
//!   one, never a torn mix: [`AtomicFile`] (write to a temp file in the same directory,
//!   then flush, fsync, rename, fsync the directory);
//! - only one process may do something (a daemon's pid file, a cache directory):
//!   [`LockFile`] (`flock`, owner pid recorded, safe against the unlink race);
//! - the errors `std::fs::File`'s `Drop` throws away matter (NFS, full disks):
//!   [`CheckedFile`] (`close` reports flush, fsync and `close(2)` errors);
//! - a temporary directory or file must go away, and a failure to remove it must be seen:
//!   [`TempDir`] and [`TempFile`] (tempfile's, wrapped).
//!
//! ```
//! use custodian::fs::AtomicFile;
//! use std::io::Write;
//!
//! let dir = tempfile::tempdir()?;
//! let config = dir.path().join("app.toml");
//! std::fs::write(&config, "port = 80\n")?;
//!
//! let mut file = AtomicFile::create(&config)?;
//! file.write_all(b"port = 8080\n")?;
//! // Until `commit`, readers (and a crash) see the old content.
//! assert_eq!(std::fs::read_to_string(&config)?, "port = 80\n");
//! file.commit()?;
//! assert_eq!(std::fs::read_to_string(&config)?, "port = 8080\n");
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! Every guard carries a [`Ticket`](crate::ledger::Ticket) in the ledger (kinds
//! `custodian::fs::AtomicFile`, `::LockFile`, `::CheckedFile`, `::TempDir`, `::TempFile`);
//! a cleanup that fails in `Drop` becomes a tracing `error` event naming the path, and a
//! `failed` count.
//!
//! Errors name the path they concern and keep the original [`io::ErrorKind`]; their
//! message ends with the original one, and [`raw_os_error`](crate::raw_os_error) gives
//! the OS error code behind them.
//!
//! # Platforms
//! Unix is the reference. Elsewhere the guards compile with weaker, documented behaviour:
//! [`CheckedFile`] cannot see the result of closing the handle, [`LockFile`] does not
//! re-check the file's identity nor remove it, and [`AtomicFile`] never removes temp
//! files left by crashed writers.

mod atomic;
mod checked;
pub(crate) mod imp;
mod lock;
mod temp;

pub use atomic::{AtomicFile, AtomicFileBuilder, CommitError};
pub use checked::CheckedFile;
pub use lock::{LockFile, LockFileBuilder, LockHeld};
pub use temp::{TempDir, TempFile};

use std::io;

/// The first failed write of a writing guard (`AtomicFile`, `CheckedFile`): once a
/// `write`, `write_all`, `write_vectored` or `seek` failed, how much of the data reached
/// the file is unknown, so the guard must never report the content as complete.
///
/// A failed `flush` is the one recoverable case: the buffer keeps what it could not write
/// (std's `BufWriter` drops only the written prefix), so a later `flush` that succeeds has
/// written everything, and clears it. Boxed: one pointer in the guard on the happy path.
#[derive(Debug, Default)]
pub(crate) struct Poison(Option<Box<Failed>>);

#[derive(Debug)]
struct Failed {
    kind: io::ErrorKind,
    message: String,
    /// Failed in `flush`: cleared by a later successful flush.
    in_flush: bool,
}

impl Poison {
    /// Records `result`'s error, if any, and passes the result on. `Interrupted` is not a
    /// failure: nothing was written, and the call may be retried.
    #[inline]
    pub(crate) fn check<T>(&mut self, result: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &result
            && e.kind() != io::ErrorKind::Interrupted
        {
            self.record(e, false);
        }
        result
    }

    /// As `check`, for a flush: a success clears a poison left by an earlier flush.
    pub(crate) fn check_flush<T>(&mut self, result: io::Result<T>) -> io::Result<T> {
        match &result {
            Ok(_) => {
                if self.0.as_ref().is_some_and(|f| f.in_flush) {
                    self.0 = None;
                }
            }
            Err(e) if e.kind() != io::ErrorKind::Interrupted => self.record(e, true),
            Err(_) => {}
        }
        result
    }

    #[cold]
    fn record(&mut self, e: &io::Error, in_flush: bool) {
        // The first failure is the one to report, unless it was a (repairable) flush and
        // this one is not.
        if self
            .0
            .as_ref()
            .is_none_or(|first| first.in_flush && !in_flush)
        {
            self.0 = Some(Box::new(Failed {
                kind: e.kind(),
                message: e.to_string(),
                in_flush,
            }));
        }
    }

    /// The error to return instead of reporting the content complete, if a write failed:
    /// of the first failure's kind, saying what failed and what `what` means. `None` for a
    /// failed flush alone, which the caller's own flush retries.
    #[cold]
    pub(crate) fn error(&self, what: &str, path: &std::path::Path) -> Option<io::Error> {
        let failed = self.0.as_ref().filter(|f| !f.in_flush)?;
        Some(io::Error::new(
            failed.kind,
            format!(
                "an earlier write to {} failed ({}); {what}",
                path.display(),
                failed.message
            ),
        ))
    }

    pub(crate) fn clear(&mut self) {
        self.0 = None;
    }
}
