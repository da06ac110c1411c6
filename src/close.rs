//! The one verb every custodian guard shares.

use std::convert::Infallible;
use std::fs::File;
use std::io::{self, BufWriter, Write};

/// A resource with a fallible release: `close` does the work `Drop` would do, and
/// returns the error `Drop` would have to throw away.
///
/// Every custodian guard implements it; [`scope`](crate::scope)'s `enter` and
/// [`CleanupStack::push`](crate::CleanupStack::push) accept anything that does, and
/// collect the error.
///
/// ```
/// use custodian::Close;
///
/// struct Conn;
///
/// impl Close for Conn {
///     type Error = std::io::Error;
///     fn close(self) -> std::io::Result<()> {
///         Err(std::io::Error::other("peer went away"))
///     }
/// }
///
/// assert!(Conn.close().is_err());
/// ```
pub trait Close {
    /// What a failed close reports.
    type Error;

    /// Releases the resource now, reporting what went wrong.
    ///
    /// # Errors
    /// Whatever the release reports; the resource is released (or given up) either way.
    fn close(self) -> Result<(), Self::Error>;
}

/// Closing a `File` makes its data durable and reports both errors std's `Drop` discards:
/// `sync_all` (an fsync, the cost of this close: a disk round trip on most file systems),
/// then `close(2)` itself, checked (on NFS and some FUSE file systems that is where a
/// failed write-back shows). The descriptor is closed even when the fsync fails; the
/// fsync's error is returned first. Off Unix, only the fsync is checked.
///
/// To close without the fsync (a file only read, or data that need not survive a power
/// loss), drop the file, or use [`fs::CheckedFile`](crate::fs::CheckedFile), whose
/// fsync is optional and whose close is checked.
///
/// ```
/// use custodian::Close;
/// use std::io::Write;
///
/// let dir = tempfile::tempdir()?;
/// let mut file = std::fs::File::create(dir.path().join("data"))?;
/// file.write_all(b"kept")?;
/// file.close()?; // fsync'ed, then close(2) checked
/// # Ok::<(), std::io::Error>(())
/// ```
impl Close for File {
    type Error = io::Error;

    fn close(self) -> io::Result<()> {
        let synced = self.sync_all();
        let closed = crate::fs::imp::close(self);
        synced.and(closed)
    }
}

/// Closing a `BufWriter` flushes its buffer (the error its `Drop` ignores), then closes
/// the inner writer.
///
/// ```
/// use custodian::Close;
/// use std::io::Write;
///
/// # #[cfg(target_os = "linux")] { // /dev/full: always full
/// let mut out = std::io::BufWriter::new(std::fs::File::create("/dev/full")?);
/// out.write_all(b"lost on a full disk")?; // buffered: succeeds
/// let err = out.close().unwrap_err();     // the flush reports it
/// assert_eq!(err.raw_os_error(), Some(28)); // ENOSPC
/// # }
/// # Ok::<(), std::io::Error>(())
/// ```
impl<W: Write + Close<Error = io::Error>> Close for BufWriter<W> {
    type Error = io::Error;

    fn close(self) -> io::Result<()> {
        self.into_inner()
            .map_err(io::IntoInnerError::into_error)?
            .close()
    }
}

/// Closing a box closes its content.
impl<G: Close> Close for Box<G> {
    type Error = G::Error;

    fn close(self) -> Result<(), G::Error> {
        (*self).close()
    }
}

/// Closing `None` does nothing; closing `Some` closes the content.
impl<G: Close> Close for Option<G> {
    type Error = G::Error;

    fn close(self) -> Result<(), G::Error> {
        self.map_or(Ok(()), Close::close)
    }
}

/// Closing a scopeguard drops it now, which runs its closure as its strategy says
/// (`Always` and `OnSuccess`: yes; `OnUnwind`: no, since nothing is unwinding).
/// It cannot fail.
///
/// ```
/// use custodian::Close;
///
/// let mut ran = false;
/// custodian::guard((), |()| ran = true).close().unwrap();
/// assert!(ran);
/// ```
impl<T, F: FnOnce(T), S: scopeguard::Strategy> Close for scopeguard::ScopeGuard<T, F, S> {
    type Error = Infallible;

    fn close(self) -> Result<(), Infallible> {
        drop(self);
        Ok(())
    }
}
