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
