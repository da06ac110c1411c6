//! custodian::rt on real tokio runtimes (current-thread and multi-thread), real loopback
//! sockets and real signals.
#![cfg(feature = "tokio")]

mod common;

use std::future::{Future, pending};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use custodian::ledger::{self, Kind};
use custodian::rt::{
    AsyncCleanupStack, AsyncGuard, Entered, Reaper, ShutdownSignal, ShutdownSignals,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use common::{capture, current_thread, errors, multi_thread};

/// Generous: only a hang fails on it.
const LONG: Duration = Duration::from_secs(60);

/// Runs the test body on a current-thread and then on a multi-thread runtime.
fn on_both_runtimes<F, Fut>(body: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    for (name, rt) in [
        ("current-thread", current_thread()),
        ("multi-thread", multi_thread()),
    ] {
        rt.block_on(async {
            tokio::time::timeout(LONG * 2, body())
                .await
                .unwrap_or_else(|_| panic!("timed out on the {name} runtime"))
        });
    }
}

/// A guard whose cleanup yields once (so it really is asynchronous), then counts.
#[track_caller]
fn counting(reaper: &Reaper, runs: &Arc<AtomicUsize>) -> AsyncGuard<Arc<AtomicUsize>, io::Error> {
    AsyncGuard::with_reaper(reaper, Arc::clone(runs), |runs| async move {
        tokio::task::yield_now().await;
        runs.fetch_add(1, SeqCst);
        Ok::<_, io::Error>(())
    })
}

fn counts(kind: &str, before: &ledger::Snapshot) -> ledger::Counts {
    ledger::snapshot().since(before).get(kind)
}

// ---------------------------------------------------------------- auto traits

#[test]
fn guards_and_their_futures_can_cross_threads() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let rt = current_thread();
    let guard = rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        AsyncGuard::new(stream, |s| async move {
            drop(s);
            Ok::<_, io::Error>(())
        })
    });
    // `Sync` although the cleanup closure need not be: `&guard` may be held across an
    // `.await` in a spawned task.
    send_sync(&guard);
    send_sync(&Reaper::new());
    let close = AsyncGuard::close(guard);
    send(&close);
    send(&custodian::rt::scope(|s| async move {
        s.defer(async {});
        Ok::<_, io::Error>(())
    }));
    rt.block_on(close).unwrap();
}

/// An `AsyncCleanupStack` is `Sync` even when its futures are not (one here holds a
/// `Cell` across an `.await`), so it can sit in state shared through an `Arc`; its
/// futures are only reached through `&mut self`.
#[test]
fn an_async_stack_is_sync_and_can_be_shared_through_an_arc() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let rt = current_thread();
    let ran = Arc::new(AtomicBool::new(false));
    let mut stack = AsyncCleanupStack::new();
    let r = Arc::clone(&ran);
    stack.defer(async move {
        let not_sync = std::cell::Cell::new(1);
        tokio::task::yield_now().await;
        r.store(not_sync.get() == 1, SeqCst);
    });
    send_sync(&stack);
    let shared = Arc::new(stack);
    let other = Arc::clone(&shared);
    assert_eq!(std::thread::spawn(move || other.len()).join().unwrap(), 1);
    let stack = Arc::try_unwrap(shared).expect("the other thread is done");
    let close = stack.close();
    send(&close);
    rt.block_on(close).unwrap();
    assert!(ran.load(SeqCst));
}

// ---------------------------------------------------------------- exactly once

#[test]
fn close_runs_the_cleanup_once_and_returns_its_error() {
    on_both_runtimes(|| async {
        let reaper = Reaper::new();
        let runs = Arc::new(AtomicUsize::new(0));
        AsyncGuard::close(counting(&reaper, &runs)).await.unwrap();
        assert_eq!(runs.load(SeqCst), 1);

        let guard = AsyncGuard::with_reaper(&reaper, 7, |n| async move {
            Err::<(), _>(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("peer {n} gone"),
            ))
        });
        // The cleanup's own error type, no downcast needed.
        let io_err: io::Error = AsyncGuard::close(guard).await.unwrap_err();
        assert_eq!(io_err.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(io_err.to_string(), "peer 7 gone");

        let report = reaper.shutdown(LONG).await;
        assert_eq!(runs.load(SeqCst), 1, "never again after close");
        assert_eq!((report.completed(), report.failed()), (0, 0));
    });
}

