//! `scope`: Python's `with` / `try…finally`, aware of how the body ended.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::error::Error;
use std::fmt;
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::panic::Location;
use std::ptr::NonNull;

use crate::Close;
use crate::error::{BoxError, CleanupError, CleanupErrors, run_caught};
use crate::ledger::Kind;
use crate::slot::Slot;

/// Failures of cleanups that ran during a panic are counted under this kind.
static KIND: Kind = Kind::new("custodian::scope");

/// How the body of a scope ended.
enum Outcome<'e, E> {
    Success,
    Err(&'e E),
    Unwind,
}

/// A registered cleanup, stored type-erased in a [`Slot`] (inline when it captures up to
/// three words: no allocation) and run through [`run_slot`].
trait Cleanup<'a, E> {
    fn run(self, outcome: &Outcome<'_, E>) -> Result<(), BoxError>;
}

/// Runs the cleanup of type `C` stored in `slot`.
///
/// # Safety
/// `slot` must hold a `C` (made by `Slot::new::<C>`): `Scope::push` pairs them.
unsafe fn run_slot<'a, E, C: Cleanup<'a, E>>(
    slot: Slot,
    outcome: &Outcome<'_, E>,
) -> Result<(), BoxError> {
    // SAFETY: the caller's promise.
    unsafe { slot.take::<C>() }.run(outcome)
}

struct Always<F>(F);
impl<'a, E, F: FnOnce() -> Result<(), BoxError> + 'a> Cleanup<'a, E> for Always<F> {
    fn run(self, _: &Outcome<'_, E>) -> Result<(), BoxError> {
        (self.0)()
    }
}

struct OnSuccess<F>(F);
impl<'a, E, F: FnOnce() + 'a> Cleanup<'a, E> for OnSuccess<F> {
    fn run(self, outcome: &Outcome<'_, E>) -> Result<(), BoxError> {
        if let Outcome::Success = outcome {
            (self.0)();
        }
        Ok(())
    }
}

struct OnErr<F>(F);
impl<'a, E, F: FnOnce(&E) + 'a> Cleanup<'a, E> for OnErr<F> {
    fn run(self, outcome: &Outcome<'_, E>) -> Result<(), BoxError> {
        if let Outcome::Err(e) = outcome {
            (self.0)(e);
        }
        Ok(())
    }
}

struct OnUnwind<F>(F);
impl<'a, E, F: FnOnce() + 'a> Cleanup<'a, E> for OnUnwind<F> {
    fn run(self, outcome: &Outcome<'_, E>) -> Result<(), BoxError> {
        if let Outcome::Unwind = outcome {
            (self.0)();
        }
        Ok(())
    }
}

/// An entered guard: a leaked `Box`, turned back into one exactly once, when it runs.
/// Kept as a raw pointer rather than a `Box` so that the `&mut G` handed out by `enter`
/// stays valid while the list grows and moves (a `Box` would assert unique access each
/// time it moves); the guard itself never moves.
struct Entered<G>(NonNull<G>);
impl<'a, E, G: Close + 'a> Cleanup<'a, E> for Entered<G>
where
    G::Error: Into<BoxError>,
{
    fn run(self, _: &Outcome<'_, E>) -> Result<(), BoxError> {
        // SAFETY: `Scope::enter` made the pointer with `Box::into_raw` and only ever
        // wraps it in this one `Entered`, consumed here: the box is rebuilt once.
        // `run_all` takes `&mut Scope`, so no reference handed out by `enter` is alive.
        let guard = unsafe { Box::from_raw(self.0.as_ptr()) };
        guard.close().map_err(Into::into)
    }
}

struct Entry<E> {
    /// The cleanup, of the type `run` was made for.
    cleanup: Slot,
    run: for<'o> unsafe fn(Slot, &Outcome<'o, E>) -> Result<(), BoxError>,
    label: &'static str,
    site: &'static Location<'static>,
}

impl<E> Entry<E> {
    #[inline(always)]
    fn new<'a, C: Cleanup<'a, E> + 'a>(
        label: &'static str,
        site: &'static Location<'static>,
        cleanup: C,
    ) -> Entry<E> {
        Entry {
            cleanup: Slot::new(cleanup),
            run: run_slot::<E, C>,
            label,
            site,
        }
    }
}

/// How many cleanups a scope keeps in place before it allocates.
const INLINE: usize = 4;

