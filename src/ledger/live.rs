//! Site tracking: which resources are alive, where they were acquired and since when.
//!
//! Off by default in release builds, on in debug builds, switchable with [`track_sites`],
//! and always on while a [`LeakCheck`] is active.
//!
//! # Cost
//! Insert and remove are O(1) whatever the number of live resources: each thread records
//! its resources in a slab of its own (a `Vec` of entries with a free list, behind a
//! mutex that only that thread takes, except for the rare release of a resource on
//! another thread and for [`live`]), and the ticket keeps the slab and slot it was given,
//! so removing is an index, never a search. A slab whose thread exited keeps its live
//! entries and goes to the next new thread. The acquisition time is read from the
//! coarse clock (see `clock.rs`), so an age is precise to a few milliseconds.

use std::fmt;
use std::panic::Location;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use super::Kind;
use super::clock::coarse_now;

/// `true` when new tickets record their site. Derived from the two settings below.
static ENABLED: AtomicBool = AtomicBool::new(cfg!(debug_assertions));
/// What the user asked for with [`track_sites`].
static USER: AtomicBool = AtomicBool::new(cfg!(debug_assertions));
/// How many leak checks are active (they force tracking on).
static FORCED: AtomicUsize = AtomicUsize::new(0);
/// Serialises updates of `ENABLED` so that it always equals `USER || FORCED > 0`.
static SETTING: Mutex<()> = Mutex::new(());
/// Acquisition order: [`live`] lists oldest first, and a [`LeakCheck`] looks only at ids
/// handed out after it started.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Slabs for this many threads at once; threads beyond that share them (still correct,
/// since every slab has its own lock, only less private).
const SLABS: usize = 64;

#[derive(Clone, Copy)]
struct Entry {
    id: u64,
    kind: &'static Kind,
    site: &'static Location<'static>,
    /// Nanoseconds on the coarse clock.
    since: u64,
    thread: ThreadId,
}

enum Slot {
    Live(Entry),
    /// A free slot: the next free one's index plus one, 0 at the end of the list.
    Free(u32),
}

/// One thread's live resources (and those left by the threads that had the slab
/// before it). Its `Vec` keeps its largest size. Cache-line aligned so that two threads' slabs never
/// share a line.
#[repr(align(64))]
struct Slab(Mutex<Entries>);

struct Entries {
    slots: Vec<Slot>,
    /// The first free slot's index plus one, 0 when none is free.
    free: u32,
}

static SLAB: [Slab; SLABS] = [const {
    Slab(Mutex::new(Entries {
        slots: Vec::new(),
        free: 0,
    }))
}; SLABS];

impl Slab {
    fn lock(&self) -> MutexGuard<'_, Entries> {
        // Nothing panics while the lock is held; if something did, the slots are still
        // consistent (each update is a single write), so ignore the poison.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Entries {
    /// Stores `entry`; returns its slot's index, or `None` (left untracked) in the
    /// impossible case of 2^32 live resources in one slab.
    #[inline]
    fn insert(&mut self, entry: Entry) -> Option<u32> {
        match self.free {
            0 => {
                let index = u32::try_from(self.slots.len())
                    .ok()
                    .filter(|&i| i < u32::MAX)?;
                self.slots.push(Slot::Live(entry));
                Some(index)
            }
            free => {
                let index = free - 1;
                let slot = &mut self.slots[index as usize];
                if let Slot::Free(next) = *slot {
                    self.free = next;
                }
                *slot = Slot::Live(entry);
                Some(index)
            }
        }
    }

    #[inline]
    fn remove(&mut self, index: u32) {
        if let Some(slot) = self.slots.get_mut(index as usize) {
            *slot = Slot::Free(self.free);
            self.free = index + 1;
        }
    }
}

/// Which slabs are free to give to a new thread.
struct Pool {
    /// Slabs whose thread exited (their live entries stay).
    idle: Vec<u32>,
    /// How many slabs have been handed out for the first time.
    claimed: usize,
    /// Round-robin counter for sharing slabs once all are taken.
    shared: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    idle: Vec::new(),
    claimed: 0,
    shared: 0,
});

fn pool() -> MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// This thread's slab and id, looked up once per thread.
struct Home {
    slab: u32,
    thread: ThreadId,
    /// `false` for a slab shared because all were taken: it is not given back.
    owned: bool,
}

impl Home {
    fn claim() -> Home {
        let thread = thread::current().id();
        let mut pool = pool();
        let (slab, owned) = if let Some(slab) = pool.idle.pop() {
            (slab, true)
        } else if pool.claimed < SLABS {
            pool.claimed += 1;
            (pool.claimed as u32 - 1, true)
        } else {
            pool.shared += 1;
            ((pool.shared % SLABS) as u32, false)
        };
        Home {
            slab,
            thread,
            owned,
        }
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        // The slab's live entries stay: their tickets may still be released from other
        // threads, and [`live`] still lists them with this thread's id.
        if self.owned {
            pool().idle.push(self.slab);
        }
    }
}

thread_local! {
    static HOME: Home = Home::claim();
}