/// `close` is an associated function: a `close` method of the guarded value (a pool's,
/// a websocket's) stays reachable through `Deref`; the guard's own is
/// `AsyncGuard::close(guard)`.
#[test]
fn the_values_own_close_method_is_not_hidden() {
    struct Pool {
        closed: AtomicBool,
    }
    impl Pool {
        fn close(&self) -> &'static str {
            self.closed.store(true, SeqCst);
            "pool closed"
        }
    }
    on_both_runtimes(|| async {
        let reaper = Reaper::new();
        let cleaned = Arc::new(AtomicBool::new(false));
        let c = Arc::clone(&cleaned);
        let pool = Pool {
            closed: AtomicBool::new(false),
        };
        let guard = AsyncGuard::with_reaper(&reaper, pool, move |pool| async move {
            assert!(pool.closed.load(SeqCst), "Pool::close ran first");
            c.store(true, SeqCst);
            Ok::<_, io::Error>(())
        });
        assert_eq!(guard.close(), "pool closed"); // Pool::close, through Deref
        assert!(!cleaned.load(SeqCst), "the guard's cleanup has not run yet");
        AsyncGuard::close(guard).await.unwrap();
        assert!(cleaned.load(SeqCst));
        assert!(reaper.shutdown(LONG).await.is_clean());
    });
}

#[test]
fn drop_in_normal_flow_runs_the_cleanup_once_on_the_reaper() {
    on_both_runtimes(|| async {
        let reaper = Reaper::new();
        let runs = Arc::new(AtomicUsize::new(0));
        {
            let guard = counting(&reaper, &runs);
            assert_eq!(guard.load(SeqCst), 0); // Deref to the value
        }
        let report = reaper.shutdown(LONG).await;
        assert_eq!(runs.load(SeqCst), 1);
        assert_eq!(report.completed(), 1);
        assert!(report.is_clean(), "{report}");
    });
}

#[test]
fn early_return_and_question_mark_run_the_cleanup_once() {
    async fn early_return(reaper: &Reaper, runs: &Arc<AtomicUsize>, stop: bool) -> u32 {
        let _guard = counting(reaper, runs);
        if stop {
            return 1;
        }
        2
    }
    async fn question_mark(reaper: &Reaper, runs: &Arc<AtomicUsize>) -> io::Result<()> {
        let _guard = counting(reaper, runs);
        std::fs::metadata("/no/such/path/for/custodian")?;
        Ok(())
    }
    on_both_runtimes(|| async {
        let reaper = Reaper::new();
        let runs = Arc::new(AtomicUsize::new(0));
        assert_eq!(early_return(&reaper, &runs, true).await, 1);
        assert!(question_mark(&reaper, &runs).await.is_err());
        let report = reaper.shutdown(LONG).await;
        assert_eq!(runs.load(SeqCst), 2);
        assert_eq!(report.completed(), 2);
    });
}

#[test]
fn panic_in_the_task_runs_the_cleanup_once() {
    on_both_runtimes(|| async {
        let reaper = Reaper::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (reaper, runs) = (reaper.clone(), runs.clone());
            async move {
                let _guard = counting(&reaper, &runs);
                tokio::task::yield_now().await;
                panic!("request handler bug");
            }
        });
        assert!(task.await.unwrap_err().is_panic());
        let report = reaper.shutdown(LONG).await;
        assert_eq!(runs.load(SeqCst), 1);
        assert_eq!(report.completed(), 1);
    });
}

#[test]
fn cancellation_by_select_timeout_and_abort_runs_the_cleanup_once_each() {
    on_both_runtimes(|| async {
        let reaper = Reaper::new();
        let runs = Arc::new(AtomicUsize::new(0));

        let stuck = |reaper: Reaper, runs: Arc<AtomicUsize>| async move {
            let _guard = counting(&reaper, &runs);
            pending::<()>().await;
        };
        tokio::select! {
            () = stuck(reaper.clone(), runs.clone()) => unreachable!(),
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        assert!(
            tokio::time::timeout(
                Duration::from_millis(20),
                stuck(reaper.clone(), runs.clone())
            )
            .await
            .is_err()
        );

        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let (reaper, runs) = (reaper.clone(), runs.clone());
            async move {
                let _guard = counting(&reaper, &runs);
                started_tx.send(()).unwrap();
                pending::<()>().await;
            }
        });
        started_rx.await.unwrap();
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());

        let report = reaper.shutdown(LONG).await;
        assert_eq!(runs.load(SeqCst), 3);
        assert_eq!(report.completed(), 3);
    });
}

