//! RAII resource guards that release files, sockets, locks, processes and async
//! connections on every path, and report what `Drop` alone would lose.
//!
//! Use custodian when:
//! - a cleanup can fail and you need to know ([`Close`], [`CleanupStack::close`]);
//! - the cleanup depends on the outcome: commit on success, roll back on `Err`
//!   ([`scope`], [`Rollback`]);
//! - several cleanups run in one place and none of their errors may be lost
//!   ([`CleanupStack`], [`ScopeError`]);
//! - a file must be replaced atomically, locked across processes, closed with its errors
//!   checked, or removed with its removal checked ([`fs`]);
//! - a socket, a child process or a lock needs cleanup std does not do: a Unix socket
//!   path unlinked, a child stopped and reaped, a TCP connection closed without losing
//!   the last response, a warning when a lock is held too long ([`net`], [`process`],
//!   [`sync`]);
//! - you want to know which resources are alive and where they were acquired, and to
//!   fail a test that leaks one ([`ledger`]);
//! - an async cleanup (a goodbye frame, an unlock) must run even when the future holding
//!   the resource is cancelled, and be drained at shutdown (`custodian::rt`, feature
//!   `tokio`).
//!
//! The zero-cost guards ([`guard`], [`defer!`], [`guard_on_success`],
//! [`guard_on_unwind`], [`ScopeGuard`]) are scopeguard's, re-exported.
//!
//! ```
//! use std::cell::RefCell;
//!
//! let log = RefCell::new(Vec::new());
//! let result = custodian::scope(|s| {
//!     s.defer(|| log.borrow_mut().push("release"));
//!     s.on_success(|| log.borrow_mut().push("commit"));
//!     s.on_err(|_: &std::io::Error| log.borrow_mut().push("roll back"));
//!     Ok(42)
//! });
//! assert_eq!(result.unwrap(), 42);
//! assert_eq!(*log.borrow(), ["commit", "release"]);
//! ```
//!
//! # Reporting
//! Every guard carries a [`ledger::Ticket`]. A cleanup that fails in `Drop` cannot
//! return its error, so it becomes a tracing `error` event under target `custodian`
//! (fields `kind`, `site`, `resource`, `error`) and a `failed` count in the ledger.
//! Acquisition and release are `trace` events; a cleanup done by `Drop` instead of an
//! explicit `close` is a `debug` event.
//!
//! # Crate features
//! - `net` (default) — [`net`]: Unix listener and graceful TCP guards (socket2).
//! - `process` (default) — [`process`]: child process guards (process-wrap).
//! - `tokio` — [`rt`]: async guards and the reaper that runs async cleanup of dropped
//!   guards; with `net` or `process`, their async guards.
//! - `postgres` — [`pg`]: PostgreSQL advisory locks that notice when they were lost
//!   (implies `tokio`).
//!
//! `default-features = false` leaves `scope`, `CleanupStack`, `Rollback`, [`fs`],
//! [`sync`] and the [`ledger`], on scopeguard, tempfile, smallvec, tracing and rustix.
//!
//! Public dependencies (their types appear in custodian's API): `tempfile` (whose
//! `TempDir`, `NamedTempFile` and `Builder` [`fs::TempDir`] and [`fs::TempFile`] wrap,
//! deref to, give back and accept), `tracing` (the events), `scopeguard` (re-exported
//! guards), and with `tokio`, tokio's runtime `Handle`, `net::TcpStream` and
//! `net::UnixListener` (wrapped by the async guards) and `process::Command`/`Child`; with
//! `postgres`, tokio-postgres' `Config` and `Client` and tokio-util's `CancellationToken`
//! (`PgLock::lost_token`).
//!
//! # Rust version
//! 1.89 or newer (std's `File::lock`).
//!
//! # When destructors do not run
//! Rust does not promise that `Drop` runs: `std::process::abort`, `process::exit`, a
//! `mem::forget`, an `Rc` cycle, a guard parked in a global or a long-lived map, or a
//! crash all skip it. custodian cannot run cleanup that never gets the chance; what it
//! does is make it visible: the ledger still counts the resource as live and, with site
//! tracking on, [`ledger::live`] names its kind and acquisition site, and
//! [`ledger::assert_no_leaks`] fails a test that leaks one. Resources the kernel frees at
//! process exit (file descriptors, `flock` locks) are released anyway; resources it does
//! not (temporary files, socket paths, child processes) need the guards' crash-safe
//! designs, documented on each guard.

#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![deny(unsafe_op_in_unsafe_fn)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod close;
mod error;
pub mod fs;
mod io_error;
pub mod ledger;
#[cfg(all(unix, feature = "net"))]
#[cfg_attr(docsrs, doc(cfg(feature = "net")))]
pub mod net;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod pg;
#[cfg(all(unix, feature = "process"))]
#[cfg_attr(docsrs, doc(cfg(feature = "process")))]
pub mod process;
mod rollback;
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub mod rt;
mod scope;
// The reaper's bookkeeping, model-checked on its own with loom:
// `RUSTFLAGS="--cfg loom" cargo test --release --lib tally`. Under `--cfg loom` tokio
// leaves out its process and signal modules, which the rest of `rt` (and process-wrap's
// tokio support) need, so the loom build compiles this one file without the feature.
mod slot;
mod stack;
pub mod sync;
#[cfg(all(loom, not(feature = "tokio")))]
#[allow(dead_code)]
#[path = "rt/tally.rs"]
mod tally;

pub use close::Close;
pub use error::{BoxError, CleanupError, CleanupErrors, GuardError};
pub use io_error::raw_os_error;
pub use rollback::Rollback;
pub use scope::{Scope, ScopeError, scope};
pub use stack::{CleanupStack, Outcome};

pub use scopeguard::{ScopeGuard, defer, guard, guard_on_success, guard_on_unwind};

#[doc = include_str!("../README.md")]
#[cfg(all(doctest, feature = "net", feature = "process"))]
pub struct ReadmeDoctests;
