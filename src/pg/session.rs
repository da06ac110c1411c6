//! `PgLockBuilder` and `PgSession`: the dedicated connection a lock is taken on.

use std::collections::HashMap;
use std::convert::identity;
use std::fmt;
use std::future::Future;
use std::io;
use std::panic::Location;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Statement};
use tokio_util::sync::CancellationToken;

use super::error::{Holder, PgLockHeld, pg_error};
use super::key::{LockKey, Resolved};
use super::lock::PgLock;
use super::watch::{ConnectionTask, Granted, LockState, OnConnectionEnd, Watch, Watched};
use crate::rt::Reaper;

/// How to connect and lock: the server, shared or exclusive, the liveness check, fencing.
///
/// Made from a `tokio_postgres::Config` ([`new`](PgLockBuilder::new)) or a connection
/// string ([`parse`](PgLockBuilder::parse), libpq's `key=value` or URL form). Each
/// acquisition through it opens a **dedicated** connection that the lock owns (never a
/// pooled one); [`connect`](PgLockBuilder::connect) opens one to reuse across
/// acquisitions.
///
/// What it sets on the connection unless the config already says otherwise:
/// `application_name` `custodian` (so that holders are recognisable in
/// `pg_stat_activity`), a connect timeout of 10 s. Always: TCP keepalives (idle 5 s,
/// interval 1 s, 3 probes) and a TCP user timeout of 10 s, so that a dead peer is noticed
/// by the socket too. TLS is not supported yet (the connection is `NoTls`).
///
/// ```no_run
/// use custodian::pg::PgLockBuilder;
/// use std::time::Duration;
///
/// # async fn f() -> std::io::Result<()> {
/// let options = PgLockBuilder::parse("host=db.internal user=app dbname=app")?
///     .check_interval(Duration::from_millis(500))
///     .clone();
/// let lock = options.acquire("nightly-report").await?;
/// // ... the work, selecting on lock.lost() ...
/// lock.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[must_use = "a builder does nothing until `connect` or an acquire"]
pub struct PgLockBuilder {
    pub(crate) config: Config,
    pub(crate) shared: bool,
    pub(crate) check_interval: Duration,
    pub(crate) check_timeout: Option<Duration>,
    pub(crate) connect_timeout: Duration,
    pub(crate) unlock_timeout: Duration,
    pub(crate) fence_table: Option<String>,
    pub(crate) reaper: Option<Reaper>,
}

/// The default liveness-check interval.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

impl PgLockBuilder {
    /// Options for the server `config` names: exclusive, liveness check every second,
    /// fencing on (table `custodian_fence`), unlock timeout 5 s.
    pub fn new(config: Config) -> PgLockBuilder {
        PgLockBuilder {
            config,
            shared: false,
            check_interval: CHECK_INTERVAL,
            check_timeout: None,
            connect_timeout: Duration::from_secs(10),
            unlock_timeout: Duration::from_secs(5),
            fence_table: Some("custodian_fence".into()),
            reaper: None,
        }
    }

