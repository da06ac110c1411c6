//! The `Reaper`: owns the async cleanups of dropped guards, runs them on the runtime and
//! drains them at shutdown.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::future::{Future, poll_fn};
use std::panic::{AssertUnwindSafe, Location, catch_unwind};
use std::pin::pin;
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tally::{Counts, Tally};
use crate::error::{BoxError, CleanupError, CleanupErrors};
use crate::ledger::{Kind, Ticket};

static DEFER: Kind = Kind::new("custodian::rt::Reaper::defer");

/// How long [`Reaper::shutdown`] waits, after the deadline, for aborted cleanups to
/// notice (they are dropped at their next poll; one that blocks its thread cannot be).
const ABORT_GRACE: Duration = Duration::from_millis(100);

/// Owns deferred async cleanups: the cleanups of guards dropped without `close` (an
/// early return, `?`, a panic, a cancelled future) run on the runtime as tasks tracked
/// here, and [`shutdown`](Reaper::shutdown) waits for them, with a deadline, and
/// reports how each one ended.
///
/// Guards use the process-wide [`Reaper::global`] unless given another one. A reaper is
/// a cheap handle: clones share the same cleanups.
///
/// Built on tokio-util's `TaskTracker` (which cleanups are still running) and
/// `CancellationToken` (abort at the deadline).
///
/// ```
/// use custodian::rt::{AsyncGuard, Reaper};
/// use std::time::Duration;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let reaper = Reaper::new();
/// let conn = AsyncGuard::with_reaper(&reaper, "conn-1", |name| async move {
///     tokio::time::sleep(Duration::from_millis(10)).await; // say goodbye
///     Ok::<_, std::io::Error>(())
/// });
/// drop(conn); // not closed: the reaper runs the cleanup
/// let report = reaper.shutdown(Duration::from_secs(5)).await;
/// assert_eq!(report.completed(), 1);
/// assert!(report.is_clean());
/// # });
/// ```
#[derive(Clone)]
pub struct Reaper {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    tracker: TaskTracker,
    abort: CancellationToken,
    tally: Tally,
    handle: Option<Handle>,
}

impl Reaper {
    /// A new reaper. Inside a tokio runtime it remembers that runtime, and runs there the
    /// cleanups of guards created where no runtime was current.
    ///
    /// ```
    /// let reaper = custodian::rt::Reaper::new(); // no runtime: guards bring their own
    /// assert!(reaper.handle().is_none());
    /// ```
    #[must_use = "a Reaper that is never shut down drains nothing"]
    pub fn new() -> Reaper {
        Reaper::build(Handle::try_current().ok())
    }

    /// A new reaper that runs, on `handle`'s runtime, the cleanups of guards created
    /// where no runtime was current.
    ///
    /// ```
    /// let rt = tokio::runtime::Runtime::new()?;
    /// let reaper = custodian::rt::Reaper::with_handle(rt.handle().clone());
    /// assert!(reaper.handle().is_some());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[must_use = "a Reaper that is never shut down drains nothing"]
    pub fn with_handle(handle: Handle) -> Reaper {
        Reaper::build(Some(handle))
    }

    fn build(handle: Option<Handle>) -> Reaper {
        Reaper {
            inner: Arc::new(Inner {
                tracker: TaskTracker::new(),
                abort: CancellationToken::new(),
                tally: Tally::new(),
                handle,
            }),
        }
    }

