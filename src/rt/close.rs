//! `AsyncClose`: the async twin of `Close`.

use std::future::Future;

/// The async twin of [`Close`](crate::Close): a resource whose release needs `.await`
/// (a goodbye frame, an unlock round trip, `shutdown()` of a socket).
///
/// The returned future is `Send` so that guards can be closed inside spawned tasks and
/// handed to the reaper.
///
/// ```
/// use custodian::rt::AsyncClose;
///
/// struct Conn;
///
/// impl AsyncClose for Conn {
///     type Error = std::io::Error;
///     async fn close(self) -> std::io::Result<()> {
///         tokio::task::yield_now().await;
///         Ok(())
///     }
/// }
/// # tokio::runtime::Runtime::new().unwrap().block_on(async { Conn.close().await.unwrap() });
/// ```
pub trait AsyncClose: Send {
    /// What a failed close reports.
    type Error;

    /// Releases the resource, reporting what went wrong.
    ///
    /// # Errors
    /// Whatever the release reports; the resource is released (or given up) either way.
    ///
    /// # Cancel safety
    /// Implementations say; custodian's own guards hand the rest of an interrupted close
    /// to the reaper.
    fn close(self) -> impl Future<Output = Result<(), Self::Error>> + Send;
}
