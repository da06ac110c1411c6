//! Chapter: sockets, child processes and lock hold times — the OS resources whose
//! cleanup std does not do.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use custodian::net::{TcpStreamGuardBuilder, UnixListenerGuard};
use custodian::process::ChildGuardBuilder;
use custodian::sync::HoldWatch;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

pub(crate) fn run(dir: &Path) -> Result<()> {
    unix_server(dir)?;
    process_tree()?;
    tcp_close()?;
    hold_time();
    Ok(())
}

/// One request to a tiny upper-casing server listening on `path`.
fn serve_one(listener: &UnixListenerGuard, path: &Path, request: &str) -> Result<String> {
    let mut client = UnixStream::connect(path)?;
    client.write_all(request.as_bytes())?;
    client.shutdown(std::net::Shutdown::Write)?;
    let (mut conn, _) = listener.accept()?;
    let mut got = String::new();
    conn.read_to_string(&mut got)?;
    conn.write_all(got.to_uppercase().as_bytes())?;
    drop(conn);
    let mut answer = String::new();
    client.read_to_string(&mut answer)?;
    Ok(answer)
}

/// A server on a Unix socket, started three times: after a crash (the socket file is
/// left behind) and after a clean stop. std alone fails the second start with
/// "address in use".
fn unix_server(dir: &Path) -> Result<()> {
    let path = dir.join("tour.sock");

    let first = UnixListenerGuard::bind(&path)?;
    println!("start 1: {}", serve_one(&first, &path, "hello")?);
    // A crash: the process dies without cleanup, the socket file stays on disk.
    let (listener, _) = UnixListenerGuard::into_inner(first);
    drop(listener);
    println!(
        "after the crash the socket file exists: {}; std's bind says: {}",
        path.exists(),
        std::os::unix::net::UnixListener::bind(&path).unwrap_err()
    );

    let second = UnixListenerGuard::bind(&path)?; // stale: nobody listens, replaced
    println!("start 2: {}", serve_one(&second, &path, "again")?);
    match UnixListenerGuard::bind(&path) {
        Ok(_) => println!("a second instance stole the address (must not happen)"),
        Err(e) => println!("a second instance meanwhile is refused: {e}"),
    }
    second.close()?; // clean stop: the file is removed
    println!(
        "after a clean stop the socket file exists: {}",
        path.exists()
    );

    let third = UnixListenerGuard::bind(&path)?;
    println!("start 3: {}", serve_one(&third, &path, "and again")?);
    drop(third);
    Ok(())
}

/// `pid`, `ppid`, process group and state of `pid` from `/proc`, or `gone`.
fn describe(pid: u32) -> String {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return format!("pid {pid}: gone");
    };
    // The command name sits between the first '(' and the last ')'.
    let name = &stat[stat.find('(').map_or(0, |i| i + 1)..stat.rfind(')').unwrap_or(0)];
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap_or(0) + 2..]
        .split_whitespace()
        .collect();
    format!(
        "pid {pid} (command `{name}`): state {} ppid {} pgid {}",
        fields.first().unwrap_or(&"?"),
        fields.get(1).unwrap_or(&"?"),
        fields.get(2).unwrap_or(&"?")
    )
}