/// Turns site tracking on or off for tickets created from now on.
///
/// Per-kind counters are always kept; site tracking adds the acquisition site and age of
/// each live resource to [`live`] and the [`report`](super::report), at the cost of a
/// lock of the thread's own slab (uncontended) per acquire and release, whatever the
/// number of live resources. It is on by default in debug builds and off in
/// release builds. A [`LeakCheck`] (and [`assert_no_leaks`]) turns it on while active,
/// whatever this setting says.
///
/// ```
/// custodian::ledger::track_sites(true);
/// ```
pub fn track_sites(on: bool) {
    let _lock = SETTING.lock().unwrap_or_else(PoisonError::into_inner);
    USER.store(on, Ordering::Relaxed);
    ENABLED.store(on || FORCED.load(Ordering::Relaxed) > 0, Ordering::Relaxed);
}

fn force(delta: isize) {
    let _lock = SETTING.lock().unwrap_or_else(PoisonError::into_inner);
    let forced = if delta > 0 {
        FORCED.fetch_add(1, Ordering::Relaxed) + 1
    } else {
        FORCED.fetch_sub(1, Ordering::Relaxed) - 1
    };
    ENABLED.store(
        USER.load(Ordering::Relaxed) || forced > 0,
        Ordering::Relaxed,
    );
}

/// Records a live resource if tracking is on; returns the key [`remove`] takes, or 0 when
/// untracked.
#[inline]
pub(crate) fn insert(kind: &'static Kind, site: &'static Location<'static>) -> u64 {
    if !ENABLED.load(Ordering::Relaxed) {
        return 0;
    }
    insert_slow(kind, site)
}

#[cold]
fn insert_slow(kind: &'static Kind, site: &'static Location<'static>) -> u64 {
    // During thread-local destruction `HOME` may be gone: use the first slab, and
    // `thread::current`, which never panics, even then.
    let (slab, thread) = HOME
        .try_with(|home| (home.slab, home.thread))
        .unwrap_or_else(|_| (0, thread::current().id()));
    let entry = Entry {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        kind,
        site,
        since: coarse_now(),
        thread,
    };
    // `% SLABS` never changes a valid index; it spares a bounds check.
    match SLAB[slab as usize % SLABS].lock().insert(entry) {
        // Never 0: the slot index is stored plus one.
        Some(index) => (u64::from(slab) << 32) | (u64::from(index) + 1),
        None => 0,
    }
}

/// Forgets the live resource `key` (from [`insert`]), from any thread.
#[cold]
pub(crate) fn remove(key: u64) {
    let slab = (key >> 32) as usize % SLABS;
    let index = (key as u32).wrapping_sub(1);
    SLAB[slab].lock().remove(index);
}

/// One live resource, as listed by [`live`].
#[derive(Clone, Debug)]
pub struct LiveResource {
    id: u64,
    kind: &'static str,
    site: &'static Location<'static>,
    since: Instant,
    thread: ThreadId,
}

impl LiveResource {
    /// The resource's kind, e.g. `fs::AtomicFile`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Where the resource was acquired (`file:line:column` of the constructor's caller).
    pub fn site(&self) -> &'static Location<'static> {
        self.site
    }

    /// How long the resource has been alive, to within one tick of the kernel's coarse
    /// clock (a few milliseconds; see [`coarse_limit`](crate::sync::coarse_limit)).
    pub fn age(&self) -> Duration {
        self.since.elapsed()
    }

    /// The thread that acquired it.
    pub fn thread(&self) -> ThreadId {
        self.thread
    }
}

impl fmt::Display for LiveResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} acquired at {} ({:.3?} ago)",
            self.kind,
            self.site,
            self.age()
        )
    }
}

/// Every live resource acquired while site tracking was on, oldest first.
///
/// Resources acquired while tracking was off are counted in [`snapshot`](super::snapshot)
/// but not listed here.
///
/// ```
/// use custodian::ledger;
///
/// ledger::track_sites(true);
/// let stack = custodian::CleanupStack::new();
/// let line = line!() - 1;
/// let mine = ledger::live().into_iter().find(|r| r.site().line() == line).unwrap();
/// assert_eq!(mine.kind(), "custodian::CleanupStack");
/// drop(stack);
/// ```
pub fn live() -> Vec<LiveResource> {
    // Ages are measured on the coarse clock and turned into `Instant`s once, here, so
    // that `LiveResource::age` keeps growing while the list is kept.
    let now = Instant::now();
    let coarse = coarse_now();
    let mut all = Vec::new();
    for slab in &SLAB {
        let entries = slab.lock();
        all.extend(entries.slots.iter().filter_map(|slot| {
            match slot {
                Slot::Live(e) => Some(LiveResource {
                    id: e.id,
                    kind: e.kind.name(),
                    site: e.site,
                    since: now
                        .checked_sub(Duration::from_nanos(coarse.saturating_sub(e.since)))
                        .unwrap_or(now),
                    thread: e.thread,
                }),
                Slot::Free(_) => None,
            }
        }));
    }
    all.sort_by_key(|r| r.id);
    all
}

