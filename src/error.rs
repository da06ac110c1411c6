//! Errors shared by every cleanup container: one failed cleanup, and all of them.

use std::any::Any;
use std::borrow::Cow;
use std::error::Error;
use std::fmt;
use std::panic::{self, AssertUnwindSafe, Location};

/// A boxed error, the common currency of cleanups with different error types.
pub type BoxError = Box<dyn Error + Send + Sync + 'static>;

/// One cleanup that failed: returned an error or panicked.
///
/// It says which cleanup (its label: the guard's type, `defer`, or the name given with
/// `defer_named`) and where it was registered.
#[derive(Debug)]
pub struct CleanupError {
    label: Cow<'static, str>,
    site: &'static Location<'static>,
    cause: Cause,
}

#[derive(Debug)]
enum Cause {
    Failed(BoxError),
    Panicked(String),
}

impl CleanupError {
    pub(crate) fn failed(
        label: impl Into<Cow<'static, str>>,
        site: &'static Location<'static>,
        error: BoxError,
    ) -> Self {
        CleanupError {
            label: label.into(),
            site,
            cause: Cause::Failed(error),
        }
    }

    pub(crate) fn panicked(
        label: impl Into<Cow<'static, str>>,
        site: &'static Location<'static>,
        payload: Box<dyn Any + Send>,
    ) -> Self {
        CleanupError {
            label: label.into(),
            site,
            cause: Cause::Panicked(panic_message(payload)),
        }
    }

    /// What the cleanup was: the guard's type name, `defer` for a closure, or the name
    /// given with `defer_named`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Where the cleanup was registered.
    pub fn site(&self) -> &'static Location<'static> {
        self.site
    }

    /// The error the cleanup returned, or `None` if it panicked.
    pub fn error(&self) -> Option<&(dyn Error + Send + Sync + 'static)> {
        match &self.cause {
            Cause::Failed(e) => Some(&**e),
            Cause::Panicked(_) => None,
        }
    }

    /// The panic message, if the cleanup panicked.
    pub fn panic_message(&self) -> Option<&str> {
        match &self.cause {
            Cause::Failed(_) => None,
            Cause::Panicked(m) => Some(m),
        }
    }

    /// What went wrong, as one text whether the cleanup returned an error or panicked: the
    /// error's message, or `panicked: <message>`. [`Display`](fmt::Display) prints it
    /// after the label and the site.
    ///
    /// ```
    /// let mut stack = custodian::CleanupStack::new();
    /// stack.defer(|| panic!("disk gone"));
    /// stack.defer_fallible(|| Err::<(), _>("unlock refused"));
    /// let causes: Vec<String> =
    ///     stack.close().unwrap_err().iter().map(|e| e.cause().to_string()).collect();
    /// assert_eq!(causes, ["unlock refused", "panicked: disk gone"]);
    /// ```
    pub fn cause(&self) -> impl fmt::Display + '_ {
        struct Cause<'a>(&'a CleanupError);
        impl fmt::Display for Cause<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt_cause(f)
            }
        }
        Cause(self)
    }

    fn fmt_cause(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cause {
            Cause::Failed(e) => write!(f, "{e}"),
            Cause::Panicked(m) => write!(f, "panicked: {m}"),
        }
    }

    /// The error the cleanup returned, or the panic message as an error.
    pub fn into_error(self) -> BoxError {
        match self.cause {
            Cause::Failed(e) => e,
            Cause::Panicked(m) => format!("cleanup panicked: {m}").into(),
        }
    }
}

/// `<label> (registered at <site>) failed: <cause>`, where the cause is the error's
/// message or `panicked: <message>` ([`CleanupError::cause`]).
impl fmt::Display for CleanupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (registered at {}) failed: ", self.label, self.site)?;
        self.fmt_cause(f)
    }
}