/// The cleanups of one [`scope`] call, given to the body as `&Scope`.
///
/// Its methods take `&self`, so the body can keep using a guard returned by
/// [`enter`](Scope::enter) while it registers more cleanups.
///
/// `'a` is how long the cleanups may borrow from: closures can capture references to
/// local variables that outlive the `scope` call.
pub struct Scope<'a, E> {
    /// The first [`INLINE`] cleanups, in registration order: `inline[..len]` are
    /// initialised, the rest are not. A plain array and a count rather than a
    /// `RefCell<SmallVec>`: registering a cleanup is a few stores and an increment, with
    /// no borrow flag and no inline-or-heap test, and when the body is inlined into
    /// [`scope`] the compiler follows each cleanup from its registration to its run
    /// (a direct, inlined call instead of one through a function pointer).
    inline: UnsafeCell<[MaybeUninit<Entry<E>>; INLINE]>,
    len: Cell<usize>,
    /// The cleanups after the first [`INLINE`], in registration order.
    spill: RefCell<Vec<Entry<E>>>,
    /// The scope owns cleanups that may borrow for `'a` (for drop check), is invariant
    /// in `'a` (a cleanup registered through `&Scope<'a, _>` must not borrow anything
    /// shorter) and is neither `Send` nor `Sync` (the cleanups need not be).
    _owns: PhantomData<Box<dyn Cleanup<'a, E> + 'a>>,
}

