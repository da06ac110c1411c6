//! `CleanupStack`: Python's `contextlib.ExitStack`, for resources known at run time.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::mem;
use std::panic::Location;
use std::panic::{self, AssertUnwindSafe};

use smallvec::SmallVec;
use sync_wrapper::SyncWrapper;

use crate::Close;
use crate::error::{BoxError, CleanupError, CleanupErrors};
use crate::ledger::{Kind, Ticket};
use crate::slot::Slot;

static KIND: Kind = Kind::new("custodian::CleanupStack");

const INLINE: usize = 4;

struct Entry {
    /// The cleanup closure, stored inline when it captures up to three words (no
    /// allocation), of the type `run` was made for. It gets the outcome the stack was
    /// closed with, and decides whether to act on it.
    cleanup: Slot,
    run: unsafe fn(Slot, Outcome) -> Result<(), BoxError>,
    label: &'static str,
    site: &'static Location<'static>,
}

/// Runs the closure of type `F` stored in `slot`.
///
/// # Safety
/// `slot` must hold an `F` (made by `Slot::new::<F>`): `push_entry` pairs them.
unsafe fn run_slot<F: FnOnce(Outcome) -> Result<(), BoxError>>(
    slot: Slot,
    outcome: Outcome,
) -> Result<(), BoxError> {
    // SAFETY: the caller's promise.
    let cleanup = unsafe { slot.take::<F>() };
    cleanup(outcome)
}

/// How the work a [`CleanupStack`] guarded ended, which decides whether its
/// [`on_success`](CleanupStack::on_success) and [`on_failure`](CleanupStack::on_failure)
/// entries run (Python's `ExitStack.__exit__` gets the exception the same way).
///
/// `close` is [`Success`](Outcome::Success); a stack dropped without being closed (an
/// early return, `?`, a panic) ends in [`Failure`](Outcome::Failure); and
/// [`close_with`](CleanupStack::close_with) says which.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The work succeeded: commit.
    Success,
    /// The work failed (an error, an early return, a panic): roll back.
    Failure,
}

/// A stack of cleanups run in reverse order (LIFO) when it is closed or dropped:
/// Python's `contextlib.ExitStack`, for a number of resources known only at run time.
///
/// Every entry runs, even when earlier ones fail or panic. A panicking cleanup is caught
/// and becomes an error, so a cleanup that panics while the thread is already unwinding
/// never aborts the process. [`close`](CleanupStack::close) returns every failure;
/// `Drop` reports each one as a tracing `error` event and a ledger failure.
///
/// Entries must be `Send` so that the stack itself is `Send` and can be stored in
/// structs, moved into threads and tasks. For cleanups that borrow local variables, use
/// [`scope`](crate::scope).
///
/// ```
/// use custodian::CleanupStack;
/// use std::io::Write;
///
/// let dir = tempfile::tempdir()?;
/// let mut stack = CleanupStack::new();
/// let mut files = Vec::new();
/// for name in ["a", "b", "c"] {
///     let path = dir.path().join(name);
///     files.push(std::fs::File::create(&path)?);
///     stack.defer_fallible(move || std::fs::remove_file(&path));
/// }
/// for f in &mut files {
///     f.write_all(b"scratch")?;
/// }
/// stack.close().expect("every file removed"); // c, b, a
/// assert_eq!(std::fs::read_dir(dir.path())?.count(), 0);
/// # Ok::<(), std::io::Error>(())
/// ```
#[must_use = "a CleanupStack runs its cleanups when dropped; bind it to a variable"]
pub struct CleanupStack {
    /// The first entries live inline: a stack with a few entries allocates only for the
    /// closures that capture something.
    entries: SmallVec<[Entry; INLINE]>,
    ticket: Ticket,
    /// What the entries are: `Send` closures, not necessarily `Sync` ones (a `Slot` is
    /// plain bytes, so this marker is what makes the stack `Send` only when they are).
    /// The stack is `Sync` all the same, as a `SyncWrapper` is: nothing reachable
    /// through `&self` (`len`, `is_empty`, `Debug`) touches a closure; they are only run
    /// or dropped through `&mut self` or by value. So a stack can sit in state shared
    /// through an `Arc`.
    _entries: PhantomData<SyncWrapper<Box<dyn FnOnce() + Send>>>,
}

impl CleanupStack {
    /// An empty stack.
    #[track_caller]
    pub fn new() -> CleanupStack {
        CleanupStack {
            entries: SmallVec::new(),
            ticket: Ticket::new(&KIND),
            _entries: PhantomData,
        }
    }

    /// Pushes a cleanup that cannot fail.
    ///
    /// ```
    /// let mut stack = custodian::CleanupStack::new();
    /// stack.defer(|| println!("runs when the stack is closed or dropped"));
    /// ```
    #[track_caller]
    pub fn defer(&mut self, f: impl FnOnce() + Send + 'static) {
        self.push_entry("defer", move |_| {
            f();
            Ok(())
        });
    }

