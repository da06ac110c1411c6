//! Instruction counts of the hot paths, for `valgrind --tool=callgrind`.
//!
//! Wall-clock figures wobble on a shared machine; instruction counts do not. This binary
//! runs one named scenario N times and does nothing else, so that
//! `(Ir(N) - Ir(0)) / N` is the cost of one run of the scenario (startup, the first
//! allocation of the thread-local counters and so on cancel out). `scripts/bench-report`
//! drives it:
//!
//! ```text
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/deps/instructions-HASH stack8-close 10000
//! ```
//!
//! A plain binary rather than gungraun/iai-callgrind: gungraun 0.20 works with this
//! valgrind, but needs its runner installed with `cargo install` (about 180 crates) and
//! adds its library to what `cargo bench --no-run` builds in CI.
//!
//! `instructions list` prints the scenario names. Under `cargo bench` (which passes
//! `--bench`) it runs each scenario once as a smoke test and exits.

use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use custodian::CleanupStack;
use custodian::ledger::{self, Kind, Ticket};

static BENCH: Kind = Kind::new("bench::ticket");

struct HandWritten<'a>(&'a Cell<u64>);
impl Drop for HandWritten<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0.set(black_box(self.0.get() + 1));
    }
}

/// Scenario name and one run of it. Each run is `#[inline(never)]` so the count is of
/// the same code the criterion suite times.
type Scenario = (&'static str, fn(&State));

struct State {
    n: Cell<u64>,
    counter: Arc<AtomicU64>,
    /// A current-thread runtime for the async scenarios (feature `tokio`).
    #[cfg(feature = "tokio")]
    rt: tokio::runtime::Runtime,
}

const SCENARIOS: &[Scenario] = &[
    ("defer-hand-written", hand_written),
    ("defer-scopeguard", scopeguard_defer),
    ("defer-scope-1", scope_1),
    ("defer-scope-1-opaque", scope_1_opaque),
    ("defer-scope-8", scope_8),
    ("stack8-vec", stack8_vec),
    ("stack8-close", stack8_close),
    ("stack8-drop", stack8_drop),
    ("ticket-nothing", ticket_nothing),
    ("ticket", ticket),
    ("ticket-filtered-subscriber", ticket),
    // Site tracking on (the debug-build default), with only the measured ticket alive and
    // with 100 000 other tickets alive: the cost must not grow with the live set.
    ("ticket-sites-1", ticket),
    ("ticket-sites-100k", ticket),
    #[cfg(feature = "tokio")]
    ("close-ready-direct", rt::direct),
    #[cfg(feature = "tokio")]
    ("close-ready-custodian", rt::custodian_close),
];

/// `AsyncGuard::new(v, f).close().await` vs `f(v).await`, on a current-thread runtime,
/// for a cleanup that is ready at once (benches/rt.rs, group `close`).
#[cfg(feature = "tokio")]
mod rt {
    use super::State;
    use custodian::rt::AsyncGuard;
    use std::hint::black_box;

    async fn ready(n: u64) -> std::io::Result<()> {
        black_box(n);
        Ok(())
    }

    #[inline(never)]
    pub(super) fn direct(s: &State) {
        s.rt.block_on(async { ready(black_box(1)).await.unwrap() });
    }

    #[inline(never)]
    pub(super) fn custodian_close(s: &State) {
        s.rt.block_on(async { AsyncGuard::new(black_box(1), ready).close().await.unwrap() });
    }
}

#[inline(never)]
fn hand_written(s: &State) {
    let _g = HandWritten(black_box(&s.n));
}

#[inline(never)]
fn scopeguard_defer(s: &State) {
    let n = black_box(&s.n);
    scopeguard::defer! { n.set(black_box(n.get() + 1)); }
}

#[inline(never)]
fn scope_1(s: &State) {
    let n = black_box(&s.n);
    let r: Result<(), custodian::ScopeError<()>> = custodian::scope(|sc| {
        sc.defer(|| n.set(black_box(n.get() + 1)));
        Ok(())
    });
    black_box(r).ok();
}

/// The same, with the cleanup registered by a function the compiler does not inline: it
/// can no longer follow the cleanup from registration to run, so this is the cost of the
/// general path (a body that hands the scope to other functions).
#[inline(never)]
fn scope_1_opaque(s: &State) {
    #[inline(never)]
    fn register<'a>(sc: &custodian::Scope<'a, ()>, n: &'a Cell<u64>) {
        sc.defer(|| n.set(black_box(n.get() + 1)));
    }
    let n = black_box(&s.n);
    let r: Result<(), custodian::ScopeError<()>> = custodian::scope(|sc| {
        black_box(register)(sc, n);
        Ok(())
    });
    black_box(r).ok();
}

