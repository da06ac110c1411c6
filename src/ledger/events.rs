//! The tracing events every guard emits, shielded so that emitting one never panics.
//!
//! A subscriber may itself panic when called at an awkward moment: tracing-subscriber's
//! `fmt` layer formats into a thread-local buffer and panics when a guard is dropped
//! after that buffer was destroyed (a guard parked in a thread-local, dropped at thread
//! exit). A panic there would abort the process (a thread-local destructor must not
//! unwind), so each event is emitted under `catch_unwind`; if the subscriber panics,
//! the event is written to stderr instead, so it is still not lost.

use std::fmt;
use std::io::Write;
use std::panic::{self, AssertUnwindSafe, Location};

use tracing::Level;

/// Emits with `emit`; on a panic, writes `fallback` to stderr instead.
///
/// Values of users' types formatted by `emit` or `fallback` must be wrapped in [`Shown`],
/// or the fallback would format them again, unprotected.
#[cold]
#[inline(never)]
pub(crate) fn shielded(emit: impl FnOnce(), fallback: fmt::Arguments<'_>) {
    if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(emit)) {
        drop_payload(payload);
        // `write_fmt` of stderr formats into a locked, unbuffered handle; the arguments are
        // ours or `Shown`, so formatting them does not panic.
        let _ = writeln!(std::io::stderr(), "custodian: {fallback}");
    }
}

/// Drops a caught panic's payload, whose own `Drop` may panic too.
fn drop_payload(payload: Box<dyn std::any::Any + Send>) {
    if let Err(again) = panic::catch_unwind(AssertUnwindSafe(|| drop(payload))) {
        std::mem::forget(again);
    }
}

/// A user's value (an error, a resource description) as events show it: its `Display`
/// runs under `catch_unwind`, and a panic shows as `<Display of the {what} panicked>`
/// instead (an `Err` from it as `<Display of the {what} failed>`). Reporting runs from `Drop`, often while a
/// panic unwinds, where one more panic escaping would abort the process.
pub(crate) struct Shown<'a> {
    value: &'a dyn fmt::Display,
    what: &'static str,
}

impl<'a> Shown<'a> {
    pub(crate) fn error(value: &'a dyn fmt::Display) -> Self {
        Shown {
            value,
            what: "error",
        }
    }

    pub(crate) fn resource(value: &'a dyn fmt::Display) -> Self {
        Shown {
            value,
            what: "resource",
        }
    }
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Formatted into a string first, so that a panic half-way writes nothing partial;
        // with `fmt::write`, not `to_string`, so that a `Display` returning `Err` is not
        // turned into a panic (and a run of the user's panic hook) either.
        let mut text = String::new();
        let written = panic::catch_unwind(AssertUnwindSafe(|| {
            fmt::write(&mut text, format_args!("{}", self.value))
        }));
        match written {
            Ok(Ok(())) => f.write_str(&text),
            Ok(Err(fmt::Error)) => write!(f, "{text}<Display of the {} failed>", self.what),
            Err(payload) => {
                drop_payload(payload);
                write!(f, "<Display of the {} panicked>", self.what)
            }
        }
    }
}

#[inline]
pub(crate) fn acquired(kind: &'static str, site: &'static Location<'static>) {
    if tracing::level_enabled!(Level::TRACE) {
        shielded(
            || tracing::trace!(target: "custodian", kind, site = %site, "acquired"),
            format_args!("acquired kind={kind} site={site}"),
        );
    }
}

#[inline]
pub(crate) fn released(kind: &'static str, site: &'static Location<'static>) {
    if tracing::level_enabled!(Level::TRACE) {
        shielded(
            || tracing::trace!(target: "custodian", kind, site = %site, "released"),
            format_args!("released kind={kind} site={site}"),
        );
    }
}

/// The `debug` event for a cleanup done by `Drop` instead of an explicit `close`.
pub(crate) fn dropped_without_close(
    kind: &'static str,
    site: &'static Location<'static>,
    resource: &dyn fmt::Display,
) {
    if tracing::level_enabled!(Level::DEBUG) {
        let resource = Shown::resource(resource);
        shielded(
            || {
                tracing::debug!(
                    target: "custodian",
                    kind,
                    site = %site,
                    resource = %resource,
                    "cleanup ran from Drop, not close"
                )
            },
            format_args!(
                "cleanup ran from Drop, not close kind={kind} site={site} resource={resource}"
            ),
        );
    }
}

/// The `error` event for a failed cleanup. Always emitted (a subscriber decides).
#[cold]
pub(crate) fn failure(
    message: &'static str,
    kind: &'static str,
    site: &'static Location<'static>,
    resource: &dyn fmt::Display,
    error: &dyn fmt::Display,
) {
    let (resource, error) = (Shown::resource(resource), Shown::error(error));
    shielded(
        || {
            tracing::error!(
                target: "custodian",
                kind,
                site = %site,
                resource = %resource,
                error = %error,
                "{message}"
            )
        },
        format_args!("{message} kind={kind} site={site} resource={resource} error={error}"),
    );
}
