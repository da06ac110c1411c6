//! Instruction counts of the hot paths, for `valgrind --tool=callgrind`.
//!
//! Wall-clock figures wobble on a shared machine; instruction counts do not. This binary
//! runs one named scenario N times and does nothing else, so that
//! `(Ir(N) - Ir(0)) / N` is the cost of one run of the scenario (startup, the first
//! allocation of the thread-local counters and so on cancel out). `scripts/bench-report`
//! drives it:
//!
//! ```text
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/deps/instructions-HASH stack8-close 10000
//! ```
//!
//! A plain binary rather than gungraun/iai-callgrind: gungraun 0.20 works with this
//! valgrind, but needs its runner installed with `cargo install` (about 180 crates) and
//! adds its library to what `cargo bench --no-run` builds in CI.
//!
//! `instructions list` prints the scenario names. Under `cargo bench` (which passes
//! `--bench`) it runs each scenario once as a smoke test and exits.

use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use custodian::CleanupStack;
use custodian::ledger::{self, Kind, Ticket};

static BENCH: Kind = Kind::new("bench::ticket");

struct HandWritten<'a>(&'a Cell<u64>);
impl Drop for HandWritten<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0.set(black_box(self.0.get() + 1));
    }
}

/// Scenario name and how it runs. Each run is `#[inline(never)]` so the count is of the
/// same code the criterion suite times.
type Scenario = (&'static str, Body);

/// How a scenario runs `n` times.
#[derive(Clone, Copy)]
enum Body {
    /// One call per run.
    Each(fn(&State)),
    /// One call for all `n` runs: the async scenarios run `n` operations inside a single
    /// `block_on`, so that entering the runtime is not counted per operation.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    Loop(fn(&State, u64)),
}

impl Body {
    fn run(self, state: &State, n: u64) {
        match self {
            Body::Each(f) => {
                for _ in 0..n {
                    f(state);
                }
            }
            Body::Loop(f) => f(state, n),
        }
    }
}

struct State {
    n: Cell<u64>,
    #[cfg(unix)]
    lock_path: std::path::PathBuf,
    #[cfg(unix)]
    socket_path: std::path::PathBuf,
    /// The same paths NUL-terminated, for the `*-floor` scenarios (made once, at setup).
    #[cfg(unix)]
    lock_c_path: std::ffi::CString,
    #[cfg(unix)]
    socket_c_path: std::ffi::CString,
    #[cfg(unix)]
    _dir: tempfile::TempDir,
    counter: Arc<AtomicU64>,
    /// A current-thread runtime for the async scenarios (feature `tokio`).
    #[cfg(feature = "tokio")]
    rt: tokio::runtime::Runtime,
}

const SCENARIOS: &[Scenario] = &[
    ("defer-hand-written", Body::Each(hand_written)),
    ("defer-scopeguard", Body::Each(scopeguard_defer)),
    ("defer-scope-1", Body::Each(scope_1)),
    ("defer-scope-1-opaque", Body::Each(scope_1_opaque)),
    ("defer-scope-8", Body::Each(scope_8)),
    ("stack8-vec", Body::Each(stack8_vec)),
    ("stack8-close", Body::Each(stack8_close)),
    ("stack8-drop", Body::Each(stack8_drop)),
    ("ticket-nothing", Body::Each(ticket_nothing)),
    ("ticket", Body::Each(ticket)),
    ("ticket-filtered-subscriber", Body::Each(ticket)),
    // Site tracking on (the debug-build default), with only the measured ticket alive and
    // with 100 000 other tickets alive: the cost must not grow with the live set.
    ("ticket-sites-1", Body::Each(ticket)),
    ("ticket-sites-100k", Body::Each(ticket)),
    #[cfg(unix)]
    ("lock-by-hand", Body::Each(os::lock_by_hand)),
    #[cfg(unix)]
    ("lock-custodian", Body::Each(os::lock_custodian)),
    #[cfg(unix)]
    ("lock-floor", Body::Each(os::lock_floor)),
    #[cfg(unix)]
    (
        "unix-listener-by-hand",
        Body::Each(os::unix_listener_by_hand),
    ),
    #[cfg(unix)]
    (
        "unix-listener-custodian",
        Body::Each(os::unix_listener_custodian),
    ),
    #[cfg(unix)]
    ("unix-listener-floor", Body::Each(os::unix_listener_floor)),
    #[cfg(feature = "tokio")]
    ("close-ready-direct", Body::Each(rt::direct)),
    #[cfg(feature = "tokio")]
    ("close-ready-custodian", Body::Each(rt::custodian_close)),
    #[cfg(feature = "tokio")]
    ("close-1rt-direct", Body::Loop(rt::direct_1rt)),
    #[cfg(feature = "tokio")]
    ("close-1rt-custodian", Body::Loop(rt::custodian_close_1rt)),
    #[cfg(feature = "tokio")]
    (
        "close-1rt-into-inner",
        Body::Loop(rt::custodian_into_inner_1rt),
    ),
    #[cfg(feature = "tokio")]
    ("reaper-tracker-spawn", Body::Loop(rt::tracker_spawn)),
    #[cfg(feature = "tokio")]
    (
        "reaper-custodian-dropped",
        Body::Loop(rt::custodian_dropped),
    ),
    #[cfg(feature = "tokio")]
    (
        "reaper-tracker-spawn-ticket",
        Body::Loop(rt::tracker_spawn_ticket),
    ),
];

/// `AsyncGuard::close(AsyncGuard::new(v, f)).await` vs `f(v).await`, on a current-thread runtime,
/// for a cleanup that is ready at once (benches/rt.rs, group `close`): `close-ready-*`
/// with a `block_on` per operation (the figures before issue 11), `close-1rt-*` with
/// all operations in one `block_on`.
///
/// `reaper-*`: a dropped guard's cleanup handed to the (global) reaper and run to the
/// end, vs `TaskTracker::spawn` of the same future; the driver yields every
/// [`BATCH`] hand-offs so that the runtime runs them.
#[cfg(feature = "tokio")]
mod rt {
    use super::{BENCH, State};
    use custodian::ledger::Ticket;
    use custodian::rt::AsyncGuard;
    use std::hint::black_box;
    use tokio_util::task::TaskTracker;

    /// Hand-offs between two yields of the driver (the cleanups then run).
    const BATCH: u64 = 64;

    #[inline(never)]
    pub(super) fn direct_1rt(s: &State, n: u64) {
        s.rt.block_on(async {
            for _ in 0..n {
                ready(black_box(1)).await.unwrap();
            }
        });
    }

    #[inline(never)]
    pub(super) fn custodian_close_1rt(s: &State, n: u64) {
        s.rt.block_on(async {
            for _ in 0..n {
                AsyncGuard::close(AsyncGuard::new(black_box(1), ready))
                    .await
                    .unwrap();
            }
        });
    }

    /// The guard made and given up without its cleanup: `close-1rt-custodian` minus this
    /// is what `close` itself adds, net of creating and ending the guard.
    #[inline(never)]
    pub(super) fn custodian_into_inner_1rt(s: &State, n: u64) {
        s.rt.block_on(async {
            for _ in 0..n {
                black_box(AsyncGuard::into_inner(AsyncGuard::new(black_box(1), ready)));
            }
        });
    }

    async fn batched(n: u64, mut each: impl FnMut()) {
        for i in 0..n {
            each();
            if i % BATCH == BATCH - 1 {
                tokio::task::yield_now().await;
            }
        }
        tokio::task::yield_now().await;
    }

    #[inline(never)]
    pub(super) fn tracker_spawn(s: &State, n: u64) {
        let tracker = TaskTracker::new();
        s.rt.block_on(batched(n, || drop(tracker.spawn(ready(black_box(1))))));
    }

    /// `TaskTracker::spawn` plus the ledger ticket every custodian guard carries.
    #[inline(never)]
    pub(super) fn tracker_spawn_ticket(s: &State, n: u64) {
        let tracker = TaskTracker::new();
        s.rt.block_on(batched(n, || {
            let ticket = Ticket::new(&BENCH);
            drop(tracker.spawn(async move {
                let r = ready(black_box(1)).await;
                drop(ticket);
                r
            }));
        }));
    }

    #[inline(never)]
    pub(super) fn custodian_dropped(s: &State, n: u64) {
        s.rt.block_on(batched(n, || drop(AsyncGuard::new(black_box(1), ready))));
    }

    async fn ready(n: u64) -> std::io::Result<()> {
        black_box(n);
        Ok(())
    }

    #[inline(never)]
    pub(super) fn direct(s: &State) {
        s.rt.block_on(async { ready(black_box(1)).await.unwrap() });
    }

    #[inline(never)]
    pub(super) fn custodian_close(s: &State) {
        s.rt.block_on(async {
            AsyncGuard::close(AsyncGuard::new(black_box(1), ready))
                .await
                .unwrap()
        });
    }
}

/// `LockFile` acquire + release and `UnixListenerGuard` bind + drop against the same
/// system calls made by hand through std (callgrind counts user-space instructions only,
/// so this is what each side adds on top of the kernel's work). Files live in a
/// directory of their own under `/dev/shm` when it exists (tmpfs), else the temp dir.
#[cfg(unix)]
mod os {
    use super::State;
    use std::fs::{self, OpenOptions};
    use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
    use std::os::unix::net::UnixListener;

    /// The by-hand lock: what `LockFile::acquire` + `close` do for an absent file
    /// (`open(O_CREAT|O_EXCL|O_NOFOLLOW)`, `flock`, `fstat`, `lstat` of the path, `pwrite`
    /// of the pid; then `pread` of the record, `lstat`, `unlink`, `flock(LOCK_UN)`,
    /// `close`), with the same checks.
    #[inline(never)]
    pub(super) fn lock_by_hand(s: &State) {
        let path = &s.lock_path;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc_o_nofollow())
            .open(path)
            .unwrap();
        file.lock().unwrap();
        let meta = file.metadata().unwrap();
        let now = fs::symlink_metadata(path).unwrap();
        assert!(meta.ino() == now.ino() && meta.dev() == now.dev() && meta.is_file());
        let pid = std::process::id();
        let mut buf = [0u8; 16];
        let mut n = 0;
        let mut p = pid;
        let mut digits = [0u8; 10];
        loop {
            digits[n] = b'0' + (p % 10) as u8;
            n += 1;
            p /= 10;
            if p == 0 {
                break;
            }
        }
        for i in 0..n {
            buf[i] = digits[n - 1 - i];
        }
        buf[n] = b'\n';
        file.write_all_at(&buf[..=n], 0).unwrap();
        // Release: our record still there, the path still ours: unlink, unlock, close.
        let mut rec = [0u8; 33];
        let got = file.read_at(&mut rec, 0).unwrap();
        assert_eq!(&rec[..got], &buf[..=n]);
        let now = fs::symlink_metadata(path).unwrap();
        assert!(meta.ino() == now.ino() && meta.dev() == now.dev());
        fs::remove_file(path).unwrap();
        file.unlock().unwrap();
        drop(file);
    }

    /// The floor under both lock rows: the by-hand lock's system calls and checks with
    /// nothing around them, through rustix on a path made NUL-terminated at setup (not
    /// counted). `fstat` and `newfstatat` where std uses `statx`, as `LockFile` does.
    #[inline(never)]
    pub(super) fn lock_floor(s: &State) {
        use rustix::fs::{AtFlags, CWD, FileType, FlockOperation, Mode, OFlags};
        let path = s.lock_c_path.as_c_str();
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
        let mode = Mode::from_raw_mode(0o644);
        let fd = rustix::fs::openat(CWD, path, flags | OFlags::CLOEXEC, mode).unwrap();
        rustix::fs::flock(&fd, FlockOperation::LockExclusive).unwrap();
        let meta = rustix::fs::fstat(&fd).unwrap();
        let now = rustix::fs::statat(CWD, path, AtFlags::SYMLINK_NOFOLLOW).unwrap();
        let is_file = FileType::from_raw_mode(meta.st_mode) == FileType::RegularFile;
        assert!(meta.st_ino == now.st_ino && meta.st_dev == now.st_dev && is_file);
        let mut buf = [0u8; 16];
        let mut start = buf.len() - 1;
        buf[start] = b'\n';
        let mut p = std::process::id();
        loop {
            start -= 1;
            buf[start] = b'0' + (p % 10) as u8;
            p /= 10;
            if p == 0 {
                break;
            }
        }
        let record = &buf[start..];
        assert_eq!(rustix::io::pwrite(&fd, record, 0).unwrap(), record.len());
        let mut rec = [0u8; 33];
        let got = rustix::io::pread(&fd, &mut rec, 0).unwrap();
        assert_eq!(&rec[..got], record);
        let now = rustix::fs::statat(CWD, path, AtFlags::SYMLINK_NOFOLLOW).unwrap();
        assert!(meta.st_ino == now.st_ino && meta.st_dev == now.st_dev);
        rustix::fs::unlinkat(CWD, path, AtFlags::empty()).unwrap();
        rustix::fs::flock(&fd, FlockOperation::Unlock).unwrap();
        drop(fd);
    }

    fn libc_o_nofollow() -> i32 {
        0o400000 // O_NOFOLLOW on Linux
    }

    #[inline(never)]
    pub(super) fn lock_custodian(s: &State) {
        custodian::fs::LockFile::acquire(&s.lock_path)
            .unwrap()
            .close()
            .unwrap();
    }

    /// The by-hand listener: bind (socket, bind, listen), `stat` the new socket, then
    /// on release `stat` the path again, compare, `unlink`, close.
    #[inline(never)]
    pub(super) fn unix_listener_by_hand(s: &State) {
        let path = &s.socket_path;
        let listener = UnixListener::bind(path).unwrap();
        let meta = fs::symlink_metadata(path).unwrap();
        let now = fs::symlink_metadata(path).unwrap();
        if meta.ino() == now.ino() && meta.dev() == now.dev() {
            fs::remove_file(path).unwrap();
        }
        drop(listener);
    }

    #[inline(never)]
    pub(super) fn unix_listener_custodian(s: &State) {
        drop(custodian::net::UnixListenerGuard::bind(&s.socket_path).unwrap());
    }

    /// The floor under both listener rows: std's bind (as both do), then the two
    /// `newfstatat`s and the `unlinkat` through rustix on a path made NUL-terminated at
    /// setup (not counted).
    #[inline(never)]
    pub(super) fn unix_listener_floor(s: &State) {
        use rustix::fs::{AtFlags, CWD};
        let path = s.socket_c_path.as_c_str();
        let listener = UnixListener::bind(&s.socket_path).unwrap();
        let meta = rustix::fs::statat(CWD, path, AtFlags::SYMLINK_NOFOLLOW).unwrap();
        let now = rustix::fs::statat(CWD, path, AtFlags::SYMLINK_NOFOLLOW).unwrap();
        if meta.st_ino == now.st_ino && meta.st_dev == now.st_dev {
            rustix::fs::unlinkat(CWD, path, AtFlags::empty()).unwrap();
        }
        drop(listener);
    }
}

