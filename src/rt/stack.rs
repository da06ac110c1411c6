//! `AsyncCleanupStack`: Python's `contextlib.AsyncExitStack`.

use std::borrow::Cow;
use std::fmt;
use std::future::{Future, poll_fn};
use std::mem;
use std::panic::{AssertUnwindSafe, Location, catch_unwind};
use std::task::Poll;

use sync_wrapper::SyncWrapper;
use tokio::runtime::Handle;

use super::AsyncClose;
use super::guard::BoxFuture;
use super::reaper::{Job, Owner, Reaper, ReaperRef};
use crate::Outcome;
use crate::error::{BoxError, CleanupError, CleanupErrors};
use crate::ledger::{Kind, Ticket};

static KIND: Kind = Kind::new("custodian::rt::AsyncCleanupStack");

/// One async cleanup waiting in a stack or a scope.
pub(crate) struct Entry {
    /// In a `SyncWrapper`: the future is reached only through `&mut` or by value, so
    /// the stacks and scopes holding entries are `Sync` without asking it to be.
    pub(crate) fut: SyncWrapper<BoxFuture<Result<(), BoxError>>>,
    pub(crate) label: &'static str,
    pub(crate) site: &'static Location<'static>,
    /// `None`: runs whatever the outcome; `Some(o)`: only when the stack ends in `o`
    /// (dropped unpolled otherwise, so it does nothing).
    pub(crate) only: Option<Outcome>,
}

impl Entry {
    pub(crate) fn new(
        fut: BoxFuture<Result<(), BoxError>>,
        label: &'static str,
        site: &'static Location<'static>,
    ) -> Entry {
        Entry {
            fut: SyncWrapper::new(fut),
            label,
            site,
            only: None,
        }
    }

    /// Polls the entry once, turning a panic into an error.
    fn poll(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), CleanupError>> {
        match catch_unwind(AssertUnwindSafe(|| self.fut.get_mut().as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
            Ok(Poll::Ready(Err(e))) => Poll::Ready(Err(CleanupError::failed(
                self.label, self.site, e,
            )
            .unwrap_named())),
            Err(payload) => {
                Poll::Ready(Err(CleanupError::panicked(self.label, self.site, payload)))
            }
        }
    }
}

/// Runs entries last first; each one runs even when earlier ones fail or panic.
/// The entry being run stays at the end of the list until it finished, so that if the
/// run is dropped midway, the list still holds it and everything after it.
pub(crate) async fn run_lifo(entries: &mut Vec<Entry>, outcome: Outcome) -> CleanupErrors {
    let mut errors = CleanupErrors::default();
    loop {
        // Entries for the other outcome are dropped, never polled.
        while entries
            .last()
            .is_some_and(|e| e.only.is_some_and(|only| only != outcome))
        {
            entries.pop();
        }
        let result = poll_fn(|cx| match entries.last_mut() {
            Some(entry) => entry.poll(cx).map(Some),
            None => Poll::Ready(None),
        })
        .await;
        match result {
            None => return errors,
            Some(result) => {
                entries.pop();
                if let Err(e) = result {
                    errors.push(e);
                }
            }
        }
    }
}

/// The entries of a dropped stack or a cancelled scope, run by the reaper, and the
/// outcome the stack ends in.
pub(crate) struct StackJob(pub(crate) Vec<Entry>, pub(crate) Outcome);

impl Job for StackJob {
    type Fut = BoxFuture<CleanupErrors>;

    fn start(self) -> BoxFuture<CleanupErrors> {
        let StackJob(mut entries, outcome) = self;
        Box::pin(async move { run_lifo(&mut entries, outcome).await })
    }

    fn errors(
        output: CleanupErrors,
        _: &'static str,
        _: &'static Location<'static>,
    ) -> CleanupErrors {
        output
    }

