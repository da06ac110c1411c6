//! `Rollback`: undo unless committed.

use std::convert::Infallible;
use std::fmt;
use std::ops::{Deref, DerefMut};

use crate::Close;
use crate::error::run_caught;
use crate::ledger::{Kind, Ticket};

static KIND: Kind = Kind::new("custodian::Rollback");

/// Holds a value and runs `rollback(value)` when dropped, unless
/// [`Rollback::commit`] took the value out first.
///
/// The transaction pattern: do the work step by step, and commit at the end; any early
/// return, `?` or panic in between undoes it. A rollback that panics is caught and
/// reported (tracing `error` event, ledger failure): it never aborts the process, even
/// during a panic.
///
/// ```
/// use custodian::Rollback;
///
/// fn provision(dir: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
///     let work = dir.join("work");
///     std::fs::create_dir(&work)?;
///     let work = Rollback::new(work, |path| {
///         let _ = std::fs::remove_dir_all(path);
///     });
///     std::fs::write(work.join("config"), "ready")?; // a `?` here removes `work`
///     Ok(Rollback::commit(work))
/// }
///
/// let tmp = tempfile::tempdir()?;
/// let work = provision(tmp.path())?;
/// assert!(work.join("config").exists());
/// # Ok::<(), std::io::Error>(())
/// ```
#[must_use = "a Rollback dropped at once rolls back at once"]
pub struct Rollback<T, F: FnOnce(T)> {
    /// `None` only after `commit` or `close` took it: both consume the guard.
    inner: Option<(T, F)>,
    ticket: Ticket,
}

impl<T, F: FnOnce(T)> Rollback<T, F> {
    /// Holds `value`; `rollback` runs with it on drop unless committed.
    #[track_caller]
    pub fn new(value: T, rollback: F) -> Self {
        Rollback {
            inner: Some((value, rollback)),
            ticket: Ticket::new(&KIND),
        }
    }

    /// Keeps the work: returns the value without running the rollback.
    ///
    /// An associated function (`Rollback::commit(r)`), not a method, so that it cannot
    /// collide with a method of `T` reached through `Deref`.
    ///
    /// ```
    /// let r = custodian::Rollback::new(5, |_| unreachable!("committed"));
    /// assert_eq!(custodian::Rollback::commit(r), 5);
    /// ```
    pub fn commit(mut this: Self) -> T {
        let (value, _rollback) = this.take();
        value
    }

    fn take(&mut self) -> (T, F) {
        self.inner
            .take()
            .expect("Rollback's value is present until the guard is consumed")
    }

    fn pair(&self) -> &(T, F) {
        self.inner
            .as_ref()
            .expect("Rollback's value is present until the guard is consumed")
    }
}

impl<T, F: FnOnce(T)> Deref for Rollback<T, F> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.pair().0
    }
}

impl<T, F: FnOnce(T)> DerefMut for Rollback<T, F> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self
            .inner
            .as_mut()
            .expect("Rollback's value is present until the guard is consumed")
            .0
    }
}

impl<T, F: FnOnce(T)> Drop for Rollback<T, F> {
    fn drop(&mut self) {
        if let Some((value, rollback)) = self.inner.take() {
            let site = self.ticket.site();
            if let Err(e) = run_caught("rollback", site, || {
                rollback(value);
                Ok(())
            }) {
                self.ticket.failure(&"rollback", &e);
            }
        }
    }
}

/// Closing a `Rollback` rolls back now, like dropping it. Use [`Rollback::commit`] to
/// keep the work.
impl<T, F: FnOnce(T)> Close for Rollback<T, F> {
    type Error = Infallible;

    fn close(self) -> Result<(), Infallible> {
        drop(self);
        Ok(())
    }
}

impl<T: fmt::Debug, F: FnOnce(T)> fmt::Debug for Rollback<T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rollback")
            .field("value", &self.inner.as_ref().map(|(v, _)| v))
            .finish_non_exhaustive()
    }
}
