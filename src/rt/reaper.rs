//! The `Reaper`: owns the async cleanups of dropped guards, runs them on the runtime and
//! drains them at shutdown.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::panic::{AssertUnwindSafe, Location, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use pin_project_lite::pin_project;
use tokio::runtime::Handle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
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
        InnerRef::Shared(Arc::clone(&self.inner)).spawn_job(
            Handle::try_current().ok(),
            owner,
            FutureJob(cleanup),
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
    /// its cleanups running (unless the deadline had already passed: those still running
    /// then were told to abort); a later call drains them.
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
    /// Runs `job` on the reaper: see [`InnerRef::spawn_job`].
    #[inline]
    pub(crate) fn spawn_job<J: Job>(self, handle: Option<Handle>, owner: Owner, job: J) {
        match self {
            ReaperRef::Global => InnerRef::Static(&Reaper::global().inner),
            ReaperRef::Owned(r) => InnerRef::Shared(r.inner),
        }
        .spawn_job(handle, owner, job);
    }

    /// The reaper's state, for one deferred cleanup.
    pub(crate) fn inner(&self) -> InnerRef {
        match self {
            ReaperRef::Global => InnerRef::Static(&Reaper::global().inner),
            ReaperRef::Owned(r) => InnerRef::Shared(Arc::clone(&r.inner)),
        }
    }
}

/// The reaper's shared state, as held by a running cleanup: the global reaper's is
/// borrowed for ever, so that its cleanups bump no shared reference count.
pub(crate) enum InnerRef {
    Static(&'static Inner),
    Shared(Arc<Inner>),
}

impl Deref for InnerRef {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        match self {
            InnerRef::Static(inner) => inner,
            InnerRef::Shared(inner) => inner,
        }
    }
}

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

    /// Reports each failure of a finished cleanup and counts it in the tally.
    #[cold]
    fn report_failed(&self, tally: &Tally, errors: CleanupErrors) {
        for e in &errors {
            self.ticket.failure(&self.resource, e);
        }
        tally.fail(errors);
    }
}

/// A deferred cleanup as the reaper runs it.
pub(crate) trait Job: Send + 'static {
    /// The cleanup, running.
    type Fut: Future + Send + 'static;

    /// Starts the cleanup (called on the runtime, at the task's first poll).
    fn start(self) -> Self::Fut;

    /// The failures in the finished cleanup's output (empty when it went well). `label`
    /// and `site` name the owner, for errors that have no better name.
    fn errors(
        output: <Self::Fut as Future>::Output,
        label: &'static str,
        site: &'static Location<'static>,
    ) -> CleanupErrors;

    /// The cleanup will never run: run the synchronous fallback, if there is one.
    fn lost(self);
}

/// A job that is a single fallible future, with no fallback.
pub(crate) struct FutureJob<F>(pub(crate) F);

impl<F, E> Job for FutureJob<F>
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    type Fut = F;

    fn start(self) -> F {
        self.0
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
    /// Runs `job` as a task tracked by the reaper, on `handle`'s runtime (the one its
    /// guard was created in), else the reaper's, else the one current here. Never blocks
    /// and never panics: a job that cannot run is reported as lost (and its fallback run)
    /// at once.
    pub(crate) fn spawn_job<J: Job>(self, handle: Option<Handle>, owner: Owner, job: J) {
        let handle = handle
            .or_else(|| self.handle.clone())
            .or_else(|| Handle::try_current().ok());
        let Some(handle) = handle else {
            if self.tally.accept() {
                self.tally.lose();
            }
            return lose(&owner, job, Lost::NoRuntime);
        };
        if !self.tally.accept() {
            return lose(&owner, job, Lost::ShutDown);
        }
        // If the runtime is shutting down or gone, tokio drops the task unpolled, and
        // the task's `Drop` reports it.
        match self {
            InnerRef::Static(inner) => {
                inner.tracker.spawn_on(Task::new(self, owner, job), &handle);
            }
            InnerRef::Shared(ref inner) => {
                let tracker = inner.tracker.clone();
                tracker.spawn_on(Task::new(self, owner, job), &handle);
            }
        }
    }
}

