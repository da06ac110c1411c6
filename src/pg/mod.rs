//! Locks across machines: PostgreSQL session-level advisory locks that notice when they
//! were lost (feature `postgres`, on tokio-postgres and [`rt`](crate::rt)).
//!
//! [`LockFile`](crate::fs::LockFile) serialises processes on one host. Replicas on
//! several machines reach for a PostgreSQL advisory lock instead (leader election, a
//! singleton cron job, migrations), and hand-written versions get the same things wrong:
//! the lock leaks when the future holding it is cancelled and its pooled connection goes
//! back to the pool still holding it; the session dies (restart, failover,
//! `pg_terminate_backend`, a half-open connection), the server frees the lock, another
//! replica takes it, and the old holder keeps working because nothing tells it; `Drop`
//! blocks, or does not release at all; and there is no fencing token to reject a stale
//! holder's writes.
//!
//! [`PgLock`] gets these right:
//! - it holds the lock on a **dedicated** connection it owns, never a pooled one;
//! - acquiring is cancel-safe: a cancelled wait is cancelled on the server and the
//!   connection closed, so the lock is never left held;
//! - [`PgLock::lost`] completes when the lock can no longer be assumed held, with a
//!   documented bound (see [`PgLock`]);
//! - [`PgLock::fence`] is a token that grows with every acquisition of the key;
//! - `close().await` reports an unlock the server refused; `Drop` never blocks: the
//!   unlock runs on the [`Reaper`](crate::rt::Reaper), and if it cannot, the connection
//!   is closed so that the server frees the lock.
//!
//! Like every guard, a lock is counted in the [ledger](crate::ledger) (kind
//! `custodian::pg::PgLock`, resource = the key and server, acquisition site) and its
//! failures are tracing `error` events under target `custodian`.
//!
//! ```no_run
//! use custodian::pg::PgLockBuilder;
//!
//! # async fn send_report(fence: i64) {}
//! # async fn f() -> std::io::Result<()> {
//! let options = PgLockBuilder::parse("host=db.internal user=app dbname=app")?;
//! // I/O errors (unreachable server, ...) in the outer `Result`, "held" in the inner one.
//! match options.try_acquire("nightly-report").await? {
//!     Ok(lock) => {
//!         tokio::select! {
//!             _ = send_report(lock.fence().unwrap()) => lock.close().await?,
//!             _ = lock.lost() => eprintln!("lost the lock: {}", lock.lost_cause().unwrap()),
//!         }
//!     }
//!     // "exclusive advisory lock "nightly-report" on db.internal:5432 is held by backend pid 4242 ..."
//!     Err(held) => println!("{held}"),
//! }
//! # Ok(()) }
//! ```
//!
//! Keys are an `i64`, a pair of `i32`, or a name hashed by the server
//! (`hashtextextended(name, 0)`), so that clients in other languages agree: see
//! [`LockKey`].
//!
//! The tests run against a real server: `scripts/with-postgres cargo test --all-features
//! --test pg` starts a throwaway one.

mod error;
mod key;
mod lock;
mod session;
mod watch;

pub use error::{Holder, LostCause, PgLockHeld};
pub use key::LockKey;
pub use lock::PgLock;
pub use session::{PgLockBuilder, PgSession};
