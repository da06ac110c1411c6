//! The service: start-up (lock, state, admin socket, helper child, listener) and the
//! shutdown sequence, the accept loop and one connection's life.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use custodian::fs::LockFile;
use custodian::ledger::Kind;
use custodian::net::{AsyncUnixListenerGuard, TcpStreamGuardBuilder};
use custodian::process::{AsyncChildGuard, ChildGuardBuilder, Signal};
use custodian::rt::{AsyncGuard, DrainReport, Reaper};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::store::{Recovered, Store, StoreHandle};

/// The ledger kind of client connections: `STATUS` shows how many are live.
pub static CONNECTION: Kind = Kind::new("service::Connection");

/// The longest request line (a `SET` with its value).
pub const MAX_LINE: usize = 64 * 1024;

/// What the service is told on its command line.
#[derive(Clone, Debug)]
pub struct Config {
    /// Holds `service.pid`, `admin.sock`, `snapshot` and `log`.
    pub state: PathBuf,
    /// The TCP address to serve on (port 0: any free port).
    pub listen: SocketAddr,
    /// How long the whole shutdown may take, from the signal to the lock released:
    /// requests finished, goodbyes said, state written, child stopped.
    pub drain_deadline: Duration,
}

/// A connection as the service holds it: requests are read through the `BufReader`,
/// replies written through the `BufWriter`.
pub type Conn = BufReader<BufWriter<TcpStream>>;

/// A started service.
#[derive(Debug)]
pub struct Running {
    lock: LockFile,
    store: Store,
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept: JoinHandle<()>,
    admin: JoinHandle<io::Result<()>>,
    admin_stop: CancellationToken,
    watchdog: AsyncChildGuard,
    ticks: JoinHandle<()>,
    /// What recovery found at start.
    pub recovered: Recovered,
}

/// What the connections and the admin socket share.
#[derive(Debug)]
struct Shared {
    store: StoreHandle,
    /// The connections' tasks: closed and waited for at shutdown.
    connections: TaskTracker,
    /// Runs the goodbyes of connections dropped at shutdown; drained with a deadline.
    reaper: Reaper,
    /// Cancelled once the listener is closed: each connection ends after its current
    /// request.
    stop: CancellationToken,
    /// Cancelled when requests are still running halfway through the deadline (a client
    /// that never reads its replies): they are dropped, their goodbye goes to the reaper.
    abort: CancellationToken,
    drain_deadline: Duration,
    watchdog_ticks: AtomicU64,
}

/// How a stopped service ended.
#[derive(Debug)]
pub struct Stopped {
    /// Client connections open when the shutdown began.
    pub open_at_stop: usize,
    /// The reaper's drain of the connections' goodbyes.
    pub report: DrainReport,
    /// Keys in the final snapshot.
    pub keys: usize,
    /// How the helper child ended (it is reaped).
    pub watchdog: ExitStatus,
    /// The whole shutdown, from `shutdown` to the lock released.
    pub elapsed: Duration,
}