    /// The process-wide reaper that guards use unless told otherwise. It has no runtime
    /// of its own: each cleanup runs on the runtime its guard was created in.
    ///
    /// Drain it at the end of `main`, after the work that creates guards has stopped:
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// #[tokio::main]
    /// async fn main() {
    ///     // ... serve ...
    ///     let report = custodian::rt::Reaper::global().shutdown(Duration::from_secs(10)).await;
    ///     if !report.is_clean() {
    ///         eprintln!("{report}");
    ///     }
    /// }
    /// ```
    pub fn global() -> &'static Reaper {
        static GLOBAL: OnceLock<Reaper> = OnceLock::new();
        GLOBAL.get_or_init(|| Reaper::build(None))
    }

    /// The runtime this reaper falls back on, if any.
    pub fn handle(&self) -> Option<&Handle> {
        self.inner.handle.as_ref()
    }

    /// How many deferred cleanups are running or waiting to run.
    ///
    /// ```
    /// assert_eq!(custodian::rt::Reaper::new().pending(), 0);
    /// ```
    pub fn pending(&self) -> usize {
        self.inner.tracker.len()
    }

    /// `true` once [`shutdown`](Reaper::shutdown) has finished: cleanups deferred from
    /// now on are reported as lost instead of run.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let reaper = custodian::rt::Reaper::new();
    /// assert!(!reaper.is_shut_down());
    /// reaper.shutdown(std::time::Duration::from_secs(1)).await;
    /// assert!(reaper.is_shut_down());
    /// # });
    /// ```
    pub fn is_shut_down(&self) -> bool {
        self.inner.tally.is_sealed()
    }

    /// Hands a cleanup future to the reaper: it runs as a task on the current runtime
    /// (or the reaper's), is waited for by [`shutdown`](Reaper::shutdown), and its error
    /// is reported (tracing `error` event, ledger failure, [`DrainReport::failures`]).
    ///
    /// Use it for one-off async cleanup with no value to guard; [`AsyncGuard`] is the
    /// usual way.
    ///
    /// With no runtime, or after the reaper shut down, the future is dropped unpolled and
    /// reported as lost (`error` event and ledger failure); it never panics.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let reaper = custodian::rt::Reaper::new();
    /// reaper.defer(async { Err::<(), _>(std::io::Error::other("unlock failed")) });
    /// let report = reaper.shutdown(Duration::from_secs(5)).await;
    /// assert_eq!(report.failed(), 1);
    /// assert_eq!(report.failures()[0].error().unwrap().to_string(), "unlock failed");
    /// # });
    /// ```
    ///
    /// [`AsyncGuard`]: super::AsyncGuard
    #[track_caller]
    pub fn defer<F, E>(&self, cleanup: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let owner = Owner::new(Ticket::new(&DEFER), Cow::Borrowed("deferred future"));
        self.inner().spawn_job(
            Handle::try_current().ok(),
            owner,
            FutureJob(async move { cleanup.await.map_err(Into::into) }),
        );
    }

    /// Waits for every deferred cleanup to finish, at most `timeout`, then aborts those
    /// still running and reports how each ended.
    ///
    /// Cleanups deferred while it waits (by other cleanups, or by tasks still running)
    /// are accepted and counted until the deadline. Once it returns, the reaper is shut
    /// down: cleanups deferred later are not run but reported as lost, each with an
    /// `error` event and a ledger failure. A second call returns an empty report.
    ///
    /// Call it from a runtime with the time driver on (`enable_time`/`enable_all`, as
    /// `#[tokio::main]` does).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let reaper = custodian::rt::Reaper::new();
    /// reaper.defer(async {
    ///     tokio::time::sleep(Duration::from_secs(3600)).await; // stuck
    ///     Ok::<_, std::io::Error>(())
    /// });
    /// let report = reaper.shutdown(Duration::from_millis(50)).await;
    /// assert_eq!(report.aborted(), 1);
    /// assert!(report.timed_out());
    /// # });
    /// ```
    ///
    /// # Panics
    /// If the current runtime has no time driver (tokio's own panic).
    ///
    /// # Cancel safety
    /// Cancelling it (dropping the future) before it returns leaves the reaper open and
    /// its cleanups running; a later call drains them.
    pub async fn shutdown(&self, timeout: Duration) -> DrainReport {
        let start = Instant::now();
        let inner = &self.inner;
        inner.tracker.close();
        let drained = tokio::time::timeout(timeout, inner.tracker.wait())
            .await
            .is_ok();
        if !drained {
            inner.abort.cancel();
            // Aborted cleanups are dropped at their next poll; give them that poll.
            let _ = tokio::time::timeout(ABORT_GRACE, inner.tracker.wait()).await;
        }
        let counts = inner.tally.seal().unwrap_or_default();
        // Anything accepted in the last instant is aborted (it is counted as such).
        inner.abort.cancel();
        DrainReport {
            counts,
            elapsed: start.elapsed(),
            timed_out: !drained,
        }
    }

    pub(crate) fn inner(&self) -> InnerRef {
        InnerRef(Arc::clone(&self.inner))
    }
}

