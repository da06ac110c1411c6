//! The tokio twins: `AsyncUnixListenerGuard` and the graceful close of
//! `tokio::net::TcpStream`.

use std::fmt;
use std::io;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener};

use super::tcp::{Peer, TcpStreamGuardBuilder, deadline_error};
use super::unix::{Bound, bind};
use crate::Close;
use crate::io_error::with_context;
use crate::ledger::{Kind, Ticket};
use crate::rt::{AsyncClose, AsyncGuard};

static KIND: Kind = Kind::new("custodian::net::AsyncUnixListenerGuard");

/// [`UnixListenerGuard`](super::UnixListenerGuard) for `tokio::net::UnixListener`:
/// a stale socket file is replaced at bind, and the path is unlinked at close or drop
/// only if it still names this guard's socket.
///
/// Removing a path needs no `.await`, so `Drop` does all of the cleanup itself; no
/// reaper is involved.
///
/// ```
/// use custodian::net::AsyncUnixListenerGuard;
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
///
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("api.sock");
/// let listener = AsyncUnixListenerGuard::bind(&path)?;
/// let mut client = tokio::net::UnixStream::connect(&path).await?;
/// let (mut conn, _) = listener.accept().await?;
/// conn.write_all(b"hi").await?;
/// let mut buf = [0; 2];
/// client.read_exact(&mut buf).await?;
/// listener.close()?;
/// assert!(!path.exists());
/// # Ok::<(), std::io::Error>(())
/// # })?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[must_use = "dropping the guard closes the listener and removes its socket file at once"]
pub struct AsyncUnixListenerGuard {
    inner: Bound<UnixListener>,
}

impl AsyncUnixListenerGuard {
    /// Binds a tokio listener at `path`, replacing a stale socket file; see
    /// [`UnixListenerGuard::bind`](super::UnixListenerGuard::bind).
    ///
    /// # Errors
    /// As [`UnixListenerGuard::bind`](super::UnixListenerGuard::bind), and failing to
    /// register the socket with the runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime with I/O enabled (tokio's `UnixListener::from_std`).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("s");
    /// std::fs::write(&path, "not a socket")?;
    /// let err = custodian::net::AsyncUnixListenerGuard::bind(&path).unwrap_err();
    /// assert!(err.to_string().contains("not a socket"));
    /// assert!(path.exists()); // never deleted
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[track_caller]
    #[must_use = "dropping the guard closes the listener and removes its socket file at once"]
    pub fn bind(path: impl AsRef<Path>) -> io::Result<AsyncUnixListenerGuard> {
        let site = std::panic::Location::caller();
        let (listener, socket) = bind(path.as_ref())?;
        let ticket = Ticket::at(&KIND, site);
        match listener
            .set_nonblocking(true)
            .and_then(|()| UnixListener::from_std(listener))
        {
            Ok(listener) => Ok(AsyncUnixListenerGuard {
                inner: Bound::new(listener, socket, ticket),
            }),
            Err(e) => {
                let e = with_context(
                    e,
                    format_args!("cannot register {} with tokio", socket.path().display()),
                );
                // Do not leave the file we just bound behind; if that fails too, the
                // caller gets the first error and the second is reported, not lost.
                if let Err(release) = socket.release() {
                    ticket.failure(&socket.path().display(), &release);
                }
                Err(e)
            }
        }
    }

    /// The path the listener is bound to.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let dir = tempfile::tempdir()?;
    /// let listener = custodian::net::AsyncUnixListenerGuard::bind(dir.path().join("s"))?;
    /// assert_eq!(listener.path(), dir.path().join("s"));
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn path(&self) -> &Path {
        self.inner.path()
    }

    /// Closes the listener and removes its socket file if the path still names it.
    ///
    /// # Errors
    /// Failing to stat or unlink the path, naming it. The listener is closed either way.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let dir = tempfile::tempdir()?;
    /// let listener = custodian::net::AsyncUnixListenerGuard::bind(dir.path().join("s"))?;
    /// listener.close()?;
    /// assert!(!dir.path().join("s").exists());
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn close(self) -> io::Result<()> {
        self.inner.close()
    }

    /// Stops guarding: returns the listener and its path, which is then the caller's to
    /// remove.
    ///
    /// ```
    /// use custodian::net::AsyncUnixListenerGuard;
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let dir = tempfile::tempdir()?;
    /// let guard = AsyncUnixListenerGuard::bind(dir.path().join("s"))?;
    /// let (listener, path) = AsyncUnixListenerGuard::into_inner(guard);
    /// drop(listener);
    /// std::fs::remove_file(path)?;
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn into_inner(guard: AsyncUnixListenerGuard) -> (UnixListener, PathBuf) {
        guard.inner.into_inner()
    }
}

impl Deref for AsyncUnixListenerGuard {
    type Target = UnixListener;

    fn deref(&self) -> &UnixListener {
        &self.inner
    }
}

