//! The example service (examples/service/) with custodian's guards, against the same
//! service with the guards replaced by plain tokio: same store (append log, one `fsync`
//! per batch), same protocol loop, task tracker and stop tokens, but a connection is a
//! bare `TcpStream` dropped at the end (no `AsyncGuard`, no goodbye drained by a reaper,
//! no ledger ticket, no graceful close). A third variant writes the graceful close by
//! hand, to tell the guard's own cost from the cost of closing gracefully.
//!
//! - `set`: acknowledged `SET`s per second, 32 clients each sending one `SET` at a time
//!   on an open connection (one element = one `SET` made durable and acknowledged).
//! - `accept_close`: connections per second, 8 clients each looping connect, `QUIT`,
//!   read `BYE` and the end of stream, close.
//! - `shutdown_200`: the shutdown sequence (`Running::shutdown`: what the service does
//!   between SIGTERM and exit) with 200 open connections, each saying `BYE` and closed
//!   gracefully; the clients read `BYE` and close.
//!
//! Criterion times each variant; it runs the other variant's same workload before each
//! timed run so that both see the same load on a shared machine. After criterion, the
//! two variants run interleaved (A, B, A, B, ...) and the min and median of the per-pair
//! ratio are printed: the figures that count, since criterion's medians come from
//! different moments.
//!
//! Run: `cargo bench --all-features --bench service -- --warm-up-time 1 --measurement-time 3`.
//! Site tracking is on, as in the service; `SERVICE_BENCH_NO_SITES=1` turns it off.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/service/server.rs"]
mod server;
#[allow(dead_code, unreachable_pub)]
#[path = "../examples/service/store.rs"]
mod store;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use server::{Config, End, Running};
use store::Store;

/// The drain deadline of the service as built.
const DRAIN: Duration = Duration::from_secs(5);
const SET_CLIENTS: usize = 32;
const CLOSE_CLIENTS: usize = 8;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The service as built (lock, admin socket, watchdog child, guarded connections).
async fn guarded(dir: &std::path::Path) -> Running {
    let config = Config {
        state: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        drain_deadline: DRAIN,
    };
    server::start(&config).await.unwrap()
}

/// The same service with the connections in plain tokio: same store, protocol loop,
/// task tracker and stop/abort tokens (the shutdown's own machinery, which a plain
/// tokio service needs too), but a bare `TcpStream` dropped at the end. With
/// `graceful`, the goodbye's graceful close is written by hand (shutdown, read until the
/// client closes): what the guard does, minus the guard, the reaper and the ledger.
async fn plain(dir: &std::path::Path, graceful: bool) -> (SocketAddr, Store) {
    let (store, _) = Store::open(dir).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = store.handle();
    let (tracker, stop, abort) = (
        TaskTracker::new(),
        CancellationToken::new(),
        CancellationToken::new(),
    );
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (store, stop, abort) = (handle.clone(), stop.clone(), abort.clone());
            tracker.spawn(async move {
                let _ = stream.set_nodelay(true);
                let mut conn = BufReader::new(BufWriter::new(stream));
                let end = tokio::select! {
                    end = server::serve(&mut conn, &store, &stop) => end,
                    () = abort.cancelled() => return,
                };
                if let Ok(End::Quit) = end {
                    let mut out = conn.into_inner();
                    let _ = out.write_all(b"BYE\n").await;
                    let _ = out.flush().await;
                    if graceful {
                        let mut stream = out.into_inner();
                        let _ = stream.shutdown().await;
                        let mut buf = [0u8; 1024];
                        let drain = async { while let Ok(1..) = stream.read(&mut buf).await {} };
                        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
                    }
                } // dropped: closed at once
            });
        }
    });
    (addr, store)
}

type Client = (BufReader<OwnedReadHalf>, OwnedWriteHalf);

async fn connect(addr: SocketAddr) -> Client {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (read, write) = stream.into_split();
    (BufReader::new(read), write)
}

/// `total` `SET`s spread over the clients, each waiting for its `OK`.
async fn sets(clients: &mut Vec<Client>, total: u64, round: &mut u64) -> Duration {
    let n = clients.len() as u64;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, (mut read, mut write)) in clients.drain(..).enumerate() {
        let count = total / n + u64::from((i as u64) < total % n);
        let tag = *round;
        tasks.push(tokio::spawn(async move {
            let mut reply = String::new();
            for k in 0..count {
                let line =
                    format!("SET r{tag}-c{i}-{k} some-value-of-forty-bytes-xxxxxxxxxxxxxxxx\n");
                write.write_all(line.as_bytes()).await.unwrap();
                reply.clear();
                read.read_line(&mut reply).await.unwrap();
                assert_eq!(reply, "OK\n");
            }
            (read, write)
        }));
    }
    for task in tasks {
        clients.push(task.await.unwrap());
    }
    *round += 1;
    start.elapsed()
}

