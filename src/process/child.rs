//! `ChildGuard`: a std child process stopped gracefully and always reaped.

use std::fmt;
use std::io;
use std::process::{ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus};
use std::time::Duration;

use process_wrap::std::{ChildWrapper, CommandWrap, ProcessGroup};

use super::{ChildGuardBuilder, Signal, sys};
use crate::Close;
use crate::GuardError;
use crate::io_error::with_context;
use crate::ledger::{Kind, Ticket};

static KIND: Kind = Kind::new("custodian::process::ChildGuard");

/// A child process that is stopped and reaped when the guard is closed or dropped:
/// the configured signal (`SIGTERM` by default), a grace period, `SIGKILL` if it is
/// still running, and always a wait for its exit status, so no zombie remains. A child
/// that already exited is just reaped.
///
/// `Drop` blocks for at most the grace period (plus the moment `SIGKILL` takes).
///
/// The guard reaps only at the end: [`wait`](Self::wait) and
/// [`try_wait`](Self::try_wait) observe the exit without reaping, so the pid (and the
/// process group id) stay reserved for as long as the guard may signal them.
///
/// ```
/// use custodian::process::ChildGuard;
/// use std::process::Command;
///
/// let mut cmd = Command::new("sleep");
/// cmd.arg("30");
/// let child = ChildGuard::spawn(cmd)?;
/// let status = child.close()?; // SIGTERM, reaped
/// assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(15));
/// # Ok::<(), std::io::Error>(())
/// ```
#[must_use = "dropping the guard stops the child at once"]
pub struct ChildGuard {
    /// `None` once closed or given away by `into_inner`.
    child: Option<Box<dyn ChildWrapper>>,
    pid: u32,
    options: ChildGuardBuilder,
    /// `close` already returned a failure to stop this child: the retry from `Drop` (a
    /// dropped `GuardError`) reports nothing more. One failure, one report.
    failure_returned: bool,
    ticket: Ticket,
}

impl ChildGuardBuilder {
    /// Spawns `command` with these options, in its own process group if
    /// [`process_group`](Self::process_group) is set.
    ///
    /// # Errors
    /// The spawn error (e.g. `NotFound` for a missing program), naming the program.
    ///
    /// ```
    /// let child = custodian::process::ChildGuardBuilder::new()
    ///     .process_group(true)
    ///     .spawn(std::process::Command::new("true"))?;
    /// assert!(child.close()?.success() || true);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[track_caller]
    #[must_use = "dropping the guard stops the child at once"]
    pub fn spawn(&self, command: Command) -> io::Result<ChildGuard> {
        let site = std::panic::Location::caller();
        let program = command.get_program().to_owned();
        let mut command = CommandWrap::from(command);
        if self.group {
            command.wrap(ProcessGroup::leader());
        }
        let child = command.spawn().map_err(|e| {
            with_context(
                e,
                format_args!("cannot spawn {}", program.to_string_lossy()),
            )
        })?;
        Ok(ChildGuard {
            pid: child.id(),
            child: Some(child),
            options: *self,
            failure_returned: false,
            ticket: Ticket::at(&KIND, site),
        })
    }

    /// Guards a child spawned elsewhere. It is signalled alone: the process group
    /// option applies to children spawned by [`spawn`](Self::spawn).
    ///
    /// ```
    /// let child = std::process::Command::new("sleep").arg("30").spawn()?;
    /// let guard = custodian::process::ChildGuardBuilder::new().guard(child);
    /// guard.close()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[track_caller]
    #[must_use = "dropping the guard stops the child at once"]
    pub fn guard(&self, child: std::process::Child) -> ChildGuard {
        ChildGuard {
            pid: child.id(),
            child: Some(Box::new(child)),
            options: ChildGuardBuilder {
                group: false,
                ..*self
            },
            failure_returned: false,
            ticket: Ticket::new(&KIND),
        }
    }
}