impl Close for AsyncUnixListenerGuard {
    type Error = io::Error;

    fn close(self) -> io::Result<()> {
        AsyncUnixListenerGuard::close(self)
    }
}

impl fmt::Debug for AsyncUnixListenerGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncUnixListenerGuard")
            .field("path", &self.inner.path())
            .field("listener", &*self.inner)
            .finish()
    }
}

impl TcpStreamGuardBuilder {
    /// Closes a tokio `TcpStream` gracefully: `shutdown()` of the write side, drain
    /// until the peer closes or the deadline passes, close.
    ///
    /// # Errors
    /// As [`TcpStreamGuardBuilder::close`]: `TimedOut` at the deadline, or the error that broke
    /// the connection, naming the peer.
    ///
    /// # Panics
    /// Outside a tokio runtime with the time driver enabled.
    ///
    /// # Cancel safety
    /// Not cancel safe: cancelled, the stream is dropped at once, which may reset the
    /// connection. Run it in a task, or hand it to the reaper, if the caller can be
    /// cancelled.
    ///
    /// ```
    /// use custodian::net::TcpStreamGuardBuilder;
    /// use tokio::io::{AsyncReadExt, AsyncWriteExt};
    ///
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let mut client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
    /// let (mut server, _) = listener.accept().await?;
    /// client.write_all(b"unread request").await?;
    /// server.write_all(b"last response").await?;
    /// let closing = tokio::spawn(async move { TcpStreamGuardBuilder::new().close_async(server).await });
    /// let mut got = Vec::new();
    /// client.read_to_end(&mut got).await?;
    /// assert_eq!(got, b"last response");
    /// drop(client);
    /// closing.await.unwrap()?;
    /// # Ok::<(), std::io::Error>(())
    /// # })?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub async fn close_async(&self, mut stream: TcpStream) -> io::Result<()> {
        let peer = stream.peer_addr().ok();
        let context = |what: &str| format!("TCP connection to {}: {what}", Peer(peer));
        let until = tokio::time::Instant::now() + self.get_deadline();
        stream
            .shutdown()
            .await
            .map_err(|e| with_context(e, context("cannot shut down the write side")))?;
        let drain = async {
            let mut buf = [0u8; 8192];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        return Err(with_context(e, context("failed while draining the peer")));
                    }
                }
            }
        };
        match tokio::time::timeout_at(until, drain).await {
            Ok(result) => result,
            Err(_elapsed) => Err(deadline_error(peer, self.get_deadline())),
        }
    }
}

static TCP_KIND: Kind = Kind::new("custodian::net::AsyncTcpStreamGuard");

impl TcpStreamGuardBuilder {
    /// Guards a tokio `stream` with this graceful close as its async cleanup:
    /// [`AsyncGuard::close(guard).await`](AsyncGuard::close) runs it and returns its
    /// `io::Error`; dropped without `close` (an early
    /// return, `?`, a cancelled future), the guard hands it to the
    /// [`Reaper`](crate::rt::Reaper), so the peer still gets every byte written.
    ///
    /// # Panics
    /// When the graceful close runs outside a tokio runtime with the time driver.
    ///
    /// ```
    /// use custodian::net::TcpStreamGuardBuilder;
    /// use tokio::io::{AsyncReadExt, AsyncWriteExt};
    ///
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let mut client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
    /// let mut server = TcpStreamGuardBuilder::new().guard_async(listener.accept().await?.0);
    /// client.write_all(b"a request the server never reads").await?;
    /// server.write_all(b"bye").await?; // Deref to the stream
    /// drop(server); // the graceful close goes on in the reaper
    /// let mut got = Vec::new();
    /// client.read_to_end(&mut got).await?;
    /// assert_eq!(got, b"bye");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[track_caller]
    #[must_use = "dropping the guard hands the graceful close to the reaper at once"]
    pub fn guard_async(&self, stream: TcpStream) -> AsyncGuard<TcpStream, io::Error> {
        let how = *self;
        let resource = format!("TCP connection to {}", Peer(stream.peer_addr().ok()));
        AsyncGuard::builder()
            .kind(&TCP_KIND)
            .resource(resource)
            .build(stream, move |stream| async move {
                how.close_async(stream).await
            })
    }
}

/// Closing a tokio `TcpStream` is a graceful close with the default deadline
/// ([`TcpStreamGuardBuilder::close_async`]).
///
/// ```
/// use custodian::rt::AsyncClose;
///
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
/// let (server, _) = listener.accept().await?;
/// drop(client);
/// server.close().await?;
/// # Ok::<(), std::io::Error>(())
/// # })?;
/// # Ok::<(), std::io::Error>(())
/// ```
impl AsyncClose for TcpStream {
    type Error = io::Error;

    async fn close(self) -> io::Result<()> {
        TcpStreamGuardBuilder::new().close_async(self).await
    }
}
