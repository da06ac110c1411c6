//! I/O errors that say what they concern (a path, an address, a pid), shared by the
//! resource families.

use std::error::Error;
use std::fmt;
use std::io;
use std::path::Path;

/// An I/O error with what it concerns in front of the original message, keeping the
/// original `ErrorKind` (tempfile's `with_err_path`).
#[derive(Debug)]
struct Context {
    context: String,
    source: io::Error,
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, self.source)
    }
}

/// `Display` prints the original error, so `source` is the original's own source: a
/// report walking the chain shows the OS message once.
impl Error for Context {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.source()
    }
}

/// Wraps `error` with `context`, keeping its kind.
#[cold]
pub(crate) fn with_context(error: io::Error, context: impl fmt::Display) -> io::Error {
    io::Error::new(
        error.kind(),
        Context {
            context: context.to_string(),
            source: error,
        },
    )
}

/// `error`, saying what was done (`what`, a phrase ending before the path) to `path`,
/// with its kind kept.
#[cold]
pub(crate) fn path_error(what: &'static str, path: &Path, error: io::Error) -> io::Error {
    with_context(error, format_args!("{what} {}", path.display()))
}

/// The OS error code (`errno`) behind `error`, also when custodian wrapped it to name the
/// path, address or pid it concerns: [`io::Error::raw_os_error`] sees only the outer
/// error, and kinds such as `ELOOP` have no stable [`io::ErrorKind`] to match on.
///
/// ```
/// # #[cfg(target_os = "linux")] {
/// let dir = tempfile::tempdir()?;
/// let link = dir.path().join("app.pid");
/// std::os::unix::fs::symlink("/etc/passwd", &link)?;
/// let err = custodian::fs::LockFile::acquire(&link).unwrap_err(); // never followed
/// assert_eq!(err.raw_os_error(), None); // wrapped, to name the path
/// assert_eq!(custodian::raw_os_error(&err), Some(40)); // ELOOP on Linux
/// # }
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn raw_os_error(error: &io::Error) -> Option<i32> {
    if let Some(code) = error.raw_os_error() {
        return Some(code);
    }
    let context = error.get_ref()?.downcast_ref::<Context>()?;
    raw_os_error(&context.source)
}
