//! The resource ledger: which resources are alive, where they were acquired, and how
//! many cleanups failed — the leak detector Python has as `ResourceWarning` and
//! `tracemalloc`, for Rust resources.
//!
//! Every custodian guard carries a [`Ticket`]: created with the guard (recording the
//! caller's file, line and column through `#[track_caller]`), dropped with it. The ledger
//! keeps, per [`Kind`]:
//! - counters, always on and cheap (no lock, no atomic read-modify-write on the hot path):
//!   acquired, released, failed cleanups — read them with [`snapshot`];
//! - with site tracking on (debug builds, [`track_sites`], or during a [`LeakCheck`]),
//!   each live resource's kind, site and age — read them with [`live`].
//!
//! Your own guards can carry tickets too: declare a `static` [`Kind`] and keep a
//! [`Ticket`] in the guard.
//!
//! ```
//! use custodian::ledger;
//!
//! let before = ledger::snapshot();
//! let stack = custodian::CleanupStack::new();
//! let during = ledger::snapshot().since(&before);
//! assert_eq!(during.get("custodian::CleanupStack").live(), 1);
//! drop(stack);
//! assert_eq!(ledger::snapshot().since(&before).get("custodian::CleanupStack").live(), 0);
//! ```

pub(crate) mod clock;
mod counters;
pub(crate) mod events;
mod live;
mod report;
mod ticket;

pub(crate) use counters::Event;
pub use counters::Kind;
pub use live::{LeakCheck, Leaks, LiveResource, assert_no_leaks, live, track_sites};
pub use report::{Counts, Report, Snapshot, report, snapshot};
pub use ticket::Ticket;
