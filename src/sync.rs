//! Lock hold-time watch: a warning, with the acquisition site, when a lock guard is
//! held longer than it should be.
//!
//! A lock held across a slow call (I/O, an `.await`, a big clone) stalls every other
//! thread that wants it, and nothing points at the culprit. [`HoldWatch`] wraps any
//! lock guard — `MutexGuard`, `RwLock` read and write guards, tokio's guards,
//! `custodian::fs::LockFile` — and, when it is released after more than a limit, emits
//! a `warn` event under target `custodian` with the lock's kind, the site that took it
//! and the hold time, and records the longest hold per site ([`slow_holds`]). Under the
//! limit it costs two clock reads and the ledger ticket.
//!
//! # Clock
//! A hold is timed with `Instant` (a vDSO `clock_gettime`, 20–60 ns a pair) only when
//! the limit is short. For a limit of at least [`coarse_limit`] (ten ticks of the
//! kernel's coarse monotonic clock: 40 ms with `HZ=250`), it is timed with
//! `CLOCK_MONOTONIC_COARSE`, a few nanoseconds a pair, whose error (one tick) is then
//! at most a tenth of the limit. Off Linux, `Instant` always.
//!
//! ```
//! use custodian::sync::HoldWatch;
//! use std::sync::Mutex;
//! use std::time::Duration;
//!
//! let counter = Mutex::new(0);
//! let mut n = HoldWatch::new(counter.lock().unwrap(), Duration::from_millis(50));
//! *n += 1; // reached through Deref/DerefMut
//! drop(n); // held for microseconds: no event
//! assert_eq!(*counter.lock().unwrap(), 1);
//! ```

use std::any::type_name;
use std::collections::HashMap;
use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::panic::Location;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::Close;
use crate::ledger::events::shielded;
use crate::ledger::{Kind, Ticket};

static KIND: Kind = Kind::new("custodian::sync::HoldWatch");

/// A lock guard `G` with a stopwatch: released after more than its limit, it emits a
/// `warn` event (target `custodian`, fields `kind`, `site`, `held_ms`, `limit_ms`) and
/// updates the longest hold recorded for its site ([`slow_holds`]).
///
/// The lock is released before the event is emitted, so reporting never lengthens the
/// hold. The guard is reached through `Deref`/`DerefMut`.
///
/// ```
/// use custodian::sync::HoldWatch;
/// use std::sync::RwLock;
/// use std::time::Duration;
///
/// let config = RwLock::new(String::from("v1"));
/// let read = HoldWatch::new(config.read().unwrap(), Duration::from_millis(10));
/// assert_eq!(read.as_str(), "v1");
/// let held = HoldWatch::close(read); // the hold time, and the lock released
/// assert!(held < Duration::from_secs(10));
/// ```
#[must_use = "dropping the watch releases the lock at once"]
pub struct HoldWatch<G> {
    guard: ManuallyDrop<G>,
    since: Start,
    limit: Duration,
    kind: &'static str,
    ticket: Ticket,
}

impl<G> HoldWatch<G> {
    /// Watches `guard`, just acquired, against `limit`. The kind reported is `G`'s type
    /// name.
    ///
    /// ```
    /// use std::time::Duration;
    /// let m = std::sync::Mutex::new(());
    /// let _held = custodian::sync::HoldWatch::new(m.lock().unwrap(), Duration::from_millis(5));
    /// ```
    #[track_caller]
    #[inline]
    #[must_use = "dropping the watch releases the lock at once"]
    pub fn new(guard: G, limit: Duration) -> HoldWatch<G> {
        HoldWatch::named(guard, type_name::<G>(), limit)
    }

    /// Watches `guard` against `limit`, reporting it as `kind` (say, which lock).
    ///
    /// ```
    /// use std::time::Duration;
    /// let sessions = std::sync::Mutex::new(Vec::<u32>::new());
    /// let held = custodian::sync::HoldWatch::named(sessions.lock().unwrap(), "sessions", Duration::from_millis(5));
    /// assert_eq!(custodian::sync::HoldWatch::kind(&held), "sessions");
    /// ```
    #[track_caller]
    #[inline]
    #[must_use = "dropping the watch releases the lock at once"]
    pub fn named(guard: G, kind: &'static str, limit: Duration) -> HoldWatch<G> {
        HoldWatch {
            ticket: Ticket::new(&KIND),
            guard: ManuallyDrop::new(guard),
            since: Start::now(limit),
            limit,
            kind,
        }
    }

