//! `AsyncGuard<T>`: a value with an async cleanup that runs even when the guard is
//! dropped mid-flight.

use std::any::type_name;
use std::borrow::Cow;
use std::fmt;
use std::future::{Future, poll_fn};
use std::ops::{Deref, DerefMut};
use std::panic::Location;
use std::pin::Pin;
use std::task::{Context, Poll};

use sync_wrapper::SyncWrapper;
use tokio::runtime::Handle;

use super::AsyncClose;
use super::reaper::{FutureJob, Job, Owner, Reaper, ReaperRef};
use crate::error::{BoxError, CleanupError, CleanupErrors};
use crate::ledger::{Kind, Ticket};

static KIND: Kind = Kind::new("custodian::rt::AsyncGuard");

pub(crate) type BoxFuture<O> = Pin<Box<dyn Future<Output = O> + Send>>;
type Fallback<T> = Box<dyn FnOnce(T) + Send>;

/// A value with an async cleanup: [`AsyncGuard::close(guard).await`](AsyncGuard::close)
/// runs it and returns its error (of the cleanup's own type `E`);
/// dropped without `close` (an early return, `?`, a panic, a cancelled future), the
/// guard hands the cleanup to its [`Reaper`], which runs it to completion on the
/// runtime, shielded from the cancelled caller, and reports its error.
///
/// `Drop` never blocks (no `block_on`, no `block_in_place`), so it is safe on a
/// current-thread runtime. With no runtime to run on (dropped on a plain thread, or
/// after the runtime shut down), the cleanup is reported as lost (a tracing `error`
/// event and a ledger failure) and the synchronous
/// [`fallback`](AsyncGuardBuilder::fallback), if one was given, runs instead.
///
/// The cleanup runs on the runtime current when the guard was created (or else the
/// reaper's, or else the one current where it is dropped), so a guard may be dropped on
/// any thread.
///
/// ```
/// use custodian::rt::AsyncGuard;
/// use tokio::io::AsyncWriteExt;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let stream = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
/// let mut conn = AsyncGuard::new(stream, |mut s| async move {
///     s.write_all(b"bye\n").await?;
///     s.shutdown().await
/// });
/// conn.write_all(b"hello\n").await?; // Deref to the stream
/// AsyncGuard::close(conn).await?; // the goodbye, with its io::Error
/// # Ok::<(), custodian::BoxError>(())
/// # }).unwrap();
/// ```
///
/// `E` is the cleanup's error type, returned by [`close`](AsyncGuard::close) as it is.
#[must_use = "dropping an AsyncGuard at once hands its cleanup to the reaper right away"]
pub struct AsyncGuard<T: Send + 'static, E: 'static = BoxError> {
    /// `Some` until `close`, `into_inner` or `Drop` takes it.
    parts: Option<Parts<T, E>>,
}

struct Parts<T: Send + 'static, E: 'static> {
    value: T,
    ticket: Ticket,
    /// The runtime current at creation (or given to the builder), where a dropped
    /// guard's cleanup runs.
    handle: Option<Handle>,
    /// In a `SyncWrapper`, which only ever gives its content by value or through `&mut`:
    /// the guard is `Sync` when `T` is (a `&AsyncGuard` can be held across an `.await`
    /// in a spawned task) without asking the closures to be `Sync`.
    rest: SyncWrapper<Rest<T, E>>,
}

struct Rest<T, E> {
    /// The cleanup closure with its type erased; a closure that captures nothing (the
    /// usual case: the value is its argument) is not allocated.
    cleanup: Box<dyn Cleanup<T, E>>,
    /// What the builder set beyond the kind and the runtime; `None` (no allocation) for
    /// `AsyncGuard::new`.
    options: Option<Box<Options<T>>>,
}

/// The builder's rarer settings.
struct Options<T> {
    resource: Option<Cow<'static, str>>,
    reaper: ReaperRef,
    fallback: Option<Fallback<T>>,
}

