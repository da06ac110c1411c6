//! A guard dropped at thread exit, after the subscriber's own thread-local buffer is
//! gone, must neither panic nor abort, and its failure must still be counted.
//!
//! One test in its own binary: it installs a global `fmt` subscriber.

use std::cell::RefCell;

use custodian::ledger::{self, Kind, Ticket};

static KIND: Kind = Kind::new("test::late_drop");

struct FailsOnDrop(Ticket);
impl Drop for FailsOnDrop {
    fn drop(&mut self) {
        self.0
            .failure(&"late resource", &"failure reported at thread exit");
    }
}

thread_local! {
    static PARKED: RefCell<Option<FailsOnDrop>> = const { RefCell::new(None) };
}

#[test]
fn events_at_thread_exit_with_a_fmt_subscriber_neither_panic_nor_abort() {
    if std::env::var("CUSTODIAN_TLS_CHILD").is_err() {
        // Run the scenario in a child process: without the shield, it aborts.
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "events_at_thread_exit_with_a_fmt_subscriber_neither_panic_nor_abort",
                "--nocapture",
            ])
            .env("CUSTODIAN_TLS_CHILD", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("child done"),
            "{:?}\n{stdout}\n{stderr}",
            out.status
        );
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter("custodian=trace")
        .with_writer(std::io::stderr)
        .init();
    let before = ledger::snapshot().get("test::late_drop");
    std::thread::spawn(|| {
        // Parked first, so its thread-local is destroyed after the subscriber's buffer,
        // which is created by the event below.
        PARKED.with(|p| *p.borrow_mut() = Some(FailsOnDrop(Ticket::new(&KIND))));
        tracing::info!(target: "custodian", "the fmt layer's buffer now exists");
    })
    .join()
    .expect("thread exit must not panic");
    let after = ledger::snapshot().get("test::late_drop");
    assert_eq!(after.failed - before.failed, 1);
    assert_eq!(after.released - before.released, 1);
    println!("child done");
}
