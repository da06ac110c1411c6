//! The async `scope`: Python's `async with`, aware of how the body ended, and safe
//! against cancellation.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::panic::{AssertUnwindSafe, Location, catch_unwind};
use std::pin::Pin;
use std::sync::mpsc;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use super::AsyncClose;
use super::guard::BoxFuture;
use super::reaper::{FutureJob, Owner, Reaper, ReaperRef};
use super::stack::{AsyncCleanupStack, Entry, StackJob};
use crate::ScopeError;
use crate::error::{BoxError, CleanupError};
use crate::ledger::{Kind, Ticket};

static KIND: Kind = Kind::new("custodian::rt::scope");

type OnErr<E> = Box<dyn FnOnce(&E) -> BoxFuture<Result<(), BoxError>> + Send>;

enum What<E> {
    Always(BoxFuture<Result<(), BoxError>>),
    OnSuccess(BoxFuture<Result<(), BoxError>>),
    OnErr(OnErr<E>),
    /// The close of an entered guard, sent when its [`Entered`] handle drops.
    Entered(oneshot::Receiver<BoxFuture<Result<(), BoxError>>>),
}

struct Registered<E> {
    what: What<E>,
    label: &'static str,
    site: &'static Location<'static>,
}

/// How the body ended.
enum Outcome<'e, E> {
    Ok,
    Err(&'e E),
    /// Cancelled or panicked: only unconditional cleanups and entered guards run.
    Interrupted,
}

impl<E> Registered<E> {
    /// The cleanup to run for this outcome, if any.
    fn resolve(self, outcome: &Outcome<'_, E>) -> Option<Entry> {
        let fut = match (self.what, outcome) {
            (What::Always(fut), _) => fut,
            (What::OnSuccess(fut), Outcome::Ok) => fut,
            (What::OnErr(f), Outcome::Err(e)) => match catch_unwind(AssertUnwindSafe(|| f(e))) {
                Ok(fut) => fut,
                Err(payload) => {
                    let e = CleanupError::panicked(self.label, self.site, payload);
                    let message = e.to_string();
                    Box::pin(async move { Err(message.into()) })
                }
            },
            (What::Entered(mut rx), _) => rx.try_recv().ok()?,
            _ => return None,
        };
        Some(Entry::new(fut, self.label, self.site))
    }
}

/// The handle a [`scope`] body registers its cleanups with. Cheap to clone; its methods
/// take `&self`.
///
/// ```
/// use std::sync::{Arc, Mutex};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let log = Arc::new(Mutex::new(Vec::new()));
/// let l = log.clone();
/// custodian::rt::scope(|s| async move {
///     let (a, b) = (l.clone(), l.clone());
///     s.defer(async move { a.lock().unwrap().push("release") });
///     s.on_success(async move { b.lock().unwrap().push("commit") });
///     Ok::<_, std::io::Error>(())
/// })
/// .await?;
/// assert_eq!(*log.lock().unwrap(), ["commit", "release"]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct AsyncScope<E> {
    tx: mpsc::Sender<Registered<E>>,
    reaper: ReaperRef,
    handle: Option<Handle>,
}

impl<E> Clone for AsyncScope<E> {
    fn clone(&self) -> Self {
        AsyncScope {
            tx: self.tx.clone(),
            reaper: self.reaper.clone(),
            handle: self.handle.clone(),
        }
    }
}