#[inline(never)]
fn hand_written(s: &State) {
    let _g = HandWritten(black_box(&s.n));
}

#[inline(never)]
fn scopeguard_defer(s: &State) {
    let n = black_box(&s.n);
    scopeguard::defer! { n.set(black_box(n.get() + 1)); }
}

#[inline(never)]
fn scope_1(s: &State) {
    let n = black_box(&s.n);
    let r: Result<(), custodian::ScopeError<()>> = custodian::scope(|sc| {
        sc.defer(|| n.set(black_box(n.get() + 1)));
        Ok(())
    });
    black_box(r).ok();
}

/// The same, with the cleanup registered by a function the compiler does not inline: it
/// can no longer follow the cleanup from registration to run, so this is the cost of the
/// general path (a body that hands the scope to other functions).
#[inline(never)]
fn scope_1_opaque(s: &State) {
    #[inline(never)]
    fn register<'a>(sc: &custodian::Scope<'a, ()>, n: &'a Cell<u64>) {
        sc.defer(|| n.set(black_box(n.get() + 1)));
    }
    let n = black_box(&s.n);
    let r: Result<(), custodian::ScopeError<()>> = custodian::scope(|sc| {
        black_box(register)(sc, n);
        Ok(())
    });
    black_box(r).ok();
}