/// The cleanup's error is printed by `Display`, so `source` is *its* source: a report
/// walking the chain (anyhow's `{:#}`) shows each message once. The error itself is
/// [`CleanupError::error`].
impl Error for CleanupError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match &self.cause {
            Cause::Failed(e) => e.source(),
            Cause::Panicked(_) => None,
        }
    }
}

/// Every cleanup that failed, in the order they ran. Never empty when returned as an
/// error.
///
/// ```
/// let mut stack = custodian::CleanupStack::new();
/// stack.defer_fallible(|| Err::<(), _>(std::io::Error::other("first")));
/// stack.defer_fallible(|| Err::<(), _>(std::io::Error::other("second")));
/// let errors = stack.close().unwrap_err();
/// let messages: Vec<String> = errors.iter().map(|e| e.error().unwrap().to_string()).collect();
/// assert_eq!(messages, ["second", "first"]); // LIFO, none lost
/// ```
#[derive(Debug, Default)]
pub struct CleanupErrors(Vec<CleanupError>);

impl CleanupErrors {
    pub(crate) fn push(&mut self, e: CleanupError) {
        self.0.push(e);
    }

    /// How many cleanups failed.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// `true` when no cleanup failed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The failures, in the order the cleanups ran.
    pub fn iter(&self) -> std::slice::Iter<'_, CleanupError> {
        self.0.iter()
    }

    /// The failures as a `Vec`.
    pub fn into_vec(self) -> Vec<CleanupError> {
        self.0
    }

    #[inline]
    pub(crate) fn into_result(self) -> Result<(), CleanupErrors> {
        if self.0.is_empty() {
            self.forget_empty();
            Ok(())
        } else {
            Err(self)
        }
    }

    /// Drops an empty list without calling `Vec`'s out-of-line `Drop` (a measurable
    /// share of a one-cleanup scope). Failures are only ever pushed, so an empty list has
    /// never allocated and forgetting it frees nothing.
    #[inline]
    pub(crate) fn forget_empty(self) {
        debug_assert!(self.0.is_empty() && self.0.capacity() == 0);
        std::mem::forget(self);
    }
}

impl fmt::Display for CleanupErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [] => write!(f, "no cleanup failed"),
            [one] => write!(f, "{one}"),
            many => {
                write!(f, "{} cleanups failed:", many.len())?;
                for (i, e) in many.iter().enumerate() {
                    write!(f, "\n  {}. {e}", i + 1)?;
                }
                Ok(())
            }
        }
    }
}

/// `Display` prints every failure, so `source` is the deeper cause of a single failure
/// (what its own `source` gives), and none when several are listed: each message once.
impl Error for CleanupErrors {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self.0.as_slice() {
            [one] => one.source(),
            _ => None,
        }
    }
}

/// An `io::Error` of the first failure's kind when it was an `io::Error` (`Other`
/// otherwise), holding every failure, so `stack.close()?` works in a function returning
/// `io::Result`.
///
/// ```
/// fn clean_up() -> std::io::Result<()> {
///     let mut stack = custodian::CleanupStack::new();
///     stack.defer_fallible(|| std::fs::remove_file("/no/such/scratch"));
///     stack.close()?;
///     Ok(())
/// }
/// assert_eq!(clean_up().unwrap_err().kind(), std::io::ErrorKind::NotFound);
/// ```
impl From<CleanupErrors> for std::io::Error {
    fn from(errors: CleanupErrors) -> std::io::Error {
        std::io::Error::new(errors.io_kind(), errors)
    }
}

impl CleanupErrors {
    /// The kind of the first failure, if it was an `io::Error`; `Other` otherwise.
    pub(crate) fn io_kind(&self) -> std::io::ErrorKind {
        self.0
            .first()
            .and_then(CleanupError::error)
            .and_then(|e| e.downcast_ref::<std::io::Error>())
            .map_or(std::io::ErrorKind::Other, std::io::Error::kind)
    }
}