/// Runs the async `body` like Python's `async with` block: every cleanup it registers on
/// the [`AsyncScope`] runs when it ends, last registered first, exactly once, whether it
/// returned `Ok` or `Err` (an early return or `?`).
///
/// - [`defer`](AsyncScope::defer) / [`defer_fallible`](AsyncScope::defer_fallible)
///   always run;
/// - [`on_success`](AsyncScope::on_success) runs only when the body returned `Ok`;
/// - [`on_err`](AsyncScope::on_err) runs only when it returned `Err`, and sees the error;
/// - [`enter`](AsyncScope::enter) keeps a guard until the end and then closes it.
///
/// If the scope's future is cancelled (dropped by `select!` or `timeout`, its task
/// aborted) or the body panics, the cleanups are not lost: the unconditional ones and
/// the entered guards are handed to [`Reaper::global`], which runs them in the same
/// order and reports their errors. [`Reaper::scope`] uses another reaper.
///
/// # Errors
/// A [`ScopeError`] when the body returned `Err` or any cleanup failed; it holds the
/// body's error and **every** cleanup failure, in the order they ran.
///
/// # Panics
/// A panic in the body goes on (after handing the cleanups to the reaper). A panic in a
/// cleanup becomes a cleanup failure; the other cleanups still run.
///
/// # Cancel safety
/// Cancelling it hands every pending cleanup to the reaper (see above); none runs twice.
///
/// ```
/// use std::sync::{Arc, Mutex};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let log = Arc::new(Mutex::new(Vec::new()));
/// let result: Result<(), _> = custodian::rt::scope(|s| {
///     let log = log.clone();
///     async move {
///         let l = log.clone();
///         s.defer(async move { l.lock().unwrap().push("close connection") });
///         let l = log.clone();
///         s.on_err(move |e: &std::io::Error| {
///             let what = format!("roll back after {e}");
///             async move { l.lock().unwrap().push("roll back"); drop(what) }
///         });
///         Err(std::io::Error::other("disk full"))?;
///         Ok(())
///     }
/// })
/// .await;
/// assert_eq!(result.unwrap_err().into_body().unwrap().to_string(), "disk full");
/// assert_eq!(*log.lock().unwrap(), ["roll back", "close connection"]);
/// # });
/// ```
#[track_caller]
pub fn scope<T, E, F, Fut>(body: F) -> impl Future<Output = Result<T, ScopeError<E>>>
where
    F: FnOnce(AsyncScope<E>) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    run(ReaperRef::Global, Ticket::new(&KIND), body)
}

impl Reaper {
    /// [`scope`](super::scope()), with the cleanups of a cancelled or panicking body
    /// handed to this reaper instead of the global one.
    ///
    /// # Errors
    /// As [`scope`](super::scope()).
    ///
    /// # Panics
    /// As [`scope`](super::scope()).
    ///
    /// # Cancel safety
    /// As [`scope`](super::scope()).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let reaper = custodian::rt::Reaper::new();
    /// let value = reaper
    ///     .scope(|s| async move {
    ///         s.defer(async { println!("done") });
    ///         Ok::<_, std::io::Error>(42)
    ///     })
    ///     .await
    ///     .unwrap();
    /// assert_eq!(value, 42);
    /// # });
    /// ```
    #[track_caller]
    pub fn scope<T, E, F, Fut>(
        &self,
        body: F,
    ) -> impl Future<Output = Result<T, ScopeError<E>>> + use<T, E, F, Fut>
    where
        F: FnOnce(AsyncScope<E>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        run(ReaperRef::Owned(self.clone()), Ticket::new(&KIND), body)
    }
}

async fn run<T, E, F, Fut>(reaper: ReaperRef, ticket: Ticket, body: F) -> Result<T, ScopeError<E>>
where
    F: FnOnce(AsyncScope<E>) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let (tx, rx) = mpsc::channel();
    let handle = Handle::try_current().ok();
    let handle_for_body = handle.clone();
    let mut running = Running {
        body: None,
        rx,
        ticket: Some(ticket),
        handle,
        reaper: reaper.clone(),
    };
    running.body = Some(Box::pin(body(AsyncScope {
        tx,
        reaper,
        handle: handle_for_body,
    })));
    let result = match running.body.as_mut() {
        Some(body) => body.as_mut().await,
        None => unreachable!("the body was just set"),
    };
    // The body finished: its handles (and entered guards) are dropped with it.
    running.body = None;
    let entries = match &result {
        Ok(_) => running.collect(&Outcome::Ok),
        Err(e) => running.collect(&Outcome::Err(e)),
    };
    let stack = AsyncCleanupStack::from_entries(
        entries,
        running.reaper.clone(),
        running.handle.take(),
        running.ticket.take().unwrap_or_else(|| Ticket::new(&KIND)),
    );
    // If this is cancelled while the cleanups run, the stack hands the rest on.
    let cleanup = match stack.close().await {
        Ok(()) => crate::CleanupErrors::default(),
        Err(errors) => errors,
    };
    match result {
        Ok(value) if cleanup.is_empty() => Ok(value),
        Ok(_) => Err(ScopeError::new(None, cleanup)),
        Err(body) => Err(ScopeError::new(Some(body), cleanup)),
    }
}