#[test]
fn a_cancelled_close_finishes_on_the_reaper_exactly_once() {
    on_both_runtimes(|| async {
        let reaper = Reaper::new();
        let (first, second) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let guard = AsyncGuard::with_reaper(
            &reaper,
            (first.clone(), second.clone()),
            |(a, b)| async move {
                a.fetch_add(1, SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                b.fetch_add(1, SeqCst);
                Ok::<_, io::Error>(())
            },
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(10), AsyncGuard::close(guard))
                .await
                .is_err()
        );
        assert_eq!(first.load(SeqCst), 1, "the close had started");
        let report = reaper.shutdown(LONG).await;
        assert_eq!(
            (first.load(SeqCst), second.load(SeqCst)),
            (1, 1),
            "finished once, not restarted"
        );
        assert_eq!(report.completed(), 1);
    });
}

#[test]
fn into_inner_never_runs_the_cleanup() {
    on_both_runtimes(|| async {
        let reaper = Reaper::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let value = AsyncGuard::into_inner(counting(&reaper, &runs));
        assert!(Arc::ptr_eq(&value, &runs));
        let report = reaper.shutdown(LONG).await;
        assert_eq!(runs.load(SeqCst), 0);
        assert_eq!(report.completed() + report.failed() + report.aborted(), 0);
    });
}