/// A shell with two grandchildren, one of them ignoring SIGTERM, stopped as a group:
/// nothing keeps running and no zombie is left.
fn process_tree() -> Result<()> {
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "sleep 60 & echo $!; (trap '' TERM; exec sleep 60) & echo $!; wait",
    ])
    .stdout(Stdio::piped());
    let mut child = ChildGuardBuilder::new()
        .process_group(true)
        .grace(Duration::from_millis(500))
        .spawn(cmd)?;
    let mut pids = vec![child.id()];
    let mut out = BufReader::new(child.stdout().take().ok_or("no stdout")?);
    for _ in 0..2 {
        let mut line = String::new();
        out.read_line(&mut line)?;
        pids.push(line.trim().parse()?);
    }
    std::thread::sleep(Duration::from_millis(50)); // let the background jobs exec
    println!("the process tree, from /proc:");
    for &pid in &pids {
        println!("  {}", describe(pid));
    }
    let status = child.close()?;
    println!("closed: the shell ended with {status}; /proc now:");
    // The shell was ours and is reaped; the grandchildren were killed and are init's to
    // reap (it does so shortly).
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|&pid| !describe(pid).ends_with("gone"))
        && std::time::Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    for &pid in &pids {
        println!("  {}", describe(pid));
    }

    // The same with std: the child is neither stopped nor reaped.
    let raw = Command::new("true").spawn()?;
    let pid = raw.id();
    drop(raw);
    std::thread::sleep(Duration::from_millis(50));
    println!(
        "std's Child dropped after exiting: {} (a zombie until we exit)",
        describe(pid)
    );
    Ok(())
}

/// The server has not read the client's request when it sends its last response:
/// a plain drop resets the connection, a graceful close delivers everything.
fn tcp_close() -> Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let client = std::thread::spawn(move || -> std::io::Result<usize> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.write_all(&[b'?'; 64 * 1024])?;
        let mut got = Vec::new();
        stream.read_to_end(&mut got)?;
        Ok(got.len())
    });
    let (mut server, _) = listener.accept()?;
    std::thread::sleep(Duration::from_millis(50));
    server.write_all(&vec![b'r'; 4 << 20])?;
    TcpStreamGuardBuilder::new().close(server)?;
    let got = client.join().map_err(|_| "client panicked")??;
    println!(
        "TCP: the client got {got} of {} bytes after a graceful close",
        4 << 20
    );
    Ok(())
}

/// A lock held past its limit: a warning naming the site and the hold time.
fn hold_time() {
    let sessions = Mutex::new(Vec::<u32>::new());
    let mut held = HoldWatch::named(
        sessions.lock().unwrap_or_else(|e| e.into_inner()),
        "sessions",
        Duration::from_millis(10),
    );
    held.push(1);
    std::thread::sleep(Duration::from_millis(30)); // slow work under the lock
    drop(held);
    for slow in custodian::sync::slow_holds() {
        println!("slow hold: {slow}");
    }
}

/// The tokio twins: a child stopped without blocking a thread, a graceful close of a
/// tokio TCP stream.
#[cfg(feature = "tokio")]
pub(crate) async fn run_async() -> Result<()> {
    use custodian::rt::AsyncClose;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut cmd = tokio::process::Command::new("sh");
    cmd.args(["-c", "trap '' TERM; echo ready; exec sleep 60"]);
    cmd.stdout(Stdio::piped());
    let mut child = ChildGuardBuilder::new()
        .grace(Duration::from_millis(200))
        .spawn_async(cmd)?;
    let pid = child.id();
    let mut ready = String::new();
    use tokio::io::AsyncBufReadExt;
    tokio::io::BufReader::new(child.stdout().take().ok_or("no stdout")?)
        .read_line(&mut ready)
        .await?;
    let status = child.close().await?;
    println!("async child ignoring SIGTERM: {status}; {}", describe(pid));

    // Dropped without close (an early return, `?`, a cancelled future): the reaper
    // stops and reaps it.
    let mut cmd = tokio::process::Command::new("sleep");
    cmd.arg("60");
    let child = custodian::process::AsyncChildGuard::spawn(cmd)?;
    let pid = child.id();
    drop(child);
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while !describe(pid).ends_with("gone") && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "async child dropped, stopped by the reaper: {}",
        describe(pid)
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mut client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
    let (mut server, _) = listener.accept().await?;
    client.write_all(b"request never read").await?;
    server.write_all(b"goodbye").await?;
    let closing = tokio::spawn(server.close());
    let mut got = String::new();
    client.read_to_string(&mut got).await?;
    drop(client);
    closing.await??;
    println!("async TCP close: the client got {got:?}");
    Ok(())
}
