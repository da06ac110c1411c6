//! `custodian::net` on real Unix sockets in temp dirs and real TCP connections on
//! loopback.
#![cfg(unix)]

mod common;

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use custodian::Close;
use custodian::net::{SUN_PATH_MAX, TcpStreamGuard, TcpStreamGuardBuilder, UnixListenerGuard};

fn inode(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).unwrap().ino()
}

/// Connects to `path` and checks that `listener` accepts the connection and that data
/// flows.
fn assert_serves(listener: &UnixListener, path: &Path) {
    let mut client = UnixStream::connect(path).unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    client.write_all(b"ping").unwrap();
    let mut buf = [0; 4];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sock");
    drop(UnixListener::bind(&path).unwrap()); // a crashed instance: the file stays
    assert!(path.exists());
    assert_eq!(
        UnixListener::bind(&path).unwrap_err().kind(),
        io::ErrorKind::AddrInUse,
        "std alone cannot restart"
    );

    let (guard, events) = common::capture(|| UnixListenerGuard::bind(&path).unwrap());
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("stale")
                && e.field("resource").unwrap().contains("app.sock")),
        "{events:?}"
    );
    assert_serves(&guard, &path);
    guard.close().unwrap();
    assert!(!path.exists());
}

#[test]
fn server_restarts_many_times_without_address_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sock");
    for i in 0..20 {
        let guard = UnixListenerGuard::bind(&path).unwrap();
        assert_serves(&guard, &path);
        if i % 2 == 0 {
            drop(guard); // removed by Drop
        } else {
            // Crash-like: the listener goes without cleanup; the next bind replaces it.
            drop(UnixListenerGuard::into_inner(guard));
        }
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn live_socket_is_not_stolen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.sock");
    let owner = UnixListener::bind(&path).unwrap();
    let before = inode(&path);

    let err = UnixListenerGuard::bind(&path).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    let message = err.to_string();
    assert!(message.contains("in use"), "{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");

    assert_eq!(inode(&path), before, "the live socket file was replaced");
    // Our probe connection is first in the owner's backlog; then a real client.
    let (probe, _) = owner.accept().unwrap();
    drop(probe);
    assert_serves(&owner, &path);
}

#[test]
fn regular_file_or_directory_at_the_path_is_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("precious.sock");
    std::fs::write(&file, "keep me").unwrap();
    let err = UnixListenerGuard::bind(&file).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

    let subdir = dir.path().join("a-directory");
    std::fs::create_dir(&subdir).unwrap();
    std::fs::write(subdir.join("inside"), "x").unwrap();
    let err = UnixListenerGuard::bind(&subdir).unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert!(subdir.join("inside").exists());
}

#[test]
fn path_taken_over_by_another_listener_is_not_unlinked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.sock");
    let ours = UnixListenerGuard::bind(&path).unwrap();
    let our_inode = inode(&path);

    // Another instance removes our file and binds its own socket at the same path.
    std::fs::remove_file(&path).unwrap();
    let theirs = UnixListener::bind(&path).unwrap();
    assert_ne!(inode(&path), our_inode);

    let (result, events) = common::capture(|| ours.close());
    result.unwrap();
    assert!(path.exists(), "their socket file was unlinked by us");
    assert!(
        events.iter().any(|e| e.message.contains("another socket")),
        "{events:?}"
    );
    assert_serves(&theirs, &path);

    // Same through Drop.
    drop(theirs);
    std::fs::remove_file(&path).unwrap();
    let ours = UnixListenerGuard::bind(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let theirs = UnixListener::bind(&path).unwrap();
    drop(ours);
    assert!(path.exists());
    assert_serves(&theirs, &path);
}

#[test]
fn too_long_path_is_a_clear_error_not_a_truncated_bind() {
    let dir = tempfile::tempdir().unwrap();
    let name = "s".repeat(SUN_PATH_MAX + 10);
    let path = dir.path().join(name);
    let err = UnixListenerGuard::bind(&path).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(
        message.contains(&(SUN_PATH_MAX - 1).to_string()),
        "{message}"
    );
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());

    // Exactly at the limit still works.
    let base = dir.path().as_os_str().len() + 1;
    if base < SUN_PATH_MAX - 1 {
        let path = dir.path().join("x".repeat(SUN_PATH_MAX - 1 - base));
        assert_eq!(path.as_os_str().len(), SUN_PATH_MAX - 1);
        UnixListenerGuard::bind(&path).unwrap().close().unwrap();
    }
}