    /// Pushes a cleanup that can fail; its error is kept.
    ///
    /// ```
    /// let mut stack = custodian::CleanupStack::new();
    /// stack.defer_fallible(|| std::fs::remove_file("/no/such/file"));
    /// assert_eq!(stack.close().unwrap_err().len(), 1);
    /// ```
    #[track_caller]
    pub fn defer_fallible<E>(&mut self, f: impl FnOnce() -> Result<(), E> + Send + 'static)
    where
        E: Into<BoxError>,
    {
        self.push_entry("defer", move |_| f().map_err(Into::into));
    }

    /// Pushes a cleanup that can fail, with a label of your choosing, shown in its
    /// [`CleanupError`] and events instead of `defer`: cleanups registered in a loop are
    /// told apart.
    ///
    /// ```
    /// let mut stack = custodian::CleanupStack::new();
    /// for path in ["/no/such/a", "/no/such/b"] {
    ///     stack.defer_named(format!("remove {path}"), move || std::fs::remove_file(path));
    /// }
    /// let errors = stack.close().unwrap_err();
    /// let labels: Vec<&str> = errors.iter().map(|e| e.label()).collect();
    /// assert_eq!(labels, ["remove /no/such/b", "remove /no/such/a"]);
    /// assert!(errors.to_string().contains("remove /no/such/b (registered at"));
    /// ```
    #[track_caller]
    pub fn defer_named<E>(
        &mut self,
        label: impl Into<Cow<'static, str>>,
        f: impl FnOnce() -> Result<(), E> + Send + 'static,
    ) where
        E: Into<BoxError>,
    {
        let named = crate::error::named(label.into(), f);
        self.push_entry("defer_named", move |_| named());
    }

    /// Pushes a cleanup that runs only if the stack ends in [`Outcome::Success`]: closed
    /// with [`close`](Self::close) (a commit). Python's `ExitStack` callbacks that look at
    /// the exception do the same.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::sync::Arc;
    ///
    /// let committed = Arc::new(AtomicBool::new(false));
    /// let mut stack = custodian::CleanupStack::new();
    /// let flag = committed.clone();
    /// stack.on_success(move || flag.store(true, Ordering::Relaxed));
    /// drop(stack); // dropped without close: a failure, so no commit
    /// assert!(!committed.load(Ordering::Relaxed));
    /// ```
    #[track_caller]
    pub fn on_success(&mut self, f: impl FnOnce() + Send + 'static) {
        self.push_entry("on_success", move |outcome| {
            if outcome == Outcome::Success {
                f();
            }
            Ok(())
        });
    }

    /// Pushes a cleanup that runs only if the stack ends in [`Outcome::Failure`]: dropped
    /// without being closed (an early return, `?`, a panic), or closed with
    /// [`close_with`](Self::close_with)`(Outcome::Failure)`. A rollback.
    ///
    /// ```
    /// use custodian::{CleanupStack, Outcome};
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::sync::Arc;
    ///
    /// fn transfer(rolled_back: Arc<AtomicBool>) -> std::io::Result<()> {
    ///     let mut stack = CleanupStack::new();
    ///     stack.on_failure(move || rolled_back.store(true, Ordering::Relaxed));
    ///     std::fs::metadata("/no/such/account")?; // `?` drops the stack: rolled back
    ///     stack.close()?;
    ///     Ok(())
    /// }
    /// let rolled_back = Arc::new(AtomicBool::new(false));
    /// assert!(transfer(rolled_back.clone()).is_err());
    /// assert!(rolled_back.load(Ordering::Relaxed));
    /// ```
    #[track_caller]
    pub fn on_failure(&mut self, f: impl FnOnce() + Send + 'static) {
        self.push_entry("on_failure", move |outcome| {
            if outcome == Outcome::Failure {
                f();
            }
            Ok(())
        });
    }

    /// Pushes a guard, closed (with [`Close::close`]) when the stack is.
    ///
    /// ```
    /// use std::io::Write;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let mut stack = custodian::CleanupStack::new();
    /// let mut file = std::fs::File::create(dir.path().join("log"))?;
    /// file.write_all(b"entry\n")?;
    /// stack.push(file); // closed = fsync'ed when the stack closes
    /// stack.close().expect("synced");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[track_caller]
    pub fn push<G>(&mut self, guard: G)
    where
        G: Close + Send + 'static,
        G::Error: Into<BoxError>,
    {
        self.push_entry(std::any::type_name::<G>(), move |_| {
            guard.close().map_err(Into::into)
        });
    }

    /// `F: Send` is what makes the stack `Send`: every entry is checked here.
    #[track_caller]
    #[inline]
    fn push_entry<F>(&mut self, label: &'static str, cleanup: F)
    where
        F: FnOnce(Outcome) -> Result<(), BoxError> + Send + 'static,
    {
        self.entries.push(Entry {
            cleanup: Slot::new(cleanup),
            run: run_slot::<F>,
            label,
            site: Location::caller(),
        });
    }

    /// Moves every entry into a new stack, leaving this one empty: Python's `pop_all`.
    ///
    /// Use it to hand resources over once a constructor has succeeded: the old stack
    /// (dropped on an early return) cleans up, the new one (kept) does not run now.
    ///
    /// ```
    /// use custodian::CleanupStack;
    ///
    /// fn open_both() -> std::io::Result<CleanupStack> {
    ///     let mut stack = CleanupStack::new();
    ///     stack.defer(|| println!("release the first"));
    ///     std::fs::metadata("/")?; // an early return here would release the first
    ///     stack.defer(|| println!("release the second"));
    ///     Ok(stack.take()) // success: the caller owns both now
    /// }
    ///
    /// let owned = open_both()?;
    /// assert_eq!(owned.len(), 2);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[track_caller]
    pub fn take(&mut self) -> CleanupStack {
        CleanupStack {
            entries: mem::take(&mut self.entries),
            ticket: Ticket::new(&KIND),
            _entries: PhantomData,
        }
    }

    /// How many cleanups are waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// `true` when no cleanup is waiting.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Runs every cleanup now, last pushed first, as a success: `on_success` entries run,
    /// `on_failure` ones do not.
    ///
    /// ```
    /// let mut stack = custodian::CleanupStack::new();
    /// stack.defer_fallible(|| std::fs::remove_file("/no/such/a"));
    /// stack.defer_fallible(|| std::fs::remove_file("/no/such/b"));
    /// let errors = stack.close().unwrap_err();
    /// assert_eq!(errors.len(), 2); // b, then a: none lost
    /// ```
    ///
    /// # Errors
    /// [`CleanupErrors`] with every failure (error or panic), in the order they ran.
    #[inline]
    pub fn close(self) -> Result<(), CleanupErrors> {
        self.close_with(Outcome::Success)
    }

    /// Runs every cleanup now, last pushed first, telling them how the work ended: with
    /// [`Outcome::Failure`], `on_failure` entries run and `on_success` ones do not
    /// (closing an `ExitStack` "as failed").
    ///
    /// ```
    /// use custodian::{CleanupStack, Outcome};
    /// use std::sync::{Arc, Mutex};
    ///
    /// let log = Arc::new(Mutex::new(Vec::new()));
    /// let mut stack = CleanupStack::new();
    /// let (a, b, c) = (log.clone(), log.clone(), log.clone());
    /// stack.defer(move || a.lock().unwrap().push("release"));
    /// stack.on_success(move || b.lock().unwrap().push("commit"));
    /// stack.on_failure(move || c.lock().unwrap().push("roll back"));
    /// stack.close_with(Outcome::Failure)?;
    /// assert_eq!(*log.lock().unwrap(), ["roll back", "release"]);
    /// # Ok::<(), custodian::CleanupErrors>(())
    /// ```
    ///
    /// # Errors
    /// [`CleanupErrors`] with every failure (error or panic), in the order they ran.
    #[inline]
    pub fn close_with(mut self, outcome: Outcome) -> Result<(), CleanupErrors> {
        self.run_all(outcome).into_result()
    }

    fn run_all(&mut self, outcome: Outcome) -> CleanupErrors {
        let mut errors = CleanupErrors::default();
        // One `catch_unwind` around the whole loop rather than one per entry: after a
        // panic, the loop starts again with the entries that are left.
        loop {
            let mut running = None;
            let finished = panic::catch_unwind(AssertUnwindSafe(|| {
                while let Some(Entry {
                    cleanup,
                    run,
                    label,
                    site,
                }) = self.entries.pop()
                {
                    // Known before it runs, for the panic report below.
                    let (label, site) = running.insert((label, site));
                    // SAFETY: `push_entry` made `run` for the type stored in `cleanup`,
                    // and the entry has just left the list: its slot is consumed once.
                    if let Err(e) = unsafe { run(cleanup, outcome) } {
                        errors.push(CleanupError::failed(*label, site, e).unwrap_named());
                    }
                }
            }));
            match (finished, running) {
                (Ok(()), _) => return errors,
                (Err(payload), Some((label, site))) => {
                    errors.push(CleanupError::panicked(label, site, payload));
                }
                // Only the loop itself could panic before an entry ran: nothing is left
                // to run that this loop could still reach (entries left, if any, are
                // leaked, never run twice or dropped half-way).
                (Err(payload), None) => {
                    errors.push(CleanupError::panicked(
                        "CleanupStack",
                        self.ticket.site(),
                        payload,
                    ));
                    return errors;
                }
            }
        }
    }
}

impl Default for CleanupStack {
    #[track_caller]
    fn default() -> Self {
        CleanupStack::new()
    }
}

impl Drop for CleanupStack {
    fn drop(&mut self) {
        if self.entries.is_empty() {
            return;
        }
        self.ticket.dropped_without_close(&"");
        // Dropped without `close`: an early return, a `?` or a panic.
        for e in self.run_all(Outcome::Failure) {
            self.ticket
                .failure(&format_args!("{} at {}", e.label(), e.site()), &e);
        }
    }
}

impl Close for CleanupStack {
    type Error = CleanupErrors;

    fn close(self) -> Result<(), CleanupErrors> {
        CleanupStack::close(self)
    }
}

impl fmt::Debug for CleanupStack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CleanupStack")
            .field("len", &self.entries.len())
            .field("site", &format_args!("{}", self.ticket.site()))
            .finish()
    }
}
