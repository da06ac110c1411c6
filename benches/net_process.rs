//! custodian's socket, process and lock guards against doing the same by hand.
//!
//! - `UnixListenerGuard` bind + drop vs `UnixListener::bind` + `remove_file`
//!   (target: ≤ 1.1×), and vs the same by hand with the guard's inode check (two
//!   `stat`s);
//! - `HoldWatch` around an uncontended `Mutex` lock/unlock vs the bare lock
//!   (target: ≤ 30 ns added);
//! - `ChildGuard` spawn + close of `/bin/true` vs `spawn` + `wait` (target: ≤ 1.05×).

use std::hint::black_box;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use custodian::net::UnixListenerGuard;
use custodian::process::ChildGuard;
use custodian::sync::HoldWatch;

/// Times `measured` only, but runs `other` before each run of it, so that both
/// functions of a pair see the same load on this shared, noisy machine.
fn paired(iters: u64, mut measured: impl FnMut(), mut other: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        other();
        let start = Instant::now();
        measured();
        total += start.elapsed();
    }
    total
}

fn unix_listener(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.sock");
    let by_hand = || {
        let listener = UnixListener::bind(&path).unwrap();
        drop(black_box(listener));
        std::fs::remove_file(&path).unwrap();
    };
    // By hand with the inode check the guard does: a stat after bind, one before unlink.
    let by_hand_checked = || {
        let listener = UnixListener::bind(&path).unwrap();
        let ours = std::fs::symlink_metadata(&path).unwrap().ino();
        drop(black_box(listener));
        if std::fs::symlink_metadata(&path).unwrap().ino() == ours {
            std::fs::remove_file(&path).unwrap();
        }
    };
    let guard = || drop(black_box(UnixListenerGuard::bind(&path).unwrap()));
    let mut group = c.benchmark_group("unix_listener_bind_drop");
    group.bench_function("by_hand", |b| b.iter_custom(|n| paired(n, by_hand, guard)));
    group.bench_function("by_hand_checked", |b| {
        b.iter_custom(|n| paired(n, by_hand_checked, guard))
    });
    group.bench_function("guard", |b| b.iter_custom(|n| paired(n, guard, by_hand)));
    group.finish();
}

fn hold_watch(c: &mut Criterion) {
    let lock = Mutex::new(0u64);
    let mut group = c.benchmark_group("mutex_lock_unlock");
    group.bench_function("bare", |b| {
        b.iter(|| {
            let mut guard = black_box(&lock).lock().unwrap();
            *guard += 1;
        })
    });
    // A 100 ms limit is timed on the coarse clock (see `sync::coarse_limit`).
    group.bench_function("hold_watch", |b| {
        b.iter(|| {
            let mut guard =
                HoldWatch::new(black_box(&lock).lock().unwrap(), Duration::from_millis(100));
            *guard += 1;
        })
    });
    // A 1 ms limit needs the precise clock: an `Instant::now()` pair.
    group.bench_function("hold_watch_precise", |b| {
        b.iter(|| {
            let mut guard =
                HoldWatch::new(black_box(&lock).lock().unwrap(), Duration::from_millis(1));
            *guard += 1;
        })
    });
    group.finish();
}

fn child(c: &mut Criterion) {
    let spawn_wait = || {
        let mut child = Command::new("/bin/true").spawn().unwrap();
        black_box(child.wait().unwrap());
    };
    // Waits for the natural exit like the peer, then reaps.
    let guard_wait_close = || {
        let mut child = ChildGuard::spawn(Command::new("/bin/true")).unwrap();
        child.wait().unwrap();
        black_box(child.close().unwrap());
    };
    // Stops the child at once (SIGTERM), then reaps.
    let guard_close = || {
        black_box(
            ChildGuard::spawn(Command::new("/bin/true"))
                .unwrap()
                .close()
                .unwrap(),
        );
    };
    let mut group = c.benchmark_group("spawn_true");
    group.sample_size(30);
    group.bench_function("spawn_wait", |b| {
        b.iter_custom(|n| paired(n, spawn_wait, guard_wait_close))
    });
    group.bench_function("child_guard_wait_close", |b| {
        b.iter_custom(|n| paired(n, guard_wait_close, spawn_wait))
    });
    group.bench_function("child_guard_close", |b| {
        b.iter_custom(|n| paired(n, guard_close, spawn_wait))
    });
    group.finish();
}

criterion_group!(benches, unix_listener, hold_watch, child);
criterion_main!(benches);