/// Runs `body` like Python's `with` block: every cleanup it registers on the [`Scope`]
/// runs when it ends, last registered first, exactly once, whether it returned `Ok`,
/// returned `Err` (an early return or `?`) or panicked.
///
/// - [`defer`](Scope::defer) / [`defer_fallible`](Scope::defer_fallible) always run;
/// - [`on_success`](Scope::on_success) runs only when the body returned `Ok`;
/// - [`on_err`](Scope::on_err) runs only when it returned `Err`, and sees the error;
/// - [`on_unwind`](Scope::on_unwind) runs only during a panic, which then goes on;
/// - [`enter`](Scope::enter) keeps a guard alive until the end and then closes it.
///
/// # Errors
/// A [`ScopeError`] when the body returned `Err` or any cleanup failed. It holds the
/// body's error and **every** cleanup failure, in the order they ran (Java's suppressed
/// exceptions), unlike Python's `ExitStack`, which keeps only the last when several
/// callbacks fail. When the body returned `Ok` but a cleanup failed, the body's value
/// is dropped: the work it describes was not cleanly finished.
///
/// `ScopeError<std::io::Error>` converts into `std::io::Error` (keeping the body's
/// error kind, or the first failed cleanup's), so `?` works in functions returning
/// `io::Result`.
///
/// # Panics
/// A panic in the body goes on after the cleanups ran. A panic in a cleanup is caught
/// and returned as a cleanup failure (or, during a panic, reported as a tracing `error`
/// event): it never stops the other cleanups and never aborts the process.
///
/// ```
/// use std::cell::{Cell, RefCell, UnsafeCell};
///
/// let log = RefCell::new(Vec::new());
/// let result: Result<(), _> = custodian::scope(|s| {
///     s.defer(|| log.borrow_mut().push("close connection"));
///     s.on_success(|| log.borrow_mut().push("commit"));
///     s.on_err(|e: &std::io::Error| log.borrow_mut().push("roll back"));
///     Err(std::io::Error::other("disk full"))?;
///     Ok(())
/// });
/// assert_eq!(result.unwrap_err().into_body().unwrap().to_string(), "disk full");
/// assert_eq!(*log.borrow(), ["roll back", "close connection"]);
/// ```
pub fn scope<'a, T, E, F>(body: F) -> Result<T, ScopeError<E>>
where
    F: FnOnce(&Scope<'a, E>) -> Result<T, E>,
{
    let mut scope = Scope {
        inline: UnsafeCell::new([const { MaybeUninit::uninit() }; INLINE]),
        len: Cell::new(0),
        spill: RefCell::new(Vec::new()),
        _owns: PhantomData,
    };
    // If `body` panics, `scope` is dropped during the unwind and runs the cleanups with
    // the `Unwind` outcome (see `Drop for Scope`). The borrow given to `body` is
    // higher-ranked, so nothing borrowed from the scope (such as a guard returned by
    // `enter`) can outlive the call: the cleanups below run with no borrow left.
    let result = body(&scope);
    let cleanup = match &result {
        Ok(_) => scope.run_all(&Outcome::Success),
        Err(e) => scope.run_all(&Outcome::Err(e)),
    };
    match result {
        Ok(value) if cleanup.is_empty() => {
            cleanup.forget_empty();
            Ok(value)
        }
        Ok(_) => Err(ScopeError {
            body: None,
            cleanup,
        }),
        Err(body) => Err(ScopeError {
            body: Some(body),
            cleanup,
        }),
    }
}

impl<'a, E> Scope<'a, E> {
    /// Runs `f` when the scope ends, however it ends (Python's `finally`).
    ///
    /// ```
    /// let log = std::cell::RefCell::new(Vec::new());
    /// let result = custodian::scope(|s| {
    ///     s.defer(|| log.borrow_mut().push("cleaned up"));
    ///     Err::<(), _>(std::io::Error::other("failed half-way"))
    /// });
    /// assert!(result.is_err());
    /// assert_eq!(*log.borrow(), ["cleaned up"]);
    /// ```
    #[track_caller]
    pub fn defer(&self, f: impl FnOnce() + 'a) {
        self.push(
            "defer",
            Always(move || {
                f();
                Ok(())
            }),
        );
    }

    /// Runs `f` when the scope ends, however it ends; its error is collected in the
    /// [`ScopeError`].
    ///
    /// ```
    /// let result = custodian::scope(|s| {
    ///     s.defer_fallible(|| std::fs::remove_file("/no/such/file"));
    ///     Ok::<_, std::io::Error>(42)
    /// });
    /// let err = result.unwrap_err();
    /// assert!(err.body().is_none());
    /// assert_eq!(err.cleanup_errors().len(), 1);
    /// ```
    #[track_caller]
    pub fn defer_fallible<Er>(&self, f: impl FnOnce() -> Result<(), Er> + 'a)
    where
        Er: Into<BoxError>,
    {
        self.push("defer_fallible", Always(move || f().map_err(Into::into)));
    }

    /// Like [`defer_fallible`](Self::defer_fallible), with a label of your choosing shown
    /// in its [`CleanupError`](crate::CleanupError) and events instead of
    /// `defer_fallible`: cleanups registered in a loop are told apart.
    ///
    /// ```
    /// let err = custodian::scope(|s| {
    ///     for path in ["/no/such/a", "/no/such/b"] {
    ///         s.defer_named(format!("remove {path}"), move || std::fs::remove_file(path));
    ///     }
    ///     Ok::<_, std::io::Error>(())
    /// })
    /// .unwrap_err();
    /// let labels: Vec<&str> = err.cleanup_errors().iter().map(|e| e.label()).collect();
    /// assert_eq!(labels, ["remove /no/such/b", "remove /no/such/a"]);
    /// ```
    #[track_caller]
    pub fn defer_named<Er>(
        &self,
        label: impl Into<std::borrow::Cow<'static, str>>,
        f: impl FnOnce() -> Result<(), Er> + 'a,
    ) where
        Er: Into<BoxError>,
    {
        self.push("defer_named", Always(crate::error::named(label.into(), f)));
    }

    /// Runs `f` when the body returned `Ok` (a commit).
    ///
    /// ```
    /// let committed = std::cell::Cell::new(false);
    /// custodian::scope(|s| {
    ///     s.on_success(|| committed.set(true));
    ///     Ok::<_, std::io::Error>(())
    /// })?;
    /// assert!(committed.get());
    /// # Ok::<(), custodian::ScopeError<std::io::Error>>(())
    /// ```
    #[track_caller]
    pub fn on_success(&self, f: impl FnOnce() + 'a) {
        self.push("on_success", OnSuccess(f));
    }

    /// Runs `f` with the body's error when the body returned `Err` (a rollback that can
    /// look at what went wrong; Python's `except`).
    ///
    /// ```
    /// let seen = std::cell::RefCell::new(String::new());
    /// let result = custodian::scope(|s| {
    ///     s.on_err(|e: &std::io::Error| *seen.borrow_mut() = format!("rolled back: {e}"));
    ///     std::fs::read("/no/such/input")?;
    ///     Ok(())
    /// });
    /// assert!(result.is_err());
    /// assert!(seen.borrow().starts_with("rolled back: No such file"));
    /// ```
    #[track_caller]
    pub fn on_err(&self, f: impl FnOnce(&E) + 'a) {
        self.push("on_err", OnErr(f));
    }

    /// Runs `f` when the body panicked, before the panic goes on.
    ///
    /// ```
    /// use std::cell::Cell;
    ///
    /// let unwound = Cell::new(false);
    /// let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
    ///     custodian::scope::<(), (), _>(|s| {
    ///         s.on_unwind(|| unwound.set(true));
    ///         panic!("boom");
    ///     })
    /// }));
    /// assert!(caught.is_err() && unwound.get());
    /// ```
    #[track_caller]
    pub fn on_unwind(&self, f: impl FnOnce() + 'a) {
        self.push("on_unwind", OnUnwind(f));
    }

    /// Keeps `guard` until the scope ends, then closes it ([`Close::close`]) and
    /// collects its error. Returns a reference to use it meanwhile.
    ///
    /// ```
    /// use std::io::Write;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("out.txt");
    /// custodian::scope(|s| {
    ///     let file = s.enter(std::fs::File::create(&path)?);
    ///     file.write_all(b"hello")?;
    ///     Ok::<_, std::io::Error>(())
    /// })
    /// .expect("written and synced");
    /// assert_eq!(std::fs::read(&path)?, b"hello");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[track_caller]
    #[allow(clippy::mut_from_ref)] // an arena: each call hands out a new, distinct entry
    pub fn enter<G>(&self, guard: G) -> &mut G
    where
        G: Close + 'a,
        G::Error: Into<BoxError>,
    {
        let guard = NonNull::from(Box::leak(Box::new(guard)));
        self.push(std::any::type_name::<G>(), Entered(guard));
        // SAFETY: `guard` comes from `Box::leak`, so it points at a live `G` that never
        // moves. The box is freed only when the `Entered` cleanup runs, in `run_all`,
        // which needs `&mut self`, so it outlives the returned borrow of `self`. Each
        // call leaks a new box, so no two references returned by `enter` alias.
        unsafe { &mut *guard.as_ptr() }
    }

    #[track_caller]
    #[inline]
    fn push<C: Cleanup<'a, E> + 'a>(&self, label: &'static str, cleanup: C) {
        let site = Location::caller();
        let len = self.len.get();
        // The entry is built in each branch rather than once ahead of them: built ahead,
        // it is assembled on the stack with word stores and copied with wider loads,
        // which stalls store-to-load forwarding (a scope with one cleanup registered out
        // of line measured about 1.6x slower for that alone).
        if len < INLINE {
            // SAFETY: no reference into `inline` is ever handed out or kept across a call
            // (`pop` reads by value), and `Scope` is not `Sync`, so this is the only
            // access; slot `len` is not initialised (only `..len` are), so nothing is
            // overwritten, and it becomes part of `..len` just below.
            unsafe { (*self.inline.get())[len].write(Entry::new(label, site, cleanup)) };
            self.len.set(len + 1);
        } else {
            self.push_spilled(Entry::new(label, site, cleanup));
        }
    }

    #[cold]
    fn push_spilled(&self, entry: Entry<E>) {
        self.spill.borrow_mut().push(entry);
    }

    /// Takes the last registered cleanup out of the list.
    #[inline(always)]
    fn pop(&mut self) -> Option<Entry<E>> {
        if let Some(entry) = self.spill.get_mut().pop() {
            return Some(entry);
        }
        let len = self.len.get().checked_sub(1)?;
        self.len.set(len);
        // SAFETY: slot `len` was initialised (it was in `..len + 1`) and has just left
        // `..len`, so it is read out exactly once; `&mut self` rules out any other access.
        Some(unsafe { self.inline.get_mut()[len].assume_init_read() })
    }

    #[inline]
    fn is_empty(&mut self) -> bool {
        self.len.get() == 0 && self.spill.get_mut().is_empty()
    }

    // Always inlined into `scope`, so that the compiler sees a cleanup from its
    // registration to its run (about 40 instructions less for a one-cleanup scope).
    #[inline(always)]
    fn run_all(&mut self, outcome: &Outcome<'_, E>) -> CleanupErrors {
        let mut errors = CleanupErrors::default();
        // One entry at a time, so that if this loop were ever interrupted, `Drop` would
        // still run the rest.
        while let Some(Entry {
            cleanup,
            run,
            label,
            site,
        }) = self.pop()
        {
            // SAFETY: `push` made `run` for the type stored in `cleanup`, and the entry
            // has just left the list, so its slot is consumed exactly once.
            if let Err(e) = run_caught(label, site, || unsafe { run(cleanup, outcome) }) {
                errors.push(e.unwrap_named());
            }
        }
        errors
    }
}

impl<E> Drop for Scope<'_, E> {
    /// Runs only when the body panicked: `scope` empties the list on every other path.
    #[inline]
    fn drop(&mut self) {
        if self.is_empty() {
            return;
        }
        self.unwind();
    }
}

impl<E> Scope<'_, E> {
    #[cold]
    fn unwind(&mut self) {
        for e in self.run_all(&Outcome::Unwind) {
            report_during_unwind(&e);
        }
    }
}