    /// The kind reported in events.
    ///
    /// ```
    /// let m = std::sync::Mutex::new(());
    /// let held = custodian::sync::HoldWatch::new(m.lock().unwrap(), std::time::Duration::MAX);
    /// assert!(custodian::sync::HoldWatch::kind(&held).contains("MutexGuard"));
    /// ```
    pub fn kind(watch: &HoldWatch<G>) -> &'static str {
        watch.kind
    }

    /// Where the lock was taken.
    ///
    /// ```
    /// let m = std::sync::Mutex::new(());
    /// let held = custodian::sync::HoldWatch::new(m.lock().unwrap(), std::time::Duration::MAX);
    /// assert_eq!(custodian::sync::HoldWatch::site(&held).line(), line!() - 1);
    /// ```
    pub fn site(watch: &HoldWatch<G>) -> &'static Location<'static> {
        watch.ticket.site()
    }

    /// How long the lock has been held so far.
    ///
    /// ```
    /// let m = std::sync::Mutex::new(());
    /// let held = custodian::sync::HoldWatch::new(m.lock().unwrap(), std::time::Duration::MAX);
    /// assert!(custodian::sync::HoldWatch::elapsed(&held) < std::time::Duration::from_secs(60));
    /// ```
    pub fn elapsed(watch: &HoldWatch<G>) -> Duration {
        watch.since.elapsed()
    }

    /// Releases the lock and returns how long it was held (warning as on drop when it
    /// passed the limit).
    ///
    /// ```
    /// let m = std::sync::Mutex::new(());
    /// let held = custodian::sync::HoldWatch::new(m.lock().unwrap(), std::time::Duration::MAX);
    /// let _took = custodian::sync::HoldWatch::close(held);
    /// assert!(m.try_lock().is_ok());
    /// ```
    pub fn close(watch: HoldWatch<G>) -> Duration {
        let mut watch = ManuallyDrop::new(watch);
        let site = watch.ticket.site();
        // SAFETY: `watch` is never dropped, and its ticket is not used again after this
        // read, so the ticket is moved out exactly once. Moved out before the guard is
        // released, so that a guard whose `Drop` panics still releases the ticket (as
        // the drop glue does for `Drop`), instead of leaving a false leak in the ledger.
        let ticket = unsafe { std::ptr::read(&watch.ticket) };
        let held = watch.release(site);
        drop(ticket);
        held
    }

    /// Stops watching: returns the guard, still held; no event is emitted.
    ///
    /// ```
    /// let m = std::sync::Mutex::new(1);
    /// let held = custodian::sync::HoldWatch::new(m.lock().unwrap(), std::time::Duration::ZERO);
    /// let guard = custodian::sync::HoldWatch::into_inner(held);
    /// assert_eq!(*guard, 1);
    /// ```
    pub fn into_inner(watch: HoldWatch<G>) -> G {
        let mut watch = ManuallyDrop::new(watch);
        // SAFETY: `watch` is never used or dropped again, so the guard and the ticket
        // are moved out exactly once; the other fields are `Copy`.
        unsafe {
            drop(std::ptr::read(&watch.ticket));
            ManuallyDrop::take(&mut watch.guard)
        }
    }

    /// Drops the guard (releasing the lock), then reports a slow hold. Called once.
    #[inline]
    fn release(&mut self, site: &'static Location<'static>) -> Duration {
        let held = self.since.elapsed();
        // SAFETY: called exactly once, from `drop` or `close`, after which the guard is
        // never touched again.
        unsafe { ManuallyDrop::drop(&mut self.guard) };
        if held > self.limit {
            report(self.kind, site, held, self.limit);
        }
        held
    }
}

impl<G: Deref> Deref for HoldWatch<G> {
    type Target = G::Target;

    #[inline]
    fn deref(&self) -> &G::Target {
        &self.guard
    }
}

impl<G: DerefMut> DerefMut for HoldWatch<G> {
    #[inline]
    fn deref_mut(&mut self) -> &mut G::Target {
        &mut self.guard
    }
}

impl<G> Drop for HoldWatch<G> {
    #[inline]
    fn drop(&mut self) {
        self.release(self.ticket.site());
    }
}

/// Closing a watch releases the lock; it cannot fail (a slow hold is an event, not an
/// error).
impl<G> Close for HoldWatch<G> {
    type Error = std::convert::Infallible;

    fn close(self) -> Result<(), std::convert::Infallible> {
        HoldWatch::close(self);
        Ok(())
    }
}

impl<G: fmt::Debug> fmt::Debug for HoldWatch<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HoldWatch")
            .field("guard", &*self.guard)
            .field("kind", &self.kind)
            .field("site", &format_args!("{}", self.ticket.site()))
            .field("held", &self.since.elapsed())
            .field("limit", &self.limit)
            .finish()
    }
}

