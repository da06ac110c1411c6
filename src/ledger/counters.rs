//! Per-kind counters: the always-on half of the ledger.
//!
//! A ticket's acquire and release must cost a few nanoseconds, so the hot path takes no
//! lock and does no atomic read-modify-write: each thread owns a block of counters (one
//! pair per kind) that only it writes, with a plain load and store. A snapshot sums the
//! blocks of every live thread plus each kind's global counters, under the registry lock.
//! When a thread exits, its block is folded into the global counters under that same
//! lock, so a snapshot never counts a thread twice or misses it. The global counters are
//! also the fallback when the thread-local block is gone (a guard dropped during
//! thread-local destruction) or when more than [`MAX_LOCAL_KINDS`] kinds exist.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Kinds beyond this many are counted with global atomics only (still exact, just slower).
const MAX_LOCAL_KINDS: usize = 64;

/// A family of resources counted together in the ledger, such as `fs::AtomicFile`.
///
/// Declare one `static` per guard type and give it to [`Ticket::new`](super::Ticket::new).
/// Kinds with the same name are merged in snapshots.
///
/// ```
/// use custodian::ledger::{Kind, Ticket};
///
/// static DB_CONN: Kind = Kind::new("myapp::DbConn");
///
/// let ticket = Ticket::new(&DB_CONN);
/// assert_eq!(custodian::ledger::snapshot().get("myapp::DbConn").live(), 1);
/// drop(ticket);
/// assert_eq!(custodian::ledger::snapshot().get("myapp::DbConn").live(), 0);
/// ```
#[derive(Debug)]
pub struct Kind {
    name: &'static str,
    /// 0 until the kind is registered, then its index in the registry plus one.
    id: AtomicU32,
    acquired: AtomicU64,
    released: AtomicU64,
    failed: AtomicU64,
}

#[derive(Clone, Copy)]
pub(crate) enum Event {
    Acquired,
    Released,
}

impl Kind {
    /// A new kind named `name`; `const`, so it can be a `static`.
    pub const fn new(name: &'static str) -> Kind {
        Kind {
            name,
            id: AtomicU32::new(0),
            acquired: AtomicU64::new(0),
            released: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// The kind's name, as shown in snapshots and events.
    pub fn name(&self) -> &'static str {
        self.name
    }

    #[inline]
    fn slot(&'static self) -> usize {
        match self.id.load(Ordering::Relaxed) {
            0 => register(self),
            id => id as usize - 1,
        }
    }

    /// Counts one acquisition or release of a resource of this kind.
    #[inline]
    pub(crate) fn count(&'static self, event: Event) {
        let slot = self.slot();
        if slot < MAX_LOCAL_KINDS
            && LOCAL
                .try_with(|local| local.0.cells[slot].bump(event))
                .is_ok()
        {
            return;
        }
        self.global(event).fetch_add(1, Ordering::Release);
    }

    /// Counts one failed cleanup. Failures are rare, so a global atomic is enough.
    pub(crate) fn count_failure(&'static self) {
        self.slot();
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    fn global(&self, event: Event) -> &AtomicU64 {
        match event {
            Event::Acquired => &self.acquired,
            Event::Released => &self.released,
        }
    }
}

/// One kind's counters in one thread. Only the owning thread writes them.
#[derive(Default)]
struct Cell {
    acquired: AtomicU64,
    released: AtomicU64,
}

impl Cell {
    #[inline]
    fn bump(&self, event: Event) {
        let counter = match event {
            Event::Acquired => &self.acquired,
            Event::Released => &self.released,
        };
        // Single writer: a load and a store, no locked instruction. The Release store
        // pairs with the snapshot's Acquire load (see `Registry::counts`).
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Release);
    }
}

struct ThreadCounters {
    cells: [Cell; MAX_LOCAL_KINDS],
}

struct Local(Arc<ThreadCounters>);

impl Local {
    fn register() -> Local {
        let counters = Arc::new(ThreadCounters {
            cells: std::array::from_fn(|_| Cell::default()),
        });
        registry().threads.push(Arc::clone(&counters));
        Local(counters)
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let mut registry = registry();
        for (kind, cell) in registry.kinds.iter().zip(self.0.cells.iter()) {
            kind.acquired
                .fetch_add(cell.acquired.load(Ordering::Acquire), Ordering::Release);
            kind.released
                .fetch_add(cell.released.load(Ordering::Acquire), Ordering::Release);
        }
        registry.threads.retain(|t| !Arc::ptr_eq(t, &self.0));
    }
}

thread_local! {
    static LOCAL: Local = Local::register();
}

struct Registry {
    kinds: Vec<&'static Kind>,
    threads: Vec<Arc<ThreadCounters>>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    kinds: Vec::new(),
    threads: Vec::new(),
});

/// The registry lock. A panic never happens while it is held, but if one did, the
/// counters are still valid: ignore the poison rather than lose the ledger.
fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cold]
fn register(kind: &'static Kind) -> usize {
    let mut registry = registry();
    match kind.id.load(Ordering::Relaxed) {
        0 => {
            registry.kinds.push(kind);
            let id = registry.kinds.len();
            kind.id.store(id as u32, Ordering::Relaxed);
            id - 1
        }
        id => id as usize - 1,
    }
}

/// Exact totals for every registered kind: `(kind, acquired, released, failed)`.
pub(crate) fn totals() -> Vec<(&'static str, u64, u64, u64)> {
    let registry = registry();
    registry
        .kinds
        .iter()
        .enumerate()
        .map(|(slot, kind)| {
            // Acquisitions are read before releases, so that `acquired - released` is
            // never more than the number of resources alive at the moment the last
            // acquisition counter was read: a release counted after that moment can
            // only lower it. The other order counted every acquisition made between
            // the two reads as live, which overstated `live` by orders of magnitude
            // while other threads were busy. In this order a release can be seen whose
            // acquisition was made after its counter was read; `released` is capped at
            // `acquired` so that `live` never goes below zero (the cap is still at least
            // every release that happened before the call: those acquisitions were
            // counted before it too).
            let sum = |event: Event| -> u64 {
                let local: u64 = registry
                    .threads
                    .iter()
                    .filter(|_| slot < MAX_LOCAL_KINDS)
                    .map(|t| {
                        let cell = &t.cells[slot];
                        match event {
                            Event::Acquired => cell.acquired.load(Ordering::Acquire),
                            Event::Released => cell.released.load(Ordering::Acquire),
                        }
                    })
                    .sum();
                local + kind.global(event).load(Ordering::Acquire)
            };
            let acquired = sum(Event::Acquired);
            let released = sum(Event::Released).min(acquired);
            (
                kind.name,
                acquired,
                released,
                kind.failed.load(Ordering::Relaxed),
            )
        })
        .collect()
}
