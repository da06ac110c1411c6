//! Chapter: async cleanup that survives cancellation (custodian::rt, feature `tokio`).
//!
//! A small service: a client holds a connection to a loopback server in an
//! `AsyncGuard` whose cleanup sends a goodbye line. Its request is cancelled by
//! `tokio::time::timeout`, dropping the guard mid-flight; the reaper still sends the
//! goodbye and the server receives it. The service then stops on SIGTERM (sent to
//! itself with `kill`) and drains the reaper.

use std::path::Path;
use std::time::Duration;

use custodian::rt::{AsyncCleanupStack, AsyncGuard, Reaper, ShutdownSignals};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

pub(crate) fn run(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(service(dir))
}

async fn service(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    // Installed first, so that the SIGTERM below is ours to handle.
    let signals = ShutdownSignals::new()?;
    let reaper = Reaper::new();

    // The server prints every line it receives until the client hangs up.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (socket, peer) = listener.accept().await?;
        let mut lines = BufReader::new(socket).lines();
        while let Some(line) = lines.next_line().await? {
            println!("server: {peer} says {line:?}");
        }
        println!("server: {peer} hung up");
        std::io::Result::Ok(())
    });

    // A request that takes too long: the timeout cancels it, dropping the connection
    // guard without `close`. The goodbye is not lost: the reaper sends it.
    let request = async {
        let stream = TcpStream::connect(addr).await?;
        let mut conn = AsyncGuard::builder()
            .reaper(&reaper)
            .resource(format!("connection to {addr}"))
            .build(stream, |mut s| async move {
                s.write_all(b"goodbye\n").await?;
                s.shutdown().await
            });
        conn.write_all(b"hello\n").await?;
        std::future::pending::<()>().await; // the reply never comes
        std::io::Result::Ok(())
    };
    match tokio::time::timeout(Duration::from_millis(100), request).await {
        Ok(result) => println!("request finished: {result:?}"),
        Err(_) => println!("client: request cancelled by its timeout; the guard was dropped"),
    }
    server.await??;

    // An async ExitStack whose cleanups fail: every error is kept.
    let mut stack = AsyncCleanupStack::with_reaper(&reaper);
    for name in ["a.sock", "b.sock"] {
        let path = dir.join(name);
        stack.defer_fallible(async move {
            tokio::task::spawn_blocking(move || {
                std::fs::remove_file(&path).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("removing {}: {e}", path.display()))
                })
            })
            .await?
        });
    }
    if let Err(errors) = stack.close().await {
        println!("async stack closed: {errors}");
    }

    // A cleanup that would hang forever is aborted at the shutdown deadline.
    drop(
        AsyncGuard::builder()
            .reaper(&reaper)
            .resource("stuck lock")
            .build((), |()| async {
                std::future::pending::<()>().await;
                std::io::Result::Ok(())
            }),
    );

    // The end of the service: wait for SIGTERM, then drain with a deadline.
    let pid = std::process::id().to_string();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await;
    });
    let (signal, report) = signals.drain(&reaper, Duration::from_millis(300)).await;
    println!("service: stopped on {signal}; {report}");
    Ok(())
}