#[test]
fn relative_path_is_released_by_its_absolute_name() {
    let dir = tempfile::tempdir().unwrap();
    let absolute = dir.path().join("rel.sock");
    // A relative path from the current directory (tests share it, so do not change it).
    let cwd = std::env::current_dir().unwrap();
    let Some(relative) = pathdiff(&absolute, &cwd) else {
        return; // temp dir on another root: nothing to test
    };
    let guard = UnixListenerGuard::bind(&relative).unwrap();
    assert!(guard.path().is_absolute(), "{}", guard.path().display());
    assert_eq!(inode(guard.path()), inode(&absolute));
    drop(guard);
    assert!(!absolute.exists());
}

/// `path` relative to `base` with `..` components (both absolute).
fn pathdiff(path: &Path, base: &Path) -> Option<std::path::PathBuf> {
    let ups = base.components().count().checked_sub(1)?;
    let mut rel = std::path::PathBuf::new();
    for _ in 0..ups {
        rel.push("..");
    }
    rel.push(path.strip_prefix("/").ok()?);
    (rel.as_os_str().len() < SUN_PATH_MAX).then_some(rel)
}

#[test]
fn missing_directory_error_names_the_path_and_keeps_the_kind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/app.sock");
    let err = UnixListenerGuard::bind(&path).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn path_with_a_nul_byte_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for path in [dir.path().join("app\0.sock"), "app\0.sock".into()] {
        let err = UnixListenerGuard::bind(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
}

#[test]
fn no_socket_files_remain_and_the_ledger_balances() {
    let dir = tempfile::tempdir().unwrap();
    // Counts this thread's guards only: other tests bind in parallel.
    let check = custodian::ledger::LeakCheck::new();
    let guards: Vec<_> = (0..16)
        .map(|i| UnixListenerGuard::bind(dir.path().join(format!("{i}.sock"))).unwrap())
        .collect();
    let live = check.leaked();
    assert_eq!(live.len(), 16);
    assert!(
        live.iter()
            .all(|r| r.kind() == "custodian::net::UnixListenerGuard")
    );
    for (i, guard) in guards.into_iter().enumerate() {
        if i % 2 == 0 {
            guard.close().unwrap();
        } else {
            drop(guard);
        }
    }
    check.finish().unwrap();
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "socket files left behind"
    );
}

#[test]
fn drop_reports_a_path_removed_by_someone_else_as_debug_not_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gone.sock");
    let guard = UnixListenerGuard::bind(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let ((), events) = common::capture(|| drop(guard));
    assert!(common::errors(&events).is_empty(), "{events:?}");
    assert!(events.iter().any(|e| e.message.contains("already removed")));
}

#[test]
#[ignore = "long: 1000 bind/drop cycles"]
fn thousand_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sock");
    for i in 0..1000 {
        let guard = UnixListenerGuard::bind(&path).unwrap();
        if i % 3 == 0 {
            drop(UnixListenerGuard::into_inner(guard));
        }
    }
    let _ = std::fs::remove_file(&path);
}

// ---- TCP ----

const RESPONSE: usize = 8 << 20;

/// The server has unread data from the client in its receive buffer when it closes
/// after writing a large response: a plain close resets the connection and the client
/// loses the tail. Returns how many bytes the client got.
fn serve_with_unread_data(close: impl FnOnce(TcpStream) -> io::Result<()> + Send) -> usize {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::scope(|s| {
        let client = s.spawn(move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.write_all(&[b'?'; 64 * 1024]).unwrap(); // never read by the server
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let mut got = 0;
            let mut buf = vec![0; 64 * 1024];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) => panic!("client lost the connection after {got} bytes: {e}"),
                }
            }
            got // dropping the stream closes the client side: the server's drain ends
        });
        let (mut server, _) = listener.accept().unwrap();
        thread::sleep(Duration::from_millis(50)); // let the unread data arrive
        server.write_all(&vec![b'r'; RESPONSE]).unwrap();
        close(server).expect("graceful close");
        client.join().unwrap()
    })
}

#[test]
fn peer_receives_every_byte_even_with_unread_data_in_flight() {
    let how = TcpStreamGuardBuilder::new().deadline(Duration::from_secs(30));
    assert_eq!(serve_with_unread_data(|s| how.close(s)), RESPONSE);
    assert_eq!(serve_with_unread_data(Close::close), RESPONSE);
    assert_eq!(serve_with_unread_data(|s| how.guard(s).close()), RESPONSE);
    // The guard's Drop does the same, bounded.
    assert_eq!(
        serve_with_unread_data(|s| {
            drop(how.guard(s));
            Ok(())
        }),
        RESPONSE
    );
}

#[test]
#[ignore = "demonstrates the problem: a plain drop may reset the connection"]
fn plain_drop_with_unread_data_loses_the_tail() {
    let got = std::panic::catch_unwind(|| {
        serve_with_unread_data(|s| {
            drop(s);
            Ok(())
        })
    });
    assert!(
        !matches!(got, Ok(RESPONSE)),
        "a plain drop delivered everything"
    );
}

