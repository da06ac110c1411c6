//! The ledger: exact counters under many threads, live resources with their acquisition
//! sites, leak checks, and events that never panic.

mod common;

use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;

use custodian::CleanupStack;
use custodian::ledger::{self, Kind, LeakCheck, Ticket};

#[test]
fn a_forgotten_guard_is_listed_with_its_file_and_line() {
    ledger::track_sites(true);
    let stack = CleanupStack::new();
    let line = line!() - 1;
    std::mem::forget(stack);
    let leaked = ledger::live()
        .into_iter()
        .find(|r| r.site().file() == file!() && r.site().line() == line)
        .expect("the forgotten stack is live");
    assert_eq!(leaked.kind(), "custodian::CleanupStack");
    assert_eq!(leaked.site().column(), 17);
    assert_eq!(leaked.thread(), std::thread::current().id());
    let shown = leaked.to_string();
    assert!(
        shown.contains(&format!("tests/ledger.rs:{line}:17")),
        "{shown}"
    );
}

#[test]
fn assert_no_leaks_fails_on_mem_forget_naming_the_site() {
    let line = line!() + 3;
    let caught = panic::catch_unwind(|| {
        ledger::assert_no_leaks(|| {
            std::mem::forget(CleanupStack::new());
        })
    });
    let payload = caught.unwrap_err();
    let message = payload.downcast_ref::<String>().unwrap();
    assert!(message.contains("1 resource(s) leaked"), "{message}");
    assert!(message.contains("custodian::CleanupStack"), "{message}");
    assert!(
        message.contains(&format!("tests/ledger.rs:{line}:")),
        "{message}"
    );
}

#[test]
fn assert_no_leaks_passes_when_everything_is_released_and_returns_the_value() {
    let v = ledger::assert_no_leaks(|| {
        let mut stack = CleanupStack::new();
        stack.defer(|| ());
        drop(stack);
        42
    });
    assert_eq!(v, 42);
}

#[test]
fn an_rc_cycle_is_a_leak() {
    struct Node {
        _stack: CleanupStack,
        next: RefCell<Option<Rc<Node>>>,
    }
    let check = LeakCheck::new();
    let a = Rc::new(Node {
        _stack: CleanupStack::new(),
        next: RefCell::new(None),
    });
    let b = Rc::new(Node {
        _stack: CleanupStack::new(),
        next: RefCell::new(Some(Rc::clone(&a))),
    });
    *a.next.borrow_mut() = Some(Rc::clone(&b));
    drop((a, b));
    let leaks = check.finish().unwrap_err();
    assert_eq!(leaks.resources().len(), 2);
    assert!(
        leaks
            .resources()
            .iter()
            .all(|r| r.kind() == "custodian::CleanupStack")
    );
}

#[test]
fn leak_check_on_the_current_thread_ignores_other_threads() {
    let check = LeakCheck::new();
    std::thread::spawn(|| std::mem::forget(CleanupStack::new()))
        .join()
        .unwrap();
    check.finish().expect("other threads' leaks are not ours");

    let check = LeakCheck::all_threads();
    std::thread::spawn(|| std::mem::forget(CleanupStack::new()))
        .join()
        .unwrap();
    assert!(!check.leaked().is_empty());
    let _ = check.finish();
}

#[test]
fn a_leak_check_dropped_without_finish_panics_on_a_leak() {
    let caught = panic::catch_unwind(|| {
        let _check = LeakCheck::new();
        std::mem::forget(CleanupStack::new());
    });
    assert!(caught.is_err());
}

static THREADED: Kind = Kind::new("test::threaded");

#[test]
fn counters_are_exact_with_eight_threads() {
    const PER_THREAD: u64 = 20_000;
    let before = ledger::snapshot().get("test::threaded");
    let barrier = std::sync::Barrier::new(8);
    // Half the tickets are released on another thread than the one that acquired them.
    let (tx, rx) = std::sync::mpsc::channel::<Ticket>();
    std::thread::scope(|s| {
        for _ in 0..8 {
            let tx = tx.clone();
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                for i in 0..PER_THREAD {
                    let ticket = Ticket::new(&THREADED);
                    if i % 2 == 0 {
                        drop(ticket);
                    } else {
                        tx.send(ticket).unwrap();
                    }
                }
            });
        }
        drop(tx);
        s.spawn(move || {
            for t in rx {
                drop(t);
            }
        });
        // Snapshots taken while the threads run never show more releases than
        // acquisitions.
        for _ in 0..50 {
            let c = ledger::snapshot().get("test::threaded");
            assert!(c.released <= c.acquired, "{c:?}");
        }
    });
    let after = ledger::snapshot().get("test::threaded");
    assert_eq!(after.acquired - before.acquired, 8 * PER_THREAD);
    assert_eq!(after.released - before.released, 8 * PER_THREAD);
    assert_eq!(after.live(), 0);
}

static FAILING: Kind = Kind::new("test::failing");

