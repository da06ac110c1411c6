//! Child processes that are stopped and reaped on every path: no orphans left running,
//! no zombies left behind.
//!
//! std's `Child` is neither killed nor reaped when dropped: the process runs on, and
//! once it exits it stays a zombie until the parent exits. tokio's `kill_on_drop` kills
//! but does not promise the reap. [`ChildGuard`] (and, with feature `tokio`,
//! [`AsyncChildGuard`]) do both, gracefully: on close or drop they send `SIGTERM` (or
//! the signal you choose), give the child a grace period, send `SIGKILL` if it is still
//! there, and always wait for its exit status. Spawned in its own process group, the
//! whole group is signalled, so grandchildren go too.
//!
//! Spawning and group reaping come from the `process-wrap` crate; custodian adds the
//! graceful stop, the reap guarantee and pid-reuse safety: the guard only reaps after
//! its last signal, and an unreaped child (even a zombie) keeps its pid and group id
//! reserved, so a signal can never hit an unrelated process that recycled the pid.
//!
//! ```
//! use custodian::process::ChildGuardBuilder;
//! use std::process::Command;
//! use std::time::Duration;
//!
//! let mut cmd = Command::new("sh");
//! cmd.args(["-c", "sleep 30 & sleep 30"]); // a child with a grandchild
//! let child = ChildGuardBuilder::new()
//!     .process_group(true)
//!     .grace(Duration::from_secs(2))
//!     .spawn(cmd)?;
//! let status = child.close()?; // SIGTERM to the group, reaped
//! assert!(!status.success());
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! A process group does not contain a descendant that calls `setsid` (a daemon): that
//! one escapes, as it does from every process-group based tool.

use std::time::Duration;

mod child;
mod sys;
#[cfg(feature = "tokio")]
mod tokio;

pub use child::ChildGuard;
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub use tokio::AsyncChildGuard;

/// A signal to stop a child with.
///
/// ```
/// use custodian::process::Signal;
/// assert_eq!(Signal::TERM.as_raw(), 15);
/// assert_eq!(Signal::from_raw(2), Signal::INT);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Signal(i32);

impl Signal {
    /// `SIGTERM`, the default: "please stop".
    pub const TERM: Signal = Signal(rustix::process::Signal::TERM.as_raw());
    /// `SIGINT`, what Ctrl-C sends.
    pub const INT: Signal = Signal(rustix::process::Signal::INT.as_raw());
    /// `SIGHUP`.
    pub const HUP: Signal = Signal(rustix::process::Signal::HUP.as_raw());
    /// `SIGQUIT`.
    pub const QUIT: Signal = Signal(rustix::process::Signal::QUIT.as_raw());
    /// `SIGUSR1`.
    pub const USR1: Signal = Signal(rustix::process::Signal::USR1.as_raw());
    /// `SIGUSR2`.
    pub const USR2: Signal = Signal(rustix::process::Signal::USR2.as_raw());
    /// `SIGKILL`, which cannot be caught or ignored.
    pub const KILL: Signal = Signal(rustix::process::Signal::KILL.as_raw());

    /// A signal by number. An invalid number is refused when the signal is sent.
    ///
    /// ```
    /// assert_eq!(custodian::process::Signal::from_raw(9), custodian::process::Signal::KILL);
    /// ```
    pub const fn from_raw(signal: i32) -> Signal {
        Signal(signal)
    }

    /// The signal's number.
    ///
    /// ```
    /// assert_eq!(custodian::process::Signal::KILL.as_raw(), 9);
    /// ```
    pub const fn as_raw(self) -> i32 {
        self.0
    }
}

/// How a child is stopped: which signal first, how long a grace period, whether its
/// whole process group is signalled. A builder for [`ChildGuard`] (and
/// [`AsyncChildGuard`]).
///
/// ```
/// use custodian::process::{ChildGuardBuilder, Signal};
/// use std::time::Duration;
///
/// let options = ChildGuardBuilder::new()
///     .signal(Signal::INT)
///     .grace(Duration::from_millis(500))
///     .process_group(true);
/// let child = options.spawn(std::process::Command::new("true"))?;
/// child.close()?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a builder does nothing until `spawn` or `guard`"]
pub struct ChildGuardBuilder {
    signal: Signal,
    grace: Duration,
    group: bool,
}

impl Default for ChildGuardBuilder {
    fn default() -> Self {
        ChildGuardBuilder::new()
    }
}

impl ChildGuardBuilder {
    /// How long a child gets between the first signal and `SIGKILL` by default: 3 s.
    pub const DEFAULT_GRACE: Duration = Duration::from_secs(3);

    /// `SIGTERM`, a grace period of [`DEFAULT_GRACE`](Self::DEFAULT_GRACE), no process
    /// group.
    ///
    /// ```
    /// let options = custodian::process::ChildGuardBuilder::new();
    /// assert_eq!(options.get_signal(), custodian::process::Signal::TERM);
    /// ```
    pub const fn new() -> ChildGuardBuilder {
        ChildGuardBuilder {
            signal: Signal::TERM,
            grace: Self::DEFAULT_GRACE,
            group: false,
        }
    }

    /// The signal sent first (default `SIGTERM`).
    ///
    /// ```
    /// use custodian::process::{ChildGuardBuilder, Signal};
    /// assert_eq!(ChildGuardBuilder::new().signal(Signal::HUP).get_signal(), Signal::HUP);
    /// ```
    #[must_use = "the builder is returned, not changed in place"]
    pub const fn signal(mut self, signal: Signal) -> ChildGuardBuilder {
        self.signal = signal;
        self
    }

    /// How long the child gets to exit after the first signal before `SIGKILL`.
    ///
    /// ```
    /// use std::time::Duration;
    /// let options = custodian::process::ChildGuardBuilder::new().grace(Duration::from_secs(10));
    /// assert_eq!(options.get_grace(), Duration::from_secs(10));
    /// ```
    #[must_use = "the builder is returned, not changed in place"]
    pub const fn grace(mut self, grace: Duration) -> ChildGuardBuilder {
        self.grace = grace;
        self
    }

    /// Spawns the child as the leader of a new process group, and signals the whole
    /// group, so that grandchildren are stopped too (default `false`).
    ///
    /// The grace period is the leader's: once it has exited (or been killed), whatever
    /// is left in its group gets `SIGKILL`.
    ///
    /// ```
    /// assert!(custodian::process::ChildGuardBuilder::new().process_group(true).get_process_group());
    /// ```
    #[must_use = "the builder is returned, not changed in place"]
    pub const fn process_group(mut self, group: bool) -> ChildGuardBuilder {
        self.group = group;
        self
    }

    /// The signal set with [`signal`](Self::signal).
    ///
    /// ```
    /// let _ = custodian::process::ChildGuardBuilder::new().get_signal();
    /// ```
    pub const fn get_signal(&self) -> Signal {
        self.signal
    }

    /// The grace period set with [`grace`](Self::grace).
    ///
    /// ```
    /// let _ = custodian::process::ChildGuardBuilder::new().get_grace();
    /// ```
    pub const fn get_grace(&self) -> Duration {
        self.grace
    }

    /// Whether the whole process group is signalled.
    ///
    /// ```
    /// assert!(!custodian::process::ChildGuardBuilder::new().get_process_group());
    /// ```
    pub const fn get_process_group(&self) -> bool {
        self.group
    }
}
