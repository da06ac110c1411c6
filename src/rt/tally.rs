//! The reaper's bookkeeping: how many deferred cleanups it accepted and how each ended.
//!
//! This is the only synchronisation of custodian's own in `rt` (task tracking and abort
//! are tokio-util's `TaskTracker` and `CancellationToken`): two atomic counters and a
//! short-held lock for the rare outcomes. What it guarantees, model-checked with loom
//! below (`RUSTFLAGS="--cfg loom" cargo test --release --lib tally`, without the `tokio`
//! feature: see the note on `mod tally` in lib.rs):
//! - `accept` and `seal` are totally ordered: a cleanup is either accepted before the seal
//!   (and then counted in the sealed report, as finished or as aborted) or refused;
//! - every outcome is counted at most once, only for an accepted cleanup, so
//!   `aborted = accepted - completed - failed - lost` is never negative.

use std::collections::VecDeque;

#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(loom)]
use loom::sync::{Mutex, MutexGuard};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
use std::sync::{Mutex, MutexGuard};

use crate::error::{CleanupError, CleanupErrors};

/// How many failures a reaper keeps for its report; the oldest go first. Every failure
/// is also a tracing `error` event and a ledger count when it happens, and
/// [`failed`](Counts::failed) counts them all.
pub(crate) const KEPT_FAILURES: usize = 1024;

/// The low bit of `Tally::accepted`.
const SEALED: u64 = 1;

/// The rare outcomes, under the lock.
#[derive(Default)]
struct Rest {
    sealed: bool,
    failed: u64,
    lost: u64,
    failures: VecDeque<CleanupError>,
    failures_dropped: u64,
}

/// The numbers of a sealed tally.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) accepted: u64,
    pub(crate) completed: u64,
    pub(crate) failed: u64,
    pub(crate) lost: u64,
    pub(crate) failures: Vec<CleanupError>,
    pub(crate) failures_dropped: u64,
}

impl Counts {
    /// Accepted cleanups that had not finished when the tally was sealed.
    pub(crate) fn aborted(&self) -> u64 {
        self.accepted - self.completed - self.failed - self.lost
    }
}

/// The hot path (accept, complete) is one atomic add each; failures and losses, rare,
/// take a lock.
pub(crate) struct Tally {
    /// Twice the number of accepted cleanups, plus [`SEALED`] once sealed. Accepting and
    /// sealing are each one read-modify-write of this word, so they are totally ordered:
    /// an accept either comes before the seal (and is counted) or sees the seal.
    accepted: Padded<AtomicU64>,
    completed: Padded<AtomicU64>,
    rest: Mutex<Rest>,
}

