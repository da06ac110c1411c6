//! A small key-value service built on custodian's guards, to read and to copy from.
//!
//! ```text
//! cargo run --features tokio --example service -- --state /tmp/kv --listen 127.0.0.1:0 --drain-deadline 5s
//! printf 'SET greeting hello\nGET greeting\nQUIT\n' | nc 127.0.0.1 <port>
//! printf 'STATUS\n' | nc -U /tmp/kv/admin.sock
//! kill -TERM <pid>
//! ```
//!
//! - `LockFile` on `<state>/service.pid`: one instance per state directory; a second one
//!   is refused, naming the first one's pid.
//! - Durable state (store.rs): a `SET` is acknowledged once `fsync`ed in an append log
//!   (one `fsync` per batch of clients' writes); `AtomicFile` snapshots at start and
//!   shutdown.
//! - Every connection is held by an `AsyncGuard` whose cleanup sends `BYE` and closes
//!   gracefully; at shutdown those goodbyes are drained by a `Reaper` with a deadline.
//! - An admin Unix socket (`AsyncUnixListenerGuard`) answers `STATUS` with the ledger.
//! - A helper child (a heartbeat) under an `AsyncChildGuard`: stopped and reaped at exit.
//! - SIGTERM/SIGINT: the shutdown sequence in `server::Running::shutdown`, all of it
//!   (drain, final state, child stopped) within the drain deadline from the signal; exit 0.
//!
//! Lines on stdout (`listening on ...`, `drain report: ...`) are for scripts and tests;
//! the tracing log goes to stderr.

mod server;
mod store;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use custodian::fs::LockHeld;
use custodian::rt::ShutdownSignals;

use crate::server::Config;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    custodian::ledger::track_sites(true); // STATUS lists each live connection's age

    let config = match parse_args(std::env::args().skip(1)) {
        Ok(config) => config,
        Err(e) => {
            eprintln!(
                "service: {e}\nusage: service --state DIR [--listen ADDR] [--drain-deadline 5s]"
            );
            return ExitCode::from(2);
        }
    };
    // Installed before anything is acquired: from here on, SIGTERM means "shut down".
    let mut signals = match ShutdownSignals::new() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("service: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let running = match server::start(&config).await {
        Ok(running) => running,
        Err(e) => {
            match LockHeld::of(&e) {
                Some(_) => eprintln!(
                    "service: another instance serves {}: {e}",
                    config.state.display()
                ),
                None => eprintln!("service: cannot start: {e}"),
            }
            return ExitCode::FAILURE;
        }
    };
    let r = &running.recovered;
    println!(
        "recovered {} keys ({} log records, {} torn bytes dropped)",
        r.keys, r.log_records, r.torn_bytes
    );
    println!("watchdog pid {}", running.watchdog_pid());
    println!("admin socket {}", config.state.join("admin.sock").display());
    println!("listening on {}", running.local_addr());

    let signal = signals.recv().await;
    // One deadline for the whole shutdown, counted from the signal.
    let deadline = Instant::now() + config.drain_deadline;
    tracing::info!("{signal}: shutting down");
    match running.shutdown(deadline).await {
        Ok(stopped) => {
            let report = &stopped.report;
            tracing::info!("{report}");
            println!("connections open at shutdown: {}", stopped.open_at_stop);
            println!(
                "drain report: completed={} failed={} aborted={} lost={} timed_out={}",
                report.completed(),
                report.failed(),
                report.aborted(),
                report.lost(),
                report.timed_out()
            );
            println!("state written: {} keys", stopped.keys);
            println!("watchdog reaped: {}", stopped.watchdog);
            println!(
                "stopped in {:?} (deadline {:?})",
                stopped.elapsed, config.drain_deadline
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("service: shutdown failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Config, String> {
    let mut state = None;
    let mut listen = "127.0.0.1:7878".to_owned();
    let mut deadline = "5s".to_owned();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--state" => state = Some(value()?),
            "--listen" => listen = value()?,
            "--drain-deadline" => deadline = value()?,
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(Config {
        state: state.ok_or("--state DIR is required")?.into(),
        listen: listen
            .parse()
            .map_err(|e| format!("--listen {listen:?}: {e}"))?,
        drain_deadline: parse_duration(&deadline)?,
    })
}

/// `250ms`, `5s` or a plain number of seconds, at most a day (so that the deadline,
/// an `Instant`, cannot overflow).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("--drain-deadline {text:?}: expected e.g. 5s or 250ms, at most 86400s");
    let parsed = match text.strip_suffix("ms") {
        Some(ms) => ms.parse().ok().map(Duration::from_millis),
        None => {
            let secs = text.strip_suffix('s').unwrap_or(text);
            secs.parse()
                .ok()
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
        }
    };
    parsed
        .filter(|d| *d <= Duration::from_secs(24 * 3600))
        .ok_or_else(bad)
}