impl IntoIterator for CleanupErrors {
    type Item = CleanupError;
    type IntoIter = std::vec::IntoIter<CleanupError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a CleanupErrors {
    type Item = &'a CleanupError;
    type IntoIter = std::slice::Iter<'a, CleanupError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Runs one cleanup, turning a panic into an error so that the next cleanup still runs
/// and a panic during unwinding never aborts the process.
pub(crate) fn run_caught(
    label: impl Into<Cow<'static, str>>,
    site: &'static Location<'static>,
    cleanup: impl FnOnce() -> Result<(), BoxError>,
) -> Result<(), CleanupError> {
    match panic::catch_unwind(AssertUnwindSafe(cleanup)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(CleanupError::failed(label, site, e)),
        Err(payload) => Err(CleanupError::panicked(label, site, payload)),
    }
}

/// The failure of a cleanup registered with a label of the user's (`defer_named`),
/// carried through the cleanup's own `BoxError` so that the common, unlabelled entries
/// keep a `&'static str` label; [`CleanupError::unwrap_named`] puts the label back.
#[derive(Debug)]
pub(crate) struct Named {
    label: Cow<'static, str>,
    cause: Cause,
}

impl fmt::Display for Named {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cause {
            Cause::Failed(e) => write!(f, "{}: {e}", self.label),
            Cause::Panicked(m) => write!(f, "{}: panicked: {m}", self.label),
        }
    }
}

impl Error for Named {}

/// Wraps a labelled cleanup: its error or panic comes out as a [`Named`] error.
pub(crate) fn named<'a, Er: Into<BoxError>>(
    label: Cow<'static, str>,
    f: impl FnOnce() -> Result<(), Er> + 'a,
) -> impl FnOnce() -> Result<(), BoxError> + 'a {
    move || {
        let cause = match panic::catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => Cause::Failed(e.into()),
            Err(payload) => Cause::Panicked(panic_message(payload)),
        };
        Err(Box::new(Named { label, cause }))
    }
}

/// An async labelled cleanup: its error or a panic while it is polled comes out as a
/// [`Named`] error (the async twin of [`named`]).
#[cfg(feature = "tokio")]
pub(crate) struct NamedFuture {
    label: Option<Cow<'static, str>>,
    fut: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BoxError>> + Send>>,
}

#[cfg(feature = "tokio")]
impl NamedFuture {
    /// `cleanup` under `label`, boxed as the async stacks and scopes keep their entries.
    pub(crate) fn boxed<E: Into<BoxError>>(
        label: Cow<'static, str>,
        cleanup: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BoxError>> + Send>> {
        Box::pin(NamedFuture {
            label: Some(label),
            fut: Box::pin(async move { cleanup.await.map_err(Into::into) }),
        })
    }
}

#[cfg(feature = "tokio")]
impl std::future::Future for NamedFuture {
    type Output = Result<(), BoxError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = &mut *self; // Unpin: the future inside is boxed
        let cause = match panic::catch_unwind(AssertUnwindSafe(|| this.fut.as_mut().poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(Ok(()))) => return Poll::Ready(Ok(())),
            Ok(Poll::Ready(Err(e))) => Cause::Failed(e),
            Err(payload) => Cause::Panicked(panic_message(payload)),
        };
        let label = this.label.take().unwrap_or(Cow::Borrowed("defer_named"));
        Poll::Ready(Err(Box::new(Named { label, cause })))
    }
}

impl CleanupError {
    /// The failure of a `defer_named` cleanup under its own label; others unchanged.
    #[cold]
    pub(crate) fn unwrap_named(self) -> CleanupError {
        match self.cause {
            Cause::Failed(e) if e.is::<Named>() => match e.downcast::<Named>() {
                Ok(named) => CleanupError {
                    label: named.label,
                    site: self.site,
                    cause: named.cause,
                },
                Err(e) => CleanupError {
                    cause: Cause::Failed(e),
                    ..self
                },
            },
            cause => CleanupError { cause, ..self },
        }
    }
}

