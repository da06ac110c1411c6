//! Async cleanup that survives cancellation and drains at shutdown (feature `tokio`).
//!
//! `Drop` cannot `.await`. Hand-written `tokio::spawn(cleanup)` in `Drop` panics outside
//! a runtime, is lost while the runtime shuts down and is never awaited at exit; blocking
//! in `Drop` (`block_on`, `block_in_place`) deadlocks or panics on a current-thread
//! runtime. And a future cancelled by `select!` or `timeout` drops its guards mid-flight,
//! so the goodbye frame, the unlock or the `shutdown()` never happens.
//!
//! Here:
//! - [`AsyncGuard`] wraps a value with an async cleanup. `AsyncGuard::close(g).await` runs it and
//!   returns its error; a guard dropped without it (early return, `?`, panic,
//!   cancellation) hands the cleanup to a [`Reaper`], which runs it on the runtime,
//!   shielded from the cancelled caller. `Drop` never blocks.
//! - The [`Reaper`] owns those cleanups; [`Reaper::shutdown`] waits for them with a
//!   deadline and returns a [`DrainReport`]: completed, failed (with errors, kinds and
//!   sites), aborted at the deadline, lost. [`ShutdownSignals`] and
//!   [`shutdown_on_signal`] end a service on SIGINT/SIGTERM with that drain.
//! - [`scope()`] and [`AsyncCleanupStack`] are the async `with` block and `ExitStack`:
//!   LIFO, every error kept, and the pending cleanups of a cancelled scope go to the
//!   reaper.
//! - [`AsyncClose`] is the async twin of [`Close`](crate::Close).
//!
//! Nothing is dropped silently: a cleanup that cannot run (no runtime, the runtime
//! already shut down, the reaper already drained) or that is aborted at the deadline is
//! a tracing `error` event under target `custodian` and a failure in the
//! [ledger](crate::ledger).
//!
//! ```
//! use custodian::rt::{AsyncGuard, Reaper};
//! use std::time::Duration;
//! use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
//! use tokio::net::{TcpListener, TcpStream};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let listener = TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let peer = tokio::spawn(async move {
//!     let (socket, _) = listener.accept().await?;
//!     let mut lines = BufReader::new(socket).lines();
//!     lines.next_line().await
//! });
//!
//! let client = async {
//!     let conn = AsyncGuard::new(TcpStream::connect(addr).await?, |mut s| async move {
//!         s.write_all(b"goodbye\n").await?;
//!         s.shutdown().await
//!     });
//!     std::future::pending::<()>().await; // a request that never ends...
//!     drop(conn);
//!     Ok::<_, std::io::Error>(())
//! };
//! // ... is cancelled, dropping the guard mid-flight: the goodbye is still sent.
//! assert!(tokio::time::timeout(Duration::from_millis(50), client).await.is_err());
//! assert_eq!(peer.await??.as_deref(), Some("goodbye"));
//!
//! let report = Reaper::global().shutdown(Duration::from_secs(5)).await;
//! assert!(report.is_clean());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

mod close;
mod guard;
mod reaper;
mod scope;
// tokio leaves out its signal module under `--cfg loom` (see tally.rs for loom tests).
#[cfg(not(loom))]
mod signal;
mod stack;
mod tally;

pub use close::AsyncClose;
pub use guard::{AsyncGuard, AsyncGuardBuilder};
pub use reaper::{DrainReport, Reaper};
pub use scope::{AsyncScope, Entered, scope};
#[cfg(not(loom))]
pub use signal::{ShutdownSignal, ShutdownSignals, shutdown_on_signal};
pub use stack::AsyncCleanupStack;