/// `total` connections, `CLOSE_CLIENTS` at a time: connect, `QUIT`, `BYE`, EOF, close.
async fn accept_close(addr: SocketAddr, total: u64) -> Duration {
    let n = CLOSE_CLIENTS as u64;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let count = total / n + u64::from(i < total % n);
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::with_capacity(8);
            for _ in 0..count {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                stream.write_all(b"QUIT\n").await.unwrap();
                got.clear();
                stream.read_to_end(&mut got).await.unwrap();
                assert_eq!(got, b"BYE\n");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    start.elapsed()
}

struct Pair {
    _dirs: [tempfile::TempDir; 3],
    guarded: Running,
    plain: (SocketAddr, Store),
    by_hand: (SocketAddr, Store),
}

fn pair(rt: &Runtime) -> Pair {
    let dirs = [(); 3].map(|()| tempfile::tempdir().unwrap());
    let (guarded, plain, by_hand) = rt.block_on(async {
        (
            guarded(dirs[0].path()).await,
            plain(dirs[1].path(), false).await,
            plain(dirs[2].path(), true).await,
        )
    });
    Pair {
        _dirs: dirs,
        guarded,
        plain,
        by_hand,
    }
}

fn bench_sets(c: &mut Criterion, rt: &Runtime, p: &Pair) {
    let (mut a, mut b) = rt.block_on(async {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..SET_CLIENTS {
            a.push(connect(p.guarded.local_addr()).await);
            b.push(connect(p.plain.0).await);
        }
        (a, b)
    });
    let mut round = 0;
    let mut group = c.benchmark_group("service/set");
    group.throughput(Throughput::Elements(1));
    group.bench_function("custodian", |bench| {
        bench.iter_custom(|iters| {
            rt.block_on(async {
                sets(&mut b, iters, &mut round).await;
                sets(&mut a, iters, &mut round).await
            })
        })
    });
    group.bench_function("plain tokio", |bench| {
        bench.iter_custom(|iters| {
            rt.block_on(async {
                sets(&mut a, iters, &mut round).await;
                sets(&mut b, iters, &mut round).await
            })
        })
    });
    group.finish();
    let ratios = rt.block_on(async {
        let mut ratios = Ratios::default();
        for _ in 0..PAIRS {
            let ta = Cost::of(sets(&mut a, 2000, &mut round)).await;
            let tb = Cost::of(sets(&mut b, 2000, &mut round)).await;
            ratios.push(&ta, &tb);
        }
        ratios
    });
    ratios.print("service/set: per acknowledged SET, custodian / plain tokio");
}

fn bench_accept_close(c: &mut Criterion, rt: &Runtime, p: &Pair) {
    let (a, b) = (p.guarded.local_addr(), p.plain.0);
    let mut group = c.benchmark_group("service/accept_close");
    group.throughput(Throughput::Elements(1));
    group.bench_function("custodian", |bench| {
        bench.iter_custom(|iters| {
            rt.block_on(async {
                accept_close(b, iters).await;
                accept_close(a, iters).await
            })
        })
    });
    group.bench_function("plain tokio", |bench| {
        bench.iter_custom(|iters| {
            rt.block_on(async {
                accept_close(a, iters).await;
                accept_close(b, iters).await
            })
        })
    });
    group.finish();
    let ratios = rt.block_on(async {
        let mut ratios = Ratios::default();
        for _ in 0..PAIRS {
            let ta = Cost::of(accept_close(a, 500)).await;
            let tb = Cost::of(accept_close(b, 500)).await;
            ratios.push(&ta, &tb);
        }
        ratios
    });
    ratios.print("service/accept_close: per connection, custodian / plain tokio");
    let c = p.by_hand.0;
    let ratios = rt.block_on(async {
        let mut ratios = Ratios::default();
        for _ in 0..PAIRS {
            let ta = Cost::of(accept_close(a, 500)).await;
            let tc = Cost::of(accept_close(c, 500)).await;
            ratios.push(&ta, &tc);
        }
        ratios
    });
    ratios.print("service/accept_close: per connection, custodian / plain tokio with a hand-written graceful close");
}

/// A service with 200 served, open connections; each client reads `BYE`, then closes.
async fn shutdown_200(dir: &std::path::Path) -> Duration {
    let running = guarded(dir).await;
    let addr = running.local_addr();
    let mut clients = Vec::new();
    for i in 0..200 {
        let (mut read, mut write) = connect(addr).await;
        write
            .write_all(format!("SET open-{i} x\n").as_bytes())
            .await
            .unwrap();
        let mut reply = String::new();
        read.read_line(&mut reply).await.unwrap();
        assert_eq!(reply, "OK\n");
        clients.push(tokio::spawn(async move {
            let mut rest = String::new();
            read.read_to_string(&mut rest).await.unwrap();
            assert_eq!(rest, "BYE\n");
            drop(write);
        }));
    }
    let start = Instant::now();
    let stopped = running.shutdown(start + DRAIN).await.unwrap();
    let elapsed = start.elapsed();
    assert_eq!(stopped.report.completed(), 200, "{}", stopped.report);
    for client in clients {
        client.await.unwrap();
    }
    elapsed
}

fn bench_shutdown(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("service/shutdown_200");
    group.sample_size(10);
    group.bench_function("custodian", |bench| {
        bench.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().unwrap();
                total += rt.block_on(shutdown_200(dir.path()));
            }
            total
        })
    });
    group.finish();
}