    fn lost(self) {}
}

/// A stack of async cleanups run last first when it is closed: Python's
/// `contextlib.AsyncExitStack`, for a number of resources known only at run time.
///
/// Every entry runs, even when earlier ones fail or panic; [`close`] returns every
/// failure. Dropped without `close` (or with its `close` cancelled midway), the stack
/// hands the entries not yet run to its [`Reaper`], which runs them in the same order
/// and reports their errors: none is lost.
///
/// Entries are futures, `Send + 'static`; they do nothing until the stack runs them.
///
/// ```
/// use custodian::rt::AsyncCleanupStack;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
/// let mut stack = AsyncCleanupStack::new();
/// for name in ["a", "b", "c"] {
///     let log = log.clone();
///     stack.defer(async move { log.lock().unwrap().push(name) });
/// }
/// stack.close().await.unwrap();
/// assert_eq!(*log.lock().unwrap(), ["c", "b", "a"]);
/// # });
/// ```
///
/// [`close`]: AsyncCleanupStack::close
#[must_use = "an AsyncCleanupStack hands its cleanups to the reaper when dropped; close it"]
pub struct AsyncCleanupStack {
    entries: Vec<Entry>,
    ticket: Option<Ticket>,
    handle: Option<Handle>,
    reaper: ReaperRef,
    /// How the stack ends if it is dropped now: `Failure` until `close_with` starts,
    /// then that call's outcome (a cancelled `close` still commits what is left).
    outcome: Outcome,
}

impl AsyncCleanupStack {
    /// An empty stack whose leftovers go to [`Reaper::global`].
    #[track_caller]
    pub fn new() -> AsyncCleanupStack {
        AsyncCleanupStack::make(ReaperRef::Global, Ticket::new(&KIND))
    }

    /// An empty stack whose leftovers go to `reaper`.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let reaper = custodian::rt::Reaper::new();
    /// let mut stack = custodian::rt::AsyncCleanupStack::with_reaper(&reaper);
    /// stack.defer(async {});
    /// drop(stack); // not closed: the reaper runs it
    /// assert_eq!(reaper.shutdown(std::time::Duration::from_secs(5)).await.completed(), 1);
    /// # });
    /// ```
    #[track_caller]
    pub fn with_reaper(reaper: &Reaper) -> AsyncCleanupStack {
        AsyncCleanupStack::make(ReaperRef::Owned(reaper.clone()), Ticket::new(&KIND))
    }

    pub(crate) fn make(reaper: ReaperRef, ticket: Ticket) -> AsyncCleanupStack {
        AsyncCleanupStack {
            entries: Vec::new(),
            ticket: Some(ticket),
            handle: Handle::try_current().ok(),
            reaper,
            outcome: Outcome::Failure,
        }
    }

    pub(crate) fn from_entries(
        entries: Vec<Entry>,
        reaper: ReaperRef,
        handle: Option<Handle>,
        ticket: Ticket,
    ) -> AsyncCleanupStack {
        AsyncCleanupStack {
            entries,
            ticket: Some(ticket),
            handle,
            reaper,
            outcome: Outcome::Failure,
        }
    }

    /// Pushes a cleanup that cannot fail.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let mut stack = custodian::rt::AsyncCleanupStack::new();
    /// stack.defer(async { println!("runs when the stack is closed") });
    /// stack.close().await.unwrap();
    /// # });
    /// ```
    #[track_caller]
    pub fn defer(&mut self, cleanup: impl Future<Output = ()> + Send + 'static) {
        self.push_entry(
            "defer",
            Box::pin(async move {
                cleanup.await;
                Ok(())
            }),
        );
    }

    /// Pushes a cleanup that can fail; its error is kept.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let mut stack = custodian::rt::AsyncCleanupStack::new();
    /// stack.defer_fallible(async { std::fs::remove_file("/no/such/file") });
    /// assert_eq!(stack.close().await.unwrap_err().len(), 1);
    /// # });
    /// ```
    #[track_caller]
    pub fn defer_fallible<E>(
        &mut self,
        cleanup: impl Future<Output = Result<(), E>> + Send + 'static,
    ) where
        E: Into<BoxError>,
    {
        self.push_entry(
            "defer",
            Box::pin(async move { cleanup.await.map_err(Into::into) }),
        );
    }

    /// Pushes a cleanup that can fail, with a label of your choosing (a `String` made in a
    /// loop, say) shown in its [`CleanupError`] and events instead of `defer`, whether it
    /// fails or panics.
    ///
    /// ```
    /// use custodian::rt::AsyncCleanupStack;
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let mut stack = AsyncCleanupStack::new();
    /// for session in [1, 2] {
    ///     stack.defer_named(format!("log out session {session}"), async move {
    ///         Err::<(), _>(std::io::Error::other("server gone"))
    ///     });
    /// }
    /// let errors = stack.close().await.unwrap_err();
    /// let labels: Vec<&str> = errors.iter().map(|e| e.label()).collect();
    /// assert_eq!(labels, ["log out session 2", "log out session 1"]);
    /// # });
    /// ```
    #[track_caller]
    pub fn defer_named<E>(
        &mut self,
        label: impl Into<std::borrow::Cow<'static, str>>,
        cleanup: impl Future<Output = Result<(), E>> + Send + 'static,
    ) where
        E: Into<BoxError>,
    {
        self.push_entry(
            "defer_named",
            crate::error::NamedFuture::boxed(label.into(), cleanup),
        );
    }

