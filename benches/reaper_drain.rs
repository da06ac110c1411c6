//! The reaper at scale: N guards dropped at once (their cleanups pending), then
//! `Reaper::shutdown`, for N = 100, 10 000 and 100 000, against `TaskTracker` (N
//! `spawn`s, then `close` + `wait`) with the same cleanup future.
//!
//! For each N it prints, per guard: the heap held while the cleanups are pending (growth
//! of the live heap, counted by the global allocator below, divided by N), the time to
//! hand them off (drop / spawn) and the time to drain them. Rounds interleave the two
//! contenders (A, B, B, A, ...); min and median over the rounds are printed.
//!
//! A current-thread runtime, so that nothing runs before the drain starts.
//!
//! Run: `cargo bench --all-features --bench reaper_drain` (`-- --rounds 3` for a quick run).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use custodian::rt::{AsyncGuard, Reaper};
use tokio_util::task::TaskTracker;

/// The system allocator, counting the bytes currently allocated.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only a counter is updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

async fn cleanup(n: u64) -> io::Result<()> {
    black_box(n);
    Ok(())
}

/// One round for one contender: (bytes per pending cleanup, hand-off ns, drain ns), per
/// guard.
#[derive(Clone, Copy)]
struct Sample {
    bytes: f64,
    handoff: f64,
    drain: f64,
}

async fn custodian(n: u64) -> Sample {
    let reaper = Reaper::new();
    let before = LIVE.load(Ordering::Relaxed);
    let start = Instant::now();
    for i in 0..n {
        drop(AsyncGuard::with_reaper(&reaper, i, cleanup));
    }
    let handoff = start.elapsed();
    let bytes = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    let start = Instant::now();
    let report = reaper.shutdown(Duration::from_secs(600)).await;
    let drain = start.elapsed();
    assert_eq!(report.completed(), n, "{report}");
    sample(n, bytes, handoff, drain)
}

async fn tracker(n: u64) -> Sample {
    let tracker = TaskTracker::new();
    let before = LIVE.load(Ordering::Relaxed);
    let start = Instant::now();
    for i in 0..n {
        drop(tracker.spawn(cleanup(i)));
    }
    let handoff = start.elapsed();
    let bytes = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    let start = Instant::now();
    tracker.close();
    tracker.wait().await;
    let drain = start.elapsed();
    sample(n, bytes, handoff, drain)
}

fn sample(n: u64, bytes: usize, handoff: Duration, drain: Duration) -> Sample {
    let n = n as f64;
    Sample {
        bytes: bytes as f64 / n,
        handoff: handoff.as_nanos() as f64 / n,
        drain: drain.as_nanos() as f64 / n,
    }
}

fn min_median(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|r| r.parse().ok())
        .unwrap_or(9usize);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    println!(
        "| guards | contender | bytes per pending cleanup | hand-off ns/guard (min / median) | drain ns/guard (min / median) |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for n in [100u64, 10_000, 100_000] {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // A, B then B, A: neither always runs first.
            if round % 2 == 0 {
                ours.push(rt.block_on(custodian(n)));
                theirs.push(rt.block_on(tracker(n)));
            } else {
                theirs.push(rt.block_on(tracker(n)));
                ours.push(rt.block_on(custodian(n)));
            }
        }
        for (name, samples) in [
            ("`AsyncGuard` dropped, `Reaper::shutdown`", &ours),
            ("`TaskTracker::spawn`, `close` + `wait`", &theirs),
        ] {
            let (bytes, _) = min_median(samples.iter().map(|s| s.bytes).collect());
            let (h_min, h_med) = min_median(samples.iter().map(|s| s.handoff).collect());
            let (d_min, d_med) = min_median(samples.iter().map(|s| s.drain).collect());
            println!(
                "| {n} | {name} | {bytes:.0} | {h_min:.0} / {h_med:.0} | {d_min:.0} / {d_med:.0} |"
            );
        }
    }
}
