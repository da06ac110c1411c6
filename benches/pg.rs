//! custodian::pg against raw advisory-lock calls, on a loopback server.
//!
//! - `acquire_release`: one exclusive lock taken and released on an open dedicated
//!   connection. `PgSession::acquire` + `PgLock::release` (fencing off: the same two
//!   round trips as the raw calls; and fencing on: the counter bump rides in the lock
//!   statement) vs `SELECT pg_advisory_lock($1)` / `SELECT pg_advisory_unlock($1)` as
//!   prepared statements on a plain tokio-postgres client.
//! - `lost_latency`: from `pg_terminate_backend` of the holder's backend returning to
//!   `lost()` completing (default check interval, 1 s; the server's goodbye is seen at
//!   once).
//!
//! Before criterion, an interleaved pass (A, B, A, B, ... 200 ops each, 30 rounds)
//! prints the min and median of the per-round ratio custodian / raw, so that drift on a
//! shared machine hits both sides alike.
//!
//! Needs a server: `scripts/with-postgres cargo bench --all-features --bench pg`.
//! Without `CUSTODIAN_TEST_PG` it prints a note and measures nothing.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use custodian::pg::{PgLockBuilder, PgSession};
use tokio::runtime::{Builder, Runtime};
use tokio_postgres::{Client, NoTls, Statement};

const KEY: i64 = 777_001;

struct Raw {
    client: Client,
    lock: Statement,
    unlock: Statement,
}

impl Raw {
    async fn connect(conn: &str) -> Raw {
        let (client, connection) = tokio_postgres::connect(conn, NoTls).await.unwrap();
        tokio::spawn(connection);
        let lock = client
            .prepare("SELECT pg_advisory_lock($1::int8)")
            .await
            .unwrap();
        let unlock = client
            .prepare("SELECT pg_advisory_unlock($1::int8)")
            .await
            .unwrap();
        Raw {
            client,
            lock,
            unlock,
        }
    }

    async fn op(&self) {
        self.client.query_one(&self.lock, &[&KEY]).await.unwrap();
        let row = self.client.query_one(&self.unlock, &[&KEY]).await.unwrap();
        assert!(row.get::<_, bool>(0));
    }
}

async fn ours(session: PgSession) -> PgSession {
    let lock = session.acquire(KEY).await.unwrap();
    black_box(lock.fence());
    lock.release().await.unwrap()
}

fn options(conn: &str, fencing: bool) -> PgLockBuilder {
    let mut options = PgLockBuilder::parse(conn).unwrap();
    if !fencing {
        options = options.fencing(None);
    }
    options
}

fn runtime() -> Runtime {
    Builder::new_current_thread().enable_all().build().unwrap()
}

/// A, B, A, B: the per-round ratio of `ours` over raw, fencing off and on.
fn interleaved(conn: &str) {
    const ROUNDS: usize = 30;
    const OPS: u32 = 200;
    let rt = runtime();
    rt.block_on(async {
        let raw = Raw::connect(conn).await;
        for fencing in [false, true] {
            let mut session = Some(options(conn, fencing).connect().await.unwrap());
            // Warm up both (statements prepared, fence row created).
            for _ in 0..OPS {
                raw.op().await;
                session = Some(ours(session.take().unwrap()).await);
            }
            let mut ratios = Vec::with_capacity(ROUNDS);
            let (mut raw_ns, mut ours_ns) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                let t = Instant::now();
                for _ in 0..OPS {
                    session = Some(ours(session.take().unwrap()).await);
                }
                let a = t.elapsed();
                let t = Instant::now();
                for _ in 0..OPS {
                    raw.op().await;
                }
                let b = t.elapsed();
                ratios.push(a.as_secs_f64() / b.as_secs_f64());
                ours_ns.push(a.as_nanos() / u128::from(OPS));
                raw_ns.push(b.as_nanos() / u128::from(OPS));
            }
            ratios.sort_by(f64::total_cmp);
            ours_ns.sort();
            raw_ns.sort();
            println!(
                "interleaved acquire+release, fencing {}: custodian {:.1} µs, raw {:.1} µs (medians); \
                 ratio min {:.3}, median {:.3}",
                if fencing { "on" } else { "off" },
                ours_ns[ROUNDS / 2] as f64 / 1e3,
                raw_ns[ROUNDS / 2] as f64 / 1e3,
                ratios[0],
                ratios[ROUNDS / 2]
            );
        }
    });
}

