//! `custodian::sync::HoldWatch` around real locks.

mod common;

use std::sync::{Mutex, RwLock};
use std::time::Duration;

use custodian::sync::{HoldWatch, slow_holds};
use tracing::Level;

fn warnings(events: &[common::Captured]) -> Vec<&common::Captured> {
    events.iter().filter(|e| e.level == Level::WARN).collect()
}

#[test]
fn a_long_hold_emits_exactly_one_warning_with_the_right_site() {
    let lock = Mutex::new(0);
    let (line, events) = common::capture(|| {
        let mut held = HoldWatch::new(lock.lock().unwrap(), Duration::from_millis(20));
        let line = line!() - 1;
        *held += 1;
        std::thread::sleep(Duration::from_millis(80));
        drop(held);
        line
    });
    let warns = warnings(&events);
    assert_eq!(warns.len(), 1, "{events:?}");
    let warn = warns[0];
    let site = warn.field("site").unwrap();
    assert!(
        site.starts_with(&format!("{}:{line}:", file!())),
        "{site} is not {}:{line}",
        file!()
    );
    assert!(
        warn.field("kind").unwrap().contains("MutexGuard"),
        "{warn:?}"
    );
    let held_ms: f64 = warn.field("held_ms").unwrap().parse().unwrap();
    assert!(held_ms >= 80.0, "{held_ms}");
    let limit_ms: f64 = warn.field("limit_ms").unwrap().parse().unwrap();
    assert_eq!(limit_ms, 20.0);
    assert_eq!(*lock.lock().unwrap(), 1);
}

#[test]
fn a_long_limit_is_timed_on_the_coarse_clock_and_still_warns_once() {
    let limit = custodian::sync::coarse_limit();
    assert!(limit < Duration::from_secs(1), "{limit:?}");
    let lock = Mutex::new(());
    let (took, events) = common::capture(|| {
        let held = HoldWatch::new(lock.lock().unwrap(), limit);
        std::thread::sleep(limit + Duration::from_millis(60));
        HoldWatch::close(held)
    });
    assert!(took > limit, "{took:?}");
    assert_eq!(warnings(&events).len(), 1, "{events:?}");

    // And a short hold under that limit does not.
    let ((), events) = common::capture(|| drop(HoldWatch::new(lock.lock().unwrap(), limit)));
    assert!(warnings(&events).is_empty(), "{events:?}");
}

#[test]
fn a_short_hold_emits_nothing() {
    let lock = Mutex::new(());
    let ((), events) = common::capture(|| {
        for _ in 0..1000 {
            let held = HoldWatch::new(lock.lock().unwrap(), Duration::from_secs(10));
            drop(held);
        }
    });
    assert!(warnings(&events).is_empty(), "{events:?}");
}

#[test]
fn the_longest_hold_per_site_is_recorded() {
    let lock = RwLock::new(());
    let hold = |ms| {
        let held = HoldWatch::named(
            lock.write().unwrap(),
            "sync-test write lock",
            Duration::from_millis(1),
        );
        std::thread::sleep(Duration::from_millis(ms));
        drop(held);
    };
    let ((), events) = common::capture(|| {
        hold(5);
        hold(40);
        hold(10);
    });
    assert_eq!(warnings(&events).len(), 3);
    let mine: Vec<_> = slow_holds()
        .into_iter()
        .filter(|h| h.kind == "sync-test write lock")
        .collect();
    assert_eq!(mine.len(), 1, "one site: {mine:?}");
    assert_eq!(mine[0].count, 3);
    assert!(mine[0].longest >= Duration::from_millis(40));
    assert!(mine[0].longest < Duration::from_secs(30));
    assert!(mine[0].to_string().contains("sync.rs"));
}

static PROBED: Mutex<()> = Mutex::new(());

#[test]
fn the_lock_is_released_before_the_warning_is_emitted() {
    let seen = std::sync::Arc::new(Mutex::new(None));
    let held = HoldWatch::new(PROBED.lock().unwrap(), Duration::ZERO);
    std::thread::sleep(Duration::from_millis(2));
    let probe = Probe { seen: seen.clone() };
    tracing::subscriber::with_default(probe, || drop(held));
    assert_eq!(
        seen.lock().unwrap().take(),
        Some(true),
        "lock still held at the warning"
    );
}