/// Interleaved pairs of runs for the ratios.
const PAIRS: usize = 40;

/// What a run cost: wall-clock time, and CPU time of the whole process (server, clients,
/// committer thread), which the other engineers' jobs on this shared machine disturb far
/// less than the wall clock.
struct Cost {
    wall: Duration,
    cpu: Duration,
}

impl Cost {
    async fn of(run: impl std::future::Future<Output = Duration>) -> Cost {
        let cpu = process_cpu();
        let wall = run.await;
        Cost {
            wall,
            cpu: process_cpu() - cpu,
        }
    }
}

fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Per-pair ratios, custodian / plain.
#[derive(Default)]
struct Ratios {
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

impl Ratios {
    fn push(&mut self, a: &Cost, b: &Cost) {
        self.wall.push(a.wall.as_secs_f64() / b.wall.as_secs_f64());
        self.cpu.push(a.cpu.as_secs_f64() / b.cpu.as_secs_f64());
    }

    fn print(mut self, what: &str) {
        for (name, ratios) in [("wall", &mut self.wall), ("cpu", &mut self.cpu)] {
            ratios.sort_by(f64::total_cmp);
            println!(
                "{what}: {name} time ratio over {} interleaved pairs: min {:.3} median {:.3} max {:.3}",
                ratios.len(),
                ratios[0],
                ratios[ratios.len() / 2],
                ratios[ratios.len() - 1]
            );
        }
    }
}

/// `SERVICE_BENCH_ONLY=<guarded|plain>-<set|accept_close>-<n>`: run only that, `n`
/// times, for `strace -c -f` (syscalls per operation: subtract the run with n = 0).
fn only(rt: &Runtime, p: &Pair, what: &str) {
    let mut parts = what.split('-');
    let (variant, workload, n) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let n: u64 = n.parse().unwrap();
    let addr = match variant {
        "guarded" => p.guarded.local_addr(),
        "plain" => p.plain.0,
        _ => p.by_hand.0,
    };
    rt.block_on(async {
        if workload == "set" {
            let mut clients = vec![connect(addr).await];
            sets(&mut clients, n, &mut 0).await;
        } else {
            accept_close(addr, n).await;
        }
    });
}

fn main() {
    custodian::ledger::track_sites(std::env::var_os("SERVICE_BENCH_NO_SITES").is_none()); // as the service's main does
    let mut c = Criterion::default().configure_from_args();
    let rt = runtime();
    let p = pair(&rt);
    if let Ok(what) = std::env::var("SERVICE_BENCH_ONLY") {
        return only(&rt, &p, &what);
    }
    bench_sets(&mut c, &rt, &p);
    bench_accept_close(&mut c, &rt, &p);
    bench_shutdown(&mut c, &rt);
    let Pair {
        guarded,
        plain,
        by_hand,
        ..
    } = p;
    rt.block_on(async {
        guarded.shutdown(Instant::now() + DRAIN).await.unwrap();
    });
    plain.1.close().unwrap();
    by_hand.1.close().unwrap();
    c.final_summary();
}
