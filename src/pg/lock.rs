//! `PgLock`: the held advisory lock, its liveness watch and its release.

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Statement;
use tokio_postgres::types::ToSql;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::error::{LostCause, pg_error};
use super::key::{LockKey, Resolved};
use super::session::PgSession;
use super::watch::{Granted, KIND, LockState};
use crate::ledger::Ticket;
use crate::rt::AsyncGuard;

/// A session-level PostgreSQL advisory lock, held on a dedicated connection the guard
/// owns, that says when it was lost.
///
/// Taken with [`PgLockBuilder::acquire`](super::PgLockBuilder::acquire) (or
/// `try_acquire`, `acquire_timeout`, or the same on a reused [`PgSession`]). While it is
/// held:
/// - [`lost`](PgLock::lost) completes when the lock can no longer be assumed held (see
///   [Loss detection](#loss-detection)): select on it in the work the lock protects;
/// - [`fence`](PgLock::fence) is a token larger than any earlier holder's (see
///   [Fencing](#fencing)).
///
/// Released by [`close`](PgLock::close) (unlock, error if the server says the lock was
/// not held, close the connection), [`release`](PgLock::release) (unlock, keep the
/// session for the next lock), or `Drop`, which never blocks: the unlock is handed to
/// the [`Reaper`](crate::rt::Reaper), then the connection is closed. How soon another
/// session can take the lock after the drop:
/// - on a healthy connection, within one round trip (the unlock's);
/// - if the unlock fails, or no runtime is left to run it, the connection is closed at
///   once and the server frees the lock with the session;
/// - if the unlock gets no answer (a stalled server or network), the connection is
///   closed after the [`unlock_timeout`] and at most one check interval plus the longer
///   of the check interval and the check timeout (5 s plus at most 2 s with the
///   defaults). The server frees the lock when it sees the connection closed: at once
///   if it is running; a stopped or partitioned server, only when it runs again or its
///   own TCP keepalives end the session.
///
/// `close` and `release` return within the same bounds: when the unlock is answered,
/// or when the connection was closed instead.
///
/// ```no_run
/// use custodian::pg::PgLockBuilder;
///
/// # async fn run_migrations() {}
/// # async fn f() -> std::io::Result<()> {
/// let options = PgLockBuilder::parse("host=db.internal user=app dbname=app")?;
/// let lock = options.acquire("migrations").await?;
/// tokio::select! {
///     _ = run_migrations() => lock.close().await?,
///     _ = lock.lost() => eprintln!("lost the migration lock: stopping"),
/// }
/// # Ok(()) }
/// ```
///
/// # Loss detection
/// The lock is lost when its session ends: a server restart or failover,
/// `pg_terminate_backend`, an idle or network timeout, a half-open TCP connection.
/// PostgreSQL then frees the lock at once and another client may take it. `lost()`
/// fires, once, with a tracing `error` event naming the key and the cause, when:
/// - the connection ends (the server closes it when it terminates the backend or shuts
///   down; this is seen at once);
/// - the liveness check — a query every [`check_interval`] (1 s by default) asking
///   `pg_locks` whether this session still holds the lock — fails, answers no, or gets
///   no answer within the check timeout (a half-open connection). TCP keepalives (5 s
///   idle, 1 s interval, 3 probes) catch a dead peer under an idle connection too.
///
/// **Bound:** after the server kills the backend, `lost()` fires within the check
/// interval plus one round trip (in practice at once, when the server's goodbye
/// arrives). After a silent network failure, within the check interval plus the check
/// timeout. Work done after the lock was lost and before `lost()` fired is not
/// protected: use [fencing](#fencing) where that matters.
///
/// # Fencing
/// Right after the lock is granted, in the same statement, the guard bumps a counter for
/// the key in a small table (`custodian_fence` by default, created on first use) and
/// keeps the new value: [`fence`](PgLock::fence). Every acquisition of the key by any
/// client gets a strictly larger token. Pass it with every write the lock protects and
/// have the store reject a token smaller than the largest it has seen (for example
/// `UPDATE ... WHERE last_fence <= $token`): a holder that lost the lock without
/// knowing it (a long pause, a partition) is then refused instead of overwriting the
/// new holder's work. Turn it off with
/// [`PgLockBuilder::fencing(None)`](super::PgLockBuilder::fencing).
///
/// # Caveats
/// A session-level lock lives in one server session: behind a pooler in transaction
/// mode (PgBouncer's `pool_mode = transaction`) consecutive statements run on different
/// server connections, and the lock is held by whichever one ran the lock statement.
/// Connect directly, or through session pooling. Each held lock takes one connection.
///
/// [`check_interval`]: super::PgLockBuilder::check_interval
/// [`unlock_timeout`]: super::PgLockBuilder::unlock_timeout
#[must_use = "dropping a PgLock releases the lock at once"]
pub struct PgLock {
    release: Release,
}