/// Which threads' resources a [`LeakCheck`] looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Threads {
    Current(ThreadId),
    All,
}

/// A leak check for tests: everything acquired while it is active must be released by
/// the time [`LeakCheck::finish`] is called (or the check is dropped).
///
/// It forces site tracking on while it lives, so the failure names the kind and the
/// acquisition site of each leaked resource. By default it watches resources acquired on
/// the thread that created it, so tests running in parallel in the same process do not
/// disturb each other; [`LeakCheck::all_threads`] watches every thread.
///
/// ```
/// use custodian::ledger::LeakCheck;
///
/// let check = LeakCheck::new();
/// let stack = custodian::CleanupStack::new();
/// drop(stack);
/// check.finish().expect("nothing leaked");
/// ```
#[derive(Debug)]
#[must_use = "a LeakCheck checks when `finish` is called or when it is dropped"]
pub struct LeakCheck {
    first_id: u64,
    threads: Threads,
    finished: bool,
}

impl LeakCheck {
    /// Starts watching resources acquired on the current thread.
    ///
    /// ```
    /// let check = custodian::ledger::LeakCheck::new();
    /// let stack = custodian::CleanupStack::new();
    /// assert_eq!(check.leaked().len(), 1); // alive, acquired since the check started
    /// drop(stack);
    /// check.finish().expect("nothing leaked");
    /// ```
    pub fn new() -> LeakCheck {
        force(1);
        LeakCheck {
            first_id: NEXT_ID.load(Ordering::Relaxed),
            threads: Threads::Current(thread::current().id()),
            finished: false,
        }
    }

    /// Starts watching resources acquired on any thread.
    ///
    /// Tests that run in parallel in the same process will see each other's resources:
    /// use it in tests that run alone (a separate test binary, or `--test-threads=1`).
    ///
    /// ```
    /// let check = custodian::ledger::LeakCheck::all_threads();
    /// let leaked = std::thread::spawn(|| std::mem::forget(custodian::CleanupStack::new()));
    /// leaked.join().unwrap();
    /// let leaks = check.finish().unwrap_err(); // seen, though acquired on another thread
    /// assert!(leaks.to_string().contains("custodian::CleanupStack"));
    /// ```
    pub fn all_threads() -> LeakCheck {
        let mut check = LeakCheck::new();
        check.threads = Threads::All;
        check
    }

    /// Resources acquired since the check started that are still alive (see
    /// [`new`](Self::new) for an example).
    pub fn leaked(&self) -> Vec<LiveResource> {
        live()
            .into_iter()
            .filter(|r| r.id >= self.first_id)
            .filter(|r| match self.threads {
                Threads::All => true,
                Threads::Current(id) => r.thread == id,
            })
            .collect()
    }

    /// Ends the check.
    ///
    /// ```
    /// let check = custodian::ledger::LeakCheck::new();
    /// std::mem::forget(custodian::CleanupStack::new()); // a leak, on purpose
    /// let leaks = check.finish().unwrap_err();
    /// assert_eq!(leaks.resources()[0].kind(), "custodian::CleanupStack");
    /// ```
    ///
    /// # Errors
    /// [`Leaks`] listing the kind and acquisition site of every resource acquired while
    /// the check was active and still alive.
    pub fn finish(mut self) -> Result<(), Leaks> {
        self.finished = true;
        let leaked = self.leaked();
        if leaked.is_empty() {
            Ok(())
        } else {
            Err(Leaks(leaked))
        }
    }
}

impl Default for LeakCheck {
    fn default() -> Self {
        LeakCheck::new()
    }
}

impl Drop for LeakCheck {
    fn drop(&mut self) {
        if !self.finished && !thread::panicking() {
            let leaked = self.leaked();
            force(-1);
            if !leaked.is_empty() {
                panic!("{}", Leaks(leaked));
            }
        } else {
            force(-1);
        }
    }
}

/// The resources a [`LeakCheck`] found still alive.
#[derive(Debug)]
pub struct Leaks(Vec<LiveResource>);

impl Leaks {
    /// The leaked resources, oldest first.
    pub fn resources(&self) -> &[LiveResource] {
        &self.0
    }
}

impl fmt::Display for Leaks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} resource(s) leaked:", self.0.len())?;
        for r in &self.0 {
            write!(f, "\n  {r}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Leaks {}

/// Runs `f` and panics if a resource acquired inside it on this thread is still alive
/// when it returns (a `mem::forget`, an `Rc` cycle, a guard parked in a global), naming
/// the kind and acquisition site of each.
///
/// # Panics
/// When something leaked, with the list of leaked resources.
///
/// ```should_panic
/// custodian::ledger::assert_no_leaks(|| {
///     std::mem::forget(custodian::CleanupStack::new()); // leaked: panics, naming this line
/// });
/// ```
#[track_caller]
pub fn assert_no_leaks<R>(f: impl FnOnce() -> R) -> R {
    let check = LeakCheck::new();
    let result = f();
    if let Err(leaks) = check.finish() {
        panic!("{leaks}");
    }
    result
}