    /// Pushes a cleanup that runs only if the stack ends in [`Outcome::Success`]: closed
    /// with [`close`](Self::close) (or `close_with(Outcome::Success)`). A commit. Dropped
    /// without `close`, the stack ends in [`Outcome::Failure`] and this never runs.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let mut stack = custodian::rt::AsyncCleanupStack::new();
    /// stack.on_success(async { println!("committed") });
    /// stack.close().await.unwrap();
    /// # });
    /// ```
    #[track_caller]
    pub fn on_success(&mut self, cleanup: impl Future<Output = ()> + Send + 'static) {
        self.push_when(Outcome::Success, "on_success", cleanup);
    }

    /// Pushes a cleanup that runs only if the stack ends in [`Outcome::Failure`]: dropped
    /// without being closed (an early return, `?`, a panic, a cancelled future; the
    /// reaper runs it), or closed with `close_with(Outcome::Failure)`. A rollback.
    ///
    /// ```
    /// use custodian::rt::AsyncCleanupStack;
    ///
    /// async fn transfer(stack: &mut AsyncCleanupStack) -> std::io::Result<()> {
    ///     stack.on_failure(async { println!("rolled back") });
    ///     std::fs::metadata("/no/such/account")?; // the caller drops the stack: rolled back
    ///     Ok(())
    /// }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let reaper = custodian::rt::Reaper::new();
    /// let mut stack = AsyncCleanupStack::with_reaper(&reaper);
    /// assert!(transfer(&mut stack).await.is_err());
    /// drop(stack);
    /// assert_eq!(reaper.shutdown(std::time::Duration::from_secs(5)).await.completed(), 1);
    /// # });
    /// ```
    #[track_caller]
    pub fn on_failure(&mut self, cleanup: impl Future<Output = ()> + Send + 'static) {
        self.push_when(Outcome::Failure, "on_failure", cleanup);
    }

    #[track_caller]
    fn push_when(
        &mut self,
        only: Outcome,
        label: &'static str,
        cleanup: impl Future<Output = ()> + Send + 'static,
    ) {
        let mut entry = Entry::new(
            Box::pin(async move {
                cleanup.await;
                Ok(())
            }),
            label,
            Location::caller(),
        );
        entry.only = Some(only);
        self.entries.push(entry);
    }

    /// Pushes a guard, closed (with [`AsyncClose::close`]) when the stack is.
    ///
    /// ```
    /// use custodian::rt::{AsyncCleanupStack, AsyncGuard};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let mut stack = AsyncCleanupStack::new();
    /// stack.push(AsyncGuard::new(1, |_| async { Err::<(), _>("refused") }));
    /// let errors = stack.close().await.unwrap_err();
    /// assert_eq!(errors.iter().next().unwrap().error().unwrap().to_string(), "refused");
    /// # });
    /// ```
    #[track_caller]
    pub fn push<G>(&mut self, guard: G)
    where
        G: AsyncClose + 'static,
        G::Error: Into<BoxError>,
    {
        self.push_entry(
            std::any::type_name::<G>(),
            Box::pin(async move { guard.close().await.map_err(Into::into) }),
        );
    }

    #[track_caller]
    fn push_entry(&mut self, label: &'static str, fut: BoxFuture<Result<(), BoxError>>) {
        self.entries
            .push(Entry::new(fut, label, Location::caller()));
    }