/// A scope while its body runs. Dropped before the body finished (cancelled, or the
/// body panicked), it hands the pending cleanups to the reaper.
struct Running<E, Fut> {
    /// Boxed so that `Drop` can drop the body (and with it the entered guards' handles,
    /// which send their guards back) before collecting the cleanups.
    body: Option<Pin<Box<Fut>>>,
    rx: mpsc::Receiver<Registered<E>>,
    ticket: Option<Ticket>,
    handle: Option<Handle>,
    reaper: ReaperRef,
}

impl<E, Fut> Running<E, Fut> {
    fn collect(&self, outcome: &Outcome<'_, E>) -> Vec<Entry> {
        self.rx
            .try_iter()
            .filter_map(|r| r.resolve(outcome))
            .collect()
    }
}

impl<E, Fut> Drop for Running<E, Fut> {
    fn drop(&mut self) {
        let Some(body) = self.body.take() else {
            return;
        };
        drop(body);
        let entries = self.collect(&Outcome::Interrupted);
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        if entries.is_empty() {
            return;
        }
        let owner = Owner::new(
            ticket,
            Cow::Owned(format!("{} pending scope cleanups", entries.len())),
        );
        owner.ticket.dropped_without_close(&owner.resource);
        self.reaper.inner().spawn_job(
            self.handle.take(),
            owner,
            StackJob(entries, crate::Outcome::Failure),
        );
    }
}

impl<E> AsyncScope<E> {
    fn register(&self, what: What<E>, label: &'static str, site: &'static Location<'static>) {
        if let Err(mpsc::SendError(r)) = self.tx.send(Registered { what, label, site }) {
            self.too_late(r);
        }
    }

    /// The scope already ended (this handle outlived its body): an unconditional cleanup
    /// goes to the reaper; a conditional one cannot apply any more and is reported.
    #[cold]
    fn too_late(&self, r: Registered<E>) {
        let ticket = Ticket::at(&KIND, r.site);
        match r.what {
            What::Always(fut) => {
                let owner = Owner::new(ticket, Cow::Borrowed(r.label));
                self.reaper
                    .inner()
                    .spawn_job(self.handle.clone(), owner, FutureJob(fut));
            }
            _ => ticket.failure(
                &r.label,
                &"registered after its scope ended: the outcome is decided, not run",
            ),
        }
    }

    /// Runs `cleanup` when the scope ends, however it ends (on the reaper if the scope
    /// is cancelled).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// custodian::rt::scope(|s| async move {
    ///     s.defer(async { println!("released") });
    ///     Ok::<_, std::io::Error>(())
    /// })
    /// .await
    /// .unwrap();
    /// # });
    /// ```
    #[track_caller]
    pub fn defer(&self, cleanup: impl Future<Output = ()> + Send + 'static) {
        self.register(
            What::Always(Box::pin(async move {
                cleanup.await;
                Ok(())
            })),
            "defer",
            Location::caller(),
        );
    }

