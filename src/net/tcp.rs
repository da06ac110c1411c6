//! Graceful TCP close: shut down the write side, drain the peer until it closes or a
//! deadline passes, then close — so the peer gets every byte written before `close`.

use std::fmt;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use crate::Close;
use crate::io_error::with_context;
use crate::ledger::{Kind, Ticket};

static KIND: Kind = Kind::new("custodian::net::TcpStreamGuard");

/// How a TCP connection is closed gracefully; a builder for [`close`](Self::close)
/// and [`TcpStreamGuard`].
///
/// Dropping a `TcpStream` whose receive buffer still holds unread data makes the kernel
/// send a reset instead of a FIN, and the reset discards what was still queued for the
/// peer: the peer loses the end of the last response. A graceful close avoids it:
/// 1. `shutdown(Write)`: the peer gets everything written, then end-of-stream;
/// 2. read and discard whatever the peer still sends, until it closes its side (EOF) or
///    the deadline passes;
/// 3. close.
///
/// ```
/// use custodian::net::TcpStreamGuardBuilder;
/// use std::io::{Read, Write};
/// use std::net::{TcpListener, TcpStream};
/// use std::time::Duration;
///
/// let listener = TcpListener::bind("127.0.0.1:0")?;
/// let mut client = TcpStream::connect(listener.local_addr()?)?;
/// let (mut server, _) = listener.accept()?;
/// client.write_all(b"request the server never reads")?;
/// server.write_all(b"last response")?;
/// let closing = std::thread::spawn(move || {
///     TcpStreamGuardBuilder::new().deadline(Duration::from_secs(5)).close(server)
/// });
/// let mut got = Vec::new();
/// client.read_to_end(&mut got)?; // every byte, then EOF: no reset
/// assert_eq!(got, b"last response");
/// drop(client);
/// closing.join().unwrap()?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a builder does nothing until `close`, `guard` or their async twins"]
pub struct TcpStreamGuardBuilder {
    deadline: Duration,
}

impl Default for TcpStreamGuardBuilder {
    fn default() -> Self {
        TcpStreamGuardBuilder::new()
    }
}

impl TcpStreamGuardBuilder {
    /// How long the peer gets to close its side by default: 3 seconds.
    pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(3);

    /// The default graceful close (deadline [`DEFAULT_DEADLINE`](Self::DEFAULT_DEADLINE)).
    ///
    /// ```
    /// let how = custodian::net::TcpStreamGuardBuilder::new();
    /// assert_eq!(how.get_deadline(), custodian::net::TcpStreamGuardBuilder::DEFAULT_DEADLINE);
    /// ```
    pub const fn new() -> TcpStreamGuardBuilder {
        TcpStreamGuardBuilder {
            deadline: Self::DEFAULT_DEADLINE,
        }
    }

    /// Sets how long the whole close may take: after it, the connection is closed even
    /// if the peer has not closed its side.
    ///
    /// ```
    /// use std::time::Duration;
    /// let how = custodian::net::TcpStreamGuardBuilder::new().deadline(Duration::from_millis(500));
    /// assert_eq!(how.get_deadline(), Duration::from_millis(500));
    /// ```
    #[must_use = "the builder is returned, not changed in place"]
    pub const fn deadline(mut self, deadline: Duration) -> TcpStreamGuardBuilder {
        self.deadline = deadline;
        self
    }

    /// The deadline set with [`deadline`](Self::deadline).
    ///
    /// ```
    /// let how = custodian::net::TcpStreamGuardBuilder::default();
    /// assert!(how.get_deadline() > std::time::Duration::ZERO);
    /// ```
    pub const fn get_deadline(&self) -> Duration {
        self.deadline
    }

