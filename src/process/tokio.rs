//! `AsyncChildGuard`: a tokio child process stopped gracefully and always reaped.

use std::fmt;
use std::io;
use std::mem::ManuallyDrop;
use std::process::ExitStatus;
use std::ptr;
use std::time::Duration;

use process_wrap::tokio::{ChildWrapper, CommandWrap, ProcessGroup};
use tokio::process::{ChildStderr, ChildStdin, ChildStdout, Command};

use super::{ChildOptions, CloseError, Signal, sys};
use crate::ledger::{Kind, Ticket};
use crate::net::with_context;
use crate::rt::AsyncClose;

static KIND: Kind = Kind::new("custodian::process::AsyncChildGuard");

/// [`ChildGuard`](super::ChildGuard) for `tokio::process`: `close().await` sends the
/// configured signal (`SIGTERM` by default), waits up to the grace period without
/// blocking a thread, sends `SIGKILL` if the child is still running, and always reaps
/// it. A child that already exited is just reaped.
///
/// Dropped without `close`, the guard cannot wait: it sends `SIGKILL` at once (to the
/// group if spawned in one) and leaves the reap to tokio's background reaping of
/// dropped children, reporting that as a `debug` event. Close it to get the grace
/// period, the exit status and a guaranteed reap.
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
#[must_use = "dropping the guard kills the child at once"]
pub struct AsyncChildGuard {
    child: Box<dyn ChildWrapper>,
    pid: u32,
    options: ChildOptions,
    ticket: Ticket,
}

impl ChildOptions {
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
    /// let child = custodian::process::ChildOptions::new()
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
        let site = std::panic::Location::caller();
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
        Ok(AsyncChildGuard {
            child,
            pid,
            options: *self,
            ticket: Ticket::at(&KIND, site),
        })
    }
}

impl AsyncChildGuard {
    /// Spawns a tokio `command` with the default [`ChildOptions`].
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
        ChildOptions::new().spawn_async(command)
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
        self.pid
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
    pub fn options(&self) -> &ChildOptions {
        &self.options
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
        self.child.stdin()
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
        self.child.stdout()
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
        self.child.stderr()
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
        sys::exited(self.pid).map_err(|e| self.context(e))
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
        let status = sys::wait_exited_async(self.pid, None)
            .await
            .map_err(|e| self.context(e))?;
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
        sys::wait_exited_async(self.pid, Some(timeout))
            .await
            .map_err(|e| self.context(e))
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
        self.child
            .signal(signal.as_raw())
            .map_err(|e| self.context(e))
    }

    /// Stops the child (unless it already exited) and reaps it; returns its exit
    /// status. See [`ChildGuard::close`](super::ChildGuard::close).
    ///
    /// # Errors
    /// A [`CloseError`] with the guard given back if the child could not be stopped or
    /// reaped.
    ///
    /// # Cancel safety
    /// Not cancel safe: cancelled, the guard is dropped, which kills the child with
    /// `SIGKILL` at once and leaves its reap to tokio.
    ///
    /// ```
    /// use std::os::unix::process::ExitStatusExt;
    /// use std::time::Duration;
    /// use tokio::io::AsyncBufReadExt;
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let mut cmd = tokio::process::Command::new("sh");
    /// cmd.args(["-c", "trap '' TERM; echo ready; exec sleep 30"]); // ignores SIGTERM
    /// cmd.stdout(std::process::Stdio::piped());
    /// let mut child = custodian::process::ChildOptions::new()
    ///     .grace(Duration::from_millis(100))
    ///     .spawn_async(cmd)?;
    /// let mut ready = String::new();
    /// tokio::io::BufReader::new(child.stdout().take().unwrap()).read_line(&mut ready).await?;
    /// assert_eq!(child.close().await?.signal(), Some(9)); // killed after the grace period
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub async fn close(mut self) -> Result<ExitStatus, CloseError<AsyncChildGuard>> {
        match self.stop().await {
            Ok(status) => {
                let (_child, _ticket) = self.into_parts();
                Ok(status)
            }
            Err(e) => Err(CloseError::new(e, self)),
        }
    }

    /// Stops guarding: returns process-wrap's child, which is then neither stopped nor
    /// reaped for you.
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
    pub fn into_inner(guard: AsyncChildGuard) -> Box<dyn ChildWrapper> {
        guard.into_parts().0
    }

    fn into_parts(self) -> (Box<dyn ChildWrapper>, Ticket) {
        let this = ManuallyDrop::new(self);
        // SAFETY: `this` is never used or dropped again, so each field with a destructor
        // is moved out exactly once (`pid` and `options` are `Copy`).
        unsafe { (ptr::read(&this.child), ptr::read(&this.ticket)) }
    }

    fn context(&self, e: io::Error) -> io::Error {
        with_context(e, format_args!("child process {}", self.pid))
    }

    async fn stop(&mut self) -> io::Result<ExitStatus> {
        if self.try_wait()?.is_none() {
            self.signal(self.options.signal)?;
            let exited = sys::wait_exited_async(self.pid, Some(self.options.grace))
                .await
                .map_err(|e| self.context(e))?;
            if exited.is_none() {
                self.signal(Signal::KILL)?;
            }
        }
        if self.options.group {
            self.kill_stragglers()?;
        }
        self.child.wait().await.map_err(|e| self.context(e))
    }

    /// `SIGKILL` to whatever is left of the group; `ESRCH` (nothing left) is fine.
    fn kill_stragglers(&self) -> io::Result<()> {
        match self.child.signal(Signal::KILL.as_raw()) {
            Err(e) if e.raw_os_error() != Some(rustix::io::Errno::SRCH.raw_os_error()) => {
                Err(self.context(e))
            }
            _ => Ok(()),
        }
    }
}

impl Drop for AsyncChildGuard {
    fn drop(&mut self) {
        // No `.await` here: kill now (the pid is still ours, unreaped), and let tokio
        // reap the dropped child in the background.
        match self.try_wait() {
            Ok(Some(_)) if !self.options.group => {}
            Ok(_) => {
                if let Err(e) = self.signal(Signal::KILL) {
                    self.ticket
                        .failure(&format_args!("child process {}", self.pid), &e);
                    return;
                }
            }
            Err(e) => {
                self.ticket
                    .failure(&format_args!("child process {}", self.pid), &e);
                return;
            }
        }
        self.ticket.dropped_without_close(&format_args!(
            "child process {} (killed; reaped by tokio in the background)",
            self.pid
        ));
    }
}

impl AsyncClose for AsyncChildGuard {
    type Error = CloseError<AsyncChildGuard>;

    async fn close(self) -> Result<(), CloseError<AsyncChildGuard>> {
        AsyncChildGuard::close(self).await.map(drop)
    }
}

impl fmt::Debug for AsyncChildGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncChildGuard")
            .field("pid", &self.pid)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}