    /// Options from a connection string (`host=... port=... user=... dbname=...` or
    /// `postgresql://user@host:port/db`).
    ///
    /// ```
    /// let options = custodian::pg::PgLockBuilder::parse("host=127.0.0.1 port=5432 user=app")?;
    /// assert_eq!(options.endpoint(), "127.0.0.1:5432");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    /// The string does not parse: kind `InvalidInput`, saying why (the string itself is
    /// not repeated: it may hold a password).
    pub fn parse(conn: &str) -> io::Result<PgLockBuilder> {
        let config: Config = conn.parse().map_err(|e: tokio_postgres::Error| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "invalid PostgreSQL connection string: {}",
                    super::error::chain(&e)
                ),
            )
        })?;
        Ok(PgLockBuilder::new(config))
    }

    /// Shared (many shared holders at once, no exclusive one) or exclusive (default).
    pub fn shared(mut self, shared: bool) -> Self {
        self.shared = shared;
        self
    }

    /// How often the liveness check runs while a lock is held (default 1 s). Each check
    /// is one query on the lock's connection that asks `pg_locks` whether this session
    /// still holds the lock. [`PgLock::lost`] fires within this interval plus one round
    /// trip of the session's end (at once when the server closes the connection), and
    /// within this interval plus the [check timeout](Self::check_timeout) of a silent
    /// failure (a stalled server, a half-open connection).
    pub fn check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How long a liveness check may take before the lock counts as lost, with
    /// [`LostCause::CheckTimedOut`](super::LostCause::CheckTimedOut) (default: the check
    /// interval, at least 1 s).
    pub fn check_timeout(mut self, timeout: Duration) -> Self {
        self.check_timeout = Some(timeout);
        self
    }

    /// The connect timeout used when the config sets none (default 10 s). It bounds the
    /// whole connection set-up (TCP, authentication), not only the TCP connect.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long `close`, `release` and a dropped lock wait for the unlock before closing
    /// the connection instead, so that the server frees the lock with the session
    /// (default 5 s). The session's liveness watch enforces it at its ticks (no timer per
    /// unlock): the connection is closed after at least this long and at most one check
    /// interval plus the longer of the check interval and the [check
    /// timeout](Self::check_timeout) more (a liveness check already waiting for its
    /// answer delays the ticks); 2 s more with the defaults. A running server frees the
    /// lock as soon as it sees the connection closed; a stopped or partitioned one, only
    /// when it runs again or its own TCP keepalives end the session.
    pub fn unlock_timeout(mut self, timeout: Duration) -> Self {
        self.unlock_timeout = timeout;
        self
    }

    /// Fencing tokens ([`PgLock::fence`]): on (default) with a counter table of this
    /// name (an identifier in the search path, quoted; created on first use), or off
    /// with `None` (no table, no write per acquisition; `fence()` is then `None`).
    pub fn fencing(mut self, table: Option<&str>) -> Self {
        self.fence_table = table.map(str::to_owned);
        self
    }

    /// The reaper that runs the unlock of a dropped lock (default [`Reaper::global`]).
    pub fn reaper(mut self, reaper: &Reaper) -> Self {
        self.reaper = Some(reaper.clone());
        self
    }

    /// The server as errors and events name it: `host:port` (each one, if several).
    pub fn endpoint(&self) -> String {
        endpoint(&self.config)
    }

    pub(crate) fn effective_check_timeout(&self) -> Duration {
        self.check_timeout
            .unwrap_or(self.check_interval.max(Duration::from_secs(1)))
    }

    /// Opens a dedicated connection to take locks on, one at a time
    /// ([`PgSession::acquire`], [`PgLock::release`] to get it back). Reusing it saves the
    /// connection set-up (a new server process) on every acquisition.
    ///
    /// # Errors
    /// The connection failed: refused, timed out (kind `TimedOut`), authentication
    /// failed, ... each naming the server's `host:port`.
    ///
    /// # Cancel safety
    /// Cancel-safe: a cancelled connect leaves nothing open.
    pub async fn connect(&self) -> io::Result<PgSession> {
        PgSession::connect(self).await
    }

    /// Opens a dedicated connection and takes the lock on `key`, waiting as long as it
    /// takes.
    ///
    /// # Errors
    /// As [`connect`](Self::connect); and a failed lock query (the server went away,
    /// the fence table could not be created), naming the key and the server.
    ///
    /// # Cancel safety
    /// Cancel-safe: if the future is dropped while it waits, the server is told to stop
    /// waiting (a cancel request) and the connection is closed, so the lock is never left
    /// held, nor taken later by a wait nobody listens to.
    #[track_caller]
    pub fn acquire(
        &self,
        key: impl Into<LockKey>,
    ) -> impl Future<Output = io::Result<PgLock>> + Send + 'static {
        let (site, key, options) = (Location::caller(), key.into(), self.clone());
        async move {
            let session = PgSession::connect(&options).await?;
            session.lock(key, Wait::Block, site, held_as_error).await
        }
    }

    /// Opens a dedicated connection and takes the lock on `key` if it is free now:
    /// `Ok(Ok(lock))`, or `Ok(Err(held))` when another session holds it, naming the
    /// holders' backend pids, `application_name`s and client addresses, with the session
    /// that tried ([`PgLockHeld::into_session`]).
    ///
    /// ```no_run
    /// # async fn f() -> std::io::Result<()> {
    /// let options = custodian::pg::PgLockBuilder::parse("host=127.0.0.1 user=app dbname=app")?;
    /// match options.try_acquire("nightly-report").await? {
    ///     Ok(lock) => lock.close().await?,
    ///     Err(held) => println!("{held}"), // "... held by backend pid 4242 ..."
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire): the connection or the lock query failed. A lock
    /// held by someone else is not an error but `Ok(Err(held))`.
    ///
    /// # Cancel safety
    /// As [`acquire`](Self::acquire).
    #[track_caller]
    pub fn try_acquire(
        &self,
        key: impl Into<LockKey>,
    ) -> impl Future<Output = io::Result<Result<PgLock, PgLockHeld>>> + Send + 'static {
        let (site, key, options) = (Location::caller(), key.into(), self.clone());
        async move {
            let session = PgSession::connect(&options).await?;
            session.lock(key, Wait::Try, site, identity).await
        }
    }

    /// Opens a dedicated connection and takes the lock on `key`, waiting at most
    /// `timeout` (the server's `lock_timeout`; the connect has its own timeout).
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire); when the time is up, an error of kind
    /// [`WouldBlock`](io::ErrorKind::WouldBlock) holding the [`PgLockHeld`] (get it with
    /// [`PgLockHeld::of`] or, with the session, [`PgLockHeld::from_io`]).
    ///
    /// # Cancel safety
    /// As [`acquire`](Self::acquire).
    #[track_caller]
    pub fn acquire_timeout(
        &self,
        key: impl Into<LockKey>,
        timeout: Duration,
    ) -> impl Future<Output = io::Result<PgLock>> + Send + 'static {
        let (site, key, options) = (Location::caller(), key.into(), self.clone());
        async move {
            let session = PgSession::connect(&options).await?;
            session
                .lock(key, Wait::For(timeout), site, held_as_error)
                .await
        }
    }
}