#[inline(never)]
fn scope_8(s: &State) {
    let n = black_box(&s.n);
    let r: Result<(), custodian::ScopeError<()>> = custodian::scope(|sc| {
        for _ in 0..4 {
            sc.defer(|| n.set(black_box(n.get() + 1)));
            sc.on_err(|_| n.set(0));
        }
        Ok(())
    });
    black_box(r).ok();
}

#[inline(never)]
fn stack8_vec(s: &State) {
    let mut v: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
    for _ in 0..8 {
        let c = Arc::clone(&s.counter);
        v.push(Box::new(move || {
            c.fetch_add(1, Ordering::Relaxed);
        }));
    }
    while let Some(f) = v.pop() {
        f();
    }
}

#[inline(never)]
fn stack8_close(s: &State) {
    let mut stack = CleanupStack::new();
    for _ in 0..8 {
        let c = Arc::clone(&s.counter);
        stack.defer(move || {
            c.fetch_add(1, Ordering::Relaxed);
        });
    }
    black_box(stack.close()).ok();
}

#[inline(never)]
fn stack8_drop(s: &State) {
    let mut stack = CleanupStack::new();
    for _ in 0..8 {
        let c = Arc::clone(&s.counter);
        stack.defer(move || {
            c.fetch_add(1, Ordering::Relaxed);
        });
    }
    drop(black_box(stack));
}

#[inline(never)]
fn ticket_nothing(_: &State) {
    black_box(&BENCH);
}

#[inline(never)]
fn ticket(_: &State) {
    drop(Ticket::new(black_box(&BENCH)));
}

fn smoke(state: &State) {
    for (_, run) in SCENARIOS {
        run(state);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    ledger::track_sites(false); // the release-build default
    let state = State {
        n: Cell::new(0),
        counter: Arc::new(AtomicU64::new(0)),
        #[cfg(feature = "tokio")]
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime"),
    };
    match args.first().map(String::as_str) {
        // `cargo bench` passes `--bench` (and any criterion options given to a run of
        // every bench): a smoke run.
        None => smoke(&state),
        Some(flag) if flag.starts_with('-') => smoke(&state),
        Some("list") => {
            for (name, _) in SCENARIOS {
                println!("{name}");
            }
        }
        Some(name) => {
            let Some(&(_, run)) = SCENARIOS.iter().find(|(n, _)| *n == name) else {
                eprintln!("unknown scenario {name}; `list` prints them");
                std::process::exit(2);
            };
            let iterations: u64 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(1);
            // Setup, done in the N = 0 run as well, so it cancels out.
            let mut held = Vec::new();
            if name.starts_with("ticket-sites") {
                ledger::track_sites(true);
            }
            if name == "ticket-sites-100k" {
                held.extend((0..100_000).map(|_| Ticket::new(&BENCH)));
            }
            let go = || {
                // Warm up once so that one-time work (registering the kind and the
                // thread's counters) is counted in the N = 0 run as well.
                run(&state);
                for _ in 0..iterations {
                    run(&state);
                }
            };
            if name == "ticket-filtered-subscriber" {
                let filtered = tracing_subscriber::fmt()
                    .with_env_filter("custodian=off,info")
                    .with_writer(std::io::sink)
                    .finish();
                tracing::subscriber::with_default(filtered, go);
            } else {
                go();
            }
            drop(black_box(held));
        }
    }
    black_box(state.n.get());
}
