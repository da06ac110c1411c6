//! `AsyncChildGuard`: a tokio child process stopped gracefully and always reaped.

use std::fmt;
use std::io;
use std::process::ExitStatus;
use std::time::Duration;

use process_wrap::tokio::{ChildWrapper, CommandWrap, ProcessGroup};
use tokio::process::{ChildStderr, ChildStdin, ChildStdout, Command};

use super::{ChildGuardBuilder, Signal, sys};
use crate::GuardError;
use crate::io_error::with_context;
use crate::ledger::Kind;
use crate::rt::{AsyncClose, AsyncGuard};

static KIND: Kind = Kind::new("custodian::process::AsyncChildGuard");

/// [`ChildGuard`](super::ChildGuard) for `tokio::process`: `close().await` sends the
/// configured signal (`SIGTERM` by default), waits up to the grace period without
/// blocking a thread, sends `SIGKILL` if the child is still running, and always reaps
/// it. A child that already exited is just reaped.
///
/// Built on [`AsyncGuard`]: dropped without `close` (an early return, `?`, a panic, a
/// cancelled future), the same stop — signal, grace period, `SIGKILL`, reap — is handed
/// to the [`Reaper`](crate::rt::Reaper) and runs to completion on the runtime; a failure
/// there is a tracing `error` event and a ledger failure. With no runtime left to run
/// it on, the child gets `SIGKILL` at once and its reap is left to tokio's background
/// reaping of dropped children.
///
/// ```
/// use custodian::process::AsyncChildGuard;
///
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// let mut cmd = tokio::process::Command::new("sleep");
/// cmd.arg("30");
/// let child = AsyncChildGuard::spawn(cmd)?;
/// let status = child.close().await?;
/// assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(15));
/// # Ok::<(), std::io::Error>(())
/// # })?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[must_use = "dropping the guard hands the child's stop to the reaper"]
pub struct AsyncChildGuard {
    /// The child, with its stop as the async cleanup that a dropped guard hands to the
    /// reaper.
    inner: AsyncGuard<ChildState, io::Error>,
}

/// What the stop needs; `status` is set once the child is reaped, after which it is
/// never signalled again.
struct ChildState {
    child: Box<dyn ChildWrapper>,
    pid: u32,
    options: ChildGuardBuilder,
    status: Option<ExitStatus>,
    /// `close` already returned a failure to stop this child: the retry from `Drop` (a
    /// dropped `GuardError`) reports nothing more. One failure, one report.
    failure_returned: bool,
}