impl From<Config> for PgLockBuilder {
    fn from(config: Config) -> Self {
        PgLockBuilder::new(config)
    }
}

impl fmt::Debug for PgLockBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the config itself: it may hold a password.
        f.debug_struct("PgLockBuilder")
            .field("endpoint", &self.endpoint())
            .field("shared", &self.shared)
            .field("check_interval", &self.check_interval)
            .field("fence_table", &self.fence_table)
            .finish_non_exhaustive()
    }
}

pub(crate) fn endpoint(config: &Config) -> String {
    let ports = config.get_ports();
    let mut out = String::new();
    let hosts = config.get_hosts();
    if hosts.is_empty() {
        out.push_str("localhost");
    }
    for (i, host) in hosts.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        match host {
            Host::Tcp(h) => out.push_str(&format!("{h}:{port}")),
            #[cfg(unix)]
            Host::Unix(p) => out.push_str(&format!("{}/.s.PGSQL.{port}", p.display())),
        }
    }
    if hosts.is_empty() {
        out.push_str(&format!(":{}", ports.first().copied().unwrap_or(5432)));
    }
    out
}

/// The outcome of a lock query that waits: the fence token (0 with fencing off), or
/// `None` when the wait ended on `lock_timeout`.
fn granted(
    result: Result<tokio_postgres::Row, tokio_postgres::Error>,
    fencing: bool,
) -> Result<Option<i64>, tokio_postgres::Error> {
    match result {
        Ok(row) => Ok(Some(if fencing { row.get::<_, i64>(0) } else { 0 })),
        Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The lock query with the server's `lock_timeout` set to `timeout` for its duration.
async fn lock_for(
    client: &Client,
    stmt: &Statement,
    params: &[&(dyn ToSql + Sync)],
    timeout: Duration,
    fencing: bool,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128).to_string();
    client
        .execute("SELECT set_config('lock_timeout', $1, false)", &[&ms])
        .await?;
    let result = client.query_one(stmt, params).await;
    client
        .execute("SELECT set_config('lock_timeout', '0', false)", &[])
        .await?;
    granted(result, fencing)
}

/// `acquire` and `acquire_timeout` report a held lock as an error of kind `WouldBlock`.
fn held_as_error(got: io::Result<Result<PgLock, PgLockHeld>>) -> io::Result<PgLock> {
    got?.map_err(io::Error::from)
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Wait {
    Block,
    Try,
    For(Duration),
}

/// The prepared statements for one key form (`Id` or `Pair`), in the session's mode.
struct Statements {
    lock: Statement,
    try_lock: Statement,
    unlock: Statement,
}

/// A dedicated connection to take advisory locks on, one at a time: the connection
/// [`PgLockBuilder::connect`] opens, that [`acquire`](PgSession::acquire) turns into a
/// [`PgLock`] and [`PgLock::release`] gives back. Dropped, it closes the connection.
///
/// ```no_run
/// use custodian::pg::PgLockBuilder;
///
/// # async fn f() -> std::io::Result<()> {
/// let options = PgLockBuilder::parse("host=127.0.0.1 user=app dbname=app")?;
/// let mut session = options.connect().await?;
/// for job in 0..10i64 {
///     let lock = session.acquire(job).await?;
///     // ... job `job`, alone ...
///     session = lock.release().await?;
/// }
/// # Ok(()) }
/// ```
pub struct PgSession(pub(crate) Box<Session>);

/// What a [`PgSession`] holds. Boxed: the session moves into every acquire future, then
/// into the lock and its release future and back, and the futures are copied where they
/// are awaited; a pointer keeps those moves and copies small.
pub(crate) struct Session {
    pub(crate) client: Arc<Client>,
    pub(crate) conn_task: AbortHandle,
    pub(crate) options: Arc<PgLockBuilder>,
    pub(crate) endpoint: Arc<str>,
    pub(crate) backend_pid: i32,
    /// Cancelled when the connection task ends; `watched.closed_why` says why.
    pub(crate) closed: CancellationToken,
    /// The lock held now, shared with the connection task and the watch task.
    pub(crate) watched: Arc<Watched>,
    cache: Cache,
}

/// What a session prepares or works out once and reuses.
#[derive(Default)]
struct Cache {
    /// The lock statements per key form (`Id`, `Pair`), prepared on first use; the mode
    /// (shared or exclusive) is the session's.
    stmts: [Option<Statements>; 2],
    /// The fencing lock statements `(wait, try)` per key form.
    fence_stmts: [Option<(Statement, Statement)>; 2],
    holders: Option<Statement>,
    /// Name keys as the server hashed them.
    names: HashMap<String, i64>,
    /// The last lock's description ("exclusive advisory lock 42 on host:port"), reused
    /// when the next lock has the same key.
    what: Option<(LockKey, Arc<str>)>,
    /// The state of the last lock released, for the next lock (see `lock_state`).
    spare: Option<Arc<LockState>>,
    /// The runtime the connection task runs on, where a dropped lock's unlock runs.
    runtime: Option<Handle>,
}

impl PgSession {
    async fn connect(options: &PgLockBuilder) -> io::Result<PgSession> {
        let mut config = options.config.clone();
        let connect_timeout = *config
            .get_connect_timeout()
            .unwrap_or(&options.connect_timeout);
        config.connect_timeout(connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name("custodian");
        }
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(10));
        let endpoint: Arc<str> = endpoint(&config).into();
        // tokio-postgres's own timeout covers each TCP connect; this one covers the whole
        // set-up, so that a server that accepts and never answers cannot hang us.
        let connected = tokio::time::timeout(connect_timeout, config.connect(NoTls)).await;
        let (client, connection) = match connected {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                return Err(pg_error(
                    e,
                    format_args!("cannot connect to PostgreSQL at {endpoint}"),
                ));
            }
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "cannot connect to PostgreSQL at {endpoint}: no answer within {connect_timeout:?}"
                    ),
                ));
            }
        };
        let closed = CancellationToken::new();
        let watched = Arc::new(Watched::default());
        let conn_task = {
            let on_end = OnConnectionEnd {
                watched: Arc::clone(&watched),
                closed: closed.clone(),
                why: None,
            };
            tokio::spawn(ConnectionTask { connection, on_end }).abort_handle()
        };
        let client = Arc::new(client);
        // One watch per session, for all the locks it takes in turn; it ends with the
        // connection.
        tokio::spawn(
            Watch {
                watched: Arc::clone(&watched),
                client: Arc::downgrade(&client),
                closed: closed.clone(),
                interval: options.check_interval,
                timeout: options.effective_check_timeout(),
                unlock_timeout: options.unlock_timeout,
                conn_task: conn_task.clone(),
            }
            .run(),
        );
        let mut session = PgSession(Box::new(Session {
            client,
            // Aborting the task drops the connection: the socket closes at once.
            conn_task,
            options: Arc::new(options.clone()),
            endpoint,
            backend_pid: 0,
            closed,
            watched,
            cache: Cache {
                runtime: Handle::try_current().ok(),
                ..Cache::default()
            },
        }));
        let row = session
            .0
            .client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(|e| session.error(e, "cannot start a session"))?;
        session.0.backend_pid = row.get(0);
        Ok(session)
    }

    /// Takes the lock on `key` on this session, waiting as long as it takes. Shared or
    /// exclusive as the options said.
    ///
    /// # Errors
    /// The lock query failed (the server went away, the fence table could not be
    /// created), naming the key and the server. The session is closed then. If the
    /// server's own `lock_timeout` ends the wait, kind `WouldBlock` with the
    /// [`PgLockHeld`], as for [`acquire_timeout`](Self::acquire_timeout).
    ///
    /// # Cancel safety
    /// Cancel-safe: a cancelled wait is cancelled on the server too (a cancel request)
    /// and the session closed, so the lock is never left held.
    #[track_caller]
    pub fn acquire(
        self,
        key: impl Into<LockKey>,
    ) -> impl Future<Output = io::Result<PgLock>> + Send + 'static {
        self.lock(key.into(), Wait::Block, Location::caller(), held_as_error)
    }

    /// Takes the lock on `key` if it is free now: `Ok(Ok(lock))`, or `Ok(Err(held))`
    /// naming the holders, from which [`PgLockHeld::into_session`] gives this session
    /// back.
    ///
    /// ```no_run
    /// # async fn f(session: custodian::pg::PgSession) -> std::io::Result<()> {
    /// let session = match session.try_acquire(42).await? {
    ///     Ok(lock) => lock.release().await?,
    ///     Err(held) => {
    ///         println!("{held}");
    ///         held.into_session()
    ///     }
    /// };
    /// # drop(session); Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire): the lock query failed, and the session is closed.
    ///
    /// # Cancel safety
    /// As [`acquire`](Self::acquire).
    #[track_caller]
    pub fn try_acquire(
        self,
        key: impl Into<LockKey>,
    ) -> impl Future<Output = io::Result<Result<PgLock, PgLockHeld>>> + Send + 'static {
        self.lock(key.into(), Wait::Try, Location::caller(), identity)
    }

    /// Takes the lock on `key`, waiting at most `timeout`.
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire); when the time is up, kind `WouldBlock` with the
    /// [`PgLockHeld`], which gives this session back ([`PgLockHeld::from_io`], then
    /// [`PgLockHeld::into_session`]).
    ///
    /// # Cancel safety
    /// As [`acquire`](Self::acquire).
    #[track_caller]
    pub fn acquire_timeout(
        self,
        key: impl Into<LockKey>,
        timeout: Duration,
    ) -> impl Future<Output = io::Result<PgLock>> + Send + 'static {
        self.lock(
            key.into(),
            Wait::For(timeout),
            Location::caller(),
            held_as_error,
        )
    }

    /// The server's pid for this session (`pg_backend_pid()`).
    pub fn backend_pid(&self) -> i32 {
        self.0.backend_pid
    }

    /// The server, as `host:port`.
    pub fn endpoint(&self) -> &str {
        &self.0.endpoint
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.0.closed.is_cancelled()
    }

    pub(crate) fn error(&self, e: tokio_postgres::Error, what: &str) -> io::Error {
        pg_error(
            e,
            format_args!(
                "{what} on PostgreSQL at {} (backend pid {})",
                self.0.endpoint, self.0.backend_pid
            ),
        )
    }

    /// The state (`lost()` token, cause) of a lock about to be granted: the last lock's,
    /// if nothing refers to it any more, else a new one.
    pub(crate) fn lock_state(&mut self, lock: Granted) -> Arc<LockState> {
        let lock = match self.0.cache.spare.take() {
            Some(spare) => match LockState::reuse(spare, lock) {
                Ok(state) => return state,
                Err(lock) => lock,
            },
            None => lock,
        };
        Arc::new(LockState::new(lock))
    }

    /// The runtime the session's connection task runs on.
    pub(crate) fn runtime(&self) -> Option<Handle> {
        self.0.cache.runtime.clone()
    }

    /// Keeps the state of a lock just released for the next lock.
    pub(crate) fn keep_lock_state(&mut self, state: Arc<LockState>) {
        self.0.cache.spare = Some(state);
    }

    /// What error messages and events call the lock on `key`: "exclusive advisory lock
    /// 42 on host:port". Kept for the next lock on the same key.
    fn describe(&mut self, key: &LockKey) -> Arc<str> {
        if let Some((last, what)) = &self.0.cache.what
            && last == key
        {
            return Arc::clone(what);
        }
        let mode = if self.0.options.shared {
            "shared"
        } else {
            "exclusive"
        };
        let what: Arc<str> = format!("{mode} advisory lock {key} on {}", self.0.endpoint).into();
        self.0.cache.what = Some((key.clone(), Arc::clone(&what)));
        what
    }

    /// Takes the lock: `Ok(Err(held))` when another session holds it (at once for
    /// `Wait::Try`, when the time is up for `Wait::For`).
    ///
    /// The first lock of a session prepares its statements, a name key is hashed once,
    /// and a held lock is looked up in `pg_locks`: those slow paths are boxed futures,
    /// so that the future of the usual path (one lock query) stays small and cheap to
    /// move.
    ///
    /// The outcome goes through `finish` (`held_as_error` for `acquire`), so that the
    /// public futures are this one, not a wrapper around it: a wrapper would store the
    /// arguments twice and move the lock once more.
    pub(crate) async fn lock<T>(
        mut self,
        key: LockKey,
        wait: Wait,
        site: &'static Location<'static>,
        finish: impl FnOnce(io::Result<Result<PgLock, PgLockHeld>>) -> T,
    ) -> T {
        let resolved = match &key {
            LockKey::Id(k) => Resolved::Id(*k),
            LockKey::Pair(a, b) => Resolved::Pair(*a, *b),
            LockKey::Name(name) => match self.0.cache.names.get(name.as_ref()) {
                Some(k) => Resolved::Id(*k),
                None => match Box::pin(self.resolve(&key)).await {
                    Ok(resolved) => resolved,
                    Err(e) => return finish(Err(e)),
                },
            },
        };
        let fencing = self.0.options.fence_table.is_some();
        let form = resolved.form();
        // Everything is prepared before the lock is asked for: once it is granted,
        // nothing is awaited before the guard exists.
        let unprepared = self.0.cache.stmts[form].is_none()
            || (fencing && self.0.cache.fence_stmts[form].is_none())
            || self.0.watched.check.get().is_none();
        if unprepared && let Err(e) = Box::pin(self.prepare(resolved)).await {
            return finish(Err(e));
        }
        let lock_stmt = match (fencing, wait) {
            (true, Wait::Try) => self.0.cache.fence_stmts[form].as_ref().map(|s| &s.1),
            (true, _) => self.0.cache.fence_stmts[form].as_ref().map(|s| &s.0),
            (false, Wait::Try) => self.0.cache.stmts[form].as_ref().map(|s| &s.try_lock),
            (false, _) => self.0.cache.stmts[form].as_ref().map(|s| &s.lock),
        };
        let Some(lock_stmt) = lock_stmt.cloned() else {
            unreachable!("the lock statements were prepared above")
        };
        let (k, a, b) = match resolved {
            Resolved::Id(k) => (k, 0, 0),
            Resolved::Pair(a, b) => (0, a, b),
        };
        let (one, two): ([&(dyn ToSql + Sync); 1], [&(dyn ToSql + Sync); 2]) = ([&k], [&a, &b]);
        let params: &[&(dyn ToSql + Sync)] = match resolved {
            Resolved::Id(_) => &one,
            Resolved::Pair(..) => &two,
        };
        let start = matches!(wait, Wait::For(_)).then(Instant::now);
        // From here the server may be waiting for the lock on our behalf: if this future
        // is dropped, tell it to stop and close the connection.
        let cancel_on_drop = CancelOnDrop(Some(&self));
        let client = &*self.0.client;
        // One query future for both waits (`query_opt`: no row when `try` with fencing
        // did not get the lock), so that the future holds one, not two.
        let outcome: Result<Option<i64>, tokio_postgres::Error> = match wait {
            Wait::For(d) => Box::pin(lock_for(client, &lock_stmt, params, d, fencing)).await,
            Wait::Try | Wait::Block => match client.query_opt(&lock_stmt, params).await {
                Ok(Some(row)) if fencing => Ok(Some(row.get::<_, i64>(0))),
                Ok(Some(row)) if matches!(wait, Wait::Try) => {
                    Ok(row.get::<_, bool>(0).then_some(0))
                }
                Ok(Some(_)) => Ok(Some(0)),
                Ok(None) => Ok(None),
                Err(e) => granted(Err(e), fencing),
            },
        };
        cancel_on_drop.disarm();
        finish(match outcome {
            Ok(Some(token)) => {
                let what = self.describe(&key);
                let Some(unlock) = self.0.cache.stmts[form].as_ref().map(|s| s.unlock.clone())
                else {
                    unreachable!("the lock statements were prepared above")
                };
                let lock = Granted {
                    key,
                    resolved,
                    what,
                    fence: fencing.then_some(token),
                    site,
                };
                Ok(Ok(PgLock::new(self, lock, unlock)))
            }
            Ok(None) => {
                let waited = start.map_or(Duration::ZERO, |start| start.elapsed());
                Box::pin(self.held(key, resolved, waited)).await
            }
            Err(e) => {
                let what = self.describe(&key);
                Err(pg_error(
                    e,
                    format_args!("cannot take {what} (backend pid {})", self.0.backend_pid),
                ))
            }
        })
    }

    /// The lock is held by others: who.
    async fn held(
        mut self,
        key: LockKey,
        resolved: Resolved,
        waited: Duration,
    ) -> io::Result<Result<PgLock, PgLockHeld>> {
        let holders = self.holders(resolved).await?;
        let what = self.describe(&key).to_string();
        Ok(Err(PgLockHeld {
            what,
            holders,
            waited,
            session: self,
        }))
    }

    /// Prepares what locks on keys of `key`'s form need: the lock statements, the
    /// fencing ones, the liveness check.
    async fn prepare(&mut self, key: Resolved) -> io::Result<()> {
        self.statements(key).await?;
        if self.0.options.fence_table.is_some() {
            self.fence_statements(key).await?;
        }
        self.check_statement().await
    }

    /// The key as the server sees it; a name is hashed by the server (and remembered).
    async fn resolve(&mut self, key: &LockKey) -> io::Result<Resolved> {
        Ok(match key {
            LockKey::Id(k) => Resolved::Id(*k),
            LockKey::Pair(a, b) => Resolved::Pair(*a, *b),
            LockKey::Name(name) => {
                if let Some(k) = self.0.cache.names.get(name.as_ref()) {
                    return Ok(Resolved::Id(*k));
                }
                let row = self
                    .0
                    .client
                    .query_one("SELECT hashtextextended($1, 0)", &[&name.as_ref()])
                    .await
                    .map_err(|e| self.error(e, &format!("cannot hash the lock name {name:?}")))?;
                let k: i64 = row.get(0);
                self.0.cache.names.insert(name.to_string(), k);
                Resolved::Id(k)
            }
        })
    }

    /// Prepares the lock statements for keys of `key`'s form, once.
    async fn statements(&mut self, key: Resolved) -> io::Result<()> {
        if self.0.cache.stmts[key.form()].is_some() {
            return Ok(());
        }
        let shared = self.0.options.shared;
        let sfx = if shared { "_shared" } else { "" };
        let args = key.args();
        let prepare = |sql: String| {
            let client = Arc::clone(&self.0.client);
            async move { client.prepare(&sql).await }
        };
        let (lock, try_lock, unlock) = tokio::try_join!(
            prepare(format!("SELECT pg_advisory_lock{sfx}({args})")),
            prepare(format!("SELECT pg_try_advisory_lock{sfx}({args})")),
            prepare(format!("SELECT pg_advisory_unlock{sfx}({args})")),
        )
        .map_err(|e| self.error(e, "cannot prepare the lock statements"))?;
        self.0.cache.stmts[key.form()] = Some(Statements {
            lock,
            try_lock,
            unlock,
        });
        Ok(())
    }

    /// The lock statements that also bump the key's fence counter, in the same
    /// statement: `(wait, try)`, each returning the new token (no row when `try` did not
    /// get the lock). The table is created on first use.
    async fn fence_statements(&mut self, key: Resolved) -> io::Result<()> {
        if self.0.cache.fence_stmts[key.form()].is_some() {
            return Ok(());
        }
        let shared = self.0.options.shared;
        let table = quote_ident(self.0.options.fence_table.as_deref().unwrap_or_default());
        let sfx = if shared { "_shared" } else { "" };
        let (args, cols) = (key.args(), key.fence_columns());
        // The counter is bumped after the lock is granted (the insert reads the CTE's
        // row) and committed at once (autocommit). In READ COMMITTED, ON CONFLICT DO
        // UPDATE updates the latest committed row even if the statement's snapshot is
        // older (taken before the lock wait), so each holder gets a larger token than
        // every earlier holder got.
        let sql = |try_: &str, filter: &str| {
            format!(
                "WITH l AS (SELECT pg_{try_}advisory_lock{sfx}({args}) AS got) \
                 INSERT INTO {table} AS f (space, key, token) SELECT {cols}, 1 FROM l {filter} \
                 ON CONFLICT (space, key) DO UPDATE SET token = f.token + 1 RETURNING f.token"
            )
        };
        let (wait_sql, try_sql) = (sql("", ""), sql("try_", "WHERE got"));
        let mut created = false;
        loop {
            let prepared = tokio::try_join!(
                self.0.client.prepare(&wait_sql),
                self.0.client.prepare(&try_sql)
            );
            match prepared {
                Ok(pair) => {
                    self.0.cache.fence_stmts[key.form()] = Some(pair);
                    return Ok(());
                }
                Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) && !created => {
                    created = true;
                    let create = format!(
                        "CREATE TABLE IF NOT EXISTS {table} (space int2 NOT NULL, key int8 NOT NULL, \
                         token int8 NOT NULL, PRIMARY KEY (space, key))"
                    );
                    match self.0.client.batch_execute(&create).await {
                        Ok(()) => {}
                        // Created by another session at the same moment.
                        Err(e)
                            if e.code() == Some(&SqlState::UNIQUE_VIOLATION)
                                || e.code() == Some(&SqlState::DUPLICATE_TABLE) => {}
                        Err(e) => {
                            return Err(
                                self.error(e, &format!("cannot create the fence table {table}"))
                            );
                        }
                    }
                }
                Err(e) => {
                    return Err(self.error(
                        e,
                        &format!("cannot prepare the fenced lock statements (table {table})"),
                    ));
                }
            }
        }
    }

    /// The liveness check: does this session still hold the lock?
    async fn check_statement(&mut self) -> io::Result<()> {
        if self.0.watched.check.get().is_some() {
            return Ok(());
        }
        let s = self
            .0
            .client
            .prepare(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND pid = pg_backend_pid() AND classid = $1::oid AND objid = $2::oid \
                 AND objsubid = $3::int2 AND granted)",
            )
            .await
            .map_err(|e| self.error(e, "cannot prepare the liveness check"))?;
        let _ = self.0.watched.check.set(s);
        Ok(())
    }

    async fn holders(&mut self, key: Resolved) -> io::Result<Vec<Holder>> {
        let stmt = match &self.0.cache.holders {
            Some(s) => s.clone(),
            None => {
                let s = self
                    .0.client
                    .prepare(
                        "SELECT l.pid, coalesce(a.application_name, ''), host(a.client_addr), \
                         l.mode = 'ShareLock' FROM pg_locks l \
                         LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
                         WHERE l.locktype = 'advisory' \
                         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                         AND l.classid = $1::oid AND l.objid = $2::oid AND l.objsubid = $3::int2 \
                         AND l.granted AND l.pid <> pg_backend_pid() ORDER BY l.pid",
                    )
                    .await
                    .map_err(|e| self.error(e, "cannot prepare the holders query"))?;
                self.0.cache.holders = Some(s.clone());
                s
            }
        };
        let (classid, objid, objsubid) = key.pg_locks();
        let rows = self
            .0
            .client
            .query(&stmt, &[&classid, &objid, &objsubid])
            .await
            .map_err(|e| self.error(e, "cannot read the lock's holders"))?;
        Ok(rows
            .iter()
            .map(|row| Holder {
                pid: row.get(0),
                application_name: row.get(1),
                client_addr: row.get(2),
                shared: row.get(3),
            })
            .collect())
    }
}

impl fmt::Debug for PgSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgSession")
            .field("endpoint", &self.0.endpoint)
            .field("backend_pid", &self.0.backend_pid)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// While a lock query is in flight: if the acquiring future is dropped, a cancel
/// request stops the server's wait (a backend waiting for a lock does not notice that
/// its client went away), and the connection is closed. It borrows the session, so that
/// arming it costs nothing.
struct CancelOnDrop<'a>(Option<&'a PgSession>);

impl CancelOnDrop<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.0.take() {
            let (token, conn_task) = (session.0.client.cancel_token(), session.0.conn_task.clone());
            let reaper = session
                .0
                .options
                .reaper
                .as_ref()
                .unwrap_or(Reaper::global());
            reaper.defer(async move {
                let result = token.cancel_query(NoTls).await;
                conn_task.abort();
                result
            });
        }
    }
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
