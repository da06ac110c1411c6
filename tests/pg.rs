//! `custodian::pg` against a real PostgreSQL server: run under `scripts/with-postgres`,
//! which starts a throwaway one and sets `CUSTODIAN_TEST_PG`. Without it the tests print
//! `SKIPPED: CUSTODIAN_TEST_PG not set` and pass, unless `CUSTODIAN_REQUIRE_PG` is set
//! (as CI does), where they fail.
#![cfg(feature = "postgres")]

mod common;

use std::future::Future;
use std::io::{self, BufRead, BufReader, Write};
use std::pin::Pin;
use std::process::{Child, ChildStdout, Stdio};
use std::sync::RwLock;
use std::task::Poll;
use std::time::{Duration, Instant};

use custodian::pg::{LockKey, LostCause, PgLock, PgLockBuilder, PgLockHeld, PgSession};
use rustix::process::{Pid, Signal, kill_process};

/// The restart test takes this exclusively; every other test shares it, so that no test
/// sees the server go away under it.
static SERVER: RwLock<()> = RwLock::new(());

/// The server's connection string, or `None` (after saying so) when there is none.
fn server() -> Option<String> {
    match std::env::var("CUSTODIAN_TEST_PG") {
        Ok(s) if !s.is_empty() => Some(s),
        _ => {
            if std::env::var_os("CUSTODIAN_REQUIRE_PG").is_some() {
                panic!(
                    "CUSTODIAN_REQUIRE_PG is set but CUSTODIAN_TEST_PG is not: run under scripts/with-postgres"
                );
            }
            println!("SKIPPED: CUSTODIAN_TEST_PG not set");
            None
        }
    }
}

/// Options for the test server with a recognisable application name.
fn options(conn: &str, app: &str) -> PgLockBuilder {
    let mut config: tokio_postgres::Config = conn.parse().unwrap();
    config.application_name(app);
    PgLockBuilder::new(config)
}

