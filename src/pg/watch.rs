//! The liveness watch of a session: one task per session, not one per lock, that checks
//! the lock the session holds at the moment and fires its `lost()`.
//!
//! A session holds at most one lock at a time. Taking a lock only stores it in the
//! session's [`Watched`] slot (a short mutex, no task spawned, no timer registered), and
//! releasing it clears the slot: consecutive locks on one session cost no more than
//! that. The watch task ticks every check interval for the whole life of the session and
//! checks whatever lock is in the slot then; the connection task fires the lock in the
//! slot when the connection ends.
//!
//! The same ticks enforce the unlock timeout: an unlock only notes the tick it started
//! at (no timer of its own), and the watch closes the connection when an unlock has
//! waited longer than the timeout.

use std::future::Future;
use std::panic::Location;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::task::AbortHandle;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use tokio_util::sync::CancellationToken;

use super::error::{LostCause, chain, closed_cause};
use super::key::{LockKey, Resolved};
use crate::ledger::{Kind, events};

pub(crate) static KIND: Kind = Kind::new("custodian::pg::PgLock");

/// What a session shares with its connection task and its watch task.
#[derive(Default)]
pub(crate) struct Watched {
    /// The lock the session holds now, if any.
    current: Mutex<Option<Arc<LockState>>>,
    /// Why the connection ended, set once by the connection task.
    pub(crate) closed_why: OnceLock<LostCause>,
    /// The liveness check, prepared with the session's first lock.
    pub(crate) check: OnceLock<Statement>,
    /// Ticks of the watch so far (written by the watch task only).
    ticks: AtomicU64,
    /// The tick an unlock in flight started at, plus one; 0 when none is.
    unlock_since: AtomicU64,
    /// Set when the watch closed the connection because an unlock took too long.
    unlock_timed_out: AtomicBool,
}

/// What a lock is, from its grant to its release.
pub(crate) struct Granted {
    pub(crate) key: LockKey,
    /// The key as the server sees it.
    pub(crate) resolved: Resolved,
    /// What errors and events call the lock ("exclusive advisory lock 42 on host:port").
    pub(crate) what: Arc<str>,
    pub(crate) fence: Option<i64>,
    pub(crate) site: &'static Location<'static>,
}

/// One held lock, shared by its guard and the watch: what it is, its `lost()` token and
/// why it fired. Behind an `Arc`, so that the guard stays small and cheap to move.
///
/// A session reuses the state of its last lock for the next one when nothing else
/// refers to it (see [`LockState::reuse`]): consecutive locks then allocate neither the
/// state nor its token.
pub(crate) struct LockState {
    pub(crate) lost: CancellationToken,
    pub(crate) cause: OnceLock<LostCause>,
    /// Set once `lost_token` handed out a child of `lost`: that child outlives the lock,
    /// so the token must not serve another lock.
    handed_out: AtomicBool,
    pub(crate) lock: Granted,
}

impl LockState {
    pub(crate) fn new(lock: Granted) -> Self {
        LockState {
            lost: CancellationToken::new(),
            cause: OnceLock::new(),
            handed_out: AtomicBool::new(false),
            lock,
        }
    }

    /// Makes `state` that of the new `lock`, if it can be: nothing else refers to it
    /// (the lock that had it is gone, no watch check holds it) and its token neither
    /// fired nor had a child handed out. Otherwise gives `lock` back.
    pub(crate) fn reuse(
        mut state: Arc<LockState>,
        lock: Granted,
    ) -> Result<Arc<LockState>, Granted> {
        let Some(s) = Arc::get_mut(&mut state) else {
            return Err(lock);
        };
        // Only `fire` cancels `lost`, after setting the cause.
        if s.cause.get().is_some() || *s.handed_out.get_mut() {
            return Err(lock);
        }
        s.lock = lock;
        Ok(state)
    }

    /// A token cancelled when the lock is lost, for the holder's tasks.
    pub(crate) fn lost_token(&self) -> CancellationToken {
        self.handed_out.store(true, Ordering::Relaxed);
        self.lost.child_token()
    }