/// Who owns a cleanup that goes to the reaper: its ticket and what the events call the
/// resource.
fn owner<T>(ticket: Ticket, resource: Option<Cow<'static, str>>) -> Owner {
    Owner::new(ticket, resource.unwrap_or(Cow::Borrowed(type_name::<T>())))
}

/// Splits the builder's settings into what each path needs.
fn unpack<T>(
    options: Option<Box<Options<T>>>,
) -> (Option<Cow<'static, str>>, ReaperRef, Option<Fallback<T>>) {
    match options {
        None => (None, ReaperRef::Global, None),
        Some(o) => {
            let Options {
                resource,
                reaper,
                fallback,
            } = *o;
            (resource, reaper, fallback)
        }
    }
}

/// The cleanup closure with its types erased, so that the guard is `AsyncGuard<T, E>`
/// whatever the closure and its future are. `defer` is monomorphised: the future is
/// spawned as it is, not boxed.
trait Cleanup<T, E>: Send {
    fn call(self: Box<Self>, value: T) -> BoxFuture<Result<(), E>>;
    fn defer(
        self: Box<Self>,
        value: T,
        handle: Option<Handle>,
        ticket: Ticket,
        options: Option<Box<Options<T>>>,
    );
}

impl<T, F, Fut, E> Cleanup<T, E> for F
where
    T: Send + 'static,
    F: FnOnce(T) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    fn call(self: Box<Self>, value: T) -> BoxFuture<Result<(), E>> {
        Box::pin((*self)(value))
    }

    fn defer(
        self: Box<Self>,
        value: T,
        handle: Option<Handle>,
        ticket: Ticket,
        options: Option<Box<Options<T>>>,
    ) {
        let (resource, reaper, fallback) = unpack(options);
        let owner = owner::<T>(ticket, resource);
        owner.ticket.dropped_without_close(&owner.resource);
        let job = GuardJob {
            value,
            cleanup: *self,
            fallback,
        };
        reaper.spawn_job(handle, owner, job);
    }
}

/// A dropped guard's cleanup, as the reaper runs it: the value and the closure stay
/// apart until the first poll, so that a cleanup that can never run gives the value to
/// the fallback.
struct GuardJob<T, F> {
    value: T,
    cleanup: F,
    fallback: Option<Fallback<T>>,
}

impl<T, F, Fut, E> Job for GuardJob<T, F>
where
    T: Send + 'static,
    F: FnOnce(T) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    type Fut = Fut;

    fn start(self) -> Fut {
        (self.cleanup)(self.value)
    }

    fn errors(
        output: Result<(), E>,
        label: &'static str,
        site: &'static Location<'static>,
    ) -> CleanupErrors {
        let mut errors = CleanupErrors::default();
        if let Err(e) = output {
            errors.push(CleanupError::failed(label, site, e.into()));
        }
        errors
    }

    fn lost(self) {
        if let Some(fallback) = self.fallback {
            fallback(self.value);
        }
    }
}

impl<T: Send + 'static> AsyncGuard<T> {
    /// Options beyond the cleanup: the ledger kind, a description of the resource for
    /// events, the reaper, the runtime, and a synchronous fallback. Guards built on
    /// `AsyncGuard` (an async socket, a child process) use it to report under their own
    /// kind.
    ///
    /// ```
    /// use custodian::ledger::Kind;
    /// use custodian::rt::AsyncGuard;
    ///
    /// static SESSION: Kind = Kind::new("myapp::Session");
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let session = AsyncGuard::builder()
    ///     .kind(&SESSION)
    ///     .resource("session 7 with 10.0.0.2:443")
    ///     .fallback(|id: u32| eprintln!("session {id}: no runtime left, logged out locally"))
    ///     .build(7u32, |id| async move { Ok::<_, std::io::Error>(()) });
    /// assert_eq!(custodian::ledger::snapshot().get("myapp::Session").live(), 1);
    /// AsyncGuard::close(session).await.unwrap();
    /// # });
    /// ```
    pub fn builder() -> AsyncGuardBuilder<T> {
        AsyncGuardBuilder {
            kind: &KIND,
            acquired: None,
            resource: None,
            reaper: ReaperRef::Global,
            handle: None,
            fallback: None,
        }
    }
}

