//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

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

/// A subscriber that records every event; install it with `capture`.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Captured>>>);

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

impl Subscriber for Recorder {
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
        self.0.lock().unwrap().push(captured);
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

/// Runs `f` with a subscriber that records every event on this thread; returns what
/// `f` returned and the events under target `custodian`.
pub fn capture<R>(f: impl FnOnce() -> R) -> (R, Vec<Captured>) {
    let recorder = Recorder::default();
    let result = tracing::subscriber::with_default(recorder.clone(), f);
    let events = recorder.0.lock().unwrap().clone();
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
