//! Sockets whose cleanup std does not do: the Unix socket path left on disk after the
//! listener drops, and the TCP connection reset (and its last response lost) when it is
//! dropped with unread data.
//!
//! - [`UnixListenerGuard`] binds a Unix socket path, replacing a stale socket file
//!   only when nobody listens on it, and unlinks the path when dropped, only if it
//!   still names its own socket.
//! - [`TcpStreamGuardBuilder`] and [`TcpStreamGuard`] close a TCP connection gracefully: shut
//!   down the write side, drain what the peer still sends until it closes or a deadline
//!   passes, then close. `TcpStream` also implements [`Close`](crate::Close) this way.
//! - With feature `tokio`: [`AsyncUnixListenerGuard`],
//!   [`AsyncClose`](crate::rt::AsyncClose) for `tokio::net::TcpStream`, and
//!   [`TcpStreamGuardBuilder::guard_async`], whose dropped guard hands the graceful close to the
//!   [`Reaper`](crate::rt::Reaper).
//!
//! ```
//! use custodian::net::UnixListenerGuard;
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("app.sock");
//! for _restart in 0..3 {
//!     let listener = UnixListenerGuard::bind(&path)?; // never "address in use"
//!     // ... serve ...
//!     drop(listener); // the socket file is removed
//! }
//! assert!(!path.exists());
//! # Ok::<(), std::io::Error>(())
//! ```

mod tcp;
#[cfg(feature = "tokio")]
mod tokio;
mod unix;

pub use tcp::{TcpStreamGuard, TcpStreamGuardBuilder};
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub use tokio::AsyncUnixListenerGuard;
pub use unix::{SUN_PATH_MAX, UnixListenerGuard};
