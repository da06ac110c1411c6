//! `scope`, `Rollback` and the scopeguard re-exports: cleanups run exactly once, in LIFO
//! order, on every path, and no error is lost.

mod common;

use std::cell::{Cell, RefCell};
use std::io::{self, Write};
use std::panic::{self, AssertUnwindSafe};
use std::process::Command;

use custodian::{Rollback, ScopeError, scope};

#[test]
fn cleanups_run_once_in_lifo_order_on_success() {
    let log = RefCell::new(Vec::new());
    let result = scope(|s| {
        s.defer(|| log.borrow_mut().push("defer 1"));
        s.on_success(|| log.borrow_mut().push("success"));
        s.on_err(|_: &io::Error| log.borrow_mut().push("err"));
        s.on_unwind(|| log.borrow_mut().push("unwind"));
        s.defer(|| log.borrow_mut().push("defer 2"));
        Ok(7)
    });
    assert_eq!(result.unwrap(), 7);
    assert_eq!(*log.borrow(), ["defer 2", "success", "defer 1"]);
}

fn fails_half_way(log: &RefCell<Vec<String>>) -> Result<u32, ScopeError<io::Error>> {
    scope(|s| {
        s.defer(|| log.borrow_mut().push("defer".into()));
        s.on_success(|| log.borrow_mut().push("success".into()));
        s.on_err(|e: &io::Error| log.borrow_mut().push(format!("err: {e}")));
        std::fs::metadata("/definitely/not/here")?; // early return through `?`
        log.borrow_mut().push("unreachable".into());
        Ok(1)
    })
}

#[test]
fn on_err_sees_the_error_of_an_early_return() {
    let log = RefCell::new(Vec::new());
    let err = fails_half_way(&log).unwrap_err();
    assert_eq!(err.body().unwrap().kind(), io::ErrorKind::NotFound);
    assert!(err.cleanup_errors().is_empty());
    let log = log.into_inner();
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(
        log[0].starts_with("err: ") && log[0].contains("No such file"),
        "{log:?}"
    );
    assert_eq!(log[1], "defer");
    // Display shows the body's error, so source() is not the body's error again (an OS
    // error has no source of its own).
    assert_eq!(err.to_string(), err.body().unwrap().to_string());
    assert!(std::error::Error::source(&err).is_none());
    assert_eq!(err.into_body().unwrap().kind(), io::ErrorKind::NotFound);
}

#[test]
fn cleanups_run_once_on_panic_and_the_panic_goes_on() {
    let log = RefCell::new(Vec::new());
    let caught = panic::catch_unwind(AssertUnwindSafe(|| {
        scope::<(), io::Error, _>(|s| {
            s.defer(|| log.borrow_mut().push("defer"));
            s.on_success(|| log.borrow_mut().push("success"));
            s.on_err(|_| log.borrow_mut().push("err"));
            s.on_unwind(|| log.borrow_mut().push("unwind"));
            panic!("body panicked");
        })
    }));
    let payload = caught.unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"body panicked"));
    assert_eq!(*log.borrow(), ["unwind", "defer"]);
}

#[test]
fn three_failing_cleanups_after_a_successful_body_give_three_errors_in_order() {
    let err = scope(|s| {
        for name in ["first", "second", "third"] {
            s.defer_fallible(move || Err::<(), _>(io::Error::other(name)));
        }
        Ok::<_, io::Error>("body result")
    })
    .unwrap_err();
    assert!(err.body().is_none());
    let messages: Vec<String> = err
        .cleanup_errors()
        .iter()
        .map(|e| e.error().unwrap().to_string())
        .collect();
    assert_eq!(messages, ["third", "second", "first"]);
    let shown = err.to_string();
    for name in ["first", "second", "third"] {
        assert!(shown.contains(name), "{shown}");
    }
    // Display lists all three, so no source repeats one of them.
    assert!(std::error::Error::source(&err).is_none());
}

#[test]
fn body_error_and_cleanup_errors_are_all_kept() {
    let err = scope(|s| {
        s.defer_fallible(|| std::fs::remove_file("/no/such/file/for/custodian"));
        Err::<(), _>(io::Error::new(io::ErrorKind::InvalidData, "bad body"))
    })
    .unwrap_err();
    assert_eq!(err.body().unwrap().kind(), io::ErrorKind::InvalidData);
    assert_eq!(err.cleanup_errors().len(), 1);
    let cleanup = err.cleanup_errors().iter().next().unwrap();
    assert_eq!(cleanup.label(), "defer_fallible");
    assert_eq!(cleanup.site().file(), file!());
    let shown = err.to_string();
    assert!(shown.starts_with("bad body; and then"), "{shown}");
}