fn report_during_unwind(e: &CleanupError) {
    KIND.count_failure();
    crate::ledger::events::failure(
        "cleanup failed during a panic",
        KIND.name(),
        e.site(),
        &e.label(),
        e,
    );
}

impl<E> fmt::Debug for Scope<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scope")
            .field("pending", &(self.len.get() + self.spill.borrow().len()))
            .finish()
    }
}

/// Why a [`scope`] failed: the body's error, if it returned one, and every cleanup that
/// failed, in the order they ran.
///
/// ```
/// let err = custodian::scope(|s| {
///     s.defer_fallible(|| Err::<(), _>("first cleanup"));
///     s.defer_fallible(|| Err::<(), _>("second cleanup"));
///     Err::<(), _>(std::io::Error::other("body"))
/// })
/// .unwrap_err();
/// assert_eq!(err.cleanup_errors().len(), 2);
/// let (body, cleanups) = err.into_parts();
/// assert_eq!(body.unwrap().to_string(), "body");
/// assert_eq!(cleanups.iter().next().unwrap().error().unwrap().to_string(), "second cleanup");
/// ```
#[derive(Debug)]
pub struct ScopeError<E> {
    body: Option<E>,
    cleanup: CleanupErrors,
}

impl<E> ScopeError<E> {
    /// For the async scope (`rt::scope`), which reports the same way.
    #[cfg(feature = "tokio")]
    pub(crate) fn new(body: Option<E>, cleanup: CleanupErrors) -> ScopeError<E> {
        ScopeError { body, cleanup }
    }