/// When a hold started, on the clock chosen for its limit.
#[derive(Clone, Copy, Debug)]
enum Start {
    Precise(Instant),
    /// Nanoseconds on `CLOCK_MONOTONIC_COARSE`.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    Coarse(u64),
}

impl Start {
    #[inline]
    fn now(limit: Duration) -> Start {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if limit >= coarse_limit() {
            return Start::Coarse(coarse_now());
        }
        let _ = limit;
        Start::Precise(Instant::now())
    }

    #[inline]
    fn elapsed(&self) -> Duration {
        match *self {
            Start::Precise(since) => since.elapsed(),
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Start::Coarse(since) => Duration::from_nanos(coarse_now().saturating_sub(since)),
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
use crate::ledger::clock::coarse_now;

/// The shortest limit timed with the cheap coarse clock: ten of its ticks, so that its
/// error stays under a tenth of the limit. `Duration::MAX` where there is no coarse
/// clock (the precise clock is then always used).
///
/// ```
/// let limit = custodian::sync::coarse_limit();
/// assert!(limit > std::time::Duration::ZERO);
/// ```
pub fn coarse_limit() -> Duration {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use std::sync::atomic::{AtomicU64, Ordering};
        /// In nanoseconds; 0 until measured.
        static LIMIT: AtomicU64 = AtomicU64::new(0);
        let mut nanos = LIMIT.load(Ordering::Relaxed);
        if nanos == 0 {
            let res = rustix::time::clock_getres(rustix::time::ClockId::MonotonicCoarse);
            let tick = (res.tv_sec as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(res.tv_nsec as u64);
            nanos = if tick == 0 {
                u64::MAX
            } else {
                tick.saturating_mul(10)
            };
            LIMIT.store(nanos, Ordering::Relaxed);
        }
        if nanos == u64::MAX {
            Duration::MAX
        } else {
            Duration::from_nanos(nanos)
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        Duration::MAX
    }
}

/// The slow holds recorded at one site.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlowHold {
    /// Where the lock was taken.
    pub site: &'static Location<'static>,
    /// The kind of the lock (its guard's type name, or the name given to
    /// [`HoldWatch::named`]).
    pub kind: &'static str,
    /// How many holds there passed their limit.
    pub count: u64,
    /// The longest of them.
    pub longest: Duration,
}

impl fmt::Display for SlowHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} taken at {}: {} slow hold(s), longest {:.3?}",
            self.kind, self.site, self.count, self.longest
        )
    }
}

type SiteKey = (&'static str, u32, u32, &'static str);

static SLOW: Mutex<Option<HashMap<SiteKey, SlowHold>>> = Mutex::new(None);

#[cold]
#[inline(never)]
fn report(kind: &'static str, site: &'static Location<'static>, held: Duration, limit: Duration) {
    let (held_ms, limit_ms) = (held.as_secs_f64() * 1e3, limit.as_secs_f64() * 1e3);
    // Shielded: a subscriber that panics (say, at thread exit) must not abort the process.
    shielded(
        || {
            tracing::warn!(
                target: "custodian",
                kind,
                site = %site,
                held_ms,
                limit_ms,
                "lock held longer than its limit"
            )
        },
        format_args!(
            "lock held longer than its limit kind={kind} site={site} held_ms={held_ms} limit_ms={limit_ms}"
        ),
    );
    let mut slow = SLOW.lock().unwrap_or_else(PoisonError::into_inner);
    let entry = slow
        .get_or_insert_with(HashMap::new)
        .entry((site.file(), site.line(), site.column(), kind))
        .or_insert(SlowHold {
            site,
            kind,
            count: 0,
            longest: Duration::ZERO,
        });
    entry.count += 1;
    entry.longest = entry.longest.max(held);
}

/// Every site whose lock was held past its limit, with the count and the longest hold,
/// longest first.
///
/// ```
/// use custodian::sync::{HoldWatch, slow_holds};
/// use std::time::Duration;
///
/// let m = std::sync::Mutex::new(());
/// let held = HoldWatch::named(m.lock().unwrap(), "doc-example lock", Duration::ZERO);
/// std::thread::sleep(Duration::from_millis(1));
/// drop(held);
/// let mine = slow_holds().into_iter().find(|h| h.kind == "doc-example lock").unwrap();
/// assert!(mine.longest >= Duration::from_millis(1));
/// ```
pub fn slow_holds() -> Vec<SlowHold> {
    let slow = SLOW.lock().unwrap_or_else(PoisonError::into_inner);
    let mut all: Vec<SlowHold> = slow
        .as_ref()
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    all.sort_by_key(|h| std::cmp::Reverse(h.longest));
    all
}
