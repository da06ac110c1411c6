//! `custodian::process` on real child processes and real signals.
#![cfg(target_os = "linux")] // /proc/<pid>/stat
#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use custodian::process::{ChildGuard, ChildGuardBuilder, Signal};

/// The zombie checks look at every child of this process, so the tests that spawn
/// children run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `(state, ppid)` of a process from `/proc/<pid>/stat`, or `None` if it is gone.
fn proc_state(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Children of this process that are zombies (exited, not reaped).
fn zombie_children() -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| matches!(proc_state(pid), Some(('Z', ppid)) if ppid == me))
        .collect()
}

/// `true` while `pid` runs (a zombie, or a gone process, is not running).
fn running(pid: u32) -> bool {
    matches!(proc_state(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// Waits up to 10 s for `pid` to stop running.
fn stops_running(pid: u32) -> bool {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if !running(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A child that runs until it is stopped (30 s at most).
fn sleep_30() -> Command {
    let mut cmd = Command::new("sleep");
    cmd.arg("30");
    cmd
}

fn sh(script: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]);
    cmd
}

/// Spawns `script` (which prints a line once ready, e.g. after setting a trap) and
/// waits for that line.
fn spawn_ready(options: ChildGuardBuilder, script: &str) -> ChildGuard {
    let mut cmd = sh(script);
    cmd.stdout(Stdio::piped());
    let mut child = options.spawn(cmd).unwrap();
    assert_eq!(first_line(&mut child), "ready");
    child
}

/// The first line the child printed on its piped stdout, trimmed.
fn first_line(child: &mut ChildGuard) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout().take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim().to_owned()
}

/// Spawns a shell in its own group whose background grandchild ignores SIGTERM, and
/// returns the guard and the grandchild's pid.
fn with_grandchild(options: ChildGuardBuilder) -> (ChildGuard, u32) {
    // The grandchild prints its pid once its trap is set.
    let mut cmd = sh("sh -c 'trap \"\" TERM; echo $$; exec sleep 30' & wait");
    cmd.stdout(Stdio::piped());
    let mut child = options.spawn(cmd).unwrap();
    let grandchild: u32 = first_line(&mut child).parse().unwrap();
    assert!(running(grandchild));
    (child, grandchild)
}

#[test]
fn child_ignoring_sigterm_is_killed_after_the_grace_period() {
    let _serial = serial();
    let grace = Duration::from_millis(300);
    let child = spawn_ready(
        ChildGuardBuilder::new().grace(grace),
        "trap '' TERM; echo ready; exec sleep 30",
    );
    let pid = child.id();
    let start = Instant::now();
    let status = child.close().unwrap();
    assert!(start.elapsed() >= grace, "killed before the grace period");
    assert_eq!(status.signal(), Some(9), "{status}");
    assert_eq!(proc_state(pid).filter(|s| s.1 == std::process::id()), None);
}

#[test]
fn child_that_stops_on_sigterm_is_not_killed() {
    let _serial = serial();
    let cmd = sleep_30();
    let child = ChildGuardBuilder::new()
        .grace(Duration::from_secs(30))
        .spawn(cmd)
        .unwrap();
    let start = Instant::now();
    let status = child.close().unwrap();
    assert_eq!(status.signal(), Some(15));
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "waited for the grace period"
    );
}

#[test]
fn configured_signal_is_the_one_sent() {
    let _serial = serial();
    let child = spawn_ready(
        ChildGuardBuilder::new().signal(Signal::INT),
        "trap 'exit 7' INT; echo ready; while :; do sleep 0.05; done",
    );
    let status = child.close().unwrap();
    assert_eq!(status.code(), Some(7), "{status}");
}

#[test]
fn child_that_already_exited_is_just_reaped_with_its_status() {
    let _serial = serial();
    let mut child = ChildGuardBuilder::new()
        .grace(Duration::from_secs(30))
        .spawn(sh("exit 3"))
        .unwrap();
    let pid = child.id();
    assert_eq!(child.wait().unwrap().code(), Some(3));
    // Observed, not reaped: the zombie keeps the pid reserved until close.
    assert_eq!(proc_state(pid).map(|s| s.0), Some('Z'));
    let start = Instant::now();
    let status = child.close().unwrap();
    assert_eq!(status.code(), Some(3));
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(proc_state(pid).filter(|s| s.1 == std::process::id()), None);
}

#[test]
fn wait_timeout_and_try_wait_do_not_reap() {
    let _serial = serial();
    let cmd = sleep_30();
    let mut child = ChildGuard::spawn(cmd).unwrap();
    assert_eq!(child.try_wait().unwrap(), None);
    assert_eq!(child.wait_timeout(Duration::from_millis(50)).unwrap(), None);
    child.signal(Signal::KILL).unwrap();
    let status = child
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    assert_eq!(status.signal(), Some(9));
    assert_eq!(proc_state(child.id()).map(|s| s.0), Some('Z'));
    drop(child);
    assert!(zombie_children().is_empty());
}

#[test]
fn grandchild_in_the_group_is_gone_too() {
    let _serial = serial();
    let options = ChildGuardBuilder::new()
        .process_group(true)
        .grace(Duration::from_secs(5));
    let (child, grandchild) = with_grandchild(options);
    let status = child.close().unwrap();
    assert_eq!(status.signal(), Some(15), "the leader stops on SIGTERM");
    assert!(
        stops_running(grandchild),
        "the grandchild ignoring SIGTERM survived the group stop"
    );

    // Dropped, too.
    let (child, grandchild) = with_grandchild(options);
    drop(child);
    assert!(stops_running(grandchild));
}

#[test]
fn without_a_group_the_grandchild_survives() {
    // The control for the test above: only the group option reaches grandchildren.
    let _serial = serial();
    let (child, grandchild) =
        with_grandchild(ChildGuardBuilder::new().grace(Duration::from_secs(5)));
    child.close().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(running(grandchild));
    let killed = Command::new("kill")
        .args(["-9", &grandchild.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(stops_running(grandchild));
}

#[test]
fn two_hundred_spawn_drop_cycles_leave_no_zombie() {
    let _serial = serial();
    let before = custodian::ledger::snapshot();
    let mut pids = Vec::new();
    for i in 0..200 {
        let cmd = if i % 2 == 0 {
            Command::new("true")
        } else {
            sleep_30()
        };
        let options = ChildGuardBuilder::new().process_group(i % 4 == 1);
        let child = options.spawn(cmd).unwrap();
        pids.push(child.id());
        drop(child);
    }
    assert_eq!(zombie_children(), Vec::<u32>::new());
    let me = std::process::id();
    for pid in pids {
        assert!(
            !matches!(proc_state(pid), Some((_, ppid)) if ppid == me),
            "child {pid} still exists"
        );
    }
    let counts = custodian::ledger::snapshot()
        .since(&before)
        .get("custodian::process::ChildGuard");
    assert_eq!(
        (counts.acquired, counts.released, counts.failed),
        (200, 200, 0)
    );
}

#[test]
fn the_zombie_check_sees_what_std_leaves_behind() {
    // The control for the test above: a std child dropped without `wait` stays a zombie.
    let _serial = serial();
    let raw = Command::new("true").spawn().unwrap();
    let pid = raw.id();
    drop(raw);
    let until = Instant::now() + Duration::from_secs(10);
    while proc_state(pid).map(|s| s.0) != Some('Z') && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(zombie_children().contains(&pid));
    // Reap it by hand so that the other tests start clean.
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty()).unwrap();
    assert!(zombie_children().is_empty());
}

#[test]
fn dropping_during_a_panic_still_reaps() {
    let _serial = serial();
    let mut pid = 0;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cmd = sleep_30();
        let child = ChildGuard::spawn(cmd).unwrap();
        pid = child.id();
        panic!("the request handler failed");
    }));
    assert!(result.is_err());
    assert!(pid > 0);
    assert!(
        !matches!(proc_state(pid), Some((_, ppid)) if ppid == std::process::id()),
        "child {pid} was not reaped"
    );
    assert!(zombie_children().is_empty());
}