impl<T: Send + 'static, E: Into<BoxError> + 'static> AsyncGuard<T, E> {
    /// Guards `value` with an async `cleanup`, run by [`close`](AsyncGuard::close) or,
    /// if the guard is dropped, by the process-wide [`Reaper::global`].
    ///
    /// The cleanup's future must be `Send + 'static` (it may run in another task). Its
    /// error type `E` is the guard's: [`close`](AsyncGuard::close) returns it as it is,
    /// and it must convert into [`BoxError`] only for the report of a dropped guard's
    /// cleanup. (`AsyncGuard<T>` alone names `AsyncGuard<T, BoxError>`: a field that
    /// holds a guard with an `io::Error` cleanup is an `AsyncGuard<T, io::Error>`.)
    ///
    /// ```
    /// use custodian::rt::AsyncGuard;
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let lock = AsyncGuard::new("job-42", |name| async move {
    ///     println!("unlocking {name}");
    ///     Ok::<_, std::io::Error>(())
    /// });
    /// assert_eq!(*lock, "job-42");
    /// AsyncGuard::close(lock).await.unwrap();
    /// # });
    /// ```
    #[track_caller]
    #[must_use = "dropping an AsyncGuard at once hands its cleanup to the reaper right away"]
    pub fn new<F, Fut>(value: T, cleanup: F) -> AsyncGuard<T, E>
    where
        F: FnOnce(T) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
    {
        AsyncGuard::make(
            Ticket::new(&KIND),
            value,
            Box::new(cleanup),
            Handle::try_current().ok(),
            None,
        )
    }

    fn make(
        ticket: Ticket,
        value: T,
        cleanup: Box<dyn Cleanup<T, E>>,
        handle: Option<Handle>,
        options: Option<Box<Options<T>>>,
    ) -> AsyncGuard<T, E> {
        AsyncGuard {
            parts: Some(Parts {
                value,
                ticket,
                handle,
                rest: SyncWrapper::new(Rest { cleanup, options }),
            }),
        }
    }

    /// Like [`new`](AsyncGuard::new), with the dropped guard's cleanup handed to
    /// `reaper` instead of the global one.
    ///
    /// ```
    /// use custodian::rt::{AsyncGuard, Reaper};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let reaper = Reaper::new();
    /// drop(AsyncGuard::with_reaper(&reaper, (), |()| async { Ok::<_, std::io::Error>(()) }));
    /// assert_eq!(reaper.shutdown(std::time::Duration::from_secs(5)).await.completed(), 1);
    /// # });
    /// ```
    #[track_caller]
    #[must_use = "dropping an AsyncGuard at once hands its cleanup to the reaper right away"]
    pub fn with_reaper<F, Fut>(reaper: &Reaper, value: T, cleanup: F) -> AsyncGuard<T, E>
    where
        F: FnOnce(T) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
    {
        AsyncGuard::builder().reaper(reaper).build(value, cleanup)
    }

    /// Runs the cleanup now and returns its error. This is the normal way to end a
    /// guard.
    ///
    /// An associated function, not a method (`AsyncGuard::close(guard)`), so that it
    /// does not hide a `close` method of `T` (a websocket's, a pool's) reached through
    /// `Deref`.
    ///
    /// # Errors
    /// The cleanup's own error, of its own type `E` (an `io::Error` keeps its `kind()`;
    /// nothing to downcast).
    ///
    /// # Panics
    /// A panic in the cleanup goes on to the caller (it is not handed to the reaper).
    ///
    /// # Cancel safety
    /// Cancel-safe in the sense that matters: if this future is dropped before it
    /// finishes (a `select!`, a `timeout`, an aborted task), the rest of the cleanup is
    /// handed to the reaper and runs to completion there; it is never lost and never
    /// runs twice. Its error is then reported like that of a dropped guard.
    ///
    /// ```
    /// use custodian::rt::AsyncGuard;
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let guard = AsyncGuard::new((), |()| async {
    ///     Err::<(), _>(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "unlock refused"))
    /// });
    /// let err: std::io::Error = AsyncGuard::close(guard).await.unwrap_err();
    /// assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    /// # });
    /// ```
    pub async fn close(mut guard: AsyncGuard<T, E>) -> Result<(), E> {
        let Some(Parts {
            value,
            ticket,
            handle,
            rest,
        }) = guard.parts.take()
        else {
            return Ok(());
        };
        let Rest { cleanup, options } = rest.into_inner();
        // The fallback goes: once the cleanup has the value, it is of no use.
        let (resource, reaper, _) = unpack(options);
        let mut closing = Closing {
            left: Some(Left {
                fut: cleanup.call(value),
                owner: owner::<T>(ticket, resource),
                handle,
                reaper,
            }),
            polling: false,
        };
        poll_fn(|cx| closing.poll(cx)).await
    }

    /// Takes the value out without running the cleanup.
    ///
    /// An associated function, not a method, so that it cannot clash with a method of
    /// `T` reached through `Deref`.
    ///
    /// ```
    /// use custodian::rt::AsyncGuard;
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let guard = AsyncGuard::new(5, |_| async { panic!("never runs"); Ok::<_, std::io::Error>(()) });
    /// assert_eq!(AsyncGuard::into_inner(guard), 5);
    /// # });
    /// ```
    pub fn into_inner(mut guard: AsyncGuard<T, E>) -> T {
        match guard.parts.take() {
            Some(parts) => parts.value,
            // `parts` is `Some` for the whole life of a guard the caller can hold.
            None => unreachable!("AsyncGuard used after it was consumed"),
        }
    }
}

/// A `close` under way. If it is dropped before the cleanup finished (a `select!`, a
/// `timeout`, an aborted task), the rest of the cleanup goes to the reaper.
struct Closing<E: Into<BoxError> + 'static> {
    /// `Some` until the cleanup finished.
    left: Option<Left<E>>,
    /// Set while the cleanup is polled: a `Closing` dropped then is unwinding from a
    /// panic in the cleanup, which is never polled again nor handed on.
    polling: bool,
}

/// What a started cleanup needs to go on in the reaper.
struct Left<E> {
    fut: BoxFuture<Result<(), E>>,
    owner: Owner,
    handle: Option<Handle>,
    reaper: ReaperRef,
}

impl<E: Into<BoxError> + 'static> Closing<E> {
    #[inline]
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        let Some(left) = &mut self.left else {
            return Poll::Ready(Ok(()));
        };
        self.polling = true;
        let poll = left.fut.as_mut().poll(cx);
        self.polling = false;
        if poll.is_ready() {
            self.left = None;
        }
        poll
    }
}

impl<E: Into<BoxError> + 'static> Drop for Closing<E> {
    fn drop(&mut self) {
        if self.polling {
            // The cleanup panicked: the panic goes on to the caller of `close`, and the
            // ledger counts a failure rather than a clean release.
            if let Some(left) = &self.left {
                left.owner.ticket.count_failure();
            }
            return;
        }
        if let Some(left) = self.left.take() {
            left.hand_off();
        }
    }
}

