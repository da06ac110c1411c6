//! Shutdown on SIGINT/SIGTERM: wait for the signal, then drain the reaper.

use std::fmt;
use std::io;
use std::time::Duration;

use super::{DrainReport, Reaper};

/// The signal that asked the process to stop.
///
/// ```no_run
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use custodian::rt::{ShutdownSignal, ShutdownSignals};
///
/// let mut signals = ShutdownSignals::new()?; // waits for a real SIGINT or SIGTERM
/// match signals.recv().await {
///     ShutdownSignal::Terminate => eprintln!("stopping: asked by the supervisor"),
///     other => eprintln!("stopping on {other}"),
/// }
/// # Ok::<(), std::io::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ShutdownSignal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM (what `kill`, systemd and Kubernetes send). Unix only.
    Terminate,
}

impl fmt::Display for ShutdownSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShutdownSignal::Interrupt => "SIGINT",
            ShutdownSignal::Terminate => "SIGTERM",
        })
    }
}

/// Listens for SIGINT and SIGTERM (on non-Unix systems, Ctrl-C only).
///
/// The handlers are installed when it is created, so a signal that arrives any time
/// after that is seen by [`recv`](ShutdownSignals::recv), and no longer kills the
/// process. Create it early in `main`.
///
/// (Compiled, not run: it waits for a real SIGINT or SIGTERM.)
///
/// ```no_run
/// use custodian::rt::{Reaper, ShutdownSignals};
/// use std::time::Duration;
///
/// #[tokio::main]
/// async fn main() -> std::io::Result<()> {
///     let mut signals = ShutdownSignals::new()?;
///     // ... start serving in spawned tasks ...
///     let signal = signals.recv().await;
///     let report = Reaper::global().shutdown(Duration::from_secs(10)).await;
///     eprintln!("{signal}: {report}");
///     Ok(())
/// }
/// ```
#[derive(Debug)]
pub struct ShutdownSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Installs the handlers.
    ///
    /// # Errors
    /// If the OS refuses to install a handler.
    ///
    /// # Panics
    /// Outside a tokio runtime with its I/O driver on (tokio's own panic).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let signals = custodian::rt::ShutdownSignals::new()?;
    /// # drop(signals);
    /// # Ok::<(), std::io::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn new() -> io::Result<ShutdownSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(ShutdownSignals {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(ShutdownSignals {})
        }
    }

    /// Waits for the next SIGINT or SIGTERM.
    ///
    /// # Cancel safety
    /// Cancel-safe: a signal that arrives while nobody waits is kept for the next call.
    ///
    /// (Compiled, not run: it waits for a real SIGINT or SIGTERM.)
    ///
    /// ```no_run
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let mut signals = custodian::rt::ShutdownSignals::new()?;
    /// println!("stopping on {}", signals.recv().await);
    /// # Ok::<(), std::io::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn recv(&mut self) -> ShutdownSignal {
        #[cfg(unix)]
        {
            tokio::select! {
                Some(()) = self.interrupt.recv() => ShutdownSignal::Interrupt,
                Some(()) = self.terminate.recv() => ShutdownSignal::Terminate,
                else => std::future::pending().await,
            }
        }
        #[cfg(not(unix))]
        {
            match tokio::signal::ctrl_c().await {
                Ok(()) => ShutdownSignal::Interrupt,
                Err(_) => std::future::pending().await,
            }
        }
    }

    /// Waits for SIGINT or SIGTERM, then drains `reaper` with `timeout`
    /// ([`Reaper::shutdown`]): the end of a service's `main`.
    ///
    /// # Panics
    /// As [`Reaper::shutdown`].
    ///
    /// # Cancel safety
    /// Cancel-safe while waiting for the signal; see [`Reaper::shutdown`] after it.
    ///
    /// (Compiled, not run: it waits for a real SIGINT or SIGTERM.)
    ///
    /// ```no_run
    /// use custodian::rt::{Reaper, ShutdownSignals};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let signals = ShutdownSignals::new()?;
    /// let (signal, report) = signals
    ///     .drain(Reaper::global(), std::time::Duration::from_secs(10))
    ///     .await;
    /// println!("{signal}: {report}");
    /// # Ok::<(), std::io::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn drain(
        mut self,
        reaper: &Reaper,
        timeout: Duration,
    ) -> (ShutdownSignal, DrainReport) {
        let signal = self.recv().await;
        tracing::info!(target: "custodian", %signal, ?timeout, "shutting down: draining the reaper");
        (signal, reaper.shutdown(timeout).await)
    }
}

/// Waits for SIGINT or SIGTERM, then drains `reaper` with `timeout` and returns the
/// signal and the [`DrainReport`]. The handlers are installed at the first poll; to be
/// sure no early signal is missed, create [`ShutdownSignals`] first instead.
///
/// # Errors
/// If a signal handler cannot be installed.
///
/// # Panics
/// Outside a tokio runtime with its I/O and time drivers on.
///
/// # Cancel safety
/// Cancel-safe while waiting for the signal; see [`Reaper::shutdown`] after it.
///
/// (Compiled, not run: it waits for a real SIGINT or SIGTERM.)
///
/// ```no_run
/// use custodian::rt::{Reaper, shutdown_on_signal};
/// use std::time::Duration;
///
/// #[tokio::main]
/// async fn main() -> std::io::Result<()> {
///     // ... spawn the service's tasks ...
///     let (signal, report) = shutdown_on_signal(Reaper::global(), Duration::from_secs(10)).await?;
///     eprintln!("stopped on {signal}: {report}");
///     Ok(())
/// }
/// ```
pub async fn shutdown_on_signal(
    reaper: &Reaper,
    timeout: Duration,
) -> io::Result<(ShutdownSignal, DrainReport)> {
    Ok(ShutdownSignals::new()?.drain(reaper, timeout).await)
}