#[inline(never)]
fn scope_8(s: &State) {
    let n = black_box(&s.n);
    let r: Result<(), custodian::ScopeError<()>> = custodian::scope(|sc| {
        for _ in 0..4 {
            sc.defer(|| n.set(black_box(n.get() + 1)));
            sc.on_err(|_| n.set(0));
        }
        Ok(())
    });
    black_box(r).ok();
}

#[inline(never)]
fn stack8_vec(s: &State) {
    let mut v: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
    for _ in 0..8 {
        let c = Arc::clone(&s.counter);
        v.push(Box::new(move || {
            c.fetch_add(1, Ordering::Relaxed);
        }));
    }
    while let Some(f) = v.pop() {
        f();
    }
}

#[inline(never)]
fn stack8_close(s: &State) {
    let mut stack = CleanupStack::new();
    for _ in 0..8 {
        let c = Arc::clone(&s.counter);
        stack.defer(move || {
            c.fetch_add(1, Ordering::Relaxed);
        });
    }
    black_box(stack.close()).ok();
}

#[inline(never)]
fn stack8_drop(s: &State) {
    let mut stack = CleanupStack::new();
    for _ in 0..8 {
        let c = Arc::clone(&s.counter);
        stack.defer(move || {
            c.fetch_add(1, Ordering::Relaxed);
        });
    }
    drop(black_box(stack));
}