/// A plain connection, for what the tests do behind the guard's back.
async fn raw(conn: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// Whether some session holds the advisory lock `key` (an `Id` key).
async fn held_by(client: &tokio_postgres::Client, key: i64) -> Vec<i32> {
    let rows = client
        .query(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 \
             AND classid = (($1::int8 >> 32) & 4294967295)::oid AND objid = ($1::int8 & 4294967295)::oid AND granted",
            &[&key],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// Polls until nobody holds `key`; returns how long that took.
async fn wait_free(client: &tokio_postgres::Client, key: i64, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if held_by(client, key).await.is_empty() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "lock {key} still held after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls until the server has no backend `pid` (its session ended, and its locks went
/// with it: a backend releases its locks before it leaves `pg_stat_activity`).
async fn wait_gone(client: &tokio_postgres::Client, pid: i32, limit: Duration) {
    let start = Instant::now();
    while sessions(client, "pid = $1", &pid).await > 0 {
        assert!(
            start.elapsed() < limit,
            "backend {pid} still there after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls until no session with `application_name` `app` is left.
async fn wait_no_sessions(client: &tokio_postgres::Client, app: &str, limit: Duration) {
    let start = Instant::now();
    while sessions(client, "application_name = $1", &app).await > 0 {
        assert!(
            start.elapsed() < limit,
            "sessions of {app:?} still there after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How many sessions `pg_stat_activity` shows that match `filter` (with `$1` = `arg`).
async fn sessions(
    client: &tokio_postgres::Client,
    filter: &str,
    arg: &(dyn tokio_postgres::types::ToSql + Sync),
) -> i64 {
    client
        .query_one(
            &format!("SELECT count(*) FROM pg_stat_activity WHERE {filter}"),
            &[arg],
        )
        .await
        .unwrap()
        .get(0)
}

/// Stops the server process `pid` with SIGSTOP: a stalled backend, whose kernel still
/// acknowledges packets (so neither TCP keepalives nor the TCP user timeout fire) but
/// which answers nothing. The guard resumes it with SIGCONT when dropped, also when the
/// test fails, so that no backend is left stopped. (The tests run as root or as the
/// server's user, so they may signal it.)
#[must_use = "dropping the guard resumes the backend at once"]
fn freeze(pid: i32) -> custodian::ScopeGuard<Pid, impl FnOnce(Pid)> {
    let pid = Pid::from_raw(pid).expect("a backend pid is positive");
    kill_process(pid, Signal::STOP).expect("SIGSTOP the backend");
    custodian::guard(pid, |pid| {
        // No panic here: this also runs while a failed test unwinds.
        if let Err(e) = kill_process(pid, Signal::CONT) {
            eprintln!("cannot resume backend {pid:?} with SIGCONT: {e}");
        }
    })
}

/// An attempt that `try_acquire` and `acquire_timeout` both fit: a held lock is an error
/// of kind `WouldBlock`.
type Attempt = Pin<Box<dyn Future<Output = io::Result<PgLock>> + Send>>;

/// `try_acquire(key)`, or with `timed` `acquire_timeout(key, 5 s)`, on a new session.
fn attempt(options: &PgLockBuilder, key: i64, timed: bool) -> Attempt {
    if timed {
        Box::pin(options.acquire_timeout(key, Duration::from_secs(5)))
    } else {
        let attempt = options.try_acquire(key);
        Box::pin(async move { attempt.await?.map_err(io::Error::from) })
    }
}

/// As [`attempt`], on `session`.
fn attempt_on(session: PgSession, key: i64, timed: bool) -> Attempt {
    if timed {
        Box::pin(session.acquire_timeout(key, Duration::from_secs(5)))
    } else {
        let attempt = session.try_acquire(key);
        Box::pin(async move { attempt.await?.map_err(io::Error::from) })
    }
}

/// The name of an attempt, for messages.
fn method(timed: bool) -> &'static str {
    if timed {
        "acquire_timeout"
    } else {
        "try_acquire"
    }
}

/// Takes `key` on a new session and gives the session back: its statements are
/// prepared, so the next attempt on it goes straight to the lock query.
async fn warm_session(options: &PgLockBuilder, key: i64) -> PgSession {
    let lock = options
        .try_acquire(key)
        .await
        .unwrap()
        .expect("the key is free");
    lock.release().await.unwrap()
}

/// Takes `key` at once on a new session of its own (panics if it is held) and lets go.
async fn take_at_once(conn: &str, key: i64, after: &str) {
    match options(conn, "bystander").try_acquire(key).await.unwrap() {
        Ok(lock) => lock.close().await.unwrap(),
        Err(held) => panic!("{after}, another session cannot take the key: {held}"),
    }
}

struct Role {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Role {
    fn spawn(role: &str, env: &[(&str, String)]) -> Role {
        let mut cmd = common::child_role(role);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Role { child, out }
    }

    /// The rest of the next line that contains `marker`, after it.
    fn line(&mut self, marker: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.out.read_line(&mut line).unwrap();
            assert!(n > 0, "child exited before printing {marker}");
            if let Some(i) = line.find(marker) {
                return line[i + marker.len()..].trim().to_owned();
            }
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    fn finish(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "child failed: {status}");
    }
}

fn env_conn() -> Option<String> {
    std::env::var("CUSTODIAN_TEST_PG").ok()
}

// ---------------------------------------------------------------------------------------
// Mutual exclusion across processes

#[test]
fn eight_processes_times_200_increments_under_the_lock_lose_none() {
    let Some(_conn) = server() else { return };
    let _server = SERVER.read();
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("counter");
    std::fs::write(&counter, "0").unwrap();
    let roles: Vec<Role> = (0..8)
        .map(|_| {
            Role::spawn(
                "child_role_increment",
                &[("CUSTODIAN_PG_COUNTER", counter.display().to_string())],
            )
        })
        .collect();
    for role in roles {
        role.finish();
    }
    assert_eq!(std::fs::read_to_string(&counter).unwrap(), "1600");
}

#[test]
#[ignore = "child role of eight_processes_times_200_increments_under_the_lock_lose_none"]
fn child_role_increment() {
    let (Some(conn), Some(path)) = (env_conn(), std::env::var_os("CUSTODIAN_PG_COUNTER")) else {
        return;
    };
    common::current_thread().block_on(async {
        let mut session = options(&conn, "increment").connect().await.unwrap();
        let mut last_fence = 0;
        for _ in 0..200 {
            let lock = session.acquire(LockKey::Id(9_001)).await.unwrap();
            let fence = lock.fence().unwrap();
            assert!(fence > last_fence, "{fence} after {last_fence}");
            last_fence = fence;
            // Read, give the others a chance to run, write: a lost update without the lock.
            let n: u64 = std::fs::read_to_string(&path).unwrap().parse().unwrap();
            tokio::task::yield_now().await;
            std::thread::yield_now();
            std::fs::write(&path, (n + 1).to_string()).unwrap();
            session = lock.release().await.unwrap();
        }
    });
}

#[test]
fn fence_strictly_increases_across_100_alternating_acquisitions_by_two_processes() {
    let Some(_conn) = server() else { return };
    let _server = SERVER.read();
    let mut roles = [
        Role::spawn("child_role_fence", &[]),
        Role::spawn("child_role_fence", &[]),
    ];
    let mut tokens = Vec::new();
    for i in 0..100 {
        let role = &mut roles[i % 2];
        role.send("GO");
        tokens.push(role.line("FENCE ").parse::<i64>().unwrap());
    }
    for [role] in roles.map(|r| [r]) {
        role.finish();
    }
    for pair in tokens.windows(2) {
        assert!(pair[0] < pair[1], "fences not increasing: {tokens:?}");
    }
}

#[test]
#[ignore = "child role of fence_strictly_increases_across_100_alternating_acquisitions_by_two_processes"]
fn child_role_fence() {
    let Some(conn) = env_conn() else { return };
    common::current_thread().block_on(async {
        let mut session = Some(options(&conn, "fence").connect().await.unwrap());
        let stdin = io::stdin();
        for line in stdin.lock().lines() {
            if line.unwrap() != "GO" {
                break;
            }
            let lock = session.take().unwrap().acquire("fence-test").await.unwrap();
            println!("FENCE {}", lock.fence().unwrap());
            session = Some(lock.release().await.unwrap());
        }
    });
}

// ---------------------------------------------------------------------------------------
// Who holds it

#[test]
fn try_acquire_while_held_names_the_holder_pid_and_application_name() {
    let Some(conn) = server() else { return };
    let _server = SERVER.read();
    common::current_thread().block_on(async {
        let holder = options(&conn, "holder-app").acquire(9_002).await.unwrap();
        let other = options(&conn, "other-app");

        // Held is not an I/O error: `Ok(Err(held))`.
        let held = match other.try_acquire(9_002).await {
            Ok(Err(held)) => held,
            Ok(Ok(_)) => panic!("took a lock that is held"),
            Err(e) => panic!("an I/O error instead of PgLockHeld: {e}"),
        };
        assert_eq!(held.waited(), Duration::ZERO);
        assert_eq!(held.holders().len(), 1, "{held}");
        let h = &held.holders()[0];
        assert_eq!(h.pid(), holder.backend_pid());
        assert_eq!(h.application_name(), "holder-app");
        assert_eq!(h.client_addr(), Some("127.0.0.1"));
        assert!(!h.is_shared());
        let text = held.to_string();
        assert!(
            text.contains(&format!("backend pid {}", holder.backend_pid())),
            "{text}"
        );
        assert!(
            text.contains("holder-app") && text.contains("9002"),
            "{text}"
        );

        // The session comes back, still open and holding nothing; held again, it says so.
        let session = held.into_session();
        let backend = session.backend_pid();
        assert!(!session.is_closed());
        let held = session.try_acquire(9_002).await.unwrap().unwrap_err();
        assert_eq!(held.holders()[0].pid(), holder.backend_pid());
        let session = held.into_session();
        assert_eq!(session.backend_pid(), backend, "the same session");

        // acquire_timeout: an io::Error of kind WouldBlock holding the PgLockHeld.
        let start = Instant::now();
        let err = session
            .acquire_timeout(9_002, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        assert!(start.elapsed() >= Duration::from_millis(300));
        let held = PgLockHeld::of(&err).unwrap();
        assert!(held.waited() >= Duration::from_millis(300));
        assert_eq!(held.holders()[0].pid(), holder.backend_pid());

        holder.close().await.unwrap();
        let session = PgLockHeld::from_io(err)
            .expect("a PgLockHeld inside")
            .into_session();
        assert_eq!(session.backend_pid(), backend, "the same session");
        let lock = session
            .acquire_timeout(9_002, Duration::from_secs(5))
            .await
            .unwrap();
        lock.close().await.unwrap();
    });
}

#[test]
fn shared_locks_admit_two_holders_and_exclude_an_exclusive_one() {
    let Some(conn) = server() else { return };
    let _server = SERVER.read();
    common::current_thread().block_on(async {
        let mut shared = options(&conn, "reader");
        shared = shared.shared(true);
        let a = shared.try_acquire((7, 9_003)).await.unwrap().unwrap();
        let b = shared.try_acquire((7, 9_003)).await.unwrap().unwrap();
        assert!(a.fence().unwrap() < b.fence().unwrap());

        let held = options(&conn, "writer")
            .try_acquire((7, 9_003))
            .await
            .unwrap()
            .expect_err("held");
        let mut pids: Vec<i32> = held.holders().iter().map(|h| h.pid()).collect();
        pids.sort();
        let mut expected = vec![a.backend_pid(), b.backend_pid()];
        expected.sort();
        assert_eq!(pids, expected);
        assert!(held.holders().iter().all(|h| h.is_shared()));
        // The pair key space is not the 64-bit one.
        options(&conn, "writer")
            .try_acquire(((7_i64) << 32) | 9_003)
            .await
            .unwrap()
            .unwrap()
            .close()
            .await
            .unwrap();

        a.close().await.unwrap();
        assert!(
            options(&conn, "writer")
                .try_acquire((7, 9_003))
                .await
                .unwrap()
                .is_err()
        );
        b.close().await.unwrap();
        let w = options(&conn, "writer")
            .try_acquire((7, 9_003))
            .await
            .unwrap()
            .unwrap();
        assert!(shared.try_acquire((7, 9_003)).await.unwrap().is_err());
        w.close().await.unwrap();
    });
}

#[test]
fn a_name_key_is_hashed_by_the_server() {
    let Some(conn) = server() else { return };
    let _server = SERVER.read();
    common::current_thread().block_on(async {
        let lock = options(&conn, "named")
            .acquire("custodian-name-test")
            .await
            .unwrap();
        let client = raw(&conn).await;
        let k: i64 = client
            .query_one("SELECT hashtextextended('custodian-name-test', 0)", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(held_by(&client, k).await, [lock.backend_pid()]);
        // Another client in any language takes the same lock with the same expression.
        let got: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtextextended('custodian-name-test', 0))",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(!got);
        lock.close().await.unwrap();
    });
}

// ---------------------------------------------------------------------------------------
// Loss detection

#[test]
fn terminated_backend_fires_lost_within_the_bound_and_another_process_acquires() {
    let Some(conn) = server() else { return };
    let _server = SERVER.read();
    let check = custodian::ledger::LeakCheck::new();
    let ((), events) = common::capture(|| {
        common::current_thread().block_on(async {
            let lock = options(&conn, "victim").acquire(9_004).await.unwrap();
            assert!(!lock.is_lost());
            let token = lock.lost_token();
            let client = raw(&conn).await;
            let start = Instant::now();
            let killed: bool = client
                .query_one("SELECT pg_terminate_backend($1)", &[&lock.backend_pid()])
                .await
                .unwrap()
                .get(0);
            assert!(killed);
            tokio::time::timeout(Duration::from_secs(5), lock.lost())
                .await
                .expect("lost() fired");
            let took = start.elapsed();
            // The documented bound: the check interval (1 s by default) + one round trip.
            assert!(took < Duration::from_millis(1_500), "lost() after {took:?}");
            assert!(token.is_cancelled());
            assert!(
                matches!(lock.lost_cause(), Some(LostCause::Terminated(msg)) if msg.contains("terminating connection")),
                "{:?}",
                lock.lost_cause()
            );

            // Another process takes it.
            let mut other = Role::spawn("child_role_acquire_once", &[]);
            assert!(other.line("ACQUIRED ").parse::<i32>().unwrap() > 0);
            other.finish();

            let err = lock.close().await.unwrap_err();
            assert!(err.to_string().contains("9004"), "{err}");
        })
    });
    let lost: Vec<_> = events.iter().filter(|e| e.message == "lock lost").collect();
    assert_eq!(lost.len(), 1, "{events:?}");
    assert_eq!(lost[0].field("kind"), Some("custodian::pg::PgLock"));
    assert!(lost[0].field("resource").unwrap().contains("9004"));
    assert!(
        lost[0]
            .field("error")
            .unwrap()
            .contains("ended the session")
    );
    check
        .finish()
        .expect("the lost lock is released in the ledger by its close");
}

#[test]
#[ignore = "child role of the loss tests"]
fn child_role_acquire_once() {
    let Some(conn) = env_conn() else { return };
    common::current_thread().block_on(async {
        let lock = options(&conn, "successor")
            .acquire_timeout(9_004, Duration::from_secs(5))
            .await
            .unwrap();
        println!("ACQUIRED {}", lock.backend_pid());
        lock.close().await.unwrap();
    });
}

#[test]
fn server_restart_while_held_fires_lost() {
    let Some(conn) = server() else { return };
    let (Ok(data), Ok(bin), Ok(user)) = (
        std::env::var("CUSTODIAN_TEST_PG_DATA"),
        std::env::var("CUSTODIAN_TEST_PG_BIN"),
        std::env::var("CUSTODIAN_TEST_PG_USER"),
    ) else {
        panic!(
            "CUSTODIAN_TEST_PG is set but not CUSTODIAN_TEST_PG_DATA/BIN/USER: use scripts/with-postgres"
        );
    };
    let log = std::env::var("CUSTODIAN_TEST_PG_LOG").unwrap_or_else(|_| "/dev/null".into());
    let _server = SERVER.write().unwrap_or_else(|e| e.into_inner());
    common::current_thread().block_on(async {
        let lock = options(&conn, "restart").acquire(9_005).await.unwrap();
        let pg_ctl = format!("{bin}/pg_ctl");
        let args = ["-D", &data, "-l", &log, "-m", "fast", "-w", "restart"];
        let mut cmd = if rustix::process::getuid().is_root() {
            let mut c = tokio::process::Command::new("runuser");
            c.args(["-u", &user, "--", &pg_ctl]);
            c
        } else {
            tokio::process::Command::new(&pg_ctl)
        };
        let status = cmd.args(args).stdout(Stdio::null()).status().await.unwrap();
        assert!(status.success(), "pg_ctl restart: {status}");
        tokio::time::timeout(Duration::from_secs(5), lock.lost())
            .await
            .expect("lost() fired");
        assert!(
            matches!(
                lock.lost_cause(),
                Some(LostCause::Terminated(_) | LostCause::ConnectionClosed(_))
            ),
            "{:?}",
            lock.lost_cause()
        );
        assert!(lock.close().await.is_err());
        // The server is back: the lock can be taken again.
        options(&conn, "restart")
            .acquire_timeout(9_005, Duration::from_secs(10))
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
    });
}

#[test]
fn unlocked_behind_the_guards_back_fires_lost_and_close_reports_it() {
    let Some(conn) = server() else { return };
    let _server = SERVER.read();
    common::current_thread().block_on(async {
        let mut opts = options(&conn, "unlocked");
        opts = opts.check_interval(Duration::from_millis(100));
        let lock = opts.acquire(9_006).await.unwrap();
        lock.client()
            .execute("SELECT pg_advisory_unlock_all()", &[])
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(2), lock.lost())
            .await
            .expect("lost() fired");
        assert_eq!(lock.lost_cause(), Some(&LostCause::NotHeld));
        let err = lock.close().await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("did not hold it") && text.contains("9006"),
            "{text}"
        );
    });
}

#[test]
fn each_lock_on_a_reused_session_is_watched_and_lost_on_its_own() {
    let Some(conn) = server() else { return };
    let _server = SERVER.read();
    common::current_thread().block_on(async {
        let opts = options(&conn, "next-lock").check_interval(Duration::from_millis(100));
        let session = opts.connect().await.unwrap();
        // The first lock's token outlives the lock; the second lock is released as
        // usual, and the third may take over its state.
        let first = session.acquire(9_020).await.unwrap();
        let first_token = first.lost_token();
        let session = first.release().await.unwrap();
        let second = session.acquire(9_021).await.unwrap();
        let session = second.release().await.unwrap();
        let third = session.acquire(9_022).await.unwrap();
        assert_eq!(third.key(), &LockKey::Id(9_022));
        assert!(third.fence().is_some());
        assert!(format!("{third:?}").contains("9022"), "{third:?}");

        // Several checks pass: they ask about 9022, not a key released before.
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(!third.is_lost(), "{:?}", third.lost_cause());

        third
            .client()
            .execute("SELECT pg_advisory_unlock_all()", &[])
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(2), third.lost())
            .await
            .expect("lost() fired");
        assert_eq!(third.lost_cause(), Some(&LostCause::NotHeld));
        assert!(
            !first_token.is_cancelled(),
            "a released lock's token does not follow the session's next locks"
        );
        let err = third.close().await.unwrap_err();
        assert!(err.to_string().contains("9022"), "{err}");
    });
}

#[test]
fn a_frozen_backend_fires_lost_with_check_timed_out_within_interval_plus_timeout() {
    let Some(conn) = server() else { return };
    let _server = SERVER.read();
    common::current_thread().block_on(async {
        let (interval, timeout) = (Duration::from_millis(200), Duration::from_millis(300));
        let opts = options(&conn, "frozen-holder")
            .check_interval(interval)
            .check_timeout(timeout);
        let lock = opts.acquire(9_015).await.unwrap();
        // A silent failure: the connection stays up, nothing answers.
        let frozen = freeze(lock.backend_pid());
        let start = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), lock.lost())
            .await
            .expect("lost() fired");
        let took = start.elapsed();
        // The documented bound, the check interval plus the check timeout (500 ms), with
        // slack for a loaded machine.
        assert!(
            took < interval + timeout + Duration::from_secs(2),
            "lost() after {took:?}"
        );
        assert_eq!(lock.lost_cause(), Some(&LostCause::CheckTimedOut(timeout)));
        drop(frozen);
        // Resumed, the backend still holds the lock (lost() means it can no longer be
        // assumed held, not that it is free), and close() unlocks it.
        lock.close().await.unwrap();
        wait_free(&raw(&conn).await, 9_015, Duration::from_secs(5)).await;
    });
}

#[test]
fn a_lost_lock_counts_one_failure_in_the_ledger_with_its_error_event() {
    let Some(conn) = server() else { return };
    // Alone: failures are counted process-wide, and other tests lose locks on purpose.
    let _server = SERVER.write().unwrap_or_else(|e| e.into_inner());
    let before = custodian::ledger::snapshot();
    let ((), events) = common::capture(|| {
        common::current_thread().block_on(async {
            let mut opts = options(&conn, "counted");
            opts = opts.check_interval(Duration::from_millis(50));
            // Lost through the liveness check (unlocked behind the guard's back) ...
            let unlocked = opts.acquire(9_012).await.unwrap();
            unlocked
                .client()
                .execute("SELECT pg_advisory_unlock_all()", &[])
                .await
                .unwrap();
            tokio::time::timeout(Duration::from_secs(2), unlocked.lost())
                .await
                .expect("lost() fired");
            // ... and through the connection's end, which the check may see too.
            let killed = opts.acquire(9_013).await.unwrap();
            let client = raw(&conn).await;
            client
                .execute("SELECT pg_terminate_backend($1)", &[&killed.backend_pid()])
                .await
                .unwrap();
            tokio::time::timeout(Duration::from_secs(2), killed.lost())
                .await
                .expect("lost() fired");
            // More checks would have run by now: none fires again.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let lost = custodian::ledger::snapshot()
                .since(&before)
                .get("custodian::pg::PgLock");
            assert_eq!(lost.failed, 2, "{lost:?}");
            // close() returns its error to the caller: not counted again.
            assert!(unlocked.close().await.is_err());
            assert!(killed.close().await.is_err());
        })
    });
    let counts = custodian::ledger::snapshot()
        .since(&before)
        .get("custodian::pg::PgLock");
    assert_eq!(counts.failed, 2, "{counts:?}");
    assert_eq!(counts.live(), 0, "{counts:?}");
    let lost: Vec<_> = events.iter().filter(|e| e.message == "lock lost").collect();
    assert_eq!(lost.len(), 2, "{events:?}");
    assert!(lost[0].field("resource").unwrap().contains("9012"));
    assert!(lost[1].field("resource").unwrap().contains("9013"));
}

// ---------------------------------------------------------------------------------------
// Release on every path

#[test]
fn a_holder_cancelled_by_timeout_frees_the_lock_within_a_second() {
    let Some(conn) = server() else { return };
    let _server = SERVER.read();
    common::multi_thread().block_on(async {
        let opts = options(&conn, "cancelled");
        let holding = async {
            let _lock = opts.acquire(9_007).await.unwrap();
            std::future::pending::<()>().await;
        };
        assert!(
            tokio::time::timeout(Duration::from_millis(300), holding)
                .await
                .is_err()
        );
        let start = Instant::now();
        let other = opts
            .acquire_timeout(9_007, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(start.elapsed() < Duration::from_secs(1));
        other.close().await.unwrap();
    });
}

#[test]
fn a_cancelled_wait_never_takes_the_lock_later() {
    let Some(conn) = server() else { return };
    let _server = SERVER.read();
    common::current_thread().block_on(async {
        let client = raw(&conn).await;
        let waiter = options(&conn, "waiter");
        let waits: [(&str, Attempt); 2] = [
            ("acquire", Box::pin(waiter.acquire(9_008))),
            (
                "acquire_timeout",
                Box::pin(waiter.acquire_timeout(9_008, Duration::from_secs(30))),
            ),
        ];
        for (method, wait) in waits {
            let holder = options(&conn, "first").acquire(9_008).await.unwrap();
            assert!(
                tokio::time::timeout(Duration::from_millis(300), wait)
                    .await
                    .is_err(),
                "{method} took a held lock"
            );
            holder.close().await.unwrap();
            // Had the waiter's backend kept waiting, it would now hold the lock.
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(held_by(&client, 9_008).await, Vec::<i32>::new(), "{method}");
            let waiting = sessions(&client, "application_name = $1", &"waiter").await;
            assert_eq!(waiting, 0, "the session of the cancelled {method} is gone");
        }
    });
}

#[test]
fn try_acquire_and_acquire_timeout_cancelled_at_any_point_never_leave_the_lock_held() {
    let Some(conn) = server() else { return };
    let _server = SERVER.read();
    common::current_thread().block_on(async {
        const KEY: i64 = 9_017;
        let client = raw(&conn).await;
        let opts = options(&conn, "cancelled-anywhere");
        for timed in [false, true] {
            // How long a whole attempt takes (connect, prepare, lock): the cancellations
            // below fall all over it, and past it.
            let start = Instant::now();
            attempt(&opts, KEY, timed)
                .await
                .unwrap()
                .close()
                .await
                .unwrap();
            let whole = start.elapsed();
            let mut cancelled = 0;
            for i in 0..=24 {
                let delay = whole * i / 16;
                match tokio::time::timeout(delay, attempt(&opts, KEY, timed)).await {
                    // Done before the deadline: the key was free, it got it.
                    Ok(got) => got.unwrap().close().await.unwrap(),
                    Err(_) => cancelled += 1,
                }
                // Nothing of the attempt is left (its session would hold the lock), ...
                wait_no_sessions(&client, "cancelled-anywhere", Duration::from_secs(5)).await;
                // ... and another session takes the key at once.
                let after = format!("after {} cancelled at {delay:?}", method(timed));
                take_at_once(&conn, KEY, &after).await;
            }
            assert!(cancelled > 0, "no {} was cancelled", method(timed));
        }
        // The options are still usable.
        opts.try_acquire(KEY)
            .await
            .unwrap()
            .expect("free")
            .close()
            .await
            .unwrap();
    });
}

#[test]
fn an_attempt_cancelled_after_the_server_granted_the_lock_frees_it() {
    let Some(conn) = server() else { return };
    let _server = SERVER.read();
    common::current_thread().block_on(async {
        const KEY: i64 = 9_018;
        let client = raw(&conn).await;
        let opts = options(&conn, "granted-unseen");
        for timed in [false, true] {
            // Retried when the attempt completes before it can be dropped (a slow server
            // answers between two looks at it).
            let mut dropped = false;
            for _ in 0..10 {
                let session = warm_session(&opts, KEY).await;
                let pid = session.backend_pid();
                let mut attempt = attempt_on(session, KEY, timed);
                // Poll the attempt, one step at a time, until the server has granted the
                // lock; it is not polled after that, so it never sees the answer.
                let deadline = Instant::now() + Duration::from_secs(5);
                let completed = loop {
                    if held_by(&client, KEY).await == [pid] {
                        break None;
                    }
                    assert!(Instant::now() < deadline, "the lock was never granted");
                    let step = std::future::poll_fn(|cx| Poll::Ready(attempt.as_mut().poll(cx)));
                    if let Poll::Ready(got) = step.await {
                        break Some(got);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                if let Some(got) = completed {
                    got.unwrap().close().await.unwrap();
                    wait_free(&client, KEY, Duration::from_secs(5)).await;
                    continue;
                }
                // Held on the server, not yet a PgLock: dropped, the attempt closes its
                // connection, and the server frees the lock with the session.
                drop(attempt);
                wait_free(&client, KEY, Duration::from_secs(2)).await;
                wait_gone(&client, pid, Duration::from_secs(2)).await;
                take_at_once(&conn, KEY, &format!("after a granted {}", method(timed))).await;
                dropped = true;
                break;
            }
            assert!(
                dropped,
                "{} completed each time before it could be dropped",
                method(timed)
            );
        }
    });
}

#[test]
fn an_attempt_cancelled_while_its_backend_is_frozen_never_holds_the_lock_after_it_resumes() {
    let Some(conn) = server() else { return };
    let _server = SERVER.read();
    common::current_thread().block_on(async {
        const KEY: i64 = 9_019;
        let client = raw(&conn).await;
        let opts = options(&conn, "frozen-attempt");
        for timed in [false, true] {
            let session = warm_session(&opts, KEY).await;
            let pid = session.backend_pid();
            let frozen = freeze(pid);
            // The query waits in the stopped backend's socket.
            let pending =
                tokio::time::timeout(Duration::from_millis(200), attempt_on(session, KEY, timed));
            assert!(pending.await.is_err(), "a stopped backend answered");
            // It never ran: another session takes the key at once, and lets it go ...
            take_at_once(
                &conn,
                KEY,
                &format!("while a cancelled {} is frozen", method(timed)),
            )
            .await;
            // ... so that a stale lock query would get it, if it ran once the backend
            // resumes. The backend finds its connection closed and exits, and the lock
            // goes with it.
            drop(frozen);
            wait_gone(&client, pid, Duration::from_secs(5)).await;
            assert_eq!(held_by(&client, KEY).await, Vec::<i32>::new());
            take_at_once(
                &conn,
                KEY,
                &format!("once a cancelled {} resumed", method(timed)),
            )
            .await;
        }
    });
}

#[test]
fn a_dropped_lock_is_unlocked_by_the_reaper_within_a_round_trip() {
    let Some(conn) = server() else { return };
    let _server = SERVER.read();
    common::current_thread().block_on(async {
        let client = raw(&conn).await;
        let lock = options(&conn, "dropped").acquire(9_009).await.unwrap();
        assert_eq!(held_by(&client, 9_009).await, [lock.backend_pid()]);
        drop(lock); // never blocks
        let took = wait_free(&client, 9_009, Duration::from_secs(1)).await;
        assert!(took < Duration::from_secs(1), "{took:?}");
    });
}

#[test]
fn an_unlock_with_no_answer_closes_the_connection_after_the_unlock_timeout() {
    let Some(conn) = server() else { return };
    let _server = SERVER.read();
    common::current_thread().block_on(async {
        let client = raw(&conn).await;
        // The check timeout no longer than the interval: the bound is then the unlock
        // timeout plus two check intervals.
        let opts = options(&conn, "stalled")
            .unlock_timeout(Duration::from_millis(300))
            .check_interval(Duration::from_millis(100))
            .check_timeout(Duration::from_millis(100));
        let lock = opts.acquire(9_014).await.unwrap();
        // A stalled server: the backend process is stopped, the unlock gets no answer.
        let frozen = freeze(lock.backend_pid());
        let start = Instant::now();
        // Bounded here too, so that a close that never returns fails the test.
        let err = tokio::time::timeout(Duration::from_secs(10), lock.close())
            .await
            .expect("close() returned")
            .unwrap_err();
        let took = start.elapsed();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(
            err.to_string().contains("9014") && err.to_string().contains("closed instead"),
            "{err}"
        );
        // Not before the timeout; at most two check intervals after it (and slack).
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_millis(900), "{took:?}");
        drop(frozen);
        // Resumed, the backend finds its connection closed and exits: the lock is free.
        wait_free(&client, 9_014, Duration::from_secs(5)).await;
    });
}

#[test]
fn an_unlock_timeout_behind_a_check_in_flight_stays_within_the_documented_bound() {
    let Some(conn) = server() else { return };
    let _server = SERVER.read();
    common::current_thread().block_on(async {
        let (unlock_timeout, interval, check_timeout) = (
            Duration::from_millis(300),
            Duration::from_millis(100),
            Duration::from_secs(1),
        );
        let opts = options(&conn, "stalled-check")
            .unlock_timeout(unlock_timeout)
            .check_interval(interval)
            .check_timeout(check_timeout);
        let lock = opts.acquire(9_020).await.unwrap();
        let frozen = freeze(lock.backend_pid());
        // Past a tick: a liveness check now waits for its answer, and the watch with it.
        tokio::time::sleep(interval + interval / 2).await;
        let start = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(10), lock.close())
            .await
            .expect("close() returned")
            .unwrap_err();
        let took = start.elapsed();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        // The documented bound: the unlock timeout plus one check interval plus the
        // longer of the check interval and the check timeout (1.4 s), with slack.
        let bound = unlock_timeout + interval + interval.max(check_timeout);
        assert!(took >= unlock_timeout, "{took:?}");
        // The message says how long the unlock really waited, not only the timeout.
        let text = err.to_string();
        let waited = text
            .split("no answer after ")
            .nth(1)
            .and_then(|rest| rest.split(" (").next())
            .unwrap_or_else(|| panic!("no wait in {text}"));
        assert!(text.contains("unlock timeout 300ms"), "{text}");
        let waited_ms = match waited.strip_suffix("ms") {
            Some(ms) => ms.parse::<f64>().unwrap(),
            None => waited.strip_suffix('s').unwrap().parse::<f64>().unwrap() * 1e3,
        };
        // Read on a clock of a few milliseconds' resolution.
        let took_ms = took.as_secs_f64() * 1e3;
        assert!(
            waited_ms >= 290.0 && waited_ms <= took_ms + 20.0,
            "{text}, took {took:?}"
        );
        assert!(took < bound + Duration::from_secs(2), "{took:?}");
        drop(frozen);
    });
}

#[test]
fn a_dropped_lock_whose_unlock_stalls_is_freed_by_closing_its_connection() {
    let Some(conn) = server() else { return };
    let _server = SERVER.read();
    common::current_thread().block_on(async {
        const KEY: i64 = 9_016;
        let client = raw(&conn).await;
        // A reaper of its own, to wait for this lock's cleanup and read how it ended.
        let reaper = custodian::rt::Reaper::new();
        let (unlock_timeout, interval) = (Duration::from_millis(300), Duration::from_millis(100));
        let opts = options(&conn, "dropped-stalled")
            .unlock_timeout(unlock_timeout)
            .check_interval(interval)
            .check_timeout(interval)
            .reaper(&reaper);
        let lock = opts.acquire(KEY).await.unwrap();
        let pid = lock.backend_pid();
        let frozen = freeze(pid);
        let start = Instant::now();
        drop(lock); // never blocks, even with the server stalled
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
        // The unlock gets no answer: the connection is closed after the unlock timeout,
        // and the cleanup ends with the unlock's error.
        let report = reaper.shutdown(Duration::from_secs(10)).await;
        let took = start.elapsed();
        assert_eq!(report.failed(), 1, "{report}");
        let err = report.failures()[0].error().unwrap().to_string();
        assert!(
            err.contains("9016") && err.contains("closed instead"),
            "{err}"
        );
        // The documented bound: the unlock timeout plus two check intervals (with a check
        // timeout no longer than the interval), with slack for a loaded machine.
        assert!(took >= unlock_timeout, "{took:?}");
        assert!(
            took < unlock_timeout + 2 * interval + Duration::from_secs(2),
            "{took:?}"
        );
        // Stopped, the backend still holds the lock; resumed, it finds its connection
        // closed and exits, and the lock goes with it: another session takes it.
        assert_eq!(held_by(&client, KEY).await, [pid]);
        drop(frozen);
        wait_gone(&client, pid, Duration::from_secs(5)).await;
        take_at_once(&conn, KEY, "once the stalled backend resumed").await;
    });
}

#[test]
fn a_lock_dropped_with_no_runtime_left_is_free_once_its_connection_closes() {
    let Some(conn) = server() else { return };
    let _server = SERVER.read();
    let rt = common::current_thread();
    let lock = rt
        .block_on(options(&conn, "orphan").acquire(9_010))
        .unwrap();
    let pid = lock.backend_pid();
    drop(rt); // the connection's task goes with its runtime
    let ((), events) = common::capture(|| drop(lock));
    common::assert_one_failure(
        &events,
        "custodian::pg::PgLock",
        &format!(
            "exclusive advisory lock 9010 on {}",
            options(&conn, "x").endpoint()
        ),
        Some("lost"),
    );
    common::current_thread().block_on(async {
        let client = raw(&conn).await;
        let took = wait_free(&client, 9_010, Duration::from_secs(1)).await;
        assert!(took < Duration::from_secs(1));
        let alive: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(alive, 0);
    });
}

#[test]
fn ledger_counts_a_held_lock_with_its_site() {
    let Some(conn) = server() else { return };
    let _server = SERVER.read();
    common::current_thread().block_on(async {
        let check = custodian::ledger::LeakCheck::new();
        let lock: PgLock = options(&conn, "ledger").acquire(9_011).await.unwrap();
        let line = line!() - 1;
        let leaked = check.leaked();
        let mine = leaked
            .iter()
            .find(|r| r.kind() == "custodian::pg::PgLock")
            .expect("counted live");
        assert_eq!(mine.site().file(), file!());
        assert_eq!(mine.site().line(), line);
        lock.close().await.unwrap();
        check.finish().expect("released");
    });
}

// ---------------------------------------------------------------------------------------
// Bad input

#[test]
fn bad_connection_strings_and_unreachable_servers_give_clear_errors_not_hangs() {
    // Needs no server: runs everywhere.
    let err = PgLockBuilder::parse("host=127.0.0.1 port=notaport").unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(
        err.to_string()
            .contains("invalid PostgreSQL connection string"),
        "{err}"
    );

    common::current_thread().block_on(async {
        // Nobody listens: refused, naming host and port.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let opts = PgLockBuilder::parse(&format!("host=127.0.0.1 port={port} user=x")).unwrap();
        let err = opts.acquire(1).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );

        // Something accepts and never answers: the connect timeout, not a hang.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let mut opts = PgLockBuilder::parse(&format!("host=127.0.0.1 port={port} user=x")).unwrap();
        opts = opts.connect_timeout(Duration::from_millis(300));
        let start = Instant::now();
        let err = opts.try_acquire(1).await.expect_err("an I/O error");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        drop(silent);
    });
}