#[test]
fn dropped_guards_use_the_global_reaper_by_default() {
    on_both_runtimes(|| async {
        let runs = Arc::new(AtomicUsize::new(0));
        drop(AsyncGuard::new(runs.clone(), |runs| async move {
            runs.fetch_add(1, SeqCst);
            Ok::<_, io::Error>(())
        }));
        // The global reaper is shared by the whole test binary: wait, do not drain it.
        tokio::time::timeout(LONG, async {
            while runs.load(SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the global reaper ran it");
    });
}

// ---------------------------------------------------------------- shutdown

#[test]
fn shutdown_waits_for_pending_cleanups() {
    on_both_runtimes(|| async {
        let reaper = Reaper::new();
        let done = Arc::new(AtomicBool::new(false));
        drop(AsyncGuard::with_reaper(
            &reaper,
            done.clone(),
            |done| async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                done.store(true, SeqCst);
                Ok::<_, io::Error>(())
            },
        ));
        assert_eq!(reaper.pending(), 1);
        let report = reaper.shutdown(LONG).await;
        assert!(
            done.load(SeqCst),
            "shutdown returned before the cleanup finished"
        );
        assert_eq!(report.completed(), 1);
        assert!(!report.timed_out());
        assert!(report.elapsed() >= Duration::from_millis(150));
        assert!(reaper.is_shut_down());
        assert_eq!(reaper.pending(), 0);
    });
}

#[test]
fn shutdown_reports_failures_with_kind_site_and_error() {
    static KIND: Kind = Kind::new("tests::rt::failing");
    let before = ledger::snapshot();
    let ((report, line), events) = capture(|| {
        current_thread().block_on(async {
            let reaper = Reaper::new();
            let line = line!() + 5; // the `.build(` call
            let guard = AsyncGuard::builder()
                .kind(&KIND)
                .reaper(&reaper)
                .resource("10.0.0.9:5432")
                .build((), |()| async {
                    Err::<(), _>(io::Error::other("unlock refused"))
                });
            drop(guard);
            drop(AsyncGuard::with_reaper(&reaper, (), |()| async {
                panic!("cleanup bug");
                #[allow(unreachable_code)]
                Ok::<_, io::Error>(())
            }));
            (reaper.shutdown(LONG).await, line)
        })
    });
    assert_eq!(report.failed(), 2, "{report}");
    let failure = &report.failures()[0];
    assert_eq!(failure.label(), "tests::rt::failing");
    assert_eq!(failure.site().line(), line);
    assert!(failure.site().file().ends_with("rt.rs"));
    assert_eq!(failure.error().unwrap().to_string(), "unlock refused");
    assert_eq!(report.failures()[1].panic_message(), Some("cleanup bug"));
    assert!(report.to_string().contains("unlock refused"));

    assert_eq!(counts("tests::rt::failing", &before).failed, 1);
    let errors = errors(&events);
    let event = errors
        .iter()
        .find(|e| e.field("kind") == Some("tests::rt::failing"))
        .expect("an error event for the failed cleanup");
    assert_eq!(event.field("resource"), Some("10.0.0.9:5432"));
    assert!(event.field("error").unwrap().contains("unlock refused"));
    assert!(
        errors
            .iter()
            .any(|e| e.field("error").unwrap().contains("cleanup bug"))
    );
}

#[test]
fn shutdown_aborts_cleanups_past_the_deadline_and_says_so() {
    static KIND: Kind = Kind::new("tests::rt::stuck");
    let before = ledger::snapshot();
    let finished = Arc::new(AtomicBool::new(false));
    let (report, events) = capture(|| {
        current_thread().block_on(async {
            let reaper = Reaper::new();
            let guard = AsyncGuard::builder().kind(&KIND).reaper(&reaper).build(
                finished.clone(),
                |finished| async move {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    finished.store(true, SeqCst);
                    Ok::<_, io::Error>(())
                },
            );
            drop(guard);
            drop(counting(&reaper, &Arc::new(AtomicUsize::new(0))));
            reaper.shutdown(Duration::from_millis(200)).await
        })
    });
    assert_eq!((report.completed(), report.aborted()), (1, 1), "{report}");
    assert!(report.timed_out());
    assert!(!report.is_clean());
    assert!(report.elapsed() < LONG);
    assert!(!finished.load(SeqCst));
    assert_eq!(counts("tests::rt::stuck", &before).failed, 1);
    assert_eq!(counts("tests::rt::stuck", &before).live(), 0);
    assert!(errors(&events).iter().any(|e| {
        e.field("kind") == Some("tests::rt::stuck")
            && e.field("error").unwrap().contains("deadline")
    }));
}

#[test]
fn cleanups_deferred_while_shutting_down_are_accepted_and_counted() {
    on_both_runtimes(|| async {
        let reaper = Reaper::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let (r, n) = (reaper.clone(), runs.clone());
        drop(AsyncGuard::with_reaper(&reaper, (), move |()| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Shutdown has begun by now: this one is still accepted.
            drop(counting(&r, &n));
            Ok::<_, io::Error>(())
        }));
        let report = reaper.shutdown(LONG).await;
        assert_eq!(report.completed(), 2, "{report}");
        assert_eq!(runs.load(SeqCst), 1);
    });
}

#[test]
fn a_guard_dropped_after_shutdown_is_reported_lost_and_falls_back() {
    static KIND: Kind = Kind::new("tests::rt::too_late");
    let before = ledger::snapshot();
    let fell_back = Arc::new(AtomicBool::new(false));
    let ((), events) = capture(|| {
        current_thread().block_on(async {
            let reaper = Reaper::new();
            let f = fell_back.clone();
            let guard = AsyncGuard::builder()
                .kind(&KIND)
                .reaper(&reaper)
                .fallback(move |()| f.store(true, SeqCst))
                .build((), |()| async { Ok::<_, io::Error>(()) });
            assert!(reaper.shutdown(LONG).await.is_clean());
            assert!(
                reaper.shutdown(LONG).await.is_clean(),
                "a second shutdown is empty"
            );
            drop(guard);
        })
    });
    assert!(fell_back.load(SeqCst));
    assert_eq!(counts("tests::rt::too_late", &before).failed, 1);
    assert!(errors(&events).iter().any(|e| {
        e.field("kind") == Some("tests::rt::too_late")
            && e.field("error")
                .unwrap()
                .contains("after the reaper shut down")
    }));
}

// ---------------------------------------------------------------- no runtime

#[test]
fn drop_outside_any_runtime_reports_and_falls_back_without_panicking() {
    static KIND: Kind = Kind::new("tests::rt::no_runtime");
    let before = ledger::snapshot();
    let fell_back = Arc::new(AtomicUsize::new(0));
    let reaper = Reaper::new();
    assert!(reaper.handle().is_none());
    let ((), events) = capture(|| {
        let f = fell_back.clone();
        let guard = AsyncGuard::builder()
            .kind(&KIND)
            .reaper(&reaper)
            .resource("lock /var/run/x")
            .fallback(move |()| {
                f.fetch_add(1, SeqCst);
            })
            .build((), |()| async { Ok::<_, io::Error>(()) });
        drop(guard);
        // Without a fallback: still reported, still no panic.
        drop(
            AsyncGuard::builder()
                .kind(&KIND)
                .reaper(&reaper)
                .build((), |()| async { Ok::<_, io::Error>(()) }),
        );
    });
    assert_eq!(fell_back.load(SeqCst), 1);
    let c = counts("tests::rt::no_runtime", &before);
    assert_eq!((c.failed, c.live()), (2, 0));
    let errors = errors(&events);
    assert_eq!(errors.len(), 2);
    assert_eq!(errors[0].field("resource"), Some("lock /var/run/x"));
    assert!(
        errors[0]
            .field("error")
            .unwrap()
            .contains("no tokio runtime")
    );
}

#[test]
fn drop_after_the_runtime_shut_down_reports_and_falls_back_without_panicking() {
    static KIND: Kind = Kind::new("tests::rt::runtime_gone");
    for rt in [current_thread(), multi_thread()] {
        let before = ledger::snapshot();
        let fell_back = Arc::new(AtomicUsize::new(0));
        let reaper = Reaper::new();
        let f = fell_back.clone();
        let guard = rt.block_on(async {
            AsyncGuard::builder()
                .kind(&KIND)
                .reaper(&reaper)
                .fallback(move |()| {
                    f.fetch_add(1, SeqCst);
                })
                .build((), |()| async { Ok::<_, io::Error>(()) })
        });
        drop(rt);
        let ((), events) = capture(|| drop(guard));
        assert_eq!(fell_back.load(SeqCst), 1);
        assert_eq!(counts("tests::rt::runtime_gone", &before).failed, 1);
        assert!(errors(&events).iter().any(|e| {
            e.field("kind") == Some("tests::rt::runtime_gone")
                && e.field("error")
                    .unwrap()
                    .contains("runtime shut down before it ran")
        }));
    }
}

#[test]
fn cleanups_pending_when_the_runtime_drops_are_reported() {
    static KIND: Kind = Kind::new("tests::rt::interrupted");
    let before = ledger::snapshot();
    let fell_back = Arc::new(AtomicUsize::new(0));
    let ((), events) = capture(|| {
        let rt = current_thread();
        rt.block_on(async {
            // One cleanup starts and waits forever; one is queued and never polled.
            drop(AsyncGuard::builder().kind(&KIND).build((), |()| async {
                pending::<()>().await;
                Ok::<_, io::Error>(())
            }));
            tokio::task::yield_now().await;
            let f = fell_back.clone();
            drop(
                AsyncGuard::builder()
                    .kind(&KIND)
                    .fallback(move |()| {
                        f.fetch_add(1, SeqCst);
                    })
                    .build((), |()| async { Ok::<_, io::Error>(()) }),
            );
        });
        drop(rt);
    });
    assert_eq!(fell_back.load(SeqCst), 1);
    let c = counts("tests::rt::interrupted", &before);
    assert_eq!((c.failed, c.live()), (2, 0));
    let messages: Vec<_> = errors(&events)
        .iter()
        .filter(|e| e.field("kind") == Some("tests::rt::interrupted"))
        .map(|e| e.field("error").unwrap().to_owned())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("shut down while it ran")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("shut down before it ran")),
        "{messages:?}"
    );
}