#[inline(never)]
fn ticket_nothing(_: &State) {
    black_box(&BENCH);
}

#[inline(never)]
fn ticket(_: &State) {
    drop(Ticket::new(black_box(&BENCH)));
}

fn smoke(state: &State) {
    for (_, body) in SCENARIOS {
        body.run(state, 1);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    ledger::track_sites(false); // the release-build default
    #[cfg(unix)]
    let dir = {
        let shm = std::path::Path::new("/dev/shm");
        if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("a scratch directory")
    };
    #[cfg(unix)]
    let c_path = |path: &std::path::Path| {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL in a temp path")
    };
    let state = State {
        n: Cell::new(0),
        #[cfg(unix)]
        lock_path: dir.path().join("bench.lock"),
        #[cfg(unix)]
        socket_path: dir.path().join("bench.sock"),
        #[cfg(unix)]
        lock_c_path: c_path(&dir.path().join("bench.lock")),
        #[cfg(unix)]
        socket_c_path: c_path(&dir.path().join("bench.sock")),
        #[cfg(unix)]
        _dir: dir,
        counter: Arc::new(AtomicU64::new(0)),
        #[cfg(feature = "tokio")]
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime"),
    };
    match args.first().map(String::as_str) {
        // `cargo bench` passes `--bench` (and any criterion options given to a run of
        // every bench): a smoke run.
        None => smoke(&state),
        Some(flag) if flag.starts_with('-') => smoke(&state),
        Some("list") => {
            for (name, _) in SCENARIOS {
                println!("{name}");
            }
        }
        Some(name) => {
            let Some(&(_, body)) = SCENARIOS.iter().find(|(n, _)| *n == name) else {
                eprintln!("unknown scenario {name}; `list` prints them");
                std::process::exit(2);
            };
            let iterations: u64 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(1);
            // Setup, done in the N = 0 run as well, so it cancels out.
            let mut held = Vec::new();
            if name.starts_with("ticket-sites") {
                ledger::track_sites(true);
            }
            if name == "ticket-sites-100k" {
                held.extend((0..100_000).map(|_| Ticket::new(&BENCH)));
            }
            let go = || {
                // Warm up once so that one-time work (registering the kind and the
                // thread's counters) is counted in the N = 0 run as well.
                body.run(&state, 1);
                body.run(&state, iterations);
            };
            if name == "ticket-filtered-subscriber" {
                let filtered = tracing_subscriber::fmt()
                    .with_env_filter("custodian=off,info")
                    .with_writer(std::io::sink)
                    .finish();
                tracing::subscriber::with_default(filtered, go);
            } else {
                go();
            }
            drop(black_box(held));
        }
    }
    black_box(state.n.get());
}
