//! `UnixListenerGuard`: a Unix socket path that is replaced when stale and removed when
//! the listener goes, and only when it is still ours.

use std::fmt;
use std::io;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::ptr;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::Close;
use crate::fs::imp::{self, FileId, PathName};
use crate::io_error::with_context;
use crate::ledger::events::shielded;
use crate::ledger::{Kind, Ticket};

static KIND: Kind = Kind::new("custodian::net::UnixListenerGuard");

/// The size of `sun_path` in `struct sockaddr_un` on this platform, terminating NUL
/// included: a socket path must be shorter than this many bytes (104 on the BSDs and
/// Apple systems, 108 elsewhere).
///
/// ```
/// assert!(custodian::net::SUN_PATH_MAX >= 100);
/// ```
pub const SUN_PATH_MAX: usize = if cfg!(any(
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd",
    target_os = "openbsd",
    target_os = "netbsd",
    target_os = "dragonfly"
)) {
    104
} else {
    108
};

/// How many times a stale socket is replaced before giving up: another process that
/// races us for the same path wins at most this often.
const BIND_ATTEMPTS: usize = 3;

/// The socket file a listener was bound to, identified by device and inode so that a
/// file another process put at the same path later is never removed.
#[derive(Debug)]
pub(crate) struct SocketPath {
    /// Kept ready for the `lstat` and `unlink` of the release.
    path: PathName,
    id: FileId,
}

/// What releasing the path found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Released {
    /// Our socket file was removed.
    Removed,
    /// Nothing was at the path any more.
    Gone,
    /// Another file (another instance's socket) is at the path: left in place.
    Replaced,
}

/// Binds a std listener at `path`, replacing a stale socket file.
#[track_caller]
pub(crate) fn bind(path: &Path) -> io::Result<(UnixListener, SocketPath)> {
    check_length(path)?;
    // Absolute, so that a later change of working directory cannot make the release look
    // at another file. A path that is already absolute names the same file whatever the
    // working directory: it is kept as given (`path::absolute` costs about a thousand
    // instructions for its normalisation, which the release does not need).
    let name = if path.is_absolute() {
        PathName::new(path)
    } else {
        PathName::new(&std::path::absolute(path).unwrap_or_else(|_| path.to_owned()))
    }
    .map_err(|e| {
        with_context(
            e,
            format_args!("cannot bind Unix socket {}", path.display()),
        )
    })?;
    for _ in 0..BIND_ATTEMPTS {
        match UnixListener::bind(path) {
            Ok(listener) => {
                let id = imp::path_id(&name).map_err(|e| {
                    with_context(
                        e,
                        format_args!("cannot stat bound socket {}", path.display()),
                    )
                })?;
                return Ok((listener, SocketPath { path: name, id }));
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => remove_if_stale(path, e)?,
            Err(e) => {
                return Err(with_context(
                    e,
                    format_args!("cannot bind Unix socket {}", path.display()),
                ));
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "cannot bind Unix socket {}: another process keeps binding the same path",
            path.display()
        ),
    ))
}

/// A path too long for `sun_path` would be refused (or, by some APIs, silently
/// truncated): say so, naming the path and the limit.
fn check_length(path: &Path) -> io::Result<()> {
    let len = path.as_os_str().len();
    if len >= SUN_PATH_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "Unix socket path {} is {len} bytes; this platform allows at most {} \
                 (sun_path is {SUN_PATH_MAX} bytes with the terminating NUL): use a \
                 shorter path, e.g. a relative one or a shorter directory",
                path.display(),
                SUN_PATH_MAX - 1
            ),
        ));
    }
    Ok(())
}

/// Something is at `path` (bind said `EADDRINUSE`): remove it if it is a socket
/// nobody listens on; otherwise fail, never touching it.
fn remove_if_stale(path: &Path, in_use: io::Error) -> io::Result<()> {
    let stat = |path: &Path| -> io::Result<Option<std::fs::Metadata>> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) => Ok(Some(meta)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(with_context(
                e,
                format_args!("cannot stat {}", path.display()),
            )),
        }
    };
    let Some(meta) = stat(path)? else {
        return Ok(()); // removed meanwhile: just bind again
    };
    if !meta.file_type().is_socket() {
        return Err(with_context(
            in_use,
            format_args!(
                "cannot bind Unix socket {}: the path exists and is not a socket; \
                 it was left untouched",
                path.display()
            ),
        ));
    }
    if is_listening(path)? {
        return Err(with_context(
            in_use,
            format_args!(
                "cannot bind Unix socket {}: it is in use, another process accepts \
                 connections on it",
                path.display()
            ),
        ));
    }
    // Stale. Remove it only if it is still the file we probed (another instance may
    // have replaced it in between; then the next bind attempt probes that one).
    match stat(path)? {
        Some(now) if (now.dev(), now.ino()) == (meta.dev(), meta.ino()) => {
            match std::fs::remove_file(path) {
                Ok(()) => {
                    let (kind, path) = (KIND.name(), path.display());
                    let message = "removed a stale socket file nobody listened on";
                    shielded(
                        || tracing::debug!(target: "custodian", kind, resource = %path, "{message}"),
                        format_args!("{message} kind={kind} resource={path}"),
                    );
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(with_context(
                    e,
                    format_args!("cannot remove stale socket file {}", path.display()),
                )),
            }
        }
        _ => Ok(()),
    }
}