#[test]
fn failure_emits_an_error_event_with_the_standard_fields_and_counts_it() {
    let before = ledger::snapshot();
    let (line, events) = common::capture(|| {
        let ticket = Ticket::new(&FAILING);
        let line = line!() - 1;
        ticket.failure(&"/var/run/app.pid", &"permission denied");
        line
    });
    let delta = ledger::snapshot().since(&before).get("test::failing");
    assert_eq!((delta.acquired, delta.released, delta.failed), (1, 1, 1));
    let errors = common::errors(&events);
    assert_eq!(errors.len(), 1);
    let e = errors[0];
    assert_eq!(e.field("kind"), Some("test::failing"));
    assert_eq!(e.field("resource"), Some("/var/run/app.pid"));
    assert_eq!(e.field("error"), Some("permission denied"));
    assert!(
        e.field("site")
            .unwrap()
            .contains(&format!("tests/ledger.rs:{line}:"))
    );
    // acquire and release are trace events
    let messages: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(messages, ["acquired", "cleanup failed", "released"]);
}

static TLS_KIND: Kind = Kind::new("test::tls_destruction");

struct FailsOnDrop(Ticket);
impl Drop for FailsOnDrop {
    fn drop(&mut self) {
        self.0
            .failure(&"tls", &"failure reported during thread-local destruction");
    }
}

thread_local! {
    static PARKED: RefCell<Vec<FailsOnDrop>> = const { RefCell::new(Vec::new()) };
}

#[test]
fn guards_dropped_during_thread_local_destruction_neither_panic_nor_get_lost() {
    // The tickets are released (and the failures reported) while the thread's
    // thread-locals, including the ledger's own per-thread counters, are torn down.
    let before = ledger::snapshot().get("test::tls_destruction");
    let handle = std::thread::spawn(|| {
        PARKED.with(|p| {
            for _ in 0..3 {
                p.borrow_mut().push(FailsOnDrop(Ticket::new(&TLS_KIND)));
            }
        });
        // Also a CleanupStack with a failing entry parked in a thread-local.
        thread_local! {
            static STACK: RefCell<Option<CleanupStack>> = const { RefCell::new(None) };
        }
        STACK.with(|s| {
            let mut stack = CleanupStack::new();
            stack.defer_fallible(|| Err::<(), _>("fails at thread exit"));
            *s.borrow_mut() = Some(stack);
        });
    });
    assert!(handle.join().is_ok(), "thread exit must not panic");
    let after = ledger::snapshot().get("test::tls_destruction");
    assert_eq!(after.acquired - before.acquired, 3);
    assert_eq!(after.released - before.released, 3);
    assert_eq!(after.failed - before.failed, 3);
}

#[test]
fn snapshot_since_and_report_print_as_tables() {
    static SHOWN: Kind = Kind::new("test::shown");
    let before = ledger::snapshot();
    let t = Ticket::new(&SHOWN);
    let delta = ledger::snapshot().since(&before);
    assert_eq!(delta.get("test::shown").live(), 1);
    let table = delta.to_string();
    assert!(table.starts_with("kind"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("test::shown")),
        "{table}"
    );
    assert!(
        delta
            .iter()
            .any(|(k, c)| k == "test::shown" && c.acquired == 1)
    );
    let total = ledger::snapshot().total();
    assert!(total.acquired >= total.released);
    drop(t);
    let delta = ledger::snapshot().since(&before);
    assert_eq!(delta.get("test::shown").live(), 0);
    let report = ledger::report().to_string();
    assert!(report.contains("test::shown"), "{report}");
}

#[test]
fn untracked_resources_are_counted_but_not_listed() {
    // Tracking is a process-wide setting: run this check in a child process so that
    // turning it off does not disturb the other tests.
    if std::env::var("CUSTODIAN_LEDGER_UNTRACKED").is_ok() {
        ledger::track_sites(false);
        static QUIET: Kind = Kind::new("test::quiet");
        let t = Ticket::new(&QUIET);
        assert_eq!(ledger::snapshot().get("test::quiet").live(), 1);
        assert!(ledger::live().iter().all(|r| r.kind() != "test::quiet"));
        // A leak check turns tracking on for its duration.
        let check = LeakCheck::new();
        let t2 = Ticket::new(&QUIET);
        assert_eq!(check.leaked().len(), 1);
        drop(t2);
        check.finish().unwrap();
        let t3 = Ticket::new(&QUIET);
        assert!(ledger::live().iter().all(|r| r.kind() != "test::quiet"));
        drop((t, t3));
        println!("untracked ok");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "untracked_resources_are_counted_but_not_listed",
            "--nocapture",
        ])
        .env("CUSTODIAN_LEDGER_UNTRACKED", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("untracked ok"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_ticket_is_released_when_its_thread_panics() {
    static UNWOUND: Kind = Kind::new("test::unwound");
    let r = std::thread::spawn(|| {
        let _t = Ticket::new(&UNWOUND);
        panic::catch_unwind(AssertUnwindSafe(|| {
            let _inner = Ticket::new(&UNWOUND);
            panic!("unwinds through the inner ticket");
        }))
        .unwrap_err();
        panic!("and through the outer one");
    })
    .join();
    assert!(r.is_err());
    let c = ledger::snapshot().get("test::unwound");
    assert_eq!((c.acquired, c.released), (2, 2));
}
