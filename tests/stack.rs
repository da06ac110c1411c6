//! `CleanupStack`: Python's ExitStack, without its lost errors.

mod common;

use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use custodian::{CleanupStack, Close};

type Log = Arc<Mutex<Vec<u32>>>;

/// A shared log and a maker of entries that append their number to it.
fn recorder() -> (Log, impl Fn(u32) -> Box<dyn FnOnce() + Send>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = Arc::clone(&log);
    (log, move |i| {
        let l = Arc::clone(&l);
        Box::new(move || l.lock().unwrap().push(i))
    })
}

#[test]
fn entries_run_lifo_exactly_once_on_close() {
    let (log, entry) = recorder();
    let mut stack = CleanupStack::new();
    for i in 0..5 {
        stack.defer(entry(i));
    }
    assert_eq!(stack.len(), 5);
    stack.close().unwrap();
    assert_eq!(*log.lock().unwrap(), [4, 3, 2, 1, 0]);
}

#[test]
fn entries_run_on_drop_including_during_a_panic() {
    let (log, entry) = recorder();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut stack = CleanupStack::new();
        stack.defer(entry(1));
        stack.defer(entry(2));
        panic!("body");
    }));
    assert!(result.is_err());
    assert_eq!(*log.lock().unwrap(), [2, 1]);
}

#[test]
fn every_entry_runs_when_earlier_ones_fail_or_panic_and_every_failure_is_kept() {
    let ran = Arc::new(AtomicUsize::new(0));
    let mut stack = CleanupStack::new();
    let r = Arc::clone(&ran);
    stack.defer(move || {
        r.fetch_add(1, Ordering::SeqCst);
    });
    stack.defer_fallible(|| std::fs::remove_file("/no/such/custodian/file"));
    stack.defer(|| panic!("entry panics"));
    let r = Arc::clone(&ran);
    stack.defer(move || {
        r.fetch_add(1, Ordering::SeqCst);
    });
    let line = line!() - 6; // the defer_fallible line
    let errors = stack.close().unwrap_err();
    assert_eq!(ran.load(Ordering::SeqCst), 2);
    assert_eq!(errors.len(), 2);
    let all: Vec<_> = errors.iter().collect();
    assert_eq!(all[0].panic_message(), Some("entry panics"));
    let io = all[1].error().unwrap().downcast_ref::<io::Error>().unwrap();
    assert_eq!(io.kind(), io::ErrorKind::NotFound);
    assert_eq!(all[1].site().file(), file!());
    assert_eq!(all[1].site().line(), line);
    let shown = errors.to_string();
    assert!(shown.starts_with("2 cleanups failed:"), "{shown}");
    assert!(shown.contains("entry panics"), "{shown}");
    assert_eq!(errors.into_iter().count(), 2);
}

#[cfg(target_os = "linux")] // /dev/full
#[test]
fn pushed_guards_are_closed_and_their_errors_returned() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    let mut out = io::BufWriter::new(std::fs::File::create(&good).unwrap());
    out.write_all(b"kept").unwrap();
    let mut full = io::BufWriter::new(
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap(),
    );
    full.write_all(b"lost").unwrap();

    let mut stack = CleanupStack::new();
    stack.push(out);
    stack.push(full);
    let errors = stack.close().unwrap_err();
    assert_eq!(errors.len(), 1);
    let e = errors.iter().next().unwrap();
    assert!(e.label().contains("BufWriter"));
    assert_eq!(
        e.error()
            .unwrap()
            .downcast_ref::<io::Error>()
            .unwrap()
            .raw_os_error(),
        Some(28)
    );
    assert_eq!(std::fs::read(&good).unwrap(), b"kept");
}

#[test]
fn take_moves_ownership_so_the_old_stack_runs_nothing() {
    let (log, entry) = recorder();
    let mut stack = CleanupStack::new();
    stack.defer(entry(1));
    stack.defer(entry(2));
    let moved = stack.take();
    assert!(stack.is_empty());
    assert_eq!(moved.len(), 2);
    drop(stack);
    assert!(log.lock().unwrap().is_empty());
    drop(moved);
    assert_eq!(*log.lock().unwrap(), [2, 1]);
}

#[test]
fn drop_reports_each_failure_as_an_error_event_and_a_ledger_failure() {
    let before = custodian::ledger::snapshot();
    let ((), events) = common::capture(|| {
        let mut stack = CleanupStack::new();
        stack.defer_fallible(|| std::fs::remove_file("/no/such/custodian/a"));
        stack.defer(|| panic!("b panics"));
    });
    let errors = common::errors(&events);
    assert_eq!(errors.len(), 2, "{events:?}");
    assert!(errors[0].field("error").unwrap().contains("b panics"));
    assert!(errors[1].field("error").unwrap().contains("No such file"));
    for e in &errors {
        assert_eq!(e.field("kind"), Some("custodian::CleanupStack"));
        assert!(e.field("site").unwrap().starts_with("tests/stack.rs:"));
        assert!(e.field("resource").unwrap().contains("tests/stack.rs:"));
    }
    assert!(
        events
            .iter()
            .any(|e| e.message == "cleanup ran from Drop, not close"),
        "{events:?}"
    );
    let delta = custodian::ledger::snapshot().since(&before);
    assert!(delta.get("custodian::CleanupStack").failed >= 2);
}