    /// Moves every entry into a new stack, leaving this one empty: Python's `pop_all`.
    ///
    /// ```
    /// use custodian::rt::AsyncCleanupStack;
    ///
    /// async fn open_both() -> std::io::Result<AsyncCleanupStack> {
    ///     let mut stack = AsyncCleanupStack::new();
    ///     stack.defer(async { println!("release the first") });
    ///     std::fs::metadata("/")?; // an early return here would release the first
    ///     stack.defer(async { println!("release the second") });
    ///     Ok(stack.take()) // success: the caller owns both now
    /// }
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let owned = open_both().await?;
    /// assert_eq!(owned.len(), 2);
    /// owned.close().await.unwrap();
    /// # Ok::<(), std::io::Error>(())
    /// # }).unwrap();
    /// ```
    #[track_caller]
    pub fn take(&mut self) -> AsyncCleanupStack {
        AsyncCleanupStack {
            entries: mem::take(&mut self.entries),
            ticket: Some(Ticket::new(&KIND)),
            handle: self.handle.clone(),
            reaper: self.reaper.clone(),
            outcome: Outcome::Failure,
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

    /// Runs every cleanup now, last pushed first, one at a time.
    ///
    /// # Errors
    /// [`CleanupErrors`] with every failure (error or panic), in the order they ran.
    ///
    /// # Panics
    /// Never because of a cleanup: a panicking cleanup becomes an error and the others
    /// still run.
    ///
    /// # Cancel safety
    /// If this future is dropped midway, the cleanup that was running and those not yet
    /// run are handed to the reaper, which finishes them in order and reports their
    /// errors. Nothing runs twice.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let mut stack = custodian::rt::AsyncCleanupStack::new();
    /// stack.defer_fallible(async { Err::<(), _>("first") });
    /// stack.defer(async { panic!("second") });
    /// let errors = stack.close().await.unwrap_err();
    /// assert_eq!(errors.len(), 2); // neither lost
    /// # });
    /// ```
    pub async fn close(self) -> Result<(), CleanupErrors> {
        self.close_with(Outcome::Success).await
    }

    /// Runs every cleanup now, last pushed first, telling them how the work ended: with
    /// [`Outcome::Failure`], `on_failure` entries run and `on_success` ones do not
    /// (closing an `AsyncExitStack` "as failed"). Cancel-safe as [`close`](Self::close):
    /// what is left goes to the reaper with the same outcome.
    ///
    /// ```
    /// use custodian::Outcome;
    /// use custodian::rt::AsyncCleanupStack;
    /// use std::sync::{Arc, Mutex};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let log = Arc::new(Mutex::new(Vec::new()));
    /// let mut stack = AsyncCleanupStack::new();
    /// let (a, b, c) = (log.clone(), log.clone(), log.clone());
    /// stack.defer(async move { a.lock().unwrap().push("release") });
    /// stack.on_success(async move { b.lock().unwrap().push("commit") });
    /// stack.on_failure(async move { c.lock().unwrap().push("roll back") });
    /// stack.close_with(Outcome::Failure).await.unwrap();
    /// assert_eq!(*log.lock().unwrap(), ["roll back", "release"]);
    /// # });
    /// ```
    ///
    /// # Errors
    /// [`CleanupErrors`] with every failure (error or panic), in the order they ran.
    pub async fn close_with(mut self, outcome: Outcome) -> Result<(), CleanupErrors> {
        // The entries stay in `self` while they run: if this future is dropped, `Drop`
        // hands what is left to the reaper, with this outcome.
        self.outcome = outcome;
        run_lifo(&mut self.entries, outcome).await.into_result()
    }
}

impl Default for AsyncCleanupStack {
    #[track_caller]
    fn default() -> Self {
        AsyncCleanupStack::new()
    }
}

impl Drop for AsyncCleanupStack {
    fn drop(&mut self) {
        // Entries for the other outcome would be dropped unpolled by the reaper anyway.
        let outcome = self.outcome;
        self.entries
            .retain(|e| e.only.is_none_or(|only| only == outcome));
        if self.entries.is_empty() {
            return;
        }
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        let owner = Owner::new(
            ticket,
            Cow::Owned(format!("{} pending cleanups", self.entries.len())),
        );
        owner.ticket.dropped_without_close(&owner.resource);
        let job = StackJob(mem::take(&mut self.entries), self.outcome);
        self.reaper
            .inner()
            .spawn_job(self.handle.take(), owner, job);
    }
}

/// Closing the stack runs its cleanups ([`AsyncCleanupStack::close`]).
impl AsyncClose for AsyncCleanupStack {
    type Error = CleanupErrors;

    fn close(self) -> impl Future<Output = Result<(), CleanupErrors>> + Send {
        AsyncCleanupStack::close(self)
    }
}

impl fmt::Debug for AsyncCleanupStack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("AsyncCleanupStack");
        d.field("len", &self.entries.len());
        if let Some(t) = &self.ticket {
            d.field("site", &format_args!("{}", t.site()));
        }
        d.finish()
    }
}
