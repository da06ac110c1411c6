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

/// The live resources of `kind`, as `live()` lists them.
fn live_of(kind: &str) -> Vec<ledger::LiveResource> {
    ledger::live()
        .into_iter()
        .filter(|r| r.kind() == kind)
        .collect()
}

#[test]
fn a_ticket_released_on_another_thread_leaves_the_live_list() {
    static HANDED: Kind = Kind::new("test::handed_over");
    ledger::track_sites(true);
    let ticket = Ticket::new(&HANDED);
    let me = std::thread::current().id();
    let listed = live_of("test::handed_over");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].thread(), me);
    std::thread::spawn(move || drop(ticket)).join().unwrap();
    assert!(live_of("test::handed_over").is_empty());
}

#[test]
fn tickets_outlive_the_thread_that_acquired_them() {
    static ORPHAN: Kind = Kind::new("test::orphaned");
    ledger::track_sites(true);
    // The acquiring thread exits with its tickets alive: they stay listed under its id,
    // and can be released later from here.
    let (tickets, exited) = std::thread::spawn(|| {
        let tickets: Vec<Ticket> = (0..100).map(|_| Ticket::new(&ORPHAN)).collect();
        (tickets, std::thread::current().id())
    })
    .join()
    .unwrap();
    let listed = live_of("test::orphaned");
    assert_eq!(listed.len(), 100);
    assert!(listed.iter().all(|r| r.thread() == exited));
    // New threads take over the exited threads' slabs: their own tickets come and go
    // without disturbing the orphans.
    for _ in 0..4 {
        std::thread::spawn(|| {
            let mine: Vec<Ticket> = (0..50).map(|_| Ticket::new(&ORPHAN)).collect();
            assert_eq!(live_of("test::orphaned").len(), 150);
            drop(mine);
        })
        .join()
        .unwrap();
    }
    assert_eq!(live_of("test::orphaned").len(), 100);
    let mut tickets = tickets;
    // Release every other one, then the rest: freed slots are reused, never confused.
    let odd: Vec<Ticket> = (0..50).map(|i| tickets.remove(i)).collect();
    drop(odd);
    assert_eq!(live_of("test::orphaned").len(), 50);
    let again: Vec<Ticket> = (0..30).map(|_| Ticket::new(&ORPHAN)).collect();
    assert_eq!(live_of("test::orphaned").len(), 80);
    drop((tickets, again));
    assert!(live_of("test::orphaned").is_empty());
}

#[test]
fn more_threads_than_slabs_are_all_listed_and_released() {
    static CROWD: Kind = Kind::new("test::crowd");
    ledger::track_sites(true);
    const THREADS: usize = 150;
    let all_in = std::sync::Barrier::new(THREADS + 1);
    let counted = std::sync::Barrier::new(THREADS + 1);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                let t = Ticket::new(&CROWD);
                all_in.wait();
                counted.wait();
                drop(t);
            });
        }
        all_in.wait();
        let listed = live_of("test::crowd");
        assert_eq!(listed.len(), THREADS);
        let threads: std::collections::HashSet<_> = listed.iter().map(|r| r.thread()).collect();
        assert_eq!(threads.len(), THREADS);
        counted.wait();
    });
    assert!(live_of("test::crowd").is_empty());
}

#[test]
fn the_live_list_is_oldest_first_and_ages_grow() {
    static AGED: Kind = Kind::new("test::aged");
    ledger::track_sites(true);
    let old = Ticket::new(&AGED);
    let old_line = line!() - 1;
    std::thread::sleep(std::time::Duration::from_millis(100));
    let young = Ticket::new(&AGED);
    let listed = live_of("test::aged");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].site().line(), old_line, "oldest first");
    // The coarse clock is behind by less than one tick (at most 10 ms).
    assert!(
        listed[0].age() >= std::time::Duration::from_millis(85),
        "{:?}",
        listed[0].age()
    );
    assert!(listed[0].age() > listed[1].age());
    let before = listed[1].age();
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert!(listed[1].age() > before, "a listed age keeps growing");
    drop((old, young));
}

#[test]
fn a_ticket_acquired_during_thread_local_destruction_is_listed() {
    static LATE: Kind = Kind::new("test::late");
    static OUT: std::sync::Mutex<Option<Ticket>> = std::sync::Mutex::new(None);
    struct AcquiresOnDrop;
    impl Drop for AcquiresOnDrop {
        fn drop(&mut self) {
            *OUT.lock().unwrap() = Some(Ticket::new(&LATE));
        }
    }
    thread_local! {
        static LATER: AcquiresOnDrop = const { AcquiresOnDrop };
    }
    ledger::track_sites(true);
    let thread = std::thread::spawn(|| {
        // Touch the ledger first, so its own thread-locals may be gone by the time
        // `LATER` is destroyed.
        drop(Ticket::new(&LATE));
        LATER.with(|_| ());
        std::thread::current().id()
    })
    .join()
    .unwrap();
    let ticket = OUT.lock().unwrap().take().expect("acquired at thread exit");
    let listed = live_of("test::late");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].thread(), thread);
    drop(ticket);
    assert!(live_of("test::late").is_empty());
}

#[test]
fn snapshots_during_churn_never_overstate_live_nor_go_negative() {
    // Four threads acquire and release one ticket at a time, so at most four are ever
    // alive; a snapshot taken meanwhile must never count more than that, nor fewer
    // than none. (Reading `released` before `acquired` counted every acquisition made
    // between the two reads as live: overstated by hundreds on a busy machine.)
    static CHURN: Kind = Kind::new("test::churn");
    const THREADS: i64 = 4;
    const PER_THREAD: usize = 300_000;
    let running = std::sync::atomic::AtomicI64::new(THREADS);
    let start = std::sync::Barrier::new(THREADS as usize + 1);
    let (mut worst, mut snapshots) = ((0, 0), 0);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                start.wait();
                for _ in 0..PER_THREAD {
                    drop(Ticket::new(&CHURN));
                }
                running.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            });
        }
        start.wait();
        while running.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            let live = ledger::snapshot().get("test::churn").live();
            worst = (worst.0.min(live), worst.1.max(live));
            snapshots += 1;
        }
    });
    assert!(
        snapshots > 100,
        "only {snapshots} snapshots overlapped the churn"
    );
    assert!(
        worst.0 >= 0 && worst.1 <= THREADS,
        "live ranged over {worst:?}, possible: 0..={THREADS}"
    );
    assert_eq!(ledger::snapshot().get("test::churn").live(), 0);
}