impl<E: Into<BoxError> + 'static> Left<E> {
    #[cold]
    fn hand_off(self) {
        let Left {
            fut,
            owner,
            handle,
            reaper,
        } = self;
        owner.ticket.dropped_without_close(&owner.resource);
        reaper.spawn_job(handle, owner, FutureJob(fut));
    }
}

impl<T: Send + 'static, E: 'static> Drop for AsyncGuard<T, E> {
    fn drop(&mut self) {
        if let Some(parts) = self.parts.take() {
            parts.defer();
        }
    }
}

impl<T: Send + 'static, E: 'static> AsyncGuard<T, E> {
    fn parts(&self) -> &Parts<T, E> {
        match &self.parts {
            Some(p) => p,
            None => unreachable!("AsyncGuard used after it was consumed"),
        }
    }
}

impl<T: Send + 'static, E: 'static> Parts<T, E> {
    fn defer(self) {
        let Parts {
            value,
            ticket,
            handle,
            rest,
        } = self;
        let Rest { cleanup, options } = rest.into_inner();
        cleanup.defer(value, handle, ticket, options);
    }
}

impl<T: Send + 'static, E: 'static> Deref for AsyncGuard<T, E> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.parts().value
    }
}

impl<T: Send + 'static, E: 'static> DerefMut for AsyncGuard<T, E> {
    fn deref_mut(&mut self) -> &mut T {
        match &mut self.parts {
            Some(p) => &mut p.value,
            None => unreachable!("AsyncGuard used after it was consumed"),
        }
    }
}

