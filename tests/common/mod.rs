//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, Once};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber, span};

/// One tracing event, with its fields as strings.
#[derive(Clone, Debug)]
pub struct Captured {
    pub level: Level,
    pub target: String,
    pub message: String,
    pub fields: BTreeMap<String, String>,
}

impl Captured {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// The events recorded on this thread while `capture` runs.
type Sink = Arc<Mutex<Vec<Captured>>>;

thread_local! {
    static SINK: RefCell<Option<Sink>> = const { RefCell::new(None) };
}

/// One global subscriber that hands each event to the capturing thread's sink.
///
/// A scoped subscriber per test (`with_default`) would be simpler, but tracing keeps one
/// process-wide max-level hint and callsite interest cache, which tests installing and
/// dropping scoped subscribers in parallel race on: events are then missed now and then.
/// A single global subscriber, always interested, has no such race.
struct Router;

struct Fields<'a>(&'a mut Captured);
impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.message = value.to_owned();
        } else {
            self.0
                .fields
                .insert(field.name().to_owned(), value.to_owned());
        }
    }
}

impl Subscriber for Router {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut captured = Captured {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            message: String::new(),
            fields: BTreeMap::new(),
        };
        event.record(&mut Fields(&mut captured));
        // `try_with`: an event may come from a guard dropped during thread exit.
        let _ = SINK.try_with(|sink| {
            if let Some(sink) = sink.borrow().as_ref() {
                sink.lock().unwrap().push(captured);
            }
        });
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

/// Runs `f` recording every event emitted on this thread; returns what `f` returned and
/// the events under target `custodian`.
pub fn capture<R>(f: impl FnOnce() -> R) -> (R, Vec<Captured>) {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        tracing::subscriber::set_global_default(Router).expect("no other global subscriber");
    });
    let sink = Sink::default();
    let previous = SINK.with(|s| s.replace(Some(Arc::clone(&sink))));
    // Restore the previous sink even if `f` panics.
    let _restore = scopeguard::guard(previous, |previous| {
        SINK.with(|s| *s.borrow_mut() = previous);
    });
    let result = f();
    let events = sink.lock().unwrap().clone();
    (
        result,
        events
            .into_iter()
            .filter(|e| e.target == "custodian")
            .collect(),
    )
}

/// The `error` events among `events`.
pub fn errors(events: &[Captured]) -> Vec<&Captured> {
    events.iter().filter(|e| e.level == Level::ERROR).collect()
}

/// This test binary, re-invoked to run one `#[ignore]`d child role (a real second
/// process for crash, kill and lock-holder tests).
pub fn child_role(role: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        role,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd
}

/// A runtime with one thread and every driver on.
#[cfg(feature = "tokio")]
pub fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A runtime with two workers (the machine's cores) and every driver on.
#[cfg(feature = "tokio")]
pub fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Asserts that `events` hold exactly one `error` event, for a resource of `kind` named
/// `resource`, whose error mentions `error` when given; returns that event.
#[track_caller]
pub fn assert_one_failure<'a>(
    events: &'a [Captured],
    kind: &str,
    resource: &str,
    error: Option<&str>,
) -> &'a Captured {
    let errs = errors(events);
    assert_eq!(errs.len(), 1, "{events:?}");
    let e = errs[0];
    assert_eq!(e.field("kind"), Some(kind), "{e:?}");
    assert_eq!(e.field("resource"), Some(resource), "{e:?}");
    if let Some(error) = error {
        assert!(e.field("error").unwrap_or("").contains(error), "{e:?}");
    }
    e
}

/// Asserts that the ledger counted at least one failed cleanup of `kind` since `before`.
#[track_caller]
pub fn assert_failure_counted(before: &custodian::ledger::Snapshot, kind: &str) {
    let counts = custodian::ledger::snapshot().since(before).get(kind);
    assert!(counts.failed >= 1, "{kind}: {counts:?}");
}