    /// Runs `cleanup` when the scope ends, however it ends; its error is kept in the
    /// [`ScopeError`].
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let err = custodian::rt::scope(|s| async move {
    ///     s.defer_fallible(async { std::fs::remove_file("/no/such/file") });
    ///     Ok::<_, std::io::Error>(())
    /// })
    /// .await
    /// .unwrap_err();
    /// assert_eq!(err.cleanup_errors().len(), 1);
    /// # });
    /// ```
    #[track_caller]
    pub fn defer_fallible<Er>(&self, cleanup: impl Future<Output = Result<(), Er>> + Send + 'static)
    where
        Er: Into<BoxError>,
    {
        self.register(
            What::Always(Box::pin(async move { cleanup.await.map_err(Into::into) })),
            "defer_fallible",
            Location::caller(),
        );
    }

    /// As [`defer_fallible`](Self::defer_fallible), with a label of your choosing (a
    /// `String` made in a loop, say) shown in its [`CleanupError`] and events instead of
    /// `defer_named`, whether it fails or panics.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let err = custodian::rt::scope(|s| async move {
    ///     for session in [1, 2] {
    ///         s.defer_named(format!("log out session {session}"), async move {
    ///             Err::<(), _>(std::io::Error::other("server gone"))
    ///         });
    ///     }
    ///     Ok::<_, std::io::Error>(())
    /// })
    /// .await
    /// .unwrap_err();
    /// let labels: Vec<&str> = err.cleanup_errors().iter().map(|e| e.label()).collect();
    /// assert_eq!(labels, ["log out session 2", "log out session 1"]);
    /// # });
    /// ```
    #[track_caller]
    pub fn defer_named<Er>(
        &self,
        label: impl Into<Cow<'static, str>>,
        cleanup: impl Future<Output = Result<(), Er>> + Send + 'static,
    ) where
        Er: Into<BoxError>,
    {
        self.register(
            What::Always(crate::error::NamedFuture::boxed(label.into(), cleanup)),
            "defer_named",
            Location::caller(),
        );
    }

    /// Runs `cleanup` when the body returned `Ok`.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// custodian::rt::scope(|s| async move {
    ///     s.on_success(async { println!("committed") });
    ///     Ok::<_, std::io::Error>(())
    /// })
    /// .await
    /// .unwrap();
    /// # });
    /// ```
    #[track_caller]
    pub fn on_success(&self, cleanup: impl Future<Output = ()> + Send + 'static) {
        self.register(
            What::OnSuccess(Box::pin(async move {
                cleanup.await;
                Ok(())
            })),
            "on_success",
            Location::caller(),
        );
    }

    /// When the body returned `Err`, calls `f` with the error and runs the future it
    /// returns.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let _ = custodian::rt::scope(|s| async move {
    ///     s.on_err(|e: &std::io::Error| {
    ///         let e = e.to_string();
    ///         async move { println!("rolling back after {e}") }
    ///     });
    ///     Err::<(), _>(std::io::Error::other("boom"))
    /// })
    /// .await;
    /// # });
    /// ```
    #[track_caller]
    pub fn on_err<Fut>(&self, f: impl FnOnce(&E) -> Fut + Send + 'static)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.register(
            What::OnErr(Box::new(move |e: &E| {
                let fut = f(e);
                Box::pin(async move {
                    fut.await;
                    Ok(())
                })
            })),
            "on_err",
            Location::caller(),
        );
    }

    /// Keeps `guard` until the scope ends, then closes it ([`AsyncClose::close`]) and
    /// collects its error. The returned handle gives access to the guard meanwhile.
    ///
    /// The guard is closed in its place among the scope's cleanups (last entered,
    /// first closed), once its handle is dropped; the body's end drops it. A handle that
    /// outlives the scope (moved into another task) closes its guard on the reaper when
    /// it drops.
    ///
    /// ```
    /// use custodian::rt::AsyncGuard;
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let err = custodian::rt::scope(|s| async move {
    ///     let mut n = s.enter(AsyncGuard::new(1, |_| async { Err::<(), _>("close failed") }));
    ///     **n += 1;
    ///     Ok::<_, std::io::Error>(())
    /// })
    /// .await
    /// .unwrap_err();
    /// assert_eq!(err.cleanup_errors().len(), 1);
    /// # });
    /// ```
    #[track_caller]
    pub fn enter<G>(&self, guard: G) -> Entered<G>
    where
        G: AsyncClose + 'static,
        G::Error: Into<BoxError>,
    {
        let (tx, rx) = oneshot::channel();
        let site = Location::caller();
        let label = std::any::type_name::<G>();
        self.register(What::Entered(rx), label, site);
        Entered {
            guard: Some(guard),
            tx: Some(tx),
            label,
            site,
            reaper: self.reaper.clone(),
            handle: self.handle.clone(),
        }
    }
}

impl<E> fmt::Debug for AsyncScope<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncScope").finish_non_exhaustive()
    }
}

/// A guard entered in an async [`scope`]: use it through `Deref`; when this handle drops,
/// the guard goes back to the scope, which closes it at its end.
///
/// ```
/// use custodian::rt::AsyncGuard;
/// use std::sync::{Arc, Mutex};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let flushed = Arc::new(Mutex::new(Vec::new()));
/// let sink = flushed.clone();
/// custodian::rt::scope(|s| async move {
///     let buffer = AsyncGuard::new(Vec::new(), move |lines: Vec<&str>| async move {
///         sink.lock().unwrap().extend(lines); // an async flush, at the scope's end
///         Ok::<_, std::io::Error>(())
///     });
///     let mut lines = s.enter(buffer);
///     lines.push("first");
///     lines.push("second");
///     Ok::<_, std::io::Error>(())
/// })
/// .await?;
/// assert_eq!(*flushed.lock().unwrap(), ["first", "second"]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[must_use = "dropping the handle at once gives the guard back to the scope, to be closed at its end"]
pub struct Entered<G: AsyncClose + 'static>
where
    G::Error: Into<BoxError>,
{
    guard: Option<G>,
    tx: Option<oneshot::Sender<BoxFuture<Result<(), BoxError>>>>,
    label: &'static str,
    site: &'static Location<'static>,
    reaper: ReaperRef,
    handle: Option<Handle>,
}

impl<G: AsyncClose + 'static> Entered<G>
where
    G::Error: Into<BoxError>,
{
    /// Takes the guard back out of the scope: it will not be closed by it.
    ///
    /// ```
    /// use custodian::rt::{AsyncGuard, Entered};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let guard = custodian::rt::scope(|s| async move {
    ///     let entered = s.enter(AsyncGuard::new(1, |_| async { Ok::<_, std::io::Error>(()) }));
    ///     Ok::<_, std::io::Error>(Entered::into_inner(entered))
    /// })
    /// .await
    /// .unwrap();
    /// AsyncGuard::close(guard).await.unwrap(); // still ours to close
    /// # });
    /// ```
    pub fn into_inner(mut entered: Entered<G>) -> G {
        entered.tx = None;
        match entered.guard.take() {
            Some(g) => g,
            None => unreachable!("Entered used after it was consumed"),
        }
    }
}

impl<G: AsyncClose + 'static> Drop for Entered<G>
where
    G::Error: Into<BoxError>,
{
    fn drop(&mut self) {
        let (Some(guard), Some(tx)) = (self.guard.take(), self.tx.take()) else {
            return;
        };
        let fut: BoxFuture<Result<(), BoxError>> =
            Box::pin(async move { guard.close().await.map_err(Into::into) });
        if let Err(fut) = tx.send(fut) {
            // The scope ended before this handle dropped: close it on the reaper.
            let owner = Owner::new(Ticket::at(&KIND, self.site), Cow::Borrowed(self.label));
            owner.ticket.dropped_without_close(&owner.resource);
            self.reaper
                .inner()
                .spawn_job(self.handle.take(), owner, FutureJob(fut));
        }
    }
}

impl<G: AsyncClose + 'static> Deref for Entered<G>
where
    G::Error: Into<BoxError>,
{
    type Target = G;

    fn deref(&self) -> &G {
        match &self.guard {
            Some(g) => g,
            None => unreachable!("Entered used after it was consumed"),
        }
    }
}

impl<G: AsyncClose + 'static> DerefMut for Entered<G>
where
    G::Error: Into<BoxError>,
{
    fn deref_mut(&mut self) -> &mut G {
        match &mut self.guard {
            Some(g) => g,
            None => unreachable!("Entered used after it was consumed"),
        }
    }
}

impl<G: AsyncClose + fmt::Debug + 'static> fmt::Debug for Entered<G>
where
    G::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entered")
            .field("guard", &self.guard)
            .field("site", &format_args!("{}", self.site))
            .finish()
    }
}