#[test]
fn a_child_reaped_elsewhere_is_never_signalled() {
    let _serial = serial();
    // Code outside the guard reaps the child: its pid is free for reuse, so the guard
    // must not signal it; close gives the guard back with a clear error.
    let mut raw = Command::new("true").spawn().unwrap();
    raw.wait().unwrap();
    let pid = raw.id();
    let guard = ChildGuardBuilder::new().guard(raw);
    let err = guard.close().unwrap_err();
    assert_eq!(err.error().kind(), std::io::ErrorKind::NotFound);
    assert!(err.to_string().contains(&pid.to_string()), "{err}");
    assert!(err.to_string().contains("reaped by someone else"), "{err}");

    // The guard given back can be closed again (the same error, asked for again), and
    // dropping it then does not report that failure a second time (one failure, one
    // report), though the ledger counts it: the child was never reaped by the guard.
    let guard = err.into_guard();
    let before = custodian::ledger::snapshot();
    let ((), events) = common::capture(|| {
        let err = guard.close().unwrap_err();
        assert!(err.to_string().contains("reaped by someone else"), "{err}");
        drop(err);
    });
    assert!(common::errors(&events).is_empty(), "{events:?}");
    let counts = custodian::ledger::snapshot()
        .since(&before)
        .get("custodian::process::ChildGuard");
    assert_eq!(counts.failed, 1, "counted, though not reported again");
    assert_eq!(counts.released, 1);
}