#[test]
fn a_guard_created_outside_a_runtime_uses_the_reapers_runtime() {
    let rt = multi_thread();
    let reaper = Reaper::with_handle(rt.handle().clone());
    let runs = Arc::new(AtomicUsize::new(0));
    drop(counting(&reaper, &runs)); // on this plain thread
    let report = rt.block_on(reaper.shutdown(LONG));
    assert_eq!((report.completed(), runs.load(SeqCst)), (1, 1));
}

#[test]
fn a_guard_created_outside_a_runtime_and_dropped_in_one_runs_there() {
    let reaper = Reaper::new(); // no runtime: no handle
    let runs = Arc::new(AtomicUsize::new(0));
    let dropped = counting(&reaper, &runs);
    let closed = AsyncGuard::with_reaper(&reaper, runs.clone(), |runs| async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        runs.fetch_add(10, SeqCst);
        Ok::<_, io::Error>(())
    });
    let rt = multi_thread();
    let report = rt.block_on(async {
        drop(dropped);
        // A close cancelled midway is finished on this runtime too.
        assert!(
            tokio::time::timeout(Duration::from_millis(5), AsyncGuard::close(closed))
                .await
                .is_err()
        );
        reaper.shutdown(LONG).await
    });
    assert_eq!((report.completed(), runs.load(SeqCst)), (2, 11), "{report}");
}

// ---------------------------------------------------------------- load