/// Keeps a hot counter on a cache line of its own: the thread that drops guards bumps
/// `accepted`, the one that runs cleanups bumps `completed`, and neither should evict the
/// other's line, or the reaper's read-only fields next to them. 128 bytes: two lines, as
/// adjacent-line prefetchers fetch pairs (crossbeam's `CachePadded` does the same).
#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl Tally {
    pub(crate) fn new() -> Tally {
        Tally {
            accepted: Padded(AtomicU64::new(0)),
            completed: Padded(AtomicU64::new(0)),
            rest: Mutex::new(Rest::default()),
        }
    }

    /// Nothing here panics while the lock is held, but if something did, the counts
    /// would still be valid: ignore the poison rather than lose the report.
    fn rest(&self) -> MutexGuard<'_, Rest> {
        self.rest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one more deferred cleanup; `false` once the tally is sealed.
    #[inline]
    pub(crate) fn accept(&self) -> bool {
        self.accepted.fetch_add(2, Ordering::Relaxed) & SEALED == 0
    }

    /// An accepted cleanup ran to the end without error.
    #[inline]
    pub(crate) fn complete(&self) {
        self.completed.fetch_add(1, Ordering::Release);
    }

    /// An accepted cleanup ran to the end with these errors (or panicked).
    pub(crate) fn fail(&self, errors: CleanupErrors) {
        let mut rest = self.rest();
        if rest.sealed {
            return;
        }
        rest.failed += 1;
        for e in errors {
            if rest.failures.len() == KEPT_FAILURES {
                rest.failures.pop_front();
                rest.failures_dropped += 1;
            }
            rest.failures.push_back(e);
        }
    }

    /// An accepted cleanup could not run: no runtime, or the runtime shut down first.
    pub(crate) fn lose(&self) {
        let mut rest = self.rest();
        if !rest.sealed {
            rest.lost += 1;
        }
    }

    /// Stops accepting and returns the counts; `None` if it was already sealed.
    ///
    /// An outcome recorded after the seal is not counted: its cleanup is then one of the
    /// `aborted` (accepted, not finished when sealed).
    pub(crate) fn seal(&self) -> Option<Counts> {
        let accepted = self.accepted.fetch_or(SEALED, Ordering::AcqRel);
        if accepted & SEALED != 0 {
            return None;
        }
        let completed = self.completed.load(Ordering::Acquire);
        let mut rest = self.rest();
        rest.sealed = true;
        Some(Counts {
            accepted: accepted / 2,
            completed,
            failed: rest.failed,
            lost: rest.lost,
            failures: std::mem::take(&mut rest.failures).into(),
            failures_dropped: rest.failures_dropped,
        })
    }

    pub(crate) fn is_sealed(&self) -> bool {
        self.accepted.load(Ordering::Relaxed) & SEALED != 0
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn counts_and_seal() {
        let tally = Tally::new();
        for _ in 0..4 {
            assert!(tally.accept());
        }
        tally.complete();
        tally.lose();
        let mut errors = CleanupErrors::default();
        errors.push(CleanupError::failed(
            "k",
            std::panic::Location::caller(),
            "boom".into(),
        ));
        tally.fail(errors);
        let counts = tally.seal().unwrap();
        assert_eq!(
            (
                counts.accepted,
                counts.completed,
                counts.failed,
                counts.lost
            ),
            (4, 1, 1, 1)
        );
        assert_eq!(counts.aborted(), 1);
        assert_eq!(counts.failures.len(), 1);
        assert!(!tally.accept());
        assert!(tally.seal().is_none());
        assert!(tally.is_sealed());
    }

    #[test]
    fn keeps_only_the_latest_failures() {
        let tally = Tally::new();
        let n = KEPT_FAILURES + 10;
        for i in 0..n {
            assert!(tally.accept());
            let mut errors = CleanupErrors::default();
            errors.push(CleanupError::failed(
                "k",
                std::panic::Location::caller(),
                i.to_string().into(),
            ));
            tally.fail(errors);
        }
        let counts = tally.seal().unwrap();
        assert_eq!(counts.failed, n as u64);
        assert_eq!(counts.failures.len(), KEPT_FAILURES);
        assert_eq!(counts.failures_dropped, 10);
        assert_eq!(counts.failures[0].error().unwrap().to_string(), "10");
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicU64, Ordering};
    use loom::thread;

    /// Two cleanups are deferred and finish while another thread seals: each is either
    /// refused or in the report exactly once, and the numbers always add up.
    #[test]
    fn accept_and_finish_race_with_seal() {
        loom::model(|| {
            let tally = Arc::new(Tally::new());
            let accepted = Arc::new(AtomicU64::new(0));
            let workers: Vec<_> = (0..2)
                .map(|i| {
                    let tally = Arc::clone(&tally);
                    let accepted = Arc::clone(&accepted);
                    thread::spawn(move || {
                        if tally.accept() {
                            accepted.fetch_add(1, Ordering::SeqCst);
                            // One fast-path outcome (atomic), one slow-path one (lock).
                            if i == 0 {
                                tally.complete();
                            } else {
                                tally.fail(CleanupErrors::default());
                            }
                        }
                    })
                })
                .collect();
            let counts = tally.seal().expect("first seal");
            for w in workers {
                w.join().unwrap();
            }
            // Every cleanup accepted was accepted before the seal, so it is counted.
            assert_eq!(counts.accepted, accepted.load(Ordering::SeqCst));
            assert!(counts.completed + counts.failed + counts.lost <= counts.accepted);
            assert_eq!(
                counts.aborted(),
                counts.accepted - counts.completed - counts.failed - counts.lost
            );
            // After the seal, nothing more is accepted or counted.
            assert!(!tally.accept());
            assert!(tally.seal().is_none());
        });
    }

    /// Two threads race to seal: exactly one gets the report.
    #[test]
    fn one_seal_wins() {
        loom::model(|| {
            let tally = Arc::new(Tally::new());
            assert!(tally.accept());
            let other = {
                let tally = Arc::clone(&tally);
                thread::spawn(move || tally.seal().is_some())
            };
            let mine = tally.seal().is_some();
            let theirs = other.join().unwrap();
            assert!(mine ^ theirs);
        });
    }
}