/// The lock's release while nobody has asked for it. Dropped, it takes the lock out of
/// the session's watch slot, then becomes an [`AsyncGuard`] whose cleanup (unlock, then
/// close the connection) goes to the reaper. The guard is built only then (or by
/// `close`), so that its allocations (its options, the resource's name for events) are
/// not paid by every acquire + release. The ledger ticket is taken at acquisition, and
/// the cleanup runs on the session's runtime, the one its connection task runs on.
struct Release(Option<Pending>);

struct Pending {
    held: Held,
    ticket: Ticket,
}

impl Pending {
    /// The guard that runs the cleanup: on `close`, or on the reaper when dropped.
    fn into_guard(self) -> AsyncGuard<Held, io::Error> {
        let Pending { held, ticket } = self;
        let session = &held.session;
        let mut builder = AsyncGuard::builder()
            .acquired(ticket, session.runtime())
            .resource(String::from(&*held.state.lock.what))
            .fallback(|held: Held| held.close_connection());
        if let Some(reaper) = &session.0.options.reaper {
            builder = builder.reaper(reaper);
        }
        builder.build(held, Held::cleanup)
    }
}

impl Release {
    fn held(&self) -> &Held {
        match &self.0 {
            Some(pending) => &pending.held,
            None => unreachable!("a PgLock's release is taken only when it is consumed"),
        }
    }

    fn held_mut(&mut self) -> &mut Held {
        match &mut self.0 {
            Some(pending) => &mut pending.held,
            None => unreachable!("a PgLock's release is taken only when it is consumed"),
        }
    }

    /// Takes the lock out of its session's watch slot: nothing fires for it any more.
    /// Done before the unlock is sent, so that a check that runs after the unlock finds
    /// the slot empty.
    fn disarm(&self) {
        self.held().session.0.watched.disarm();
    }

    fn into_guard(mut self) -> AsyncGuard<Held, io::Error> {
        match self.0.take() {
            Some(pending) => pending.into_guard(),
            None => unreachable!("a PgLock's release is taken only when it is consumed"),
        }
    }

    /// The lock is released (or its connection closed): its ticket goes, counted as
    /// released.
    fn into_held(mut self) -> Held {
        match self.0.take() {
            Some(pending) => pending.held,
            None => unreachable!("a PgLock's release is taken only when it is consumed"),
        }
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if let Some(pending) = self.0.take() {
            pending.held.session.0.watched.disarm();
            drop(pending.into_guard());
        }
    }
}

/// What the guard's cleanup needs: the session and how to unlock.
struct Held {
    session: PgSession,
    /// The key, its description, and the `lost()` token.
    state: Arc<LockState>,
    unlock: Statement,
    /// Set when `release` sent the unlock: a cleanup after a cancelled `release` then
    /// only closes the connection (a second unlock would say "not held").
    unlock_sent: bool,
}

impl Held {
    async fn unlock(&mut self) -> io::Result<()> {
        self.unlock_sent = true;
        let (k, a, b) = match self.state.lock.resolved {
            Resolved::Id(k) => (k, 0, 0),
            Resolved::Pair(a, b) => (0, a, b),
        };
        let (one, two): ([&(dyn ToSql + Sync); 1], [&(dyn ToSql + Sync); 2]) = ([&k], [&a, &b]);
        let params: &[&(dyn ToSql + Sync)] = match self.state.lock.resolved {
            Resolved::Id(_) => &one,
            Resolved::Pair(..) => &two,
        };
        // The unlock timeout is enforced by the session's watch (see `Watched`), not by
        // a timer per unlock.
        let (watched, what) = (&self.session.0.watched, &self.state.lock.what);
        watched.unlock_started();
        // For the message only: the watch enforces the timeout at its ticks, so the wait
        // can be longer than the timeout, and the error says how long it was.
        let started = crate::ledger::clock::coarse_now();
        let result = self.session.0.client.query_one(&self.unlock, params).await;
        let timed_out = watched.unlock_finished();
        match result {
            Ok(row) if row.get::<_, bool>(0) => Ok(()),
            Ok(_) => Err(io::Error::other(format!(
                "cannot release {}: the server says backend pid {} did not hold it \
                 (the lock was lost)",
                what, self.session.0.backend_pid
            ))),
            Err(_) if timed_out => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "cannot release {}: no answer after {:?} (unlock timeout {:?}); the \
                     connection is closed instead",
                    what,
                    Duration::from_millis(
                        crate::ledger::clock::coarse_now().saturating_sub(started) / 1_000_000
                    ),
                    self.session.0.options.unlock_timeout
                ),
            )),
            Err(e) => Err(pg_error(
                e,
                format_args!(
                    "cannot release {} (backend pid {})",
                    what, self.session.0.backend_pid
                ),
            )),
        }
    }

    /// Closes the connection at once: the server frees the lock with the session.
    fn close_connection(&self) {
        self.session.0.conn_task.abort();
    }

    /// The cleanup of `close` and of a dropped lock: unlock, then close the connection.
    async fn cleanup(mut self) -> io::Result<()> {
        let result = if self.unlock_sent {
            Ok(())
        } else {
            self.unlock().await
        };
        self.close_connection();
        result
    }
}