/// Closing the guard runs its cleanup ([`AsyncGuard::close`]).
impl<T: Send + 'static, E: Into<BoxError> + 'static> AsyncClose for AsyncGuard<T, E> {
    type Error = E;

    fn close(self) -> impl Future<Output = Result<(), E>> + Send {
        AsyncGuard::close(self)
    }
}

impl<T: Send + 'static + fmt::Debug, E: 'static> fmt::Debug for AsyncGuard<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts = self.parts();
        f.debug_struct("AsyncGuard")
            .field("value", &parts.value)
            .field("kind", &parts.ticket.kind())
            .field("site", &format_args!("{}", parts.ticket.site()))
            .finish()
    }
}

/// Builds an [`AsyncGuard`] with options; made by [`AsyncGuard::builder`]: the ledger
/// kind and the resource named in events, the reaper or runtime handle the dropped guard's
/// cleanup goes to, and a fallback for when no runtime is left.
///
/// ```
/// use custodian::ledger::Kind;
/// use custodian::rt::{AsyncGuard, Reaper};
///
/// static SESSION: Kind = Kind::new("myapp::Session");
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let reaper = Reaper::new();
/// let session = AsyncGuard::builder()
///     .kind(&SESSION)
///     .resource("session 42 on db-1")
///     .reaper(&reaper)
///     .fallback(|id: u32| eprintln!("session {id}: no runtime left, logged out locally"))
///     .build(42u32, |id| async move { Ok::<_, std::io::Error>(()) /* log out `id` */ });
/// drop(session); // the log-out runs on `reaper`
/// assert_eq!(reaper.shutdown(std::time::Duration::from_secs(5)).await.completed(), 1);
/// # });
/// ```
#[must_use = "a builder does nothing until `build`"]
pub struct AsyncGuardBuilder<T> {
    kind: &'static Kind,
    /// The ticket and runtime of a resource acquired before its guard is built.
    acquired: Option<(Ticket, Option<Handle>)>,
    resource: Option<Cow<'static, str>>,
    reaper: ReaperRef,
    handle: Option<Handle>,
    fallback: Option<Fallback<T>>,
}

