//! The foundation's hot paths against what users would write instead, in one run.
//!
//! - `defer`: hand-written `Drop` struct vs scopeguard's `defer!` vs `custodian::scope`
//!   with one deferred cleanup (target: scope ≤ 1.5× `defer!`), and with 8.
//! - `stack8`: `CleanupStack` with 8 entries vs `Vec<Box<dyn FnOnce()>>` run in reverse
//!   (target ≤ 1.1×).
//! - `ticket`: one ledger ticket acquire + release vs nothing (target ≤ 5 ns), on one
//!   thread and with a second thread doing the same at the same time; with site tracking
//!   on, alone and with 100 000 other tickets alive (the cost must not grow).
//! - `events`: a guard whose events are disabled (no subscriber; a subscriber that
//!   filters out `custodian`) vs the same work without events.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use custodian::CleanupStack;
use custodian::ledger::{self, Kind, Ticket};

struct HandWritten<'a>(&'a mut u64);
impl Drop for HandWritten<'_> {
    #[inline]
    fn drop(&mut self) {
        *self.0 = black_box(*self.0 + 1);
    }
}

fn defer(c: &mut Criterion) {
    let mut g = c.benchmark_group("defer");
    g.bench_function("hand-written Drop", |b| {
        let mut n = 0u64;
        b.iter(|| {
            let _g = HandWritten(&mut n);
        });
        black_box(n);
    });
    g.bench_function("scopeguard defer!", |b| {
        let mut n = 0u64;
        b.iter(|| {
            scopeguard::defer! { n = black_box(n + 1); }
        });
        black_box(n);
    });
    g.bench_function("custodian::scope, 1 defer", |b| {
        let n = std::cell::Cell::new(0u64);
        b.iter(|| {
            let r: Result<(), custodian::ScopeError<()>> = custodian::scope(|s| {
                s.defer(|| n.set(black_box(n.get() + 1)));
                Ok(())
            });
            black_box(r).ok();
        });
        black_box(n.get());
    });
    g.bench_function("custodian::scope, 1 defer registered out of line", |b| {
        // The cleanup is registered by a function the compiler does not inline, as when
        // the body hands the scope to other code: the general path.
        #[inline(never)]
        fn register<'a>(s: &custodian::Scope<'a, ()>, n: &'a std::cell::Cell<u64>) {
            s.defer(|| n.set(black_box(n.get() + 1)));
        }
        let n = std::cell::Cell::new(0u64);
        b.iter(|| {
            let r: Result<(), custodian::ScopeError<()>> = custodian::scope(|s| {
                black_box(register)(s, &n);
                Ok(())
            });
            black_box(r).ok();
        });
        black_box(n.get());
    });
    g.bench_function("custodian::scope, 8 cleanups", |b| {
        let n = std::cell::Cell::new(0u64);
        b.iter(|| {
            let r: Result<(), custodian::ScopeError<()>> = custodian::scope(|s| {
                for _ in 0..4 {
                    s.defer(|| n.set(black_box(n.get() + 1)));
                    s.on_err(|_| n.set(0));
                }
                Ok(())
            });
            black_box(r).ok();
        });
        black_box(n.get());
    });
    g.finish();
}

fn stack8(c: &mut Criterion) {
    // Distinct boxed closures (each captures its own Arc), as in real use.
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut g = c.benchmark_group("stack8");
    g.bench_function("Vec<Box<dyn FnOnce()>> reversed", |b| {
        b.iter(|| {
            let mut v: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
            for _ in 0..8 {
                let c = Arc::clone(&counter);
                v.push(Box::new(move || {
                    c.fetch_add(1, Ordering::Relaxed);
                }));
            }
            while let Some(f) = v.pop() {
                f();
            }
        });
    });
    g.bench_function("CleanupStack close", |b| {
        b.iter(|| {
            let mut stack = CleanupStack::new();
            for _ in 0..8 {
                let c = Arc::clone(&counter);
                stack.defer(move || {
                    c.fetch_add(1, Ordering::Relaxed);
                });
            }
            black_box(stack.close()).ok();
        });
    });
    g.bench_function("CleanupStack drop", |b| {
        b.iter(|| {
            let mut stack = CleanupStack::new();
            for _ in 0..8 {
                let c = Arc::clone(&counter);
                stack.defer(move || {
                    c.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
    });
    g.finish();
}

static BENCH: Kind = Kind::new("bench::ticket");

fn ticket(c: &mut Criterion) {
    // Release-build default: counters only, no site tracking.
    ledger::track_sites(false);
    let mut g = c.benchmark_group("ticket");
    g.bench_function("nothing", |b| {
        b.iter(|| black_box(&BENCH));
    });
    g.bench_function("acquire+release, 1 thread", |b| {
        b.iter(|| drop(Ticket::new(black_box(&BENCH))));
    });
    g.bench_function("acquire+release, 2 threads", |b| {
        b.iter_custom(|iters| {
            let stop = Arc::new(AtomicBool::new(false));
            let other = {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..1000 {
                            drop(Ticket::new(black_box(&BENCH)));
                        }
                    }
                })
            };
            let start = Instant::now();
            for _ in 0..iters {
                drop(Ticket::new(black_box(&BENCH)));
            }
            let elapsed = start.elapsed();
            stop.store(true, Ordering::Relaxed);
            other.join().unwrap();
            elapsed
        });
    });
    g.bench_function("acquire+release, site tracking on", |b| {
        ledger::track_sites(true);
        b.iter(|| drop(Ticket::new(black_box(&BENCH))));
        ledger::track_sites(false);
    });
    g.bench_function("acquire+release, site tracking on, 100 000 live", |b| {
        ledger::track_sites(true);
        let held: Vec<Ticket> = (0..100_000).map(|_| Ticket::new(&BENCH)).collect();
        b.iter(|| drop(Ticket::new(black_box(&BENCH))));
        drop(held);
        ledger::track_sites(false);
    });
    g.finish();
}

fn events(c: &mut Criterion) {
    let mut g = c.benchmark_group("events");
    g.bench_function("ticket, no subscriber", |b| {
        b.iter(|| drop(Ticket::new(black_box(&BENCH))));
    });
    let filtered = tracing_subscriber::fmt()
        .with_env_filter("custodian=off,info")
        .with_writer(std::io::sink)
        .finish();
    tracing::subscriber::with_default(filtered, || {
        g.bench_function("ticket, subscriber filtering custodian out", |b| {
            b.iter(|| drop(Ticket::new(black_box(&BENCH))));
        });
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = defer, stack8, ticket, events
}
criterion_main!(benches);
