use std::fmt;
use std::panic::Location;

use super::{Event, Kind, events, live};

/// A guard's entry in the ledger: counts the resource as live from creation to drop.
///
/// Create it in your guard's constructor (mark the constructor `#[track_caller]` so the
/// site is your caller's), keep it in the guard, and let it drop with the guard. Use
/// [`Ticket::failure`] to report a cleanup error: it emits the standard `error` event
/// and counts the failure.
///
/// Cost: two thread-local counter updates (no lock, no atomic read-modify-write), plus,
/// when site tracking is on, an uncontended lock of the thread's own slab on acquire and
/// release (O(1): the ticket keeps its slot).
///
/// ```
/// use custodian::ledger::{Kind, Ticket};
///
/// static CONN: Kind = Kind::new("myapp::Conn");
///
/// struct Conn { ticket: Ticket }
///
/// impl Conn {
///     #[track_caller]
///     fn open() -> Conn { Conn { ticket: Ticket::new(&CONN) } }
/// }
///
/// impl Drop for Conn {
///     fn drop(&mut self) {
///         if let Err(e) = std::fs::metadata("/no/such/file") {
///             self.ticket.failure(&"/no/such/file", &e);
///         }
///     }
/// }
///
/// let before = custodian::ledger::snapshot();
/// drop(Conn::open());
/// let counts = custodian::ledger::snapshot().since(&before).get("myapp::Conn");
/// assert_eq!((counts.acquired, counts.released, counts.failed), (1, 1, 1));
/// ```
#[must_use = "dropping a Ticket releases the resource in the ledger at once"]
pub struct Ticket {
    kind: &'static Kind,
    site: &'static Location<'static>,
    /// The live-set key (slab and slot), or 0 when site tracking was off at creation.
    id: u64,
}

impl Ticket {
    /// Counts a resource of `kind` as acquired here (the caller's location).
    #[track_caller]
    #[inline]
    pub fn new(kind: &'static Kind) -> Ticket {
        Ticket::at(kind, Location::caller())
    }

    /// Counts a resource of `kind` as acquired at `site`.
    #[inline]
    pub fn at(kind: &'static Kind, site: &'static Location<'static>) -> Ticket {
        kind.count(Event::Acquired);
        let id = live::insert(kind, site);
        events::acquired(kind.name(), site);
        Ticket { kind, site, id }
    }

    /// The resource's kind name.
    pub fn kind(&self) -> &'static str {
        self.kind.name()
    }

    /// Where the resource was acquired.
    pub fn site(&self) -> &'static Location<'static> {
        self.site
    }

    /// Reports a failed cleanup of this resource: an `error` event under target
    /// `custodian` with `kind`, `site`, `resource` (a path, an address, a pid) and
    /// `error`, and one more `failed` in the ledger.
    ///
    /// Never panics, even during thread-local destruction.
    #[cold]
    pub fn failure(&self, resource: &dyn fmt::Display, error: &dyn fmt::Display) {
        self.kind.count_failure();
        events::failure(
            "cleanup failed",
            self.kind.name(),
            self.site,
            resource,
            error,
        );
    }

    /// One more `failed` in the ledger, with no event: for a failure the caller already
    /// got (a returned error, a panic going on to the caller).
    #[cold]
    pub(crate) fn count_failure(&self) {
        self.kind.count_failure();
    }

    /// Reports that the resource's cleanup ran from `Drop` rather than an explicit
    /// `close`: a `debug` event, since a dropped guard cannot return its error.
    pub fn dropped_without_close(&self, resource: &dyn fmt::Display) {
        events::dropped_without_close(self.kind.name(), self.site, resource);
    }
}

impl Drop for Ticket {
    #[inline]
    fn drop(&mut self) {
        self.kind.count(Event::Released);
        if self.id != 0 {
            live::remove(self.id);
        }
        events::released(self.kind.name(), self.site);
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("kind", &self.kind.name())
            .field("site", &format_args!("{}", self.site))
            .finish()
    }
}