/// Takes the state directory's lock, recovers the state, binds the admin socket and
/// the TCP listener, and starts the helper child.
///
/// # Errors
/// A second instance gets the lock's error, naming the pid of the first one (see
/// `custodian::fs::LockHeld`); then nothing else was touched.
pub async fn start(config: &Config) -> io::Result<Running> {
    // The state directory is created on first use.
    std::fs::create_dir_all(&config.state).map_err(|e| {
        let state = config.state.display();
        io::Error::new(
            e.kind(),
            format!("cannot create the state directory {state}: {e}"),
        )
    })?;
    // One instance per state directory. A lock left by a killed instance is free (the
    // kernel dropped its flock): taken at once, our pid written in.
    let lock = LockFile::acquire_timeout(config.state.join("service.pid"), Duration::ZERO)?;
    let (store, recovered) = Store::open(&config.state)?;
    // A socket file left by a killed instance is replaced; a live one is never stolen.
    let admin_socket = AsyncUnixListenerGuard::bind(config.state.join("admin.sock"))?;
    let listener = TcpListener::bind(config.listen).await?;
    let local_addr = listener.local_addr()?;

    // A heartbeat child: one line a second. It dies of SIGPIPE within a second if we are
    // SIGKILLed; otherwise it is stopped (SIGTERM to its group) and reaped at shutdown.
    let mut cmd = tokio::process::Command::new("sh");
    cmd.args(["-c", "while sleep 1; do echo tick || exit; done"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null()); // nothing of ours kept open by an orphan after a SIGKILL
    let mut watchdog = ChildGuardBuilder::new()
        .process_group(true)
        .grace(Duration::from_secs(1))
        .spawn_async(cmd)?;
    let beats = watchdog.stdout().take().expect("stdout is piped");

    let shared = Arc::new(Shared {
        store: store.handle(),
        connections: TaskTracker::new(),
        reaper: Reaper::new(),
        stop: CancellationToken::new(),
        abort: CancellationToken::new(),
        drain_deadline: config.drain_deadline,
        watchdog_ticks: AtomicU64::new(0),
    });
    let ticks = tokio::spawn(count_ticks(beats, Arc::clone(&shared)));
    let admin_stop = CancellationToken::new();
    let admin = tokio::spawn(serve_admin(
        admin_socket,
        Arc::clone(&shared),
        admin_stop.clone(),
    ));
    let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
    Ok(Running {
        lock,
        store,
        shared,
        local_addr,
        accept,
        admin,
        admin_stop,
        watchdog,
        ticks,
        recovered,
    })
}

impl Running {
    /// The address the service listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The pid of the helper child.
    pub fn watchdog_pid(&self) -> u32 {
        self.watchdog.id()
    }

    /// The shutdown sequence, all of it done by `deadline` (in `main`: the signal's
    /// arrival plus the drain deadline): stop accepting, let requests in flight finish,
    /// drain the connections' goodbyes, write the final state and stop the helper child,
    /// remove the admin socket, release the lock. Every step runs even when an earlier
    /// one failed; the first error is returned.
    ///
    /// The connections get the deadline minus a reserve (see `reserve`); the reserve
    /// covers the final state write and the child's stop, which run side by side.
    pub async fn shutdown(self, deadline: Instant) -> io::Result<Stopped> {
        let start = Instant::now();
        let Running {
            lock,
            store,
            shared,
            accept,
            admin,
            admin_stop,
            watchdog,
            ticks,
            ..
        } = self;
        let drain_end = deadline - reserve(deadline.saturating_duration_since(start));
        let left = |until: Instant| until.saturating_duration_since(Instant::now());

        // 1. Stop accepting: the accept loop ends and drops the listener.
        accept.abort();
        let _ = accept.await;
        let open_at_stop = shared.connections.len();

        // 2. Each connection finishes its current request, then drops its guard: the
        //    goodbye (BYE, graceful close) goes to the reaper. Requests still stuck
        //    halfway through the connections' time are dropped the same way.
        shared.stop.cancel();
        shared.connections.close();
        if tokio::time::timeout(left(drain_end) / 2, shared.connections.wait())
            .await
            .is_err()
        {
            shared.abort.cancel();
            shared.connections.wait().await;
        }

        // 3. Drain the goodbyes until `drain_end` (the reaper takes up to 100 ms more to
        //    let the goodbyes it aborts notice; the reserve absorbs that).
        let report = shared.reaper.shutdown(left(drain_end)).await;

        // 4. The final state (last batch committed, snapshot written, log emptied) on a
        //    blocking thread, while 5. the helper child is stopped and reaped within what
        //    is left.
        //
        //    The state write is never cut short, even once the deadline has passed (a
        //    stalled disk, a machine too loaded for the reserve): every acknowledged SET
        //    is already durable in the log, so finishing late loses nothing, and a
        //    supervisor's SIGKILL in the middle of it leaves the old snapshot and the log,
        //    which the next start replays.
        let state = tokio::task::spawn_blocking(move || store.close());
        let watchdog = stop_child(watchdog, deadline).await;
        let keys = state.await.unwrap_or_else(|e| Err(io::Error::other(e)));
        // Not waited for to its end: were the stop to fail, the child's stdout could
        // stay open.
        ticks.abort();
        let _ = ticks.await;

        // 6. The admin socket's file is removed; then the lock (and pid file) released.
        admin_stop.cancel();
        let admin = admin.await.unwrap_or_else(|e| Err(io::Error::other(e)));
        let lock = lock.close();

        if let Some(late) = Instant::now().checked_duration_since(deadline) {
            tracing::warn!("the shutdown overran its deadline by {late:?}");
        }
        let (keys, watchdog) = (keys?, watchdog?);
        admin?;
        lock?;
        Ok(Stopped {
            open_at_stop,
            report,
            keys,
            watchdog,
            elapsed: start.elapsed(),
        })
    }
}

/// The part of a shutdown's time kept back from the connections for the final state
/// write and the child's stop: a quarter, at most a second. A snapshot of a few MB and
/// a child that exits on SIGTERM take well under that on a loaded machine.
fn reserve(total: Duration) -> Duration {
    (total / 4).min(Duration::from_secs(1))
}

/// Stops the helper child by `deadline`: SIGTERM to its group, its grace period (the
/// guard's, cut to what is left before `deadline`), SIGKILL if it is still there. Then
/// the guard's `close`, seeing it exited, kills whatever is left of its group and reaps
/// it.
async fn stop_child(mut child: AsyncChildGuard, deadline: Instant) -> io::Result<ExitStatus> {
    let grace = child
        .options()
        .get_grace()
        .min(deadline.saturating_duration_since(Instant::now()));
    if child.try_wait()?.is_none() {
        child.signal(child.options().get_signal())?;
        if child.wait_timeout(grace).await?.is_none() {
            child.signal(Signal::KILL)?;
            child.wait().await?; // SIGKILL cannot be caught: this is prompt
        }
    }
    child.close().await.map_err(io::Error::from)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Runs until the shutdown aborts it (at an `.await`: never between an accept and
    // the spawn of its connection), which drops the listener.
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                shared
                    .connections
                    .spawn(connection(stream, peer, Arc::clone(&shared)));
            }
            Err(e) => {
                // Out of file descriptors, or a connection reset before accept: go on.
                tracing::warn!("accept on {:?} failed: {e}", listener.local_addr());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// One client's life: requests until it quits or the service stops; then `BYE` and a
/// graceful close, run by the guard.
async fn connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let goodbye = TcpStreamGuardBuilder::new().deadline(shared.drain_deadline);
    let mut conn = AsyncGuard::builder()
        .kind(&CONNECTION)
        .reaper(&shared.reaper)
        .resource(format!("client {peer}"))
        .build(
            BufReader::new(BufWriter::new(stream)),
            move |conn: Conn| async move {
                let mut out = conn.into_inner();
                out.write_all(b"BYE\n").await?;
                out.flush().await?;
                // shutdown(Write), then read until the client closes: no reset, even
                // if it had sent a request we will not answer.
                goodbye.close_async(out.into_inner()).await
            },
        );
    let end = tokio::select! {
        end = serve(&mut conn, &shared.store, &shared.stop) => end,
        // Still in a request at the abort: dropping the guard hands the goodbye to the
        // reaper, whose deadline bounds it.
        () = shared.abort.cancelled() => return,
    };
    match end {
        // Shutting down: the reaper says goodbye, and its drain report counts it.
        Ok(End::Stop) => drop(conn),
        Ok(End::Quit) => {
            // A client that quits but keeps its side open would hold this close until
            // the goodbye's own deadline. At the abort the rest of the close goes to the
            // reaper (`close` is cancel safe), whose drain bounds it and counts it.
            tokio::select! {
                closed = AsyncGuard::close(conn) => {
                    if let Err(e) = closed {
                        tracing::debug!("goodbye to {peer}: {e}");
                    }
                }
                () = shared.abort.cancelled() => {}
            }
        }
        Ok(End::Eof) => drop(AsyncGuard::into_inner(conn)), // the client left first
        Err(e) => {
            tracing::debug!("client {peer}: {e}");
            drop(AsyncGuard::into_inner(conn));
        }
    }
}

/// Why [`serve`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The client sent `QUIT`.
    Quit,
    /// The client closed its side.
    Eof,
    /// The service is stopping; the connection was between requests.
    Stop,
}

/// The line protocol: `SET key value` → `OK` once durable, `GET key` → `VALUE v` or
/// `NIL`, `QUIT`. Returns between requests when `stop` is cancelled; a request already
/// read is always answered first.
pub async fn serve<S>(
    conn: &mut BufReader<S>,
    store: &StoreHandle,
    stop: &CancellationToken,
) -> io::Result<End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut line = String::new();
    loop {
        line.clear();
        let mut request = (&mut *conn).take(MAX_LINE as u64 + 1);
        let read = tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(End::Stop),
            read = request.read_line(&mut line) => read?,
        };
        if read == 0 {
            return Ok(End::Eof);
        }
        let Some(request) = line.strip_suffix('\n') else {
            conn.get_mut().write_all(b"ERR line too long\n").await?;
            conn.get_mut().flush().await?;
            return Ok(End::Quit);
        };
        let request = request.strip_suffix('\r').unwrap_or(request);
        let reply = match request.split_once(' ').unwrap_or((request, "")) {
            ("SET", args) => match args.split_once(' ') {
                Some((key, value)) if !key.is_empty() && !value.is_empty() => {
                    match store.set(key, value).await {
                        Ok(()) => "OK\n".to_owned(),
                        Err(e) => format!("ERR not stored: {e}\n"),
                    }
                }
                _ => "ERR usage: SET key value\n".to_owned(),
            },
            ("GET", key) if !key.is_empty() && !key.contains(' ') => match store.get(key) {
                Some(value) => format!("VALUE {value}\n"),
                None => "NIL\n".to_owned(),
            },
            ("QUIT", "") => return Ok(End::Quit),
            _ => "ERR unknown command (SET key value | GET key | QUIT)\n".to_owned(),
        };
        let out = conn.get_mut();
        out.write_all(reply.as_bytes()).await?;
        // Pipelined requests get their replies in one write, after the last of them.
        if conn.buffer().is_empty() {
            conn.get_mut().flush().await?;
        }
    }
}