    /// Fires `lost()`, once: the cause is kept, the loss is counted as a failure in the
    /// ledger and reported as an `error` event naming the key and the cause.
    fn fire(&self, cause: LostCause) {
        if self.cause.set(cause).is_err() {
            return;
        }
        if let Some(cause) = self.cause.get() {
            KIND.count_failure();
            let Granted { site, what, .. } = &self.lock;
            events::failure("lock lost", KIND.name(), site, what, cause);
        }
        self.lost.cancel();
    }
}

impl Watched {
    /// Puts `lock` in the slot. If the connection already ended (between the grant and
    /// now), fires it at once: the connection task may have looked at the slot before.
    pub(crate) fn arm(&self, lock: &Arc<LockState>) {
        *self.slot() = Some(Arc::clone(lock));
        if let Some(why) = self.closed_why.get() {
            lock.fire(why.clone());
        }
    }

    /// Empties the slot: nothing fires for that lock any more. Called before the unlock
    /// is sent, so that a check that runs after the unlock finds the slot empty.
    pub(crate) fn disarm(&self) {
        let previous = self.slot().take();
        drop(previous);
    }

    /// The connection ended: keep why, and fire the lock held now.
    pub(crate) fn connection_ended(&self, why: LostCause) {
        let _ = self.closed_why.set(why);
        let current = self.slot().clone();
        if let (Some(lock), Some(why)) = (current, self.closed_why.get()) {
            lock.fire(why.clone());
        }
    }

    /// Fires `lock` if it is still the one held: a check that answered for a lock
    /// released in the meantime says nothing about the lock held now.
    fn fire_if_current(&self, lock: &Arc<LockState>, cause: LostCause) {
        let current = self
            .slot()
            .as_ref()
            .is_some_and(|held| Arc::ptr_eq(held, lock));
        if current {
            lock.fire(cause);
        }
    }

    /// An unlock is about to be sent: the watch closes the connection if it is still
    /// unanswered after the unlock timeout.
    pub(crate) fn unlock_started(&self) {
        let now = self.ticks.load(Ordering::Relaxed);
        self.unlock_since.store(now + 1, Ordering::Relaxed);
    }

    /// The unlock has its answer (or failed): `true` if that is because the watch closed
    /// the connection after the unlock timeout.
    pub(crate) fn unlock_finished(&self) -> bool {
        self.unlock_since.store(0, Ordering::Relaxed);
        self.unlock_timed_out.load(Ordering::Acquire)
    }

    fn current(&self) -> Option<Arc<LockState>> {
        self.slot().clone()
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<LockState>>> {
        // Nothing panics while holding it; a poisoned slot is still consistent.
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The watch task of one session. It holds the client weakly, so that dropping the
/// session still closes the connection, and ends with the connection (`closed`).
pub(crate) struct Watch {
    pub(crate) watched: Arc<Watched>,
    pub(crate) client: Weak<Client>,
    pub(crate) closed: CancellationToken,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    /// How long an unlock may wait before the connection is closed instead.
    pub(crate) unlock_timeout: Duration,
    /// The connection task, aborted (the connection closed) when an unlock times out.
    pub(crate) conn_task: AbortHandle,
}

impl Watch {
    pub(crate) async fn run(self) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is now
        // An unlock that started at tick s has waited at least (t - s) intervals at tick
        // t: close the connection once that reaches the unlock timeout.
        let unlock_ticks = self
            .unlock_timeout
            .as_nanos()
            .div_ceil(self.interval.as_nanos().max(1))
            .clamp(1, u128::from(u32::MAX)) as u64;
        loop {
            tokio::select! {
                biased;
                // The connection task fires the lock held then.
                () = self.closed.cancelled() => return,
                _ = tick.tick() => {}
            }
            let t = self.watched.ticks.fetch_add(1, Ordering::Relaxed) + 1;
            let since = self.watched.unlock_since.load(Ordering::Relaxed);
            if since != 0 && t.saturating_sub(since) >= unlock_ticks {
                self.watched.unlock_timed_out.store(true, Ordering::Release);
                // The server frees the lock with the session.
                self.conn_task.abort();
                return;
            }
            let (Some(lock), Some(check)) = (self.watched.current(), self.watched.check.get())
            else {
                continue;
            };
            let Some(client) = self.client.upgrade() else {
                return;
            };
            let (classid, objid, objsubid) = lock.lock.resolved.pg_locks();
            let params: [&(dyn ToSql + Sync); 3] = [&classid, &objid, &objsubid];
            let query = client.query_one(check, &params);
            let outcome = tokio::select! {
                biased;
                () = self.closed.cancelled() => return,
                outcome = tokio::time::timeout(self.timeout, query) => outcome,
            };
            let cause = match outcome {
                Ok(Ok(row)) if row.get::<_, bool>(0) => continue,
                Ok(Ok(_)) => LostCause::NotHeld,
                Ok(Err(e)) if client.is_closed() => {
                    // The connection task records the server's reason and fires: give it
                    // the time of a check, then fire with what this check saw.
                    drop(client);
                    let reason = tokio::time::timeout(self.timeout, self.closed.cancelled());
                    if reason.await.is_ok() {
                        return;
                    }
                    LostCause::ConnectionClosed(chain(&e))
                }
                Ok(Err(e)) => LostCause::CheckFailed(chain(&e)),
                Err(_) => LostCause::CheckTimedOut(self.timeout),
            };
            self.watched.fire_if_current(&lock, cause);
        }
    }
}

/// The connection task of a session: drives the connection, and tells the session when
/// it ended and why (through [`OnConnectionEnd`]). A plain future rather than an `async`
/// block, because it is polled for every message of the session and should cost no more
/// than polling the connection.
pub(crate) struct ConnectionTask<C> {
    pub(crate) connection: C,
    pub(crate) on_end: OnConnectionEnd,
}

impl<C> Future for ConnectionTask<C>
where
    C: Future<Output = Result<(), tokio_postgres::Error>> + Unpin,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let result = ready!(Pin::new(&mut this.connection).poll(cx));
        // Reported when the task drops this future, right after it completes.
        this.on_end.ended(closed_cause(result.as_ref().err()));
        Poll::Ready(())
    }
}

