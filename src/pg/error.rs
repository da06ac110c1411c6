//! Errors of the PostgreSQL lock: who holds a lock, why one was lost, and
//! `tokio_postgres::Error` turned into `io::Error` with the server named.

use std::error::Error;
use std::fmt;
use std::io;
use std::time::Duration;

use tokio_postgres::error::SqlState;

use super::session::PgSession;

/// A session that holds an advisory lock, as `pg_locks` and `pg_stat_activity` show it.
///
/// ```no_run
/// # async fn f(options: custodian::pg::PgLockBuilder) -> std::io::Result<()> {
/// if let Err(held) = options.try_acquire(42).await? {
///     for h in held.holders() {
///         println!("held by backend {} ({:?}) from {:?}", h.pid(), h.application_name(), h.client_addr());
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub(crate) pid: i32,
    pub(crate) application_name: String,
    pub(crate) client_addr: Option<String>,
    pub(crate) shared: bool,
}

impl Holder {
    /// The holder's backend pid (on the server: `pg_terminate_backend(pid)` ends it).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The holder's `application_name` (empty if it set none; `custodian` by default for
    /// custodian's own sessions). Hidden (empty) for other roles' sessions unless the
    /// role reading it has `pg_read_all_stats`.
    pub fn application_name(&self) -> &str {
        &self.application_name
    }

    /// The holder's client address, `None` for a Unix-socket client or when hidden (as
    /// for [`application_name`](Holder::application_name)).
    pub fn client_addr(&self) -> Option<&str> {
        self.client_addr.as_deref()
    }

    /// Whether it holds the lock in shared mode.
    pub fn is_shared(&self) -> bool {
        self.shared
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "backend pid {} (application_name {:?}, client {}{})",
            self.pid,
            self.application_name,
            self.client_addr.as_deref().unwrap_or("local or hidden"),
            if self.shared { ", shared" } else { "" }
        )
    }
}

/// The lock was held by another session: what [`try_acquire`] returns as `Ok(Err(held))`,
/// and what the `io::Error` of kind [`WouldBlock`](io::ErrorKind::WouldBlock) returned by
/// [`acquire_timeout`] holds when the time is up (get it with [`of`](PgLockHeld::of) or
/// [`from_io`](PgLockHeld::from_io)). It names the key, the server and the holders, and
/// gives back the session that tried ([`into_session`](PgLockHeld::into_session)), so
/// that it can try again without reconnecting.
///
/// ```no_run
/// use custodian::pg::PgLockBuilder;
///
/// # async fn f() -> std::io::Result<()> {
/// let options = PgLockBuilder::parse("host=127.0.0.1 user=app dbname=app")?;
/// match options.try_acquire("nightly-report").await? {
///     Ok(lock) => lock.close().await?,
///     Err(held) => {
///         println!("{held}"); // "exclusive advisory lock "nightly-report" on ... is held by backend pid 4242 ..."
///         let session = held.into_session(); // still open, holding nothing
///         let lock = session.acquire("nightly-report").await?; // wait this time
///         lock.close().await?;
///     }
/// }
/// # Ok(()) }
/// ```
///
/// [`try_acquire`]: super::PgLockBuilder::try_acquire
/// [`acquire_timeout`]: super::PgLockBuilder::acquire_timeout
#[derive(Debug)]
pub struct PgLockHeld {
    pub(crate) what: String,
    pub(crate) holders: Vec<Holder>,
    pub(crate) waited: Duration,
    pub(crate) session: PgSession,
}

impl PgLockHeld {
    /// The `PgLockHeld` inside `err`, if that is what it is.
    ///
    /// ```no_run
    /// # async fn f(options: custodian::pg::PgLockBuilder) {
    /// let err = options.acquire_timeout(42, std::time::Duration::from_secs(1)).await.unwrap_err();
    /// if let Some(held) = custodian::pg::PgLockHeld::of(&err) {
    ///     println!("waited {:?}; held by {:?}", held.waited(), held.holders());
    /// }
    /// # }
    /// ```
    pub fn of(err: &io::Error) -> Option<&PgLockHeld> {
        err.get_ref()?.downcast_ref()
    }

    /// The `PgLockHeld` inside `err`, by value (to get the session back), or `err`
    /// unchanged if it holds something else.
    ///
    /// ```no_run
    /// use custodian::pg::PgLockHeld;
    /// use std::time::Duration;
    ///
    /// # async fn f(session: custodian::pg::PgSession) -> std::io::Result<()> {
    /// let lock = match session.acquire_timeout(42, Duration::from_secs(1)).await {
    ///     Ok(lock) => lock,
    ///     // Try once more, on the same session, without a deadline.
    ///     Err(e) => PgLockHeld::from_io(e)?.into_session().acquire(42).await?,
    /// };
    /// lock.close().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// `err` itself when it does not hold a `PgLockHeld`.
    pub fn from_io(err: io::Error) -> Result<PgLockHeld, io::Error> {
        if PgLockHeld::of(&err).is_none() {
            return Err(err);
        }
        let kind = err.kind();
        match err.into_inner().map(|inner| inner.downcast::<PgLockHeld>()) {
            Some(Ok(held)) => Ok(*held),
            // Checked above; kept total rather than panicking.
            Some(Err(inner)) => Err(io::Error::new(kind, inner)),
            None => Err(io::Error::from(kind)),
        }
    }