    /// Closes `stream` gracefully: shutdown of the write side, drain until the peer
    /// closes or the deadline passes, close. Blocks for at most the deadline (plus one
    /// `read` timeout granularity).
    ///
    /// The stream is put back in blocking mode if it was not.
    ///
    /// # Errors
    /// Naming the peer address and keeping the original `ErrorKind`:
    /// - `TimedOut` when the peer did not close its side before the deadline (the
    ///   connection is then closed anyway, which may reset it);
    /// - `NotConnected`, `ConnectionReset`, ... when the connection broke, so the peer
    ///   may not have received everything.
    ///
    /// The stream is closed in every case; there is nothing left to give back.
    ///
    /// ```
    /// use std::net::{TcpListener, TcpStream};
    ///
    /// let listener = TcpListener::bind("127.0.0.1:0")?;
    /// let client = TcpStream::connect(listener.local_addr()?)?;
    /// let (server, _) = listener.accept()?;
    /// drop(client); // the peer is gone: EOF at once
    /// custodian::net::TcpStreamGuardBuilder::new().close(server)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn close(&self, stream: TcpStream) -> io::Result<()> {
        let peer = stream.peer_addr().ok();
        close_std(&stream, self.deadline, peer)
    }

    /// Wraps `stream` in a guard that closes it this way when closed or dropped.
    ///
    /// ```
    /// use std::net::{TcpListener, TcpStream};
    /// use std::time::Duration;
    ///
    /// let listener = TcpListener::bind("127.0.0.1:0")?;
    /// let client = TcpStream::connect(listener.local_addr()?)?;
    /// let how = custodian::net::TcpStreamGuardBuilder::new().deadline(Duration::from_secs(1));
    /// let guard = how.guard(client);
    /// drop(listener); // the peer goes away
    /// let _ = guard.close();
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[track_caller]
    #[must_use = "dropping the guard closes the connection at once"]
    pub fn guard(&self, stream: TcpStream) -> TcpStreamGuard {
        TcpStreamGuard {
            peer: stream.peer_addr().ok(),
            stream: Some(stream),
            how: *self,
            ticket: Ticket::new(&KIND),
        }
    }
}

/// Who the connection is with, for messages.
pub(crate) struct Peer(pub(crate) Option<SocketAddr>);

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("<unknown peer>"),
        }
    }
}

pub(crate) fn deadline_error(peer: Option<SocketAddr>, deadline: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "TCP connection to {}: the peer did not close its side within {deadline:?}; \
             closed anyway, the peer may not have received everything",
            Peer(peer)
        ),
    )
}

fn close_std(stream: &TcpStream, deadline: Duration, peer: Option<SocketAddr>) -> io::Result<()> {
    let context = |what: &str| format!("TCP connection to {}: {what}", Peer(peer));
    let until = Instant::now() + deadline;
    stream
        .set_nonblocking(false)
        .map_err(|e| with_context(e, context("cannot make it blocking")))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| with_context(e, context("cannot shut down the write side")))?;
    let mut buf = [0u8; 8192];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(deadline_error(peer, deadline));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| with_context(e, context("cannot set a read timeout")))?;
        match (&*stream).read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(with_context(e, context("failed while draining the peer"))),
        }
    }
}

/// Closing a `TcpStream` is a graceful close with the default deadline
/// ([`TcpStreamGuardBuilder::new`]): shutdown of the write side, drain until the peer closes,
/// close.
///
/// ```
/// use custodian::Close;
/// use std::net::{TcpListener, TcpStream};
///
/// let listener = TcpListener::bind("127.0.0.1:0")?;
/// let client = TcpStream::connect(listener.local_addr()?)?;
/// let (server, _) = listener.accept()?;
/// drop(client);
/// server.close()?;
/// # Ok::<(), std::io::Error>(())
/// ```
impl Close for TcpStream {
    type Error = io::Error;

    fn close(self) -> io::Result<()> {
        TcpStreamGuardBuilder::new().close(self)
    }
}

/// A `TcpStream` closed gracefully ([`TcpStreamGuardBuilder`]) when closed or dropped; `Drop`
/// blocks for at most the deadline.
///
/// The stream is reached through `Deref`/`DerefMut`, so `Read` and `Write` work on the
/// guard.
///
/// ```
/// use custodian::net::TcpStreamGuard;
/// use std::io::{Read, Write};
/// use std::net::{TcpListener, TcpStream};
///
/// let listener = TcpListener::bind("127.0.0.1:0")?;
/// let mut client = TcpStream::connect(listener.local_addr()?)?;
/// let mut server = TcpStreamGuard::new(listener.accept()?.0);
/// server.write_all(b"bye")?;
/// let closing = std::thread::spawn(move || server.close());
/// let mut got = String::new();
/// client.read_to_string(&mut got)?;
/// drop(client);
/// closing.join().unwrap()?;
/// assert_eq!(got, "bye");
/// # Ok::<(), std::io::Error>(())
/// ```
#[must_use = "dropping the guard closes the connection at once"]
pub struct TcpStreamGuard {
    /// `None` once closed or given away by `into_inner`.
    stream: Option<TcpStream>,
    peer: Option<SocketAddr>,
    how: TcpStreamGuardBuilder,
    ticket: Ticket,
}