/// `true` if someone accepts connections on the socket at `path`: a non-blocking
/// connect succeeds, is in progress, or finds the backlog full. `ECONNREFUSED` (a
/// socket file with no listener behind it) is the only answer that means stale.
fn is_listening(path: &Path) -> io::Result<bool> {
    let context = |e| {
        with_context(
            e,
            format_args!("cannot check whether {} is in use", path.display()),
        )
    };
    let probe = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(context)?;
    probe.set_nonblocking(true).map_err(context)?;
    let addr = SockAddr::unix(path).map_err(context)?;
    match probe.connect(&addr) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(false),
        // Removed between our stat and the connect: nothing to protect.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => {
            Ok(true)
        }
        Err(e) => Err(context(e)),
    }
}

impl SocketPath {
    pub(crate) fn path(&self) -> &Path {
        self.path.as_path()
    }

    /// Removes the socket file if the path still names our inode.
    pub(crate) fn release(&self) -> io::Result<Released> {
        match imp::path_id(&self.path) {
            Ok(now) if now == self.id => {}
            Ok(_) => return Ok(Released::Replaced),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Released::Gone),
            Err(e) => {
                return Err(with_context(
                    e,
                    format_args!("cannot stat socket file {}", self.path().display()),
                ));
            }
        }
        match imp::remove(&self.path) {
            Ok(()) => Ok(Released::Removed),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Released::Gone),
            Err(e) => Err(with_context(
                e,
                format_args!("cannot remove socket file {}", self.path().display()),
            )),
        }
    }

    /// `release`, with the outcomes that are not errors reported as debug events.
    pub(crate) fn release_reported(&self, kind: &'static str) -> io::Result<()> {
        let message = match self.release()? {
            Released::Removed => return Ok(()),
            Released::Gone => "socket file was already removed",
            Released::Replaced => "socket path now names another socket; left it in place",
        };
        let path = self.path().display();
        // Shielded: this runs from `Drop`, where a panicking subscriber must not abort.
        shielded(
            || tracing::debug!(target: "custodian", kind, resource = %path, "{message}"),
            format_args!("{message} kind={kind} resource={path}"),
        );
        Ok(())
    }
}

/// A listener (std's or tokio's) with the socket path it owns and its ledger ticket:
/// the close, the escape hatch and the `Drop` both listener guards share.
pub(crate) struct Bound<L> {
    /// Closed before the path is released (see `Drop`).
    listener: ManuallyDrop<L>,
    socket: SocketPath,
    ticket: Ticket,
}

impl<L> Bound<L> {
    pub(crate) fn new(listener: L, socket: SocketPath, ticket: Ticket) -> Bound<L> {
        Bound {
            listener: ManuallyDrop::new(listener),
            socket,
            ticket,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.socket.path()
    }

    /// Closes the listener, then removes the socket file if the path still names it.
    pub(crate) fn close(self) -> io::Result<()> {
        let (listener, socket, ticket) = self.into_parts();
        drop(listener);
        socket.release_reported(ticket.kind())
    }

    /// The listener and its path, no longer removed for the caller.
    pub(crate) fn into_inner(self) -> (L, PathBuf) {
        let (listener, socket, _ticket) = self.into_parts();
        (listener, socket.path().to_path_buf())
    }

    fn into_parts(self) -> (L, SocketPath, Ticket) {
        let this = ManuallyDrop::new(self);
        // SAFETY: `this` is never used or dropped again, so each field is moved out
        // exactly once.
        unsafe {
            (
                ManuallyDrop::into_inner(ptr::read(&this.listener)),
                ptr::read(&this.socket),
                ptr::read(&this.ticket),
            )
        }
    }
}

impl<L> Deref for Bound<L> {
    type Target = L;