/// The message of a panic payload. The payload is dropped here, and a payload whose own
/// `Drop` panics is leaked rather than allowed to abort the process.
fn panic_message(payload: Box<dyn Any + Send>) -> String {
    let message = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string panic payload>".to_owned()
    };
    if let Err(second) = panic::catch_unwind(AssertUnwindSafe(|| drop(payload))) {
        std::mem::forget(second);
    }
    message
}

/// A fallible release or hand-over that failed and consumed a guard: the error, and the
/// guard given back, so that nothing is lost to the error (tempfile's `PersistError`,
/// std's `IntoInnerError`). Drop it to let the guard's own `Drop` do its best effort;
/// keep it with [`into_guard`](GuardError::into_guard) to retry or decide.
///
/// Returned by [`fs::CheckedFile::into_inner`](crate::fs::CheckedFile::into_inner) (a
/// flush failed: the data is still buffered), by [`fs::TempDir::close`](crate::fs::TempDir::close)
/// and [`fs::TempFile::close`](crate::fs::TempFile::close) (the removal failed: what is
/// left is still there) and by the child guards' `close` (the child could not be stopped
/// or reaped). [`fs::CommitError`](crate::fs::CommitError) follows
/// the same names (`error`, `guard`, `into_guard`, `into_parts`).
///
/// It displays as its error; `source` is that error's own source, so a report walking
/// the chain prints each message once.
///
/// ```
/// use custodian::fs::CheckedFile;
/// use std::io::Write;
///
/// # #[cfg(target_os = "linux")] { // /dev/full: always full
/// let mut file = CheckedFile::create("/dev/full")?;
/// file.write_all(b"buffered")?;
/// let err = CheckedFile::into_inner(file).unwrap_err();
/// assert_eq!(err.error().kind(), std::io::ErrorKind::StorageFull);
/// let file: CheckedFile = err.into_guard(); // the buffered bytes are still in there
/// # drop(file);
/// # }
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct GuardError<G> {
    error: std::io::Error,
    guard: G,
}

impl<G> GuardError<G> {
    pub(crate) fn new(error: std::io::Error, guard: G) -> Self {
        GuardError { error, guard }
    }

    /// What went wrong.
    ///
    /// ```
    /// # fn f(e: custodian::GuardError<custodian::fs::CheckedFile>) {
    /// let kind = e.error().kind();
    /// # }
    /// ```
    pub fn error(&self) -> &std::io::Error {
        &self.error
    }

    /// The guard given back.
    ///
    /// ```
    /// # fn f(e: custodian::GuardError<custodian::fs::CheckedFile>) {
    /// println!("{}", e.guard().path().display());
    /// # }
    /// ```
    pub fn guard(&self) -> &G {
        &self.guard
    }

    /// Takes the guard back, to retry or to decide what to do with it.
    ///
    /// ```
    /// # fn f(e: custodian::GuardError<custodian::fs::CheckedFile>) {
    /// let file = e.into_guard();
    /// # }
    /// ```
    pub fn into_guard(self) -> G {
        self.guard
    }

    /// The error and the guard.
    ///
    /// ```
    /// # fn f(e: custodian::GuardError<custodian::fs::CheckedFile>) {
    /// let (error, file) = e.into_parts();
    /// # }
    /// ```
    pub fn into_parts(self) -> (std::io::Error, G) {
        (self.error, self.guard)
    }
}

impl<G> fmt::Debug for GuardError<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<G> fmt::Display for GuardError<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl<G> Error for GuardError<G> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.error.source()
    }
}

/// The error alone; the guard is dropped, which runs its own best-effort cleanup.
impl<G> From<GuardError<G>> for std::io::Error {
    fn from(e: GuardError<G>) -> std::io::Error {
        e.error
    }
}