impl<T: Send + 'static> AsyncGuardBuilder<T> {
    /// The ledger kind the guard is counted under (default `custodian::rt::AsyncGuard`).
    ///
    /// ```
    /// static CONN: custodian::ledger::Kind = custodian::ledger::Kind::new("myapp::Conn");
    /// let builder = custodian::rt::AsyncGuard::<u8>::builder().kind(&CONN);
    /// # drop(builder);
    /// ```
    pub fn kind(mut self, kind: &'static Kind) -> Self {
        self.kind = kind;
        self
    }

    /// What the events name as the resource: a path, an address, a pid (default: the
    /// type name of `T`).
    ///
    /// ```
    /// let builder = custodian::rt::AsyncGuard::<u8>::builder().resource(format!("pid {}", 42));
    /// # drop(builder);
    /// ```
    pub fn resource(mut self, resource: impl Into<Cow<'static, str>>) -> Self {
        self.resource = Some(resource.into());
        self
    }

    /// The reaper that runs the cleanup if the guard is dropped (default:
    /// [`Reaper::global`]).
    ///
    /// ```
    /// let reaper = custodian::rt::Reaper::new();
    /// let builder = custodian::rt::AsyncGuard::<u8>::builder().reaper(&reaper);
    /// # drop(builder);
    /// ```
    pub fn reaper(mut self, reaper: &Reaper) -> Self {
        self.reaper = ReaperRef::Owned(reaper.clone());
        self
    }

    /// For a resource counted in the ledger before its guard is built (a guard built only
    /// when the resource is dropped or closed, so that the hand-off's allocations are
    /// not paid by every acquisition): the `ticket` taken at acquisition, which keeps its
    /// kind and site, and the runtime current then (`None`: none was), used as they are.
    #[cfg(feature = "postgres")]
    pub(crate) fn acquired(mut self, ticket: Ticket, handle: Option<Handle>) -> Self {
        self.acquired = Some((ticket, handle));
        self
    }

    /// The runtime the cleanup runs on if the guard is dropped (default: the runtime
    /// current at `build`, else the reaper's).
    ///
    /// ```
    /// let rt = tokio::runtime::Runtime::new()?;
    /// let builder = custodian::rt::AsyncGuard::<u8>::builder().handle(rt.handle().clone());
    /// # drop(builder);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn handle(mut self, handle: Handle) -> Self {
        self.handle = Some(handle);
        self
    }

    /// A synchronous cleanup run with the value when the async one cannot run at all
    /// (no runtime, the runtime shut down before it started, the reaper already shut
    /// down). It runs in `Drop` or in the runtime's shutdown, so keep it short and
    /// non-blocking. The loss is reported either way.
    ///
    /// ```
    /// use custodian::rt::AsyncGuard;
    /// use std::sync::atomic::{AtomicBool, Ordering};
    ///
    /// static FELL_BACK: AtomicBool = AtomicBool::new(false);
    /// // No runtime here: the async cleanup cannot run, the fallback does.
    /// let guard = AsyncGuard::builder()
    ///     .fallback(|_: u8| FELL_BACK.store(true, Ordering::SeqCst))
    ///     .build(1u8, |_| async { Ok::<_, std::io::Error>(()) });
    /// drop(guard);
    /// assert!(FELL_BACK.load(Ordering::SeqCst));
    /// ```
    pub fn fallback(mut self, fallback: impl FnOnce(T) + Send + 'static) -> Self {
        self.fallback = Some(Box::new(fallback));
        self
    }

    /// Creates the guard; the caller's location is recorded in the ledger.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let guard = custodian::rt::AsyncGuard::builder()
    ///     .build(String::from("x"), |s| async move { Ok::<_, std::io::Error>(()) });
    /// custodian::rt::AsyncGuard::close(guard).await.unwrap();
    /// # });
    /// ```
    #[track_caller]
    #[must_use = "dropping an AsyncGuard at once hands its cleanup to the reaper right away"]
    pub fn build<F, Fut, E>(self, value: T, cleanup: F) -> AsyncGuard<T, E>
    where
        F: FnOnce(T) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let (ticket, handle) = match self.acquired {
            Some(acquired) => acquired,
            None => (
                Ticket::new(self.kind),
                self.handle.or_else(|| Handle::try_current().ok()),
            ),
        };
        let options = match (self.resource, self.reaper, self.fallback) {
            (None, ReaperRef::Global, None) => None,
            (resource, reaper, fallback) => Some(Box::new(Options {
                resource,
                reaper,
                fallback,
            })),
        };
        AsyncGuard::make(ticket, value, Box::new(cleanup), handle, options)
    }
}

impl<T> fmt::Debug for AsyncGuardBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncGuardBuilder")
            .field("kind", &self.kind.name())
            .field("resource", &self.resource)
            .field("has_fallback", &self.fallback.is_some())
            .finish()
    }
}