impl ChildGuardBuilder {
    /// Spawns a tokio `command` with these options, in its own process group if
    /// [`process_group`](Self::process_group) is set.
    ///
    /// # Errors
    /// The spawn error, naming the program.
    ///
    /// # Panics
    /// Outside a tokio runtime (tokio's `Command::spawn`).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let child = custodian::process::ChildGuardBuilder::new()
    ///     .process_group(true)
    ///     .spawn_async(tokio::process::Command::new("true"))?;
    /// child.close().await?;
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[track_caller]
    #[must_use = "dropping the guard kills the child at once"]
    pub fn spawn_async(&self, command: Command) -> io::Result<AsyncChildGuard> {
        let program = command.as_std().get_program().to_owned();
        let mut command = CommandWrap::from(command);
        if self.group {
            command.wrap(ProcessGroup::leader());
        }
        let context = |e| {
            with_context(
                e,
                format_args!("cannot spawn {}", program.to_string_lossy()),
            )
        };
        let child = command.spawn().map_err(context)?;
        let pid = child
            .id()
            .ok_or_else(|| context(io::Error::other("the spawned child has no pid")))?;
        let state = ChildState {
            child,
            pid,
            options: *self,
            status: None,
            failure_returned: false,
        };
        let inner = AsyncGuard::builder()
            .kind(&KIND)
            .resource(format!("child process {pid}"))
            .fallback(ChildState::kill_now)
            .build(state, |mut state| async move {
                match state.stop().await {
                    Ok(_) => Ok(()),
                    // Already returned by `close`: counted, not reported a second time.
                    Err(_) if state.failure_returned => {
                        KIND.count_failure();
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            });
        Ok(AsyncChildGuard { inner })
    }
}

impl AsyncChildGuard {
    /// Spawns a tokio `command` with the default [`ChildGuardBuilder`].
    ///
    /// # Errors
    /// The spawn error, naming the program.
    ///
    /// # Panics
    /// Outside a tokio runtime (tokio's `Command::spawn`).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let child = custodian::process::AsyncChildGuard::spawn(tokio::process::Command::new("true"))?;
    /// child.close().await?;
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[track_caller]
    #[must_use = "dropping the guard kills the child at once"]
    pub fn spawn(command: Command) -> io::Result<AsyncChildGuard> {
        ChildGuardBuilder::new().spawn_async(command)
    }

    /// The child's pid (also its process group id when spawned in its own group).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let child = custodian::process::AsyncChildGuard::spawn(tokio::process::Command::new("true"))?;
    /// assert!(child.id() > 0);
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn id(&self) -> u32 {
        self.inner.pid
    }

    /// The options the child is stopped with.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let child = custodian::process::AsyncChildGuard::spawn(tokio::process::Command::new("true"))?;
    /// assert_eq!(child.options().get_signal(), custodian::process::Signal::TERM);
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn options(&self) -> &ChildGuardBuilder {
        &self.inner.options
    }

    /// The child's stdin, if it was piped.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let mut cmd = tokio::process::Command::new("cat");
    /// cmd.stdin(std::process::Stdio::piped());
    /// let mut child = custodian::process::AsyncChildGuard::spawn(cmd)?;
    /// drop(child.stdin().take()); // EOF: cat exits
    /// assert!(child.wait().await?.success());
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn stdin(&mut self) -> &mut Option<ChildStdin> {
        self.inner.child.stdin()
    }

    /// The child's stdout, if it was piped.
    ///
    /// ```
    /// use tokio::io::AsyncReadExt;
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let mut cmd = tokio::process::Command::new("echo");
    /// cmd.arg("hi").stdout(std::process::Stdio::piped());
    /// let mut child = custodian::process::AsyncChildGuard::spawn(cmd)?;
    /// let mut out = String::new();
    /// child.stdout().take().unwrap().read_to_string(&mut out).await?;
    /// assert_eq!(out, "hi\n");
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn stdout(&mut self) -> &mut Option<ChildStdout> {
        self.inner.child.stdout()
    }

    /// The child's stderr, if it was piped.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let mut cmd = tokio::process::Command::new("true");
    /// cmd.stderr(std::process::Stdio::piped());
    /// let mut child = custodian::process::AsyncChildGuard::spawn(cmd)?;
    /// assert!(child.stderr().is_some());
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn stderr(&mut self) -> &mut Option<ChildStderr> {
        self.inner.child.stderr()
    }

    /// The exit status if the child has exited, without reaping it.
    ///
    /// # Errors
    /// `waitid(2)` failing; `NotFound` if other code reaped the child.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let mut cmd = tokio::process::Command::new("sleep");
    /// cmd.arg("30");
    /// let mut child = custodian::process::AsyncChildGuard::spawn(cmd)?;
    /// assert_eq!(child.try_wait()?, None);
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.inner.try_wait()
    }

    /// Waits for the child to exit by itself, without reaping it (the guard reaps at
    /// close).
    ///
    /// # Errors
    /// As [`try_wait`](Self::try_wait).
    ///
    /// # Cancel safety
    /// Cancel safe: it only observes the child.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let mut child = custodian::process::AsyncChildGuard::spawn(tokio::process::Command::new("true"))?;
    /// assert!(child.wait().await?.success());
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.inner.wait_exited(None).await?;
        Ok(status.expect("waiting without a limit returns only at exit"))
    }

