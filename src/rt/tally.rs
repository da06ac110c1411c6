//! The reaper's bookkeeping: how many deferred cleanups it accepted and how each ended.
//!
//! This is the only synchronisation of custodian's own in `rt` (task tracking and abort
//! are tokio-util's `TaskTracker` and `CancellationToken`): one short-held lock. What it
//! guarantees, model-checked with loom below (`RUSTFLAGS="--cfg loom" cargo test
//! --features tokio --lib tally`):
//! - `accept` and `seal` are totally ordered: a cleanup is either accepted before the seal
//!   (and then counted in the sealed report, as finished or as aborted) or refused;
//! - every outcome recorded before the seal is in the report, none twice, and
//!   `aborted = accepted - completed - failed - lost` is never negative.

use std::collections::VecDeque;

#[cfg(loom)]
use loom::sync::{Mutex, MutexGuard};
#[cfg(not(loom))]
use std::sync::{Mutex, MutexGuard};

use crate::error::{CleanupError, CleanupErrors};

/// How many failures a reaper keeps for its report; the oldest go first. Every failure
/// is also a tracing `error` event and a ledger count when it happens, and
/// [`failed`](Counts::failed) counts them all.
pub(crate) const KEPT_FAILURES: usize = 1024;

#[derive(Default)]
struct State {
    sealed: bool,
    accepted: u64,
    completed: u64,
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

pub(crate) struct Tally {
    state: Mutex<State>,
}

impl Tally {
    pub(crate) fn new() -> Tally {
        Tally {
            state: Mutex::new(State::default()),
        }
    }

    /// Nothing here panics while the lock is held, but if something did, the counts
    /// would still be valid: ignore the poison rather than lose the report.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one more deferred cleanup; `false` once the tally is sealed.
    pub(crate) fn accept(&self) -> bool {
        let mut state = self.lock();
        if state.sealed {
            return false;
        }
        state.accepted += 1;
        true
    }

    /// An accepted cleanup ran to the end without error.
    pub(crate) fn complete(&self) {
        let mut state = self.lock();
        if !state.sealed {
            state.completed += 1;
        }
    }

    /// An accepted cleanup ran to the end with these errors (or panicked).
    pub(crate) fn fail(&self, errors: CleanupErrors) {
        let mut state = self.lock();
        if state.sealed {
            return;
        }
        state.failed += 1;
        for e in errors {
            if state.failures.len() == KEPT_FAILURES {
                state.failures.pop_front();
                state.failures_dropped += 1;
            }
            state.failures.push_back(e);
        }
    }

    /// An accepted cleanup could not run: no runtime, or the runtime shut down first.
    pub(crate) fn lose(&self) {
        let mut state = self.lock();
        if !state.sealed {
            state.lost += 1;
        }
    }

    /// Stops accepting and returns the counts; `None` if it was already sealed.
    pub(crate) fn seal(&self) -> Option<Counts> {
        let mut state = self.lock();
        if state.sealed {
            return None;
        }
        state.sealed = true;
        Some(Counts {
            accepted: state.accepted,
            completed: state.completed,
            failed: state.failed,
            lost: state.lost,
            failures: std::mem::take(&mut state.failures).into(),
            failures_dropped: state.failures_dropped,
        })
    }

    pub(crate) fn is_sealed(&self) -> bool {
        self.lock().sealed
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
                            if i == 0 {
                                tally.complete();
                            } else {
                                tally.lose();
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
                counts.accepted - counts.completed - counts.lost
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