#[test]
fn ten_thousand_concurrently_dropped_guards_all_drain() {
    const N: usize = 10_000;
    on_both_runtimes(|| async {
        let reaper = Reaper::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..N)
            .map(|_| {
                let (reaper, runs) = (reaper.clone(), runs.clone());
                tokio::spawn(async move {
                    let _guard = counting(&reaper, &runs);
                    tokio::task::yield_now().await;
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let report = reaper.shutdown(LONG).await;
        assert_eq!(report.completed(), N as u64, "{report}");
        assert_eq!(runs.load(SeqCst), N);
    });
}

// ---------------------------------------------------------------- loopback

#[test]
fn a_loopback_peer_receives_the_goodbye_after_the_client_was_cancelled() {
    on_both_runtimes(|| async {
        let reaper = Reaper::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let (socket, _) = listener.accept().await?;
            let mut lines = BufReader::new(socket).lines();
            let mut got = Vec::new();
            while let Some(line) = lines.next_line().await? {
                got.push(line);
            }
            io::Result::Ok(got) // EOF: the cleanup shut the write side down
        });

        let client = async {
            let stream = TcpStream::connect(addr).await?;
            let mut conn = AsyncGuard::builder()
                .reaper(&reaper)
                .resource(addr.to_string())
                .build(stream, |mut s| async move {
                    s.write_all(b"goodbye\n").await?;
                    s.shutdown().await
                });
            conn.write_all(b"hello\n").await?;
            pending::<()>().await; // waits for a reply that never comes
            io::Result::Ok(())
        };
        assert!(
            tokio::time::timeout(Duration::from_millis(100), client)
                .await
                .is_err()
        );

        let got = tokio::time::timeout(LONG, peer)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, ["hello", "goodbye"]);
        let report = reaper.shutdown(LONG).await;
        assert_eq!(report.completed(), 1);
        assert!(report.is_clean(), "{report}");
    });
}

// ---------------------------------------------------------------- scope and stack

type Log = Arc<Mutex<Vec<String>>>;

fn note(log: &Log, what: &str) -> impl Future<Output = ()> + Send + use<> {
    let (log, what) = (log.clone(), what.to_owned());
    async move {
        tokio::task::yield_now().await;
        log.lock().unwrap().push(what);
    }
}

#[test]
fn scope_runs_cleanups_lifo_by_outcome_and_keeps_every_error() {
    on_both_runtimes(|| async {
        let log = Log::default();
        let l = log.clone();
        let value = custodian::rt::scope(|s| async move {
            s.defer(note(&l, "first"));
            s.on_success(note(&l, "commit"));
            let ll = l.clone();
            s.on_err(move |_: &io::Error| note(&ll, "roll back"));
            s.defer(note(&l, "last"));
            Ok::<_, io::Error>(42)
        })
        .await
        .unwrap();
        assert_eq!(value, 42);
        assert_eq!(*log.lock().unwrap(), ["last", "commit", "first"]);

        let log = Log::default();
        let l = log.clone();
        let err = custodian::rt::scope(|s| async move {
            s.defer_fallible(async { Err::<(), _>(io::Error::other("cleanup one")) });
            s.on_success(note(&l, "commit"));
            let ll = l.clone();
            s.on_err(move |e: &io::Error| note(&ll, &format!("roll back after {e}")));
            s.defer_fallible(async { Err::<(), _>(io::Error::other("cleanup two")) });
            s.defer(async { panic!("cleanup three") });
            std::fs::metadata("/no/such/path/for/custodian")?;
            Ok(())
        })
        .await
        .unwrap_err();
        let (body, cleanups) = err.into_parts();
        assert_eq!(body.unwrap().kind(), io::ErrorKind::NotFound);
        let messages: Vec<String> = cleanups
            .iter()
            .map(|e| match e.error() {
                Some(e) => e.to_string(),
                None => e.panic_message().unwrap().to_owned(),
            })
            .collect();
        assert_eq!(messages, ["cleanup three", "cleanup two", "cleanup one"]);
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 1);
        assert!(log[0].starts_with("roll back after"), "{log:?}");
    });
}

#[test]
fn scope_enter_closes_guards_in_order_and_collects_their_errors() {
    on_both_runtimes(|| async {
        let reaper = Reaper::new();
        let log = Log::default();
        let (l, r) = (log.clone(), reaper.clone());
        let err = custodian::rt::scope(|s| async move {
            let l1 = l.clone();
            let mut a = s.enter(AsyncGuard::with_reaper(&r, 1, move |n| async move {
                note(&l1, &format!("close a={n}")).await;
                Ok::<_, io::Error>(())
            }));
            s.defer(note(&l, "deferred"));
            let l2 = l.clone();
            let b = s.enter(AsyncGuard::with_reaper(&r, 2, move |n| async move {
                note(&l2, &format!("close b={n}")).await;
                Err::<(), _>(io::Error::other("b refused"))
            }));
            **a += 10; // used through the handle
            assert_eq!(**b, 2);
            Ok::<_, io::Error>(())
        })
        .await
        .unwrap_err();
        assert_eq!(
            *log.lock().unwrap(),
            ["close b=2", "deferred", "close a=11"]
        );
        assert_eq!(err.cleanup_errors().len(), 1);
        assert!(err.to_string().contains("b refused"));
        let report = reaper.shutdown(LONG).await;
        assert_eq!(
            report.completed() + report.failed(),
            0,
            "closed by the scope, not the reaper"
        );

        // Taken back out: the scope does not close it.
        let runs = Arc::new(AtomicUsize::new(0));
        let (r, n) = (reaper.clone(), runs.clone());
        let guard = custodian::rt::scope(|s| async move {
            Ok::<_, io::Error>(Entered::into_inner(s.enter(counting(&r, &n))))
        })
        .await
        .unwrap();
        assert_eq!(runs.load(SeqCst), 0);
        AsyncGuard::close(guard).await.unwrap();
        assert_eq!(runs.load(SeqCst), 1);
    });
}