fn acquire_release(c: &mut Criterion, conn: &str) {
    let rt = runtime();
    let mut group = c.benchmark_group("pg_acquire_release");
    let raw = rt.block_on(Raw::connect(conn));
    group.bench_function("raw pg_advisory_lock/unlock (prepared)", |b| {
        b.iter(|| rt.block_on(raw.op()));
    });
    for fencing in [false, true] {
        let mut session = Some(rt.block_on(options(conn, fencing).connect()).unwrap());
        let name = if fencing {
            "custodian PgSession::acquire + release, fencing on"
        } else {
            "custodian PgSession::acquire + release, fencing off"
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                let s = session.take().unwrap();
                session = Some(rt.block_on(ours(s)));
            });
        });
    }
    group.finish();
}

fn lost_latency(c: &mut Criterion, conn: &str) {
    let rt = runtime();
    let admin = rt.block_on(Raw::connect(conn));
    let options = options(conn, false);
    let mut group = c.benchmark_group("pg_lost_latency");
    group.sample_size(10);
    group.bench_function("pg_terminate_backend -> lost()", |b| {
        b.iter_custom(|iters| {
            let (admin, options) = (&admin, &options);
            rt.block_on(async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let lock = options.acquire(KEY + 1).await.unwrap();
                    let t = Instant::now();
                    admin
                        .client
                        .execute("SELECT pg_terminate_backend($1)", &[&lock.backend_pid()])
                        .await
                        .unwrap();
                    lock.lost().await;
                    total += t.elapsed();
                    let _ = lock.close().await;
                }
                total
            })
        });
    });
    group.finish();
}

/// `pg --instructions ours|raw|fenced|raw-timer N`: N acquire+release after one warm-up,
/// nothing else, for callgrind: (Ir(N) - Ir(0)) / N is the client's instructions per op
/// (`scripts/bench-report` runs it, and `strace -c` for system calls). `raw-timer` is raw
/// with one idle periodic timer in the runtime.
fn instructions(conn: &str, which: &str, n: u32) {
    let rt = runtime();
    rt.block_on(async {
        match which {
            "raw" | "raw-timer" => {
                if which == "raw-timer" {
                    // A runtime with one periodic timer pending, as custodian's session
                    // watch keeps: every park then looks up the next expiration.
                    tokio::spawn(async {
                        let mut tick = tokio::time::interval(Duration::from_secs(1));
                        loop {
                            tick.tick().await;
                        }
                    });
                }
                let raw = Raw::connect(conn).await;
                raw.op().await;
                for _ in 0..n {
                    raw.op().await;
                }
            }
            "ours" | "fenced" => {
                let mut session = options(conn, which == "fenced").connect().await.unwrap();
                session = ours(session).await;
                for _ in 0..n {
                    session = ours(session).await;
                }
                drop(session);
            }
            other => panic!("unknown scenario {other:?}: ours, raw, fenced or raw-timer"),
        }
    });
}

fn main() {
    let Ok(conn) = std::env::var("CUSTODIAN_TEST_PG") else {
        println!("benches/pg.rs: CUSTODIAN_TEST_PG not set; run under scripts/with-postgres");
        return;
    };
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--instructions") {
        let which = args.get(i + 1).map_or("ours", String::as_str);
        let n = args.get(i + 2).and_then(|n| n.parse().ok()).unwrap_or(1000);
        instructions(&conn, which, n);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    interleaved(&conn);
    acquire_release(&mut c, &conn);
    lost_latency(&mut c, &conn);
    c.final_summary();
}