#[test]
fn a_panicking_cleanup_does_not_stop_the_others_and_is_reported() {
    let ran = Cell::new(0);
    let err = scope(|s| {
        s.defer(|| ran.set(ran.get() + 1));
        s.defer(|| panic!("cleanup bug"));
        s.defer(|| ran.set(ran.get() + 1));
        Ok::<_, io::Error>(())
    })
    .unwrap_err();
    assert_eq!(ran.get(), 2);
    let e = err.cleanup_errors().iter().next().unwrap();
    assert_eq!(e.panic_message(), Some("cleanup bug"));
    assert!(e.error().is_none());
}

#[test]
fn entered_guard_is_usable_while_more_cleanups_are_registered_and_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out");
    let order = RefCell::new(Vec::new());
    scope(|s| {
        let file = s.enter(io::BufWriter::new(std::fs::File::create(&path)?));
        s.defer(|| order.borrow_mut().push("deferred after enter"));
        file.write_all(b"buffered")?;
        // Not flushed yet: the BufWriter holds it until it is closed.
        assert_eq!(std::fs::read(&path)?.len(), 0);
        Ok::<_, io::Error>(())
    })
    .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"buffered");
    assert_eq!(*order.borrow(), ["deferred after enter"]);
}

#[cfg(target_os = "linux")] // /dev/full
#[test]
fn entered_guard_close_error_is_collected_with_the_real_error() {
    // /dev/full: the buffered write succeeds, the flush at close fails with ENOSPC.
    let err = scope(|s| {
        let out = s.enter(io::BufWriter::new(
            std::fs::OpenOptions::new().write(true).open("/dev/full")?,
        ));
        out.write_all(b"this will not fit")?;
        Ok::<_, io::Error>(())
    })
    .unwrap_err();
    assert!(err.body().is_none());
    let e = err.cleanup_errors().iter().next().unwrap();
    assert!(e.label().contains("BufWriter"), "{}", e.label());
    let io = e.error().unwrap().downcast_ref::<io::Error>().unwrap();
    assert_eq!(io.raw_os_error(), Some(28)); // ENOSPC
}

#[test]
fn rollback_runs_on_drop_and_not_after_commit() {
    let rolled_back = Cell::new(0);
    {
        let r = Rollback::new(vec![1, 2], |v| {
            assert_eq!(v, [1, 2, 3]);
            rolled_back.set(rolled_back.get() + 1);
        });
        let mut r = r;
        r.push(3); // DerefMut
        assert_eq!(r.len(), 3); // Deref
    }
    assert_eq!(rolled_back.get(), 1);

    let r = Rollback::new(String::from("kept"), |_| rolled_back.set(100));
    assert_eq!(Rollback::commit(r), "kept");
    assert_eq!(rolled_back.get(), 1);
}

#[test]
fn rollback_runs_once_on_panic() {
    let rolled_back = Cell::new(0);
    let _ = panic::catch_unwind(AssertUnwindSafe(|| {
        let _r = Rollback::new((), |()| rolled_back.set(rolled_back.get() + 1));
        panic!("fail in the middle");
    }));
    assert_eq!(rolled_back.get(), 1);
}

#[test]
fn a_panicking_rollback_is_reported_not_propagated() {
    let before = custodian::ledger::snapshot();
    let ((), events) = common::capture(|| {
        drop(Rollback::new((), |()| panic!("rollback bug")));
    });
    let errors = common::errors(&events);
    assert_eq!(errors.len(), 1, "{events:?}");
    assert_eq!(errors[0].field("kind"), Some("custodian::Rollback"));
    assert!(errors[0].field("error").unwrap().contains("rollback bug"));
    assert!(errors[0].field("site").unwrap().contains("tests/scope.rs"));
    let delta = custodian::ledger::snapshot().since(&before);
    assert!(delta.get("custodian::Rollback").failed >= 1);
}

#[test]
fn scopeguard_reexports_work() {
    let ran = Cell::new(false);
    {
        custodian::defer! { ran.set(true); }
    }
    assert!(ran.get());
    let g = custodian::guard(5, |_| {});
    assert_eq!(custodian::ScopeGuard::into_inner(g), 5);
    let on_success = Cell::new(false);
    drop(custodian::guard_on_success((), |()| on_success.set(true)));
    assert!(on_success.get());
    let on_unwind = Cell::new(false);
    drop(custodian::guard_on_unwind((), |()| on_unwind.set(true)));
    assert!(!on_unwind.get());
}

// A cleanup that panics while the thread is already unwinding must not abort the
// process. Run the scenario in a child process (this test binary, re-invoked) and check
// that it exits normally rather than with SIGABRT.
const CHILD: &str = "CUSTODIAN_SCOPE_DOUBLE_PANIC_CHILD";