    /// Waits at most `timeout` for the child to exit by itself, without reaping it.
    ///
    /// # Errors
    /// As [`try_wait`](Self::try_wait).
    ///
    /// # Cancel safety
    /// Cancel safe: it only observes the child.
    ///
    /// ```
    /// use std::time::Duration;
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let mut cmd = tokio::process::Command::new("sleep");
    /// cmd.arg("30");
    /// let mut child = custodian::process::AsyncChildGuard::spawn(cmd)?;
    /// assert_eq!(child.wait_timeout(Duration::from_millis(10)).await?, None);
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub async fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        self.inner.wait_exited(Some(timeout)).await
    }

    /// Sends `signal` to the child, or to its whole group if spawned in one. Safe
    /// against pid reuse: the guard has not reaped the child.
    ///
    /// # Errors
    /// `kill(2)` failing, naming the pid.
    ///
    /// ```
    /// use custodian::process::{AsyncChildGuard, Signal};
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let mut cmd = tokio::process::Command::new("sleep");
    /// cmd.arg("30");
    /// let mut child = AsyncChildGuard::spawn(cmd)?;
    /// child.signal(Signal::KILL)?;
    /// assert!(!child.wait().await?.success());
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        self.inner.signal(signal)
    }

    /// Stops the child (unless it already exited) and reaps it; returns its exit
    /// status. See [`ChildGuard::close`](super::ChildGuard::close).
    ///
    /// # Errors
    /// A [`GuardError`] with the guard given back if the child could not be stopped or
    /// reaped.
    ///
    /// # Cancel safety
    /// Cancelled (a `select!`, a `timeout`, an aborted task), the rest of the stop is
    /// handed to the reaper: the child is still stopped and reaped, never signalled
    /// after its reap.
    ///
    /// ```
    /// use std::os::unix::process::ExitStatusExt;
    /// use std::time::Duration;
    /// use tokio::io::AsyncBufReadExt;
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let mut cmd = tokio::process::Command::new("sh");
    /// cmd.args(["-c", "trap '' TERM; echo ready; exec sleep 30"]); // ignores SIGTERM
    /// cmd.stdout(std::process::Stdio::piped());
    /// let mut child = custodian::process::ChildGuardBuilder::new()
    ///     .grace(Duration::from_millis(100))
    ///     .spawn_async(cmd)?;
    /// let mut ready = String::new();
    /// tokio::io::BufReader::new(child.stdout().take().unwrap()).read_line(&mut ready).await?;
    /// assert_eq!(child.close().await?.signal(), Some(9)); // killed after the grace period
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub async fn close(mut self) -> Result<ExitStatus, GuardError<AsyncChildGuard>> {
        // The stop runs on the state still inside the `AsyncGuard`: if this future is
        // cancelled, the guard drops and the reaper finishes the stop.
        match self.inner.stop().await {
            Ok(status) => {
                drop(AsyncGuard::into_inner(self.inner));
                Ok(status)
            }
            Err(e) => {
                self.inner.failure_returned = true;
                Err(GuardError::new(e, self))
            }
        }
    }

    /// Stops guarding: returns tokio's child, which is then neither stopped nor reaped for
    /// you. A child spawned in its own process group stays its group's leader; signalling
    /// the group is then up to you.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let guard = custodian::process::AsyncChildGuard::spawn(tokio::process::Command::new("true"))?;
    /// let mut child = custodian::process::AsyncChildGuard::into_inner(guard);
    /// child.wait().await?;
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn into_inner(guard: AsyncChildGuard) -> tokio::process::Child {
        let child = AsyncGuard::into_inner(guard.inner).child;
        // SAFETY: the only wrapper custodian puts around a tokio child is process-wrap's
        // `ProcessGroup`, whose one invariant is that kills go to the whole group; the
        // caller gives that up by taking the child out (documented above). The tokio
        // `Child` stays a valid handle on the leader, which is not reaped yet.
        match unsafe { child.try_into_inner_child() } {
            Ok(child) => child,
            Err(_) => unreachable!("custodian wraps only tokio children"),
        }
    }
}

impl ChildState {
    fn context(&self, e: io::Error) -> io::Error {
        with_context(e, format_args!("child process {}", self.pid))
    }

    fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        sys::exited(self.pid).map_err(|e| self.context(e))
    }

    async fn wait_exited(&self, timeout: Option<Duration>) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        sys::wait_exited_async(self.pid, timeout)
            .await
            .map_err(|e| self.context(e))
    }

    fn signal(&self, signal: Signal) -> io::Result<()> {
        if self.status.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "child process {} was reaped: not signalling its pid",
                    self.pid
                ),
            ));
        }
        self.child
            .signal(signal.as_raw())
            .map_err(|e| self.context(e))
    }

    /// The stop sequence; every signal is sent before the reap. Run again after it
    /// completed (a close cancelled just after the reap), it returns the status.
    async fn stop(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        if self.try_wait()?.is_none() {
            self.signal(self.options.signal)?;
            if self.wait_exited(Some(self.options.grace)).await?.is_none() {
                self.signal(Signal::KILL)?;
            }
        }
        if self.options.group {
            // Whatever is left of the group; `ESRCH` (nothing left) is fine.
            sys::nothing_left_is_ok(self.child.signal(Signal::KILL.as_raw()))
                .map_err(|e| self.context(e))?;
        }
        let status = self.child.wait().await.map_err(|e| self.context(e))?;
        self.status = Some(status);
        Ok(status)
    }

    /// With no runtime to run the stop on: `SIGKILL` now (the pid is still ours); the
    /// reap is left to tokio's background reaping of dropped children.
    fn kill_now(self) {
        if self.status.is_none() {
            let _ = self.child.signal(Signal::KILL.as_raw());
        }
    }
}

impl fmt::Debug for ChildState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildState")
            .field("pid", &self.pid)
            .field("options", &self.options)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl AsyncClose for AsyncChildGuard {
    type Error = GuardError<AsyncChildGuard>;

    async fn close(self) -> Result<(), GuardError<AsyncChildGuard>> {
        AsyncChildGuard::close(self).await.map(drop)
    }
}

impl fmt::Debug for AsyncChildGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncChildGuard")
            .field("pid", &self.inner.pid)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}