#[test]
fn peer_that_never_closes_times_out_with_an_error_naming_it() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    let peer = server.peer_addr().unwrap();
    let start = Instant::now();
    let err = TcpStreamGuardBuilder::new()
        .deadline(Duration::from_millis(200))
        .close(server)
        .unwrap_err();
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    assert!(err.to_string().contains(&peer.to_string()), "{err}");
    drop(client);
}

#[test]
fn guard_dropped_past_its_deadline_reports_an_error_event() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    let peer = server.peer_addr().unwrap().to_string();
    let guard = TcpStreamGuardBuilder::new()
        .deadline(Duration::from_millis(100))
        .guard(server);
    let line = line!() - 1;
    let before = custodian::ledger::snapshot();
    let ((), events) = common::capture(|| drop(guard));
    let errors = common::errors(&events);
    assert_eq!(errors.len(), 1, "{events:?}");
    assert_eq!(errors[0].field("resource"), Some(peer.as_str()));
    assert!(
        errors[0]
            .field("site")
            .unwrap()
            .contains(&format!("net.rs:{line}"))
    );
    let counts = custodian::ledger::snapshot()
        .since(&before)
        .get("custodian::net::TcpStreamGuard");
    assert!(counts.failed >= 1);
    drop(client);
}

#[test]
fn into_inner_skips_the_graceful_close() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let guard = TcpStreamGuard::new(client);
    let start = Instant::now();
    let ((), events) = common::capture(|| drop(TcpStreamGuard::into_inner(guard)));
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(
        events.iter().all(|e| !e.message.contains("Drop")),
        "{events:?}"
    );
}

// ---- tokio twins ----

#[cfg(feature = "tokio")]
mod tokio_twins {
    use super::*;
    use custodian::net::AsyncUnixListenerGuard;
    use custodian::rt::AsyncClose;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn async_listener_replaces_stale_refuses_live_and_unlinks_only_its_own() {
        let runtime = common::current_thread();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("async.sock");
            drop(UnixListener::bind(&path).unwrap()); // stale
            let guard = AsyncUnixListenerGuard::bind(&path).unwrap();
            let mut client = tokio::net::UnixStream::connect(&path).await.unwrap();
            let (mut conn, _) = guard.accept().await.unwrap();
            client.write_all(b"hi").await.unwrap();
            let mut buf = [0; 2];
            conn.read_exact(&mut buf).await.unwrap();

            let err = AsyncUnixListenerGuard::bind(&path).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::AddrInUse);

            drop(guard);
            assert!(!path.exists());

            let ours = AsyncUnixListenerGuard::bind(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            let _theirs = UnixListener::bind(&path).unwrap();
            ours.close().unwrap();
            assert!(path.exists());
        });
    }

    /// A client that sends 64 KiB the server never reads, then reads to EOF: how many
    /// bytes it got.
    async fn unread_request_then_read_all(addr: std::net::SocketAddr) -> usize {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(&[b'?'; 64 * 1024]).await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        got.len()
    }

    #[test]
    fn tokio_stream_close_delivers_every_byte_with_unread_data_in_flight() {
        let runtime = common::multi_thread();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let client = tokio::spawn(unread_request_then_read_all(addr));
            let (mut server, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            server.write_all(&vec![b'r'; RESPONSE]).await.unwrap();
            server.close().await.unwrap();
            assert_eq!(client.await.unwrap(), RESPONSE);
        });
    }

    #[test]
    fn dropped_async_guard_still_delivers_every_byte() {
        let runtime = common::multi_thread();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let client = tokio::spawn(unread_request_then_read_all(addr));
            let (server, _) = listener.accept().await.unwrap();
            let mut server = TcpStreamGuardBuilder::new()
                .deadline(Duration::from_secs(30))
                .guard_async(server);
            tokio::time::sleep(Duration::from_millis(50)).await;
            server.write_all(&vec![b'r'; RESPONSE]).await.unwrap();
            drop(server); // e.g. a `?` return: the reaper does the graceful close
            assert_eq!(client.await.unwrap(), RESPONSE);
        });
    }

    #[test]
    fn tokio_stream_close_times_out_naming_the_peer() {
        let runtime = common::current_thread();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (server, peer) = listener.accept().await.unwrap();
            let err = TcpStreamGuardBuilder::new()
                .deadline(Duration::from_millis(100))
                .close_async(server)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::TimedOut);
            assert!(err.to_string().contains(&peer.to_string()), "{err}");
        });
    }
}

#[test]
fn listener_guard_entered_in_a_scope_is_closed_at_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scoped.sock");
    let result = custodian::scope(|s| {
        let listener = s.enter(UnixListenerGuard::bind(&path)?);
        assert_serves(listener, &path);
        Ok::<_, io::Error>(())
    });
    result.unwrap();
    assert!(!path.exists());
}