impl PgLock {
    /// The guard of a lock just granted on `session`: counted in the ledger, put in the
    /// session's watch slot.
    pub(crate) fn new(mut session: PgSession, lock: Granted, unlock: Statement) -> PgLock {
        let ticket = Ticket::at(&KIND, lock.site);
        let state = session.lock_state(lock);
        session.0.watched.arm(&state);
        PgLock {
            release: Release(Some(Pending {
                held: Held {
                    session,
                    state,
                    unlock,
                    unlock_sent: false,
                },
                ticket,
            })),
        }
    }

    fn state(&self) -> &LockState {
        &self.release.held().state
    }

    /// Completes when the lock can no longer be assumed held (see
    /// [Loss detection](#loss-detection)); pending for as long as it is. Fires once;
    /// every call after that completes at once.
    ///
    /// ```no_run
    /// # async fn work() {}
    /// # async fn f(lock: custodian::pg::PgLock) -> std::io::Result<()> {
    /// tokio::select! {
    ///     _ = work() => lock.close().await?,
    ///     _ = lock.lost() => eprintln!("lost: {}", lock.lost_cause().unwrap()),
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future changes nothing; call `lost()` again.
    pub fn lost(&self) -> WaitForCancellationFuture<'_> {
        self.state().lost.cancelled()
    }

    /// A token cancelled when the lock is lost, to hand to tasks doing the protected
    /// work (cancelling it yourself does not affect the lock).
    pub fn lost_token(&self) -> CancellationToken {
        self.state().lost_token()
    }

    /// Whether the lock is known to be lost.
    pub fn is_lost(&self) -> bool {
        self.state().lost.is_cancelled()
    }

    /// Why the lock was lost, once it was.
    pub fn lost_cause(&self) -> Option<&LostCause> {
        self.state().cause.get()
    }

    /// The fencing token of this acquisition: larger than that of every earlier
    /// acquisition of the key, by any client (see [Fencing](#fencing)); `None` with
    /// fencing off.
    ///
    /// In shared mode each holder gets its own token, so a store that refuses tokens
    /// smaller than the largest it has seen would also refuse an earlier shared holder
    /// that still holds the lock. There, refuse a shared holder's write only when its
    /// token is smaller than the largest an exclusive holder wrote (and an exclusive
    /// holder's, as usual, when it is smaller than any seen).
    pub fn fence(&self) -> Option<i64> {
        self.state().lock.fence
    }

    /// The key.
    pub fn key(&self) -> &LockKey {
        &self.state().lock.key
    }

    /// The lock's own session, to run the protected work in the same session (so that
    /// it cannot outlive the lock) or to inspect it. Do not unlock through it: `close`
    /// would then report the lock as not held, and the liveness check fires `lost()`.
    pub fn client(&self) -> &tokio_postgres::Client {
        &self.release.held().session.0.client
    }

    /// The server's pid for the session holding the lock.
    pub fn backend_pid(&self) -> i32 {
        self.release.held().session.0.backend_pid
    }

    /// Unlocks and closes the connection.
    ///
    /// # Errors
    /// The server said the session did not hold the lock (it was lost), the unlock
    /// failed or got no answer within the unlock timeout (kind `TimedOut`), each naming
    /// the key and the server. The connection is closed either way, so the lock is free.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropped before it finished, the rest of the release runs on the
    /// reaper, and its error is reported there.
    pub fn close(self) -> impl Future<Output = io::Result<()>> + Send + 'static {
        // Taken apart before the future, so that the future does not hold the lock twice
        // (as the argument and as its parts).
        let PgLock { release } = self;
        release.disarm();
        let guard = release.into_guard();
        async move { AsyncGuard::close(guard).await }
    }

    /// Unlocks and gives the session back, to take the next lock without reconnecting.
    ///
    /// # Errors
    /// As [`close`](PgLock::close); the connection is closed then.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropped before it finished, the connection is closed on the reaper
    /// (the lock goes with the session).
    pub fn release(self) -> impl Future<Output = io::Result<PgSession>> + Send + 'static {
        let PgLock { mut release } = self;
        async move {
            release.disarm();
            match release.held_mut().unlock().await {
                Ok(()) => {
                    let Held {
                        mut session, state, ..
                    } = release.into_held();
                    // Nothing refers to the lock any more: its state can serve the next.
                    session.keep_lock_state(state);
                    Ok(session)
                }
                Err(e) => {
                    release.into_held().close_connection();
                    Err(e)
                }
            }
        }
    }
}

impl fmt::Debug for PgLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgLock")
            .field("what", &self.state().lock.what)
            .field("backend_pid", &self.backend_pid())
            .field("fence", &self.fence())
            .field("lost", &self.lost_cause())
            .finish()
    }
}
