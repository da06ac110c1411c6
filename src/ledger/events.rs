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
#[cold]
#[inline(never)]
pub(crate) fn shielded(emit: impl FnOnce(), fallback: fmt::Arguments<'_>) {
    if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(emit)) {
        if let Err(again) = panic::catch_unwind(AssertUnwindSafe(|| drop(payload))) {
            std::mem::forget(again);
        }
        let _ = writeln!(std::io::stderr(), "custodian: {fallback}");
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
