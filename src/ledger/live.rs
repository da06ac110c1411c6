//! Site tracking: which resources are alive, where they were acquired and since when.
//!
//! Off by default in release builds (it takes a lock per acquire and release), on in debug
//! builds, switchable with [`track_sites`], and always on while a [`LeakCheck`] is active.

use std::collections::BTreeMap;
use std::fmt;
use std::panic::Location;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use super::Kind;

/// `true` when new tickets record their site. Derived from the two settings below.
static ENABLED: AtomicBool = AtomicBool::new(cfg!(debug_assertions));
/// What the user asked for with [`track_sites`].
static USER: AtomicBool = AtomicBool::new(cfg!(debug_assertions));
/// How many leak checks are active (they force tracking on).
static FORCED: AtomicUsize = AtomicUsize::new(0);
/// Serialises updates of `ENABLED` so that it always equals `USER || FORCED > 0`.
static SETTING: Mutex<()> = Mutex::new(());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

const SHARDS: usize = 16;

#[derive(Clone, Copy)]
struct Entry {
    kind: &'static Kind,
    site: &'static Location<'static>,
    since: Instant,
    thread: ThreadId,
}

#[allow(clippy::declare_interior_mutable_const)] // used only to initialise the array below
const EMPTY: Mutex<BTreeMap<u64, Entry>> = Mutex::new(BTreeMap::new());
static LIVE: [Mutex<BTreeMap<u64, Entry>>; SHARDS] = [EMPTY; SHARDS];

fn shard(id: u64) -> MutexGuard<'static, BTreeMap<u64, Entry>> {
    LIVE[id as usize % SHARDS]
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// Turns site tracking on or off for tickets created from now on.
///
/// Per-kind counters are always kept; site tracking adds the acquisition site and age of
/// each live resource to [`live`] and the [`report`](super::report), at the cost of a
/// short lock per acquire and release. It is on by default in debug builds and off in
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

/// Records a live resource if tracking is on; returns its id, or 0 when untracked.
#[inline]
pub(crate) fn insert(kind: &'static Kind, site: &'static Location<'static>) -> u64 {
    if !ENABLED.load(Ordering::Relaxed) {
        return 0;
    }
    insert_slow(kind, site)
}

#[cold]
fn insert_slow(kind: &'static Kind, site: &'static Location<'static>) -> u64 {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let entry = Entry {
        kind,
        site,
        since: Instant::now(),
        // `thread::current` never panics, even during thread-local destruction.
        thread: thread::current().id(),
    };
    shard(id).insert(id, entry);
    id
}

#[cold]
pub(crate) fn remove(id: u64) {
    shard(id).remove(&id);
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

    /// How long the resource has been alive.
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
    let mut all: Vec<LiveResource> = LIVE
        .iter()
        .flat_map(|shard| {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard
                .iter()
                .map(|(&id, e)| LiveResource {
                    id,
                    kind: e.kind.name(),
                    site: e.site,
                    since: e.since,
                    thread: e.thread,
                })
                .collect::<Vec<_>>()
        })
        .collect();
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
    pub fn all_threads() -> LeakCheck {
        let mut check = LeakCheck::new();
        check.threads = Threads::All;
        check
    }

    /// Resources acquired since the check started that are still alive.
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