impl Default for Reaper {
    fn default() -> Self {
        Reaper::new()
    }
}

impl fmt::Debug for Reaper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reaper")
            .field("pending", &self.pending())
            .field("shut_down", &self.is_shut_down())
            .field("has_handle", &self.inner.handle.is_some())
            .finish()
    }
}

/// What a guard keeps to reach its reaper: nothing for the global one (no reference
/// count to bump on every guard), a shared pointer otherwise.
#[derive(Clone, Default)]
pub(crate) enum ReaperRef {
    #[default]
    Global,
    Owned(Reaper),
}

impl ReaperRef {
    pub(crate) fn get(&self) -> &Reaper {
        match self {
            ReaperRef::Global => Reaper::global(),
            ReaperRef::Owned(r) => r,
        }
    }
}

/// The reaper's shared state, as held by a running cleanup.
pub(crate) struct InnerRef(Arc<Inner>);

/// Who a deferred cleanup belongs to: its ledger ticket (kind and acquisition site) and
/// a description of the resource for events.
pub(crate) struct Owner {
    pub(crate) ticket: Ticket,
    pub(crate) resource: Cow<'static, str>,
}

impl Owner {
    pub(crate) fn new(ticket: Ticket, resource: Cow<'static, str>) -> Owner {
        Owner { ticket, resource }
    }

    /// Reports a cleanup that did not run or did not finish: `error` event + ledger
    /// failure.
    #[cold]
    pub(crate) fn report_lost(&self, why: &dyn fmt::Display) {
        self.ticket.failure(&self.resource, why);
    }
}

/// A deferred cleanup as the reaper runs it.
pub(crate) trait Job: Send + 'static {
    /// Runs the cleanup; every failure is returned (empty when it all went well).
    /// `label` and `site` name the owner, for errors that have no better name.
    fn run(
        self,
        label: &'static str,
        site: &'static Location<'static>,
    ) -> impl Future<Output = CleanupErrors> + Send;

    /// The cleanup will never run: run the synchronous fallback, if there is one.
    fn lost(self);
}

/// A job that is a single fallible future, with no fallback.
pub(crate) struct FutureJob<F>(pub(crate) F);

impl<F> Job for FutureJob<F>
where
    F: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    async fn run(self, label: &'static str, site: &'static Location<'static>) -> CleanupErrors {
        let mut errors = CleanupErrors::default();
        if let Err(e) = self.0.await {
            errors.push(CleanupError::failed(label, site, e));
        }
        errors
    }

    fn lost(self) {}
}

/// Why a deferred cleanup did not run or did not finish.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Lost {
    NoRuntime,
    ShutDown,
    RuntimeGone,
    RuntimeGoneRunning,
    Aborted,
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lost::NoRuntime => "async cleanup lost: no tokio runtime to run it on",
            Lost::ShutDown => "async cleanup lost: deferred after the reaper shut down",
            Lost::RuntimeGone => "async cleanup lost: the tokio runtime shut down before it ran",
            Lost::RuntimeGoneRunning => {
                "async cleanup interrupted: the tokio runtime shut down while it ran"
            }
            Lost::Aborted => {
                "async cleanup aborted: still running at the reaper's shutdown deadline"
            }
        })
    }
}