#[test]
fn stacks_nest_through_the_close_trait() {
    let (log, entry) = recorder();
    let mut inner = CleanupStack::new();
    inner.defer(entry(1));
    inner.defer_fallible(|| Err::<(), _>("inner failure"));
    let mut outer = CleanupStack::new();
    outer.defer(entry(0));
    outer.push(inner);
    outer.defer(entry(2));
    let errors = Close::close(outer).unwrap_err();
    assert_eq!(*log.lock().unwrap(), [2, 1, 0]);
    assert_eq!(errors.len(), 1);
    assert!(errors.to_string().contains("inner failure"));
}

#[test]
fn a_stack_is_send_and_runs_on_another_thread() {
    let (log, entry) = recorder();
    let mut stack = CleanupStack::new();
    stack.defer(entry(9));
    std::thread::spawn(move || stack.close().unwrap())
        .join()
        .unwrap();
    assert_eq!(*log.lock().unwrap(), [9]);
}

#[test]
fn outcome_entries_run_only_for_their_outcome() {
    use custodian::Outcome;
    use std::sync::{Arc, Mutex};

    let run = |how: &str| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut stack = CleanupStack::new();
        let (a, b, c) = (log.clone(), log.clone(), log.clone());
        stack.defer(move || a.lock().unwrap().push("always"));
        stack.on_success(move || b.lock().unwrap().push("success"));
        stack.on_failure(move || c.lock().unwrap().push("failure"));
        match how {
            "close" => stack.close().unwrap(),
            "close_with(Success)" => stack.close_with(Outcome::Success).unwrap(),
            "close_with(Failure)" => stack.close_with(Outcome::Failure).unwrap(),
            "drop" => drop(stack),
            "panic" => {
                let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                    let _stack = stack;
                    panic!("the work panicked");
                }));
                assert!(caught.is_err());
            }
            _ => unreachable!(),
        }
        log.lock().unwrap().clone()
    };
    assert_eq!(run("close"), ["success", "always"]);
    assert_eq!(run("close_with(Success)"), ["success", "always"]);
    assert_eq!(run("close_with(Failure)"), ["failure", "always"]);
    assert_eq!(run("drop"), ["failure", "always"]);
    assert_eq!(run("panic"), ["failure", "always"]);
}

#[test]
fn named_cleanups_are_told_apart_in_errors_and_events() {
    let mut stack = CleanupStack::new();
    for name in ["a", "b", "c"] {
        stack.defer_named(format!("remove /no/such/{name}"), move || {
            std::fs::remove_file(format!("/no/such/{name}"))
        });
    }
    let errors = stack.close().unwrap_err();
    let labels: Vec<&str> = errors.iter().map(|e| e.label()).collect();
    assert_eq!(
        labels,
        [
            "remove /no/such/c",
            "remove /no/such/b",
            "remove /no/such/a"
        ]
    );

    // Dropped: each failure event names its cleanup.
    let ((), events) = common::capture(|| {
        let mut stack = CleanupStack::new();
        for name in ["x", "y"] {
            stack.defer_named(format!("remove {name}"), move || {
                std::fs::remove_file(format!("/no/such/{name}"))
            });
        }
        drop(stack);
    });
    let resources: Vec<&str> = common::errors(&events)
        .iter()
        .map(|e| e.field("resource").unwrap())
        .collect();
    assert_eq!(resources.len(), 2, "{events:?}");
    assert!(resources[0].starts_with("remove y at "), "{resources:?}");
    assert!(resources[1].starts_with("remove x at "), "{resources:?}");
}

#[test]
fn cleanup_error_cause_reads_the_same_for_errors_and_panics() {
    let mut stack = CleanupStack::new();
    stack.defer(|| panic!("disk gone"));
    stack.defer_fallible(|| Err::<(), _>("unlock refused"));
    let errors = stack.close().unwrap_err();
    let causes: Vec<String> = errors.iter().map(|e| e.cause().to_string()).collect();
    assert_eq!(causes, ["unlock refused", "panicked: disk gone"]);
    for e in &errors {
        assert!(
            e.to_string().ends_with(&format!("failed: {}", e.cause())),
            "{e}"
        );
    }
}

/// A `CleanupStack` is `Sync` even when its closures are not (one here owns a `Cell`),
/// so it can sit in state shared through an `Arc`: through `&self` it gives only its
/// length; closures are only run through `&mut self` or by value.
#[test]
fn a_stack_is_sync_and_can_be_shared_through_an_arc() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    let ran = Arc::new(AtomicUsize::new(0));
    let mut stack = CleanupStack::new();
    let not_sync = std::cell::Cell::new(7);
    let r = Arc::clone(&ran);
    stack.defer(move || r.store(not_sync.get(), Ordering::SeqCst));
    send_sync(&stack);
    let shared = Arc::new(stack);
    let other = Arc::clone(&shared);
    assert_eq!(std::thread::spawn(move || other.len()).join().unwrap(), 1);
    let stack = Arc::try_unwrap(shared).expect("the other thread is done");
    stack.close().unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 7);
}