#[test]
fn a_cancelled_scope_hands_its_cleanups_to_the_reaper() {
    on_both_runtimes(|| async {
        let reaper = Reaper::new();
        let log = Log::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let (l, r, n) = (log.clone(), reaper.clone(), runs.clone());
        let scope = reaper.scope(|s| async move {
            s.defer(note(&l, "deferred"));
            s.on_success(note(&l, "commit"));
            let _conn = s.enter(counting(&r, &n));
            pending::<Result<(), io::Error>>().await
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(20), scope)
                .await
                .is_err()
        );
        let report = reaper.shutdown(LONG).await;
        assert_eq!(
            *log.lock().unwrap(),
            ["deferred"],
            "unconditional ones only"
        );
        assert_eq!(runs.load(SeqCst), 1, "the entered guard was closed");
        // One job for the scope's cleanups, run in order.
        assert_eq!(report.completed(), 1, "{report}");
    });
}

#[test]
fn a_scope_whose_body_panics_hands_its_cleanups_to_the_reaper() {
    on_both_runtimes(|| async {
        let reaper = Reaper::new();
        let log = Log::default();
        let (l, r) = (log.clone(), reaper.clone());
        let task = tokio::spawn(async move {
            r.scope(|s| async move {
                s.defer(note(&l, "deferred"));
                tokio::task::yield_now().await;
                panic!("handler bug");
                #[allow(unreachable_code)]
                Ok::<(), io::Error>(())
            })
            .await
        });
        assert!(task.await.unwrap_err().is_panic());
        assert_eq!(reaper.shutdown(LONG).await.completed(), 1);
        assert_eq!(*log.lock().unwrap(), ["deferred"]);
    });
}

#[test]
fn stack_closes_lifo_and_keeps_every_error() {
    on_both_runtimes(|| async {
        let log = Log::default();
        let mut stack = AsyncCleanupStack::new();
        stack.defer(note(&log, "a"));
        stack.defer_fallible(async { Err::<(), _>(io::Error::other("b failed")) });
        stack.defer(async { panic!("c panicked") });
        stack.push(AsyncGuard::new(log.clone(), |log| async move {
            note(&log, "d").await;
            Ok::<_, io::Error>(())
        }));
        assert_eq!(stack.len(), 4);
        let errors = stack.close().await.unwrap_err();
        assert_eq!(*log.lock().unwrap(), ["d", "a"]);
        assert_eq!(errors.len(), 2);
        let errors: Vec<_> = errors.into_iter().collect();
        assert_eq!(errors[0].panic_message(), Some("c panicked"));
        assert_eq!(errors[1].error().unwrap().to_string(), "b failed");
    });
}