    /// The body's error, if it returned one.
    pub fn body(&self) -> Option<&E> {
        self.body.as_ref()
    }

    /// The body's error by value, if it returned one.
    pub fn into_body(self) -> Option<E> {
        self.body
    }

    /// The cleanups that failed, in the order they ran (may be empty when only the body
    /// failed).
    pub fn cleanup_errors(&self) -> &CleanupErrors {
        &self.cleanup
    }

    /// The body's error and the cleanup failures.
    pub fn into_parts(self) -> (Option<E>, CleanupErrors) {
        (self.body, self.cleanup)
    }
}

impl<E: fmt::Display> fmt::Display for ScopeError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.body {
            Some(body) if self.cleanup.is_empty() => write!(f, "{body}"),
            Some(body) => write!(f, "{body}; and then {}", self.cleanup),
            None => write!(f, "{}", self.cleanup),
        }
    }
}

/// `Display` prints the body's error and the cleanups' failures, so `source` is the
/// body's error's own source (or that of the only cleanup failure): a report walking the
/// chain shows each message once. The errors themselves are [`body`](ScopeError::body)
/// and [`cleanup_errors`](ScopeError::cleanup_errors).
impl<E: Error + 'static> Error for ScopeError<E> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match &self.body {
            Some(body) => body.source(),
            None => self.cleanup.source(),
        }
    }
}

/// Keeps the body's error as it is when it is the only failure; otherwise wraps the whole
/// `ScopeError` (so that no cleanup failure is lost) in an `io::Error` of the body's
/// kind, or of the first failed cleanup's kind when it was an `io::Error`.
///
/// ```
/// fn write_report(path: &std::path::Path) -> std::io::Result<()> {
///     custodian::scope(|s| {
///         s.defer_fallible(|| std::fs::remove_file("/no/such/scratch"));
///         std::fs::write(path, "done")
///     })?;
///     Ok(())
/// }
/// let dir = tempfile::tempdir()?;
/// let err = write_report(&dir.path().join("r")).unwrap_err();
/// assert_eq!(err.kind(), std::io::ErrorKind::NotFound); // the cleanup's kind
/// # Ok::<(), std::io::Error>(())
/// ```
impl From<ScopeError<std::io::Error>> for std::io::Error {
    fn from(e: ScopeError<std::io::Error>) -> std::io::Error {
        let kind = match &e.body {
            Some(body) => body.kind(),
            None => e.cleanup.io_kind(),
        };
        match e {
            ScopeError {
                body: Some(body),
                cleanup,
            } if cleanup.is_empty() => body,
            e => std::io::Error::new(kind, e),
        }
    }
}