#[cold]
fn lose<J: Job>(owner: &Owner, job: J, why: Lost) {
    owner.report_lost(&why);
    if let Err(payload) = catch_unwind(AssertUnwindSafe(|| job.lost())) {
        let e = CleanupError::panicked(owner.ticket.kind(), owner.ticket.site(), payload);
        owner.report_lost(&format_args!("the synchronous fallback failed: {e}"));
    }
}

pin_project! {
    /// Where a deferred cleanup is. The job and its running future share the space.
    #[project = StageProj]
    #[project_replace = StageReplace]
    enum Stage<J: Job> {
        Waiting { job: J },
        Running { #[pin] fut: J::Fut },
        Finished,
    }
}

pin_project! {
    /// A deferred cleanup's task: starts the job at the first poll, runs it to the end
    /// (a panic is caught and reported), stops it when the reaper aborts, and, dropped
    /// before it finished (the runtime shut down), reports why.
    ///
    /// A hand-written future rather than an `async fn`, so that the task holds the
    /// cleanup future once, inline: the hand-off costs one allocation, as a bare spawn
    /// does.
    struct Task<J: Job> {
        reaper: InnerRef,
        owner: Owner,
        #[pin]
        stage: Stage<J>,
        // Created only if the cleanup is pending: most finish in their first poll and
        // never touch the token's lock.
        abort: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    }

    impl<J: Job> PinnedDrop for Task<J> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            match this.stage.project_replace(Stage::Finished) {
                StageReplace::Waiting { job } => {
                    this.reaper.tally.lose();
                    lose(this.owner, job, Lost::RuntimeGone);
                }
                StageReplace::Running { .. } => {
                    if this.reaper.abort.is_cancelled() {
                        this.owner.report_lost(&Lost::Aborted);
                    } else {
                        this.reaper.tally.lose();
                        this.owner.report_lost(&Lost::RuntimeGoneRunning);
                    }
                }
                StageReplace::Finished => {}
            }
        }
    }
}

impl<J: Job> Task<J> {
    fn new(reaper: InnerRef, owner: Owner, job: J) -> Task<J> {
        Task {
            reaper,
            owner,
            stage: Stage::Waiting { job },
            abort: None,
        }
    }
}

impl<J: Job> Future for Task<J> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let (label, site) = (this.owner.ticket.kind(), this.owner.ticket.site());
        if let StageProj::Waiting { .. } = this.stage.as_mut().project() {
            let StageReplace::Waiting { job } =
                this.stage.as_mut().project_replace(Stage::Finished)
            else {
                unreachable!("just matched Waiting")
            };
            // The user's closure is called here: it may panic too.
            match catch_unwind(AssertUnwindSafe(|| job.start())) {
                Ok(fut) => this.stage.set(Stage::Running { fut }),
                Err(payload) => {
                    let mut errors = CleanupErrors::default();
                    errors.push(CleanupError::panicked(label, site, payload));
                    this.owner.report_failed(&this.reaper.tally, errors);
                    return Poll::Ready(());
                }
            }
        }
        let StageProj::Running { fut } = this.stage.as_mut().project() else {
            return Poll::Ready(());
        };
        let errors = match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Ready(output)) => J::errors(output, label, site),
            Err(payload) => {
                let mut errors = CleanupErrors::default();
                errors.push(CleanupError::panicked(label, site, payload));
                errors
            }
            Ok(Poll::Pending) => {
                let abort = this
                    .abort
                    .get_or_insert_with(|| Box::pin(this.reaper.abort.clone().cancelled_owned()));
                if abort.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // Aborted at the deadline: dropped unfinished. The sealed tally counts it.
                this.stage.set(Stage::Finished);
                this.owner.report_lost(&Lost::Aborted);
                return Poll::Ready(());
            }
        };
        this.stage.set(Stage::Finished);
        if errors.is_empty() {
            this.reaper.tally.complete();
        } else {
            this.owner.report_failed(&this.reaper.tally, errors);
        }
        Poll::Ready(())
    }
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