#[test]
fn a_dropped_or_cancelled_stack_hands_its_cleanups_to_the_reaper() {
    on_both_runtimes(|| async {
        let reaper = Reaper::new();

        let log = Log::default();
        let mut stack = AsyncCleanupStack::with_reaper(&reaper);
        stack.defer(note(&log, "a"));
        stack.defer(note(&log, "b"));
        drop(stack);

        // Cancelled midway: the running entry is finished, not restarted; none is lost.
        let counter = Arc::new(AtomicUsize::new(0));
        let mut stack = AsyncCleanupStack::with_reaper(&reaper);
        let c = counter.clone();
        stack.defer(async move {
            c.fetch_add(1, SeqCst);
        });
        let c = counter.clone();
        stack.defer(async move {
            c.fetch_add(10, SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.fetch_add(100, SeqCst);
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(10), stack.close())
                .await
                .is_err()
        );
        assert_eq!(counter.load(SeqCst), 10);

        let report = reaper.shutdown(LONG).await;
        assert_eq!(*log.lock().unwrap(), ["b", "a"]);
        assert_eq!(counter.load(SeqCst), 111);
        assert_eq!(report.completed(), 2, "{report}");
    });
}

#[test]
fn a_stack_runs_commits_or_rollbacks_by_how_it_ends() {
    on_both_runtimes(|| async {
        let reaper = Reaper::new();
        let stack_with = |log: &Log| {
            let mut stack = AsyncCleanupStack::with_reaper(&reaper);
            stack.defer(note(log, "release"));
            stack.on_success(note(log, "commit"));
            stack.on_failure(note(log, "roll back"));
            stack
        };

        // Closed: a success.
        let log = Log::default();
        stack_with(&log).close().await.unwrap();
        assert_eq!(*log.lock().unwrap(), ["commit", "release"]);

        // Closed as failed.
        let log = Log::default();
        stack_with(&log)
            .close_with(custodian::Outcome::Failure)
            .await
            .unwrap();
        assert_eq!(*log.lock().unwrap(), ["roll back", "release"]);

        // Dropped without close (an early return, a cancelled caller): a failure, run
        // by the reaper.
        let dropped = Log::default();
        drop(stack_with(&dropped));

        // A close(): success, cancelled while its first cleanup runs: what is left still
        // commits, on the reaper; the rollback never runs.
        let cancelled = Log::default();
        let mut stack = AsyncCleanupStack::with_reaper(&reaper);
        stack.on_failure(note(&cancelled, "roll back"));
        stack.on_success(note(&cancelled, "commit"));
        stack.defer({
            let log = cancelled.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                note(&log, "slow release").await;
            }
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(10), stack.close())
                .await
                .is_err()
        );

        let report = reaper.shutdown(LONG).await;
        assert_eq!(*dropped.lock().unwrap(), ["roll back", "release"]);
        assert_eq!(*cancelled.lock().unwrap(), ["slow release", "commit"]);
        assert_eq!(report.completed(), 2, "{report}");
    });
}

// ---------------------------------------------------------------- signals

#[cfg(unix)]
#[test]
fn sigterm_and_sigint_drain_the_reaper() {
    multi_thread().block_on(async {
        for (flag, expected) in [
            ("-TERM", ShutdownSignal::Terminate),
            ("-INT", ShutdownSignal::Interrupt),
        ] {
            let reaper = Reaper::new();
            let runs = Arc::new(AtomicUsize::new(0));
            drop(counting(&reaper, &runs));
            // Installed before the signal is sent, so it cannot kill the test process.
            let signals = ShutdownSignals::new().unwrap();
            let drain = tokio::spawn({
                let reaper = reaper.clone();
                async move { signals.drain(&reaper, LONG).await }
            });
            let kill = std::process::Command::new("kill")
                .arg(flag)
                .arg(std::process::id().to_string())
                .status()
                .unwrap();
            assert!(kill.success());
            let (signal, report) = tokio::time::timeout(LONG, drain).await.unwrap().unwrap();
            assert_eq!(signal, expected);
            assert_eq!((report.completed(), runs.load(SeqCst)), (1, 1));
        }
    });
}

#[test]
fn a_cleanup_that_panics_in_close_counts_a_failure_not_a_clean_release() {
    static PANICKY: Kind = Kind::new("test::panics_in_close");
    let rt = common::current_thread();
    let before = ledger::snapshot();
    rt.block_on(async {
        let guard = AsyncGuard::builder().kind(&PANICKY).build((), |()| async {
            if true {
                panic!("the cleanup panicked");
            }
            Ok::<_, std::io::Error>(())
        });
        let joined = tokio::spawn(AsyncGuard::close(guard)).await;
        assert!(
            joined.unwrap_err().is_panic(),
            "the panic goes on to the caller"
        );
    });
    let c = counts("test::panics_in_close", &before);
    assert_eq!((c.acquired, c.released, c.failed), (1, 1, 1), "{c:?}");
}

#[test]
fn named_async_cleanups_keep_their_label_when_they_fail_or_panic() {
    common::current_thread().block_on(async {
        let mut stack = AsyncCleanupStack::new();
        stack.defer_named("log out session 7", async {
            Err::<(), _>(io::Error::other("server gone"))
        });
        stack.defer_named(String::from("flush the cache"), async {
            if true {
                panic!("cache gone");
            }
            Ok::<(), io::Error>(())
        });
        let errors = stack.close().await.unwrap_err();
        let got: Vec<(String, String)> = errors
            .iter()
            .map(|e| (e.label().to_owned(), e.cause().to_string()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "flush the cache".to_owned(),
                    "panicked: cache gone".to_owned()
                ),
                ("log out session 7".to_owned(), "server gone".to_owned()),
            ]
        );
    });
}