#[test]
fn spawn_error_names_the_program() {
    let err = ChildGuard::spawn(Command::new("/no/such/program")).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert!(err.to_string().contains("/no/such/program"), "{err}");
}

#[test]
fn drop_is_a_debug_event_with_the_site() {
    let _serial = serial();
    let child = ChildGuard::spawn(Command::new("true")).unwrap();
    let line = line!() - 1;
    let ((), events) = common::capture(|| drop(child));
    assert!(common::errors(&events).is_empty(), "{events:?}");
    let dropped: Vec<_> = events
        .iter()
        .filter(|e| e.message.contains("Drop"))
        .collect();
    assert_eq!(dropped.len(), 1, "{events:?}");
    assert!(
        dropped[0]
            .field("site")
            .unwrap()
            .contains(&format!("process.rs:{line}"))
    );
}

#[test]
#[ignore = "long: 1000 spawn/drop cycles"]
fn thousand_spawn_drop_cycles_leave_no_zombie() {
    let _serial = serial();
    for i in 0..1000 {
        let cmd = sleep_30();
        drop(
            ChildGuardBuilder::new()
                .process_group(i % 2 == 0)
                .spawn(cmd)
                .unwrap(),
        );
    }
    assert!(zombie_children().is_empty());
}

#[cfg(feature = "tokio")]
mod tokio_guard {
    use super::*;
    use custodian::process::AsyncChildGuard;
    use tokio::io::AsyncBufReadExt;