impl InnerRef {
    /// Runs `job` as a task tracked by the reaper, on `handle`'s runtime or else the
    /// reaper's. Never blocks and never panics: a job that cannot run is reported as lost
    /// (and its fallback run) at once.
    pub(crate) fn spawn_job<J: Job>(self, handle: Option<Handle>, owner: Owner, job: J) {
        let inner = &*self.0;
        let Some(handle) = handle.or_else(|| inner.handle.clone()) else {
            if inner.tally.accept() {
                inner.tally.lose();
            }
            return lose(owner, job, Lost::NoRuntime);
        };
        if !inner.tally.accept() {
            return lose(owner, job, Lost::ShutDown);
        }
        let tracker = inner.tracker.clone();
        let running = Running {
            reaper: self,
            owner,
            job: Some(job),
            started: false,
        };
        // If the runtime is shutting down or gone, tokio drops the task unpolled and
        // `Running::drop` reports it.
        tracker.spawn_on(running.run(), &handle);
    }
}

#[cold]
fn lose<J: Job>(owner: Owner, job: J, why: Lost) {
    owner.report_lost(&why);
    run_fallback(&owner, job);
}

/// Runs a job's fallback, turning a panic into a reported failure.
fn run_fallback<J: Job>(owner: &Owner, job: J) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(|| job.lost())) {
        let e = CleanupError::panicked(owner.ticket.kind(), owner.ticket.site(), payload);
        owner.report_lost(&format_args!("the synchronous fallback failed: {e}"));
    }
}

/// A deferred cleanup inside its task. Dropped before it finished (the runtime shut
/// down, or the reaper aborted it), it reports why.
struct Running<J: Job> {
    reaper: InnerRef,
    owner: Owner,
    /// `Some` until the task is first polled.
    job: Option<J>,
    /// `true` from the first poll until the job finished.
    started: bool,
}

impl<J: Job> Running<J> {
    async fn run(mut self) {
        let Some(job) = self.job.take() else { return };
        self.started = true;
        let (label, site) = (self.owner.ticket.kind(), self.owner.ticket.site());
        let outcome = abortable(job.run(label, site), &self.reaper.0.abort).await;
        let tally = &self.reaper.0.tally;
        match outcome {
            // Aborted at the deadline: `Drop` reports it; the sealed tally counts it.
            None => return,
            Some(Ok(errors)) if errors.is_empty() => tally.complete(),
            Some(Ok(errors)) => {
                for e in &errors {
                    self.owner.ticket.failure(&self.owner.resource, e);
                }
                tally.fail(errors);
            }
            Some(Err(payload)) => {
                let e = CleanupError::panicked(label, site, payload);
                self.owner.ticket.failure(&self.owner.resource, &e);
                let mut errors = CleanupErrors::default();
                errors.push(e);
                tally.fail(errors);
            }
        }
        self.started = false;
    }
}

impl<J: Job> Drop for Running<J> {
    fn drop(&mut self) {
        let inner = &*self.reaper.0;
        if let Some(job) = self.job.take() {
            inner.tally.lose();
            lose_in_place(&self.owner, job, Lost::RuntimeGone);
        } else if self.started {
            if inner.abort.is_cancelled() {
                self.owner.report_lost(&Lost::Aborted);
            } else {
                inner.tally.lose();
                self.owner.report_lost(&Lost::RuntimeGoneRunning);
            }
        }
    }
}

#[cold]
fn lose_in_place<J: Job>(owner: &Owner, job: J, why: Lost) {
    owner.report_lost(&why);
    run_fallback(owner, job);
}