/// A subscriber that records, at the first warning, whether `PROBED` is free.
struct Probe {
    seen: std::sync::Arc<Mutex<Option<bool>>>,
}

impl tracing::Subscriber for Probe {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == Level::WARN {
            let mut seen = self.seen.lock().unwrap();
            if seen.is_none() {
                *seen = Some(PROBED.try_lock().is_ok());
            }
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn into_inner_stops_watching_and_close_returns_the_hold_time() {
    let lock = Mutex::new(5);
    let ((), events) = common::capture(|| {
        let held = HoldWatch::new(lock.lock().unwrap(), Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        let guard = HoldWatch::into_inner(held);
        assert_eq!(*guard, 5);
    });
    assert!(warnings(&events).is_empty(), "{events:?}");

    let (took, events) = common::capture(|| {
        let held = HoldWatch::new(lock.lock().unwrap(), Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(50));
        HoldWatch::close(held)
    });
    // A 10 s limit is timed on the coarse clock: one tick (a tenth of
    // `coarse_limit`) of error.
    let tick = custodian::sync::coarse_limit() / 10;
    assert!(took + tick >= Duration::from_millis(50), "{took:?}");
    assert!(warnings(&events).is_empty());
    assert!(lock.try_lock().is_ok());
}

#[test]
fn a_held_lock_is_a_live_resource_in_the_ledger() {
    // Other tests hold watches in parallel: look for this one by its site.
    custodian::ledger::track_sites(true);
    let lock = Mutex::new(());
    let held = HoldWatch::new(lock.lock().unwrap(), Duration::from_secs(1));
    let line = line!() - 1;
    let mine =
        |r: &custodian::ledger::LiveResource| r.site().line() == line && r.site().file() == file!();
    let live = custodian::ledger::live();
    let found: Vec<_> = live.iter().filter(|r| mine(r)).collect();
    assert_eq!(found.len(), 1, "{live:?}");
    assert_eq!(found[0].kind(), "custodian::sync::HoldWatch");
    drop(held);
    assert!(!custodian::ledger::live().iter().any(mine));
}

#[test]
fn close_releases_the_ticket_even_when_the_guard_panics_on_release() {
    struct PanicsOnDrop;
    impl Drop for PanicsOnDrop {
        fn drop(&mut self) {
            panic!("the lock guard's own Drop panicked");
        }
    }
    custodian::ledger::track_sites(true);
    let watch = HoldWatch::new(PanicsOnDrop, Duration::from_secs(1));
    let line = line!() - 1;
    let mine =
        |r: &custodian::ledger::LiveResource| r.site().line() == line && r.site().file() == file!();
    assert!(custodian::ledger::live().iter().any(mine));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| HoldWatch::close(watch)));
    assert!(result.is_err());
    assert!(
        !custodian::ledger::live().iter().any(mine),
        "the ticket of a closed watch is still live"
    );
}

#[test]
fn read_guards_and_panicking_holders_are_watched_too() {
    let lock = RwLock::new(1);
    let ((), events) = common::capture(|| {
        let a = HoldWatch::new(lock.read().unwrap(), Duration::ZERO);
        let b = HoldWatch::new(lock.read().unwrap(), Duration::ZERO);
        std::thread::sleep(Duration::from_millis(1));
        assert_eq!(*a + *b, 2);
        drop((a, b));
        let result = std::panic::catch_unwind(|| {
            let _held = HoldWatch::new(lock.read().unwrap(), Duration::ZERO);
            std::thread::sleep(Duration::from_millis(1));
            panic!("while holding");
        });
        assert!(result.is_err());
    });
    assert_eq!(warnings(&events).len(), 3, "{events:?}");
    assert!(lock.try_write().is_ok(), "the lock was not released");
}

#[cfg(feature = "tokio")]
#[test]
fn tokio_mutex_guards_are_watched() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let lock = tokio::sync::Mutex::new(0);
    let ((), events) = common::capture(|| {
        runtime.block_on(async {
            let mut held = HoldWatch::new(lock.lock().await, Duration::from_millis(10));
            *held += 1;
            tokio::time::sleep(Duration::from_millis(30)).await;
        })
    });
    assert_eq!(warnings(&events).len(), 1, "{events:?}");
    assert_eq!(*lock.try_lock().unwrap(), 1);
}