    fn tokio_sh(script: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[test]
    fn async_child_reaped_elsewhere_fails_once_and_is_reported_once() {
        use rustix::process::{Pid, WaitOptions, waitpid};
        let _serial = serial();
        const KIND: &str = "custodian::process::AsyncChildGuard";
        let before = custodian::ledger::snapshot();
        // A current-thread runtime: the reaper runs the dropped guard's stop on this
        // thread, where `capture` sees its events.
        let ((), events) = common::capture(|| {
            common::current_thread().block_on(async {
                let child = AsyncChildGuard::spawn(tokio_sh("exit 0")).unwrap();
                let pid = child.id();
                // Reaped behind the guard's back: its stop must fail, and say so once.
                waitpid(Pid::from_raw(pid as i32), WaitOptions::empty()).unwrap();
                let err = child.close().await.unwrap_err();
                assert!(err.to_string().contains("reaped by someone else"), "{err}");
                assert!(err.to_string().contains(&pid.to_string()), "{err}");
                // The guard given back is dropped: its stop goes to the reaper, fails the
                // same way, and is counted without a second error event.
                drop(err.into_guard());
                let deadline = Instant::now() + Duration::from_secs(10);
                while custodian::ledger::snapshot()
                    .since(&before)
                    .get(KIND)
                    .released
                    < 1
                {
                    assert!(Instant::now() < deadline, "the reaper never ran the stop");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
        });
        assert!(
            common::errors(&events).is_empty(),
            "reported again: {events:?}"
        );
        let counts = custodian::ledger::snapshot().since(&before).get(KIND);
        assert_eq!(counts.failed, 1, "counted, though not reported again");
        assert_eq!(counts.released, 1);
    }

    #[test]
    fn async_close_kills_a_child_ignoring_sigterm_and_reaps_it() {
        let _serial = serial();
        common::multi_thread().block_on(async {
            let grace = Duration::from_millis(300);
            let child = spawn_ignoring_term(grace).await;
            let pid = child.id();
            let start = Instant::now();
            let status = child.close().await.unwrap();
            assert!(start.elapsed() >= grace);
            assert_eq!(status.signal(), Some(9));
            assert_eq!(proc_state(pid).filter(|s| s.1 == std::process::id()), None);
        });
    }

    #[test]
    fn async_group_close_stops_the_grandchild_and_exited_child_is_just_reaped() {
        let _serial = serial();
        common::multi_thread().block_on(async {
            let mut cmd = tokio_sh("sh -c 'trap \"\" TERM; echo $$; exec sleep 30' & wait");
            cmd.stdout(Stdio::piped());
            let mut child = ChildGuardBuilder::new()
                .process_group(true)
                .spawn_async(cmd)
                .unwrap();
            let mut line = String::new();
            tokio::io::BufReader::new(child.stdout().take().unwrap())
                .read_line(&mut line)
                .await
                .unwrap();
            let grandchild: u32 = line.trim().parse().unwrap();
            let status = child.close().await.unwrap();
            assert_eq!(status.signal(), Some(15));
            assert!(stops_running(grandchild));

            let mut child = AsyncChildGuard::spawn(tokio_sh("exit 4")).unwrap();
            assert_eq!(child.wait().await.unwrap().code(), Some(4));
            assert_eq!(child.close().await.unwrap().code(), Some(4));
        });
        assert!(zombie_children().is_empty());
    }

    /// Spawns a tokio child ignoring SIGTERM and waits until its trap is set.
    async fn spawn_ignoring_term(grace: Duration) -> AsyncChildGuard {
        let mut cmd = tokio_sh("trap '' TERM; echo ready; exec sleep 30");
        cmd.stdout(Stdio::piped());
        let mut child = ChildGuardBuilder::new()
            .grace(grace)
            .spawn_async(cmd)
            .unwrap();
        let mut ready = String::new();
        tokio::io::BufReader::new(child.stdout().take().unwrap())
            .read_line(&mut ready)
            .await
            .unwrap();
        assert_eq!(ready.trim(), "ready");
        child
    }

    /// Waits up to 10 s until `pid` is no longer a child of this process (reaped).
    async fn reaped(pid: u32) -> bool {
        let me = std::process::id();
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if !matches!(proc_state(pid), Some((_, ppid)) if ppid == me) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[test]
    fn dropped_guard_hands_the_graceful_stop_to_the_reaper() {
        let _serial = serial();
        common::multi_thread().block_on(async {
            let child = spawn_ignoring_term(Duration::from_millis(200)).await;
            let pid = child.id();
            let start = Instant::now();
            drop(child); // returns at once: the stop runs in the reaper
            assert!(start.elapsed() < Duration::from_millis(150));
            assert!(
                running(pid),
                "killed at once instead of after the grace period"
            );
            assert!(reaped(pid).await, "the reaper did not stop and reap {pid}");
            assert!(start.elapsed() >= Duration::from_millis(200));
        });
        assert!(zombie_children().is_empty());
    }

    #[test]
    fn cancelled_close_is_finished_by_the_reaper() {
        let _serial = serial();
        common::multi_thread().block_on(async {
            let child = spawn_ignoring_term(Duration::from_millis(300)).await;
            let pid = child.id();
            let cancelled = tokio::time::timeout(Duration::from_millis(50), child.close()).await;
            assert!(cancelled.is_err(), "close finished within the timeout");
            assert!(reaped(pid).await, "the cancelled stop was lost for {pid}");
        });
        assert!(zombie_children().is_empty());
    }

    #[test]
    fn dropped_outside_any_runtime_the_child_is_killed_and_the_loss_reported() {
        let _serial = serial();
        let rt = common::multi_thread();
        let child = rt.block_on(async {
            let mut cmd = tokio::process::Command::new("sleep");
            cmd.arg("30");
            AsyncChildGuard::spawn(cmd).unwrap()
        });
        let pid = child.id();
        drop(rt);
        let ((), events) = common::capture(|| drop(child));
        assert_eq!(common::errors(&events).len(), 1, "{events:?}");
        assert!(stops_running(pid));
        // Nobody is left to reap it here: do it by hand to keep the zombie checks clean.
        if matches!(proc_state(pid), Some(('Z', _))) {
            let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
            let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
        }
    }
}

#[test]
fn guards_go_into_a_cleanup_stack_and_their_errors_come_back() {
    let _serial = serial();
    let mut stack = custodian::CleanupStack::new();
    let cmd = sleep_30();
    let child = ChildGuard::spawn(cmd).unwrap();
    let pid = child.id();
    stack.push(child);
    // A child reaped by other code: its close fails, and the error is collected.
    let mut raw = Command::new("true").spawn().unwrap();
    raw.wait().unwrap();
    stack.push(ChildGuardBuilder::new().guard(raw));
    let errors = stack.close().unwrap_err();
    assert_eq!(errors.len(), 1, "{errors}");
    assert!(
        errors.to_string().contains("reaped by someone else"),
        "{errors}"
    );
    assert!(!matches!(proc_state(pid), Some((_, ppid)) if ppid == std::process::id()));
}