/// Polls `fut` until it finishes (`Some`, with a panic caught as `Err`) or `abort` is
/// cancelled (`None`). Biased towards completion: the future is polled first, and the
/// token is looked at only while the future is pending (so the common case, a cleanup
/// that finishes in one poll, touches no shared lock).
async fn abortable<F: Future>(
    fut: F,
    abort: &CancellationToken,
) -> Option<Result<F::Output, Box<dyn Any + Send>>> {
    let mut fut = pin!(fut);
    let mut cancelled = pin!(None);
    poll_fn(|cx| {
        match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(out)) => return Poll::Ready(Some(Ok(out))),
            Err(payload) => return Poll::Ready(Some(Err(payload))),
            Ok(Poll::Pending) => {}
        }
        if cancelled.is_none() {
            cancelled.set(Some(abort.cancelled()));
        }
        match cancelled.as_mut().as_pin_mut().map(|c| c.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(None),
            _ => Poll::Pending,
        }
    })
    .await
}

/// What [`Reaper::shutdown`] found: how many deferred cleanups completed, failed (with
/// their errors), were aborted at the deadline, or were lost (no runtime to run them).
///
/// Counts cover the reaper's whole life, up to the shutdown. Each failure, abort and
/// loss was also reported when it happened (tracing `error` event, ledger failure).
///
/// ```
/// use std::time::Duration;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let reaper = custodian::rt::Reaper::new();
/// reaper.defer(async { Ok::<_, std::io::Error>(()) });
/// reaper.defer(async { Err::<(), _>(std::io::Error::other("peer gone")) });
/// let report = reaper.shutdown(Duration::from_secs(5)).await;
/// assert_eq!((report.completed(), report.failed(), report.aborted(), report.lost()), (1, 1, 0, 0));
/// println!("{report}");
/// # });
/// ```
#[derive(Debug)]
pub struct DrainReport {
    counts: Counts,
    elapsed: Duration,
    timed_out: bool,
}

impl DrainReport {
    /// Cleanups that ran to the end without error.
    pub fn completed(&self) -> u64 {
        self.counts.completed
    }

    /// Cleanups that ran to the end with an error, or panicked.
    pub fn failed(&self) -> u64 {
        self.counts.failed
    }

    /// Cleanups still running (or not yet started) at the deadline, dropped unfinished.
    pub fn aborted(&self) -> u64 {
        self.counts.aborted()
    }

    /// Cleanups that could not run at all: no runtime, or it shut down first.
    pub fn lost(&self) -> u64 {
        self.counts.lost
    }

    /// The errors of the failed cleanups, oldest first, each with its kind (as the
    /// label) and the site where its guard was created. At most the latest 1024 are
    /// kept (see [`failures_dropped`](DrainReport::failures_dropped)); every one was
    /// also a tracing `error` event.
    pub fn failures(&self) -> &[CleanupError] {
        &self.counts.failures
    }

    /// The kept errors, by value.
    pub fn into_failures(self) -> Vec<CleanupError> {
        self.counts.failures
    }

    /// How many errors were not kept because more than 1024 cleanups failed.
    pub fn failures_dropped(&self) -> u64 {
        self.counts.failures_dropped
    }

    /// `true` when the deadline passed before every cleanup finished.
    pub fn timed_out(&self) -> bool {
        self.timed_out
    }

    /// How long the shutdown took.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// `true` when nothing failed, was aborted or lost.
    pub fn is_clean(&self) -> bool {
        self.failed() == 0 && self.aborted() == 0 && self.lost() == 0
    }
}

impl fmt::Display for DrainReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "reaper drained in {:.3?}: {} completed, {} failed, {} aborted at the deadline, {} lost",
            self.elapsed,
            self.completed(),
            self.failed(),
            self.aborted(),
            self.lost()
        )?;
        for e in self.failures() {
            write!(f, "\n  - {e}")?;
        }
        if self.failures_dropped() > 0 {
            write!(
                f,
                "\n  ({} older failures not kept)",
                self.failures_dropped()
            )?;
        }
        Ok(())
    }
}