    /// The session that tried to take the lock, still open and holding nothing, to try
    /// again without reconnecting.
    pub fn into_session(self) -> PgSession {
        self.session
    }

    /// The sessions that held the lock just after the attempt failed (may be empty if
    /// the holder let go in between).
    pub fn holders(&self) -> &[Holder] {
        &self.holders
    }

    /// How long the attempt waited: zero for `try_acquire`, and for `acquire` when the
    /// server's own `lock_timeout` ended the wait.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

/// An `io::Error` of kind `WouldBlock` holding the `PgLockHeld`, as `acquire_timeout`
/// returns it.
impl From<PgLockHeld> for io::Error {
    fn from(held: PgLockHeld) -> io::Error {
        io::Error::new(io::ErrorKind::WouldBlock, held)
    }
}

impl fmt::Display for PgLockHeld {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is held", self.what)?;
        if !self.waited.is_zero() {
            write!(f, " (waited {:?})", self.waited)?;
        }
        match self.holders.as_slice() {
            [] => write!(f, " (its holder let go just now)"),
            holders => {
                f.write_str(" by ")?;
                for (i, h) in holders.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{h}")?;
                }
                Ok(())
            }
        }
    }
}

impl Error for PgLockHeld {}

/// Why a [`PgLock`](super::PgLock) can no longer be assumed held ([`PgLock::lost`]).
///
/// [`PgLock::lost`]: super::PgLock::lost
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostCause {
    /// The server ended the session (`pg_terminate_backend`, a restart or shutdown):
    /// its message.
    Terminated(String),
    /// The connection ended (reset, closed, keepalive failure): the error.
    ConnectionClosed(String),
    /// The liveness check failed with this error.
    CheckFailed(String),
    /// The liveness check got no answer within this time (a half-open connection, a
    /// stalled server).
    CheckTimedOut(Duration),
    /// The liveness check found that this session no longer holds the lock (for
    /// example behind a transaction-mode pooler that moved it to another server
    /// connection).
    NotHeld,
}

impl fmt::Display for LostCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LostCause::Terminated(msg) => write!(f, "the server ended the session: {msg}"),
            LostCause::ConnectionClosed(e) => write!(f, "the connection ended: {e}"),
            LostCause::CheckFailed(e) => write!(f, "the liveness check failed: {e}"),
            LostCause::CheckTimedOut(d) => {
                write!(f, "the liveness check got no answer within {d:?}")
            }
            LostCause::NotHeld => f.write_str("the session no longer holds the lock"),
        }
    }
}

/// The cause of a connection's end, from the error its task returned.
pub(crate) fn closed_cause(e: Option<&tokio_postgres::Error>) -> LostCause {
    match e {
        None => LostCause::ConnectionClosed("closed by the server".into()),
        Some(e) => match e.as_db_error() {
            Some(db) => LostCause::Terminated(format!("{}: {}", db.severity(), db.message())),
            None => LostCause::ConnectionClosed(chain(e)),
        },
    }
}

/// `e` with its sources, on one line.
pub(crate) fn chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// A tokio-postgres error as an `io::Error` saying what was done where, with the kind of
/// the underlying I/O error kept (connection refused, timed out, ...).
#[cold]
pub(crate) fn pg_error(e: tokio_postgres::Error, what: fmt::Arguments<'_>) -> io::Error {
    let kind = if let Some(io) = e.source().and_then(|s| s.downcast_ref::<io::Error>()) {
        io.kind()
    } else if let Some(db) = e.as_db_error() {
        match *db.code() {
            SqlState::LOCK_NOT_AVAILABLE => io::ErrorKind::WouldBlock,
            SqlState::ADMIN_SHUTDOWN | SqlState::CRASH_SHUTDOWN => io::ErrorKind::ConnectionAborted,
            SqlState::INVALID_PASSWORD
            | SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            | SqlState::INSUFFICIENT_PRIVILEGE => io::ErrorKind::PermissionDenied,
            SqlState::INVALID_CATALOG_NAME | SqlState::UNDEFINED_TABLE => io::ErrorKind::NotFound,
            _ => io::ErrorKind::Other,
        }
    } else if e.is_closed() {
        io::ErrorKind::BrokenPipe
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, format!("{what}: {}", chain(&e)))
}