/// The admin socket: `STATUS` → counters and the ledger report; then the connection
/// is closed. Stops (and removes the socket file) when `stop` is cancelled.
async fn serve_admin(
    socket: AsyncUnixListenerGuard,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> io::Result<()> {
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = socket.accept() => accepted?,
        };
        let (read, mut write) = stream.into_split();
        let mut request = String::new();
        let answered = tokio::time::timeout(Duration::from_secs(2), async {
            let mut read = BufReader::new(read).take(1024);
            read.read_line(&mut request).await?;
            let reply = match request.trim() {
                "STATUS" => status(&shared),
                other => format!("ERR unknown admin command {other:?} (STATUS)\n"),
            };
            write.write_all(reply.as_bytes()).await?;
            write.shutdown().await
        })
        .await;
        if let Ok(Err(e)) | Err(e) = answered.map_err(io::Error::from) {
            tracing::debug!("admin request: {e}");
        }
    }
    socket.close() // unlinks admin.sock if it is still ours
}

fn status(shared: &Shared) -> String {
    let stats = shared.store.stats();
    let (acked, fsyncs) = (
        stats.acked.load(Ordering::Relaxed),
        stats.fsyncs.load(Ordering::Relaxed),
    );
    format!(
        "connections: {}\nsets acknowledged: {acked} in {fsyncs} fsyncs\nwatchdog ticks: {}\n{}",
        custodian::ledger::snapshot().get(CONNECTION.name()).live(),
        shared.watchdog_ticks.load(Ordering::Relaxed),
        custodian::ledger::report(),
    )
}

async fn count_ticks(beats: tokio::process::ChildStdout, shared: Arc<Shared>) {
    let mut lines = BufReader::new(beats).lines();
    while let Ok(Some(_)) = lines.next_line().await {
        shared.watchdog_ticks.fetch_add(1, Ordering::Relaxed);
    }
    if !shared.stop.is_cancelled() {
        tracing::warn!("the watchdog child stopped beating");
    }
}