    fn deref(&self) -> &L {
        &self.listener
    }
}

impl<L> Drop for Bound<L> {
    fn drop(&mut self) {
        // The listener first, then the path: closing a socket whose file is already
        // unlinked is markedly slower, and the order is safe either way (a new instance
        // that replaces the file in between keeps it: the inode check).
        // SAFETY: the listener is dropped exactly once, here; nothing touches it after.
        unsafe { ManuallyDrop::drop(&mut self.listener) };
        match self.socket.release_reported(self.ticket.kind()) {
            Ok(()) => self
                .ticket
                .dropped_without_close(&self.socket.path().display()),
            Err(e) => self.ticket.failure(&self.socket.path().display(), &e),
        }
    }
}

/// A `std::os::unix::net::UnixListener` bound to a path it owns: a stale socket file
/// at the path is replaced at bind, and the path is unlinked when the guard is closed
/// or dropped — only if it still names the socket this guard bound.
///
/// std leaves the socket file on disk when a listener drops, so the next start fails
/// with "address in use"; deleting whatever is at the path before binding steals a live
/// instance's address, or deletes a file that is not a socket. This guard does neither:
/// - at [`bind`](Self::bind), a socket file nobody accepts on (connect says
///   `ECONNREFUSED`) is removed and the path bound; a socket someone listens on is
///   left alone and the bind fails with `AddrInUse`; anything that is not a socket is
///   never removed;
/// - it remembers the socket file's device and inode, and at close only unlinks the
///   path if it still names that inode (another instance may have taken the path over).
///
/// The listener is reached through `Deref`.
///
/// ```
/// use custodian::net::UnixListenerGuard;
/// use std::io::{Read, Write};
/// use std::os::unix::net::UnixStream;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("api.sock");
/// let listener = UnixListenerGuard::bind(&path)?;
/// let mut client = UnixStream::connect(&path)?;
/// let (mut conn, _) = listener.accept()?;
/// conn.write_all(b"hi")?;
/// let mut buf = [0; 2];
/// client.read_exact(&mut buf)?;
/// listener.close()?; // unlinks api.sock, reporting a failure
/// assert!(!path.exists());
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// A crash leaves the socket file behind (no destructor runs); the next `bind` finds
/// nobody listening on it and replaces it.
#[must_use = "dropping the guard closes the listener and removes its socket file at once"]
pub struct UnixListenerGuard {
    inner: Bound<UnixListener>,
}

impl UnixListenerGuard {
    /// Binds a listener at `path`, replacing a stale socket file.
    ///
    /// Connecting to check whether a socket file is stale costs a live listener one
    /// accepted connection that closes at once.
    ///
    /// # Errors
    /// - `InvalidInput` if the path is too long for `sun_path` (see [`SUN_PATH_MAX`]),
    ///   naming the path and the limit;
    /// - `AddrInUse` if another process accepts connections on the path, or if the path
    ///   exists and is not a socket (it is left untouched);
    /// - any other error of `bind(2)`, `stat(2)` or `unlink(2)`, naming the path and
    ///   keeping its `ErrorKind` (`NotFound` for a missing directory,
    ///   `PermissionDenied`, ...).
    ///
    /// ```
    /// use custodian::net::UnixListenerGuard;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("app.sock");
    /// let first = UnixListenerGuard::bind(&path)?;
    /// let err = UnixListenerGuard::bind(&path).unwrap_err(); // live: not stolen
    /// assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    /// assert!(err.to_string().contains("in use"));
    /// drop(first);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[track_caller]
    #[must_use = "dropping the guard closes the listener and removes its socket file at once"]
    pub fn bind(path: impl AsRef<Path>) -> io::Result<UnixListenerGuard> {
        let site = std::panic::Location::caller();
        let (listener, socket) = bind(path.as_ref())?;
        Ok(UnixListenerGuard {
            inner: Bound::new(listener, socket, Ticket::at(&KIND, site)),
        })
    }

    /// The path the listener is bound to.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let listener = custodian::net::UnixListenerGuard::bind(dir.path().join("s"))?;
    /// assert_eq!(listener.path(), dir.path().join("s"));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn path(&self) -> &Path {
        self.inner.path()
    }

    /// Closes the listener and removes its socket file if the path still names it.
    ///
    /// A path that was already removed, or that now names another socket, is not an
    /// error (a `debug` event says so).
    ///
    /// # Errors
    /// Failing to stat or unlink the path (e.g. `PermissionDenied` when the directory
    /// was made read-only), naming the path. The listener is closed either way.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let listener = custodian::net::UnixListenerGuard::bind(dir.path().join("s"))?;
    /// listener.close()?;
    /// assert!(!dir.path().join("s").exists());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn close(self) -> io::Result<()> {
        self.inner.close()
    }

    /// Stops guarding: returns the listener and its path, which is then the caller's to
    /// remove.
    ///
    /// ```
    /// use custodian::net::UnixListenerGuard;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let guard = UnixListenerGuard::bind(dir.path().join("s"))?;
    /// let (listener, path) = UnixListenerGuard::into_inner(guard);
    /// drop(listener);
    /// assert!(path.exists()); // no longer removed for us
    /// std::fs::remove_file(path)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn into_inner(guard: UnixListenerGuard) -> (UnixListener, PathBuf) {
        guard.inner.into_inner()
    }
}

impl Deref for UnixListenerGuard {
    type Target = UnixListener;

    fn deref(&self) -> &UnixListener {
        &self.inner
    }
}

impl Close for UnixListenerGuard {
    type Error = io::Error;

    fn close(self) -> io::Result<()> {
        UnixListenerGuard::close(self)
    }
}

impl fmt::Debug for UnixListenerGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnixListenerGuard")
            .field("path", &self.inner.path())
            .field("listener", &*self.inner)
            .finish()
    }
}