impl TcpStreamGuard {
    /// A builder for the graceful close: its deadline, then `guard`, `close` or their
    /// async twins.
    ///
    /// ```
    /// use std::net::{TcpListener, TcpStream};
    /// use std::time::Duration;
    ///
    /// let listener = TcpListener::bind("127.0.0.1:0")?;
    /// let how = custodian::net::TcpStreamGuard::builder().deadline(Duration::from_secs(1));
    /// let guard = how.guard(TcpStream::connect(listener.local_addr()?)?);
    /// drop(listener.accept()?);
    /// guard.close()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub const fn builder() -> TcpStreamGuardBuilder {
        TcpStreamGuardBuilder::new()
    }

    /// Guards `stream` with the default graceful close; see [`TcpStreamGuardBuilder::guard`] to
    /// set the deadline.
    ///
    /// ```
    /// use std::net::{TcpListener, TcpStream};
    ///
    /// let listener = TcpListener::bind("127.0.0.1:0")?;
    /// let guard = custodian::net::TcpStreamGuard::new(TcpStream::connect(listener.local_addr()?)?);
    /// assert_eq!(guard.peer_addr()?, listener.local_addr()?);
    /// # drop(listener);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[track_caller]
    #[must_use = "dropping the guard closes the connection at once"]
    pub fn new(stream: TcpStream) -> TcpStreamGuard {
        TcpStreamGuardBuilder::new().guard(stream)
    }

    /// Closes the connection gracefully now.
    ///
    /// # Errors
    /// As [`TcpStreamGuardBuilder::close`].
    ///
    /// ```
    /// use std::net::{TcpListener, TcpStream};
    ///
    /// let listener = TcpListener::bind("127.0.0.1:0")?;
    /// let guard = custodian::net::TcpStreamGuard::new(TcpStream::connect(listener.local_addr()?)?);
    /// drop(listener.accept()?); // the server side closes at once
    /// guard.close()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn close(mut self) -> io::Result<()> {
        let stream = self.take();
        close_std(&stream, self.how.deadline, self.peer)
    }

    /// Stops guarding: returns the stream, which then closes as std closes it.
    ///
    /// ```
    /// use std::net::{TcpListener, TcpStream};
    ///
    /// let listener = TcpListener::bind("127.0.0.1:0")?;
    /// let guard = custodian::net::TcpStreamGuard::new(TcpStream::connect(listener.local_addr()?)?);
    /// let stream: TcpStream = custodian::net::TcpStreamGuard::into_inner(guard);
    /// # drop(stream);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn into_inner(mut guard: TcpStreamGuard) -> TcpStream {
        guard.take()
    }

    fn take(&mut self) -> TcpStream {
        match self.stream.take() {
            Some(stream) => stream,
            None => unreachable!("a TcpStreamGuard's stream is only taken by consuming it"),
        }
    }

    fn stream(&self) -> &TcpStream {
        match &self.stream {
            Some(stream) => stream,
            None => unreachable!("a TcpStreamGuard's stream is only taken by consuming it"),
        }
    }
}

impl Deref for TcpStreamGuard {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        self.stream()
    }
}

impl DerefMut for TcpStreamGuard {
    fn deref_mut(&mut self) -> &mut TcpStream {
        match &mut self.stream {
            Some(stream) => stream,
            None => unreachable!("a TcpStreamGuard's stream is only taken by consuming it"),
        }
    }
}

impl Drop for TcpStreamGuard {
    fn drop(&mut self) {
        let Some(stream) = &self.stream else {
            return;
        };
        match close_std(stream, self.how.deadline, self.peer) {
            Ok(()) => self.ticket.dropped_without_close(&Peer(self.peer)),
            Err(e) => self.ticket.failure(&Peer(self.peer), &e),
        }
    }
}

impl Close for TcpStreamGuard {
    type Error = io::Error;

    fn close(self) -> io::Result<()> {
        TcpStreamGuard::close(self)
    }
}

impl fmt::Debug for TcpStreamGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpStreamGuard")
            .field("stream", self.stream())
            .field("deadline", &self.how.deadline)
            .finish()
    }
}