#[test]
fn double_panic_child() {
    let Ok(which) = std::env::var(CHILD) else {
        return; // only meaningful when re-invoked by the test below
    };
    let caught = panic::catch_unwind(|| match which.as_str() {
        "scope" => {
            let _ = scope::<(), (), _>(|s| {
                s.defer(|| panic!("cleanup panics during the unwind"));
                s.on_unwind(|| panic!("on_unwind panics too"));
                panic!("body panics first");
            });
        }
        "rollback" => {
            let _r = Rollback::new((), |()| panic!("rollback panics during the unwind"));
            panic!("body panics first");
        }
        "stack" => {
            let mut stack = custodian::CleanupStack::new();
            stack.defer(|| panic!("stack entry panics during the unwind"));
            panic!("body panics first");
        }
        other => panic!("unknown scenario {other}"),
    });
    let payload = caught.unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"body panics first"));
    println!("survived the double panic");
}

#[test]
fn a_cleanup_panicking_during_an_unwind_never_aborts() {
    for scenario in ["scope", "rollback", "stack"] {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "double_panic_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, scenario)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("survived the double panic"),
            "{scenario}: {:?}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn scope_error_converts_into_io_error_without_losing_anything() {
    // Only the body failed: the body's error comes back as it was.
    let only_body: io::Error = scope(|_| Err::<(), _>(io::Error::other("body only")))
        .unwrap_err()
        .into();
    assert_eq!(only_body.to_string(), "body only");
    let inner = only_body.get_ref().unwrap();
    assert!(
        inner.downcast_ref::<ScopeError<io::Error>>().is_none(),
        "not wrapped"
    );

    // Body and cleanup failed: the body's kind, and both messages in the error.
    let both: io::Error = scope(|s| {
        s.defer_fallible(|| Err::<(), _>("cleanup also failed"));
        Err::<(), _>(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "body denied",
        ))
    })
    .unwrap_err()
    .into();
    assert_eq!(both.kind(), io::ErrorKind::PermissionDenied);
    let shown = both.to_string();
    assert!(
        shown.contains("body denied") && shown.contains("cleanup also failed"),
        "{shown}"
    );
}

#[test]
fn more_cleanups_than_fit_inline_run_lifo_on_every_outcome() {
    // The first cleanups are kept in place, the rest in a list on the heap: the order
    // and the outcome checks must not depend on where a cleanup is kept.
    for outcome in ["ok", "err", "panic"] {
        let log = RefCell::new(Vec::new());
        let caught = panic::catch_unwind(AssertUnwindSafe(|| {
            scope(|s| {
                let log = &log;
                for i in 0..10 {
                    s.defer(move || log.borrow_mut().push(format!("defer {i}")));
                    s.on_success(move || log.borrow_mut().push(format!("success {i}")));
                    s.on_err(move |_: &&str| log.borrow_mut().push(format!("err {i}")));
                    s.on_unwind(move || log.borrow_mut().push(format!("unwind {i}")));
                }
                match outcome {
                    "ok" => Ok(()),
                    "err" => Err("failed"),
                    _ => panic!("boom"),
                }
            })
        }));
        assert_eq!(caught.is_err(), outcome == "panic");
        let which = match outcome {
            "ok" => "success",
            "err" => "err",
            _ => "unwind",
        };
        let expected: Vec<String> = (0..10)
            .rev()
            .flat_map(|i| [format!("{which} {i}"), format!("defer {i}")])
            .collect();
        assert_eq!(*log.borrow(), expected, "{outcome}");
    }
}

#[test]
fn named_cleanups_keep_their_label_when_they_fail_or_panic() {
    let err = scope(|s| {
        for name in ["a", "b"] {
            s.defer_named(format!("remove {name}"), move || {
                std::fs::remove_file(format!("/no/such/{name}"))
            });
        }
        s.defer_named("flush the cache", || -> io::Result<()> {
            panic!("cache gone")
        });
        Ok::<(), io::Error>(())
    })
    .unwrap_err();
    let got: Vec<(String, String)> = err
        .cleanup_errors()
        .iter()
        .map(|e| (e.label().to_owned(), e.cause().to_string()))
        .collect();
    assert_eq!(
        got[0],
        ("flush the cache".into(), "panicked: cache gone".into())
    );
    assert_eq!(got[1].0, "remove b");
    assert_eq!(got[2].0, "remove a");
    assert!(got[1].1.contains("No such file"), "{got:?}");
    // The error itself is the one the cleanup returned, not a wrapper.
    let first = err.cleanup_errors().iter().nth(1).unwrap();
    assert!(first.error().unwrap().downcast_ref::<io::Error>().is_some());
}