/// Kept by the connection task: when the task ends, whether the connection closed or
/// the task was aborted (the session closed it), the session learns that it is closed
/// and the lock it held, if any, is lost.
pub(crate) struct OnConnectionEnd {
    pub(crate) watched: Arc<Watched>,
    pub(crate) closed: CancellationToken,
    pub(crate) why: Option<LostCause>,
}

impl OnConnectionEnd {
    /// The connection ended by itself, for this reason (reported when this drops).
    pub(crate) fn ended(&mut self, why: LostCause) {
        self.why = Some(why);
    }
}

impl Drop for OnConnectionEnd {
    fn drop(&mut self) {
        let why = self
            .why
            .take()
            .unwrap_or_else(|| LostCause::ConnectionClosed("closed by this process".into()));
        self.watched.connection_ended(why);
        self.closed.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granted(k: i64) -> Granted {
        Granted {
            key: LockKey::Id(k),
            resolved: Resolved::Id(k),
            what: format!("exclusive advisory lock {k}").into(),
            fence: Some(k),
            site: Location::caller(),
        }
    }

    #[test]
    fn a_lock_state_serves_the_next_lock_only_when_nothing_else_refers_to_it() {
        let state = Arc::new(LockState::new(granted(1)));
        let Ok(state) = LockState::reuse(state, granted(2)) else {
            panic!("a state nothing else refers to is reused");
        };
        assert_eq!(state.lock.key, LockKey::Id(2));
        assert_eq!(state.lock.fence, Some(2));
        assert_eq!(&*state.lock.what, "exclusive advisory lock 2");

        // A watch check in flight holds a clone: the next lock gets a state of its own.
        let in_check = Arc::clone(&state);
        let Err(lock) = LockState::reuse(state, granted(3)) else {
            panic!("a state the watch still holds is not reused");
        };
        assert_eq!(lock.key, LockKey::Id(3));
        drop(in_check);
    }

    #[test]
    fn a_lock_state_that_fired_or_handed_out_a_token_is_not_reused() {
        let fired = Arc::new(LockState::new(granted(1)));
        fired.fire(LostCause::NotHeld);
        assert!(LockState::reuse(fired, granted(2)).is_err());

        let handed_out = Arc::new(LockState::new(granted(1)));
        let token = handed_out.lost_token();
        assert!(LockState::reuse(handed_out, granted(2)).is_err());
        assert!(!token.is_cancelled());
    }
}