impl ChildGuard {
    /// A builder: the stop signal, the grace period, the process group.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let child = custodian::process::ChildGuard::builder()
    ///     .grace(Duration::from_millis(200))
    ///     .spawn(std::process::Command::new("true"))?;
    /// child.close()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub const fn builder() -> ChildGuardBuilder {
        ChildGuardBuilder::new()
    }

    /// Spawns `command` with the default [`ChildGuardBuilder`]: `SIGTERM`, a 3 s grace
    /// period, no process group.
    ///
    /// # Errors
    /// The spawn error, naming the program.
    ///
    /// ```
    /// let child = custodian::process::ChildGuard::spawn(std::process::Command::new("true"))?;
    /// child.close()?;
    /// let err = custodian::process::ChildGuard::spawn(std::process::Command::new("/no/such")).unwrap_err();
    /// assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[track_caller]
    #[must_use = "dropping the guard stops the child at once"]
    pub fn spawn(command: Command) -> io::Result<ChildGuard> {
        ChildGuardBuilder::new().spawn(command)
    }

    /// The child's pid (also its process group id when spawned in its own group).
    ///
    /// ```
    /// let child = custodian::process::ChildGuard::spawn(std::process::Command::new("true"))?;
    /// assert!(child.id() > 0);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// The options the child is stopped with.
    ///
    /// ```
    /// let child = custodian::process::ChildGuard::spawn(std::process::Command::new("true"))?;
    /// assert!(!child.options().get_process_group());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn options(&self) -> &ChildGuardBuilder {
        &self.options
    }

    /// The child's stdin, if it was piped.
    ///
    /// ```
    /// use std::io::Write;
    /// use std::process::{Command, Stdio};
    ///
    /// let mut cmd = Command::new("cat");
    /// cmd.stdin(Stdio::piped()).stdout(Stdio::null());
    /// let mut child = custodian::process::ChildGuard::spawn(cmd)?;
    /// child.stdin().take().unwrap().write_all(b"hello")?; // dropped: cat sees EOF
    /// assert!(child.wait()?.success());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn stdin(&mut self) -> &mut Option<ChildStdin> {
        self.child_mut().stdin()
    }

    /// The child's stdout, if it was piped.
    ///
    /// ```
    /// use std::io::Read;
    /// use std::process::{Command, Stdio};
    ///
    /// let mut cmd = Command::new("echo");
    /// cmd.arg("hi").stdout(Stdio::piped());
    /// let mut child = custodian::process::ChildGuard::spawn(cmd)?;
    /// let mut out = String::new();
    /// child.stdout().take().unwrap().read_to_string(&mut out)?;
    /// assert_eq!(out, "hi\n");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn stdout(&mut self) -> &mut Option<ChildStdout> {
        self.child_mut().stdout()
    }

    /// The child's stderr, if it was piped.
    ///
    /// ```
    /// use std::process::{Command, Stdio};
    ///
    /// let mut cmd = Command::new("true");
    /// cmd.stderr(Stdio::piped());
    /// let mut child = custodian::process::ChildGuard::spawn(cmd)?;
    /// assert!(child.stderr().is_some());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn stderr(&mut self) -> &mut Option<ChildStderr> {
        self.child_mut().stderr()
    }

    /// The exit status if the child has exited, without waiting and without reaping
    /// (the guard reaps at close or drop).
    ///
    /// # Errors
    /// `waitid(2)` failing; `NotFound` if other code reaped the child.
    ///
    /// ```
    /// let mut sleep = std::process::Command::new("sleep");
    /// sleep.arg("30");
    /// let mut child = custodian::process::ChildGuard::spawn(sleep)?;
    /// assert_eq!(child.try_wait()?, None);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        sys::exited(self.pid).map_err(|e| self.context(e))
    }

    /// Waits for the child to exit by itself, without reaping it (the guard reaps at
    /// close or drop).
    ///
    /// # Errors
    /// As [`try_wait`](Self::try_wait).
    ///
    /// ```
    /// let mut child = custodian::process::ChildGuard::spawn(std::process::Command::new("true"))?;
    /// assert!(child.wait()?.success());
    /// assert!(child.close()?.success()); // the same status, now reaped
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = sys::wait_exited(self.pid, None).map_err(|e| self.context(e))?;
        Ok(status.expect("waiting without a limit returns only at exit"))
    }

    /// Waits at most `timeout` for the child to exit by itself, without reaping it.
    ///
    /// # Errors
    /// As [`try_wait`](Self::try_wait).
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut sleep = std::process::Command::new("sleep");
    /// sleep.arg("30");
    /// let mut child = custodian::process::ChildGuard::spawn(sleep)?;
    /// assert_eq!(child.wait_timeout(Duration::from_millis(10))?, None);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        sys::wait_exited(self.pid, Some(timeout)).map_err(|e| self.context(e))
    }

    /// Sends `signal` to the child, or to its whole group if spawned in one.
    ///
    /// Safe against pid reuse: the guard has not reaped the child, so its pid still
    /// names it (or its zombie).
    ///
    /// # Errors
    /// `kill(2)` failing (`PermissionDenied`, `InvalidInput` for a bad signal number),
    /// naming the pid.
    ///
    /// ```
    /// use custodian::process::{ChildGuard, Signal};
    /// let mut sleep = std::process::Command::new("sleep");
    /// sleep.arg("30");
    /// let mut child = ChildGuard::spawn(sleep)?;
    /// child.signal(Signal::KILL)?;
    /// assert!(!child.wait()?.success());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        self.child()
            .signal(signal.as_raw())
            .map_err(|e| self.context(e))
    }

    /// Stops the child (unless it already exited) and reaps it: the signal, up to the
    /// grace period, `SIGKILL`, then the wait. Returns its exit status.
    ///
    /// # Errors
    /// A [`GuardError`] with the guard given back if the child could not be stopped or
    /// reaped (a refused signal, a child reaped by other code).
    ///
    /// ```
    /// use std::io::{BufRead, BufReader};
    /// use std::os::unix::process::ExitStatusExt;
    /// use std::time::Duration;
    ///
    /// let mut cmd = std::process::Command::new("sh");
    /// cmd.args(["-c", "trap '' TERM; echo ready; exec sleep 30"]); // ignores SIGTERM
    /// cmd.stdout(std::process::Stdio::piped());
    /// let mut child = custodian::process::ChildGuardBuilder::new()
    ///     .grace(Duration::from_millis(100))
    ///     .spawn(cmd)?;
    /// let mut ready = String::new();
    /// BufReader::new(child.stdout().take().unwrap()).read_line(&mut ready)?;
    /// let status = child.close()?;
    /// assert_eq!(status.signal(), Some(9)); // killed after the grace period
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn close(mut self) -> Result<ExitStatus, GuardError<ChildGuard>> {
        match self.stop() {
            Ok(status) => {
                drop(self.take());
                Ok(status)
            }
            Err(e) => {
                self.failure_returned = true;
                Err(GuardError::new(e, self))
            }
        }
    }

    /// Stops guarding: returns the std child, which is then neither stopped nor reaped
    /// for you. A child spawned with [`process_group`](ChildGuardBuilder::process_group) stays
    /// its group's leader; signalling the group is then up to you (`kill(-pid, sig)`).
    ///
    /// ```
    /// let guard = custodian::process::ChildGuard::spawn(std::process::Command::new("true"))?;
    /// let mut child: std::process::Child = custodian::process::ChildGuard::into_inner(guard);
    /// child.wait()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn into_inner(mut guard: ChildGuard) -> std::process::Child {
        // SAFETY: the only wrapper custodian puts around a std child is process-wrap's
        // `ProcessGroup`, whose one invariant is that kills go to the whole group; the
        // caller gives that up by taking the child out (documented above). The std
        // `Child` stays a valid handle on the leader, which is not reaped yet.
        match unsafe { guard.take().try_into_inner_child() } {
            Ok(child) => child,
            Err(_) => unreachable!("custodian wraps only std children"),
        }
    }

    /// Takes the child out; `Drop` then has nothing left to do.
    fn take(&mut self) -> Box<dyn ChildWrapper> {
        match self.child.take() {
            Some(child) => child,
            None => unreachable!("a ChildGuard's child is only taken by consuming it"),
        }
    }

    fn child(&self) -> &dyn ChildWrapper {
        match &self.child {
            Some(child) => child.as_ref(),
            None => unreachable!("a ChildGuard's child is only taken by consuming it"),
        }
    }

    fn child_mut(&mut self) -> &mut dyn ChildWrapper {
        match &mut self.child {
            Some(child) => child.as_mut(),
            None => unreachable!("a ChildGuard's child is only taken by consuming it"),
        }
    }

    fn context(&self, e: io::Error) -> io::Error {
        with_context(e, format_args!("child process {}", self.pid))
    }

    /// The stop sequence. Every signal is sent before the reap, while the pid is still
    /// reserved by the unreaped child.
    fn stop(&mut self) -> io::Result<ExitStatus> {
        let grace = self.options.grace;
        if self.try_wait()?.is_none() {
            self.signal(self.options.signal)?;
            if sys::wait_exited(self.pid, Some(grace))
                .map_err(|e| self.context(e))?
                .is_none()
            {
                self.signal(Signal::KILL)?;
            }
        }
        if self.options.group {
            // Whatever is left of the group (the leader's zombie keeps it addressable).
            sys::nothing_left_is_ok(self.child().signal(Signal::KILL.as_raw()))
                .map_err(|e| self.context(e))?;
        }
        self.child_mut().wait().map_err(|e| self.context(e))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        // Named as AsyncChildGuard names its resource, in both events.
        let pid = self.pid;
        let resource = format_args!("child process {pid}");
        match self.stop() {
            Ok(_) => self.ticket.dropped_without_close(&resource),
            // Already returned by `close`: counted, not reported a second time.
            Err(_) if self.failure_returned => KIND.count_failure(),
            Err(e) => self.ticket.failure(&resource, &e),
        }
    }
}

impl Close for ChildGuard {
    type Error = GuardError<ChildGuard>;

    fn close(self) -> Result<(), GuardError<ChildGuard>> {
        ChildGuard::close(self).map(drop)
    }
}

impl fmt::Debug for ChildGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildGuard")
            .field("pid", &self.pid)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}
