//! Fault injection: what the docs promise still holds on bad input, a full disk, exhausted
//! file descriptors, a cleanup error whose `Display` panics, a subscriber that panics, and
//! guards dropped in thread-local destructors. Nothing is lost and nothing aborts.
//!
//! Cases that install a global subscriber, lower a resource limit or could abort run in a
//! child process (this binary, re-invoked for one `#[ignore]`d role). A case that cannot
//! run here (no `unshare`, no tmpfs mount) prints `SKIPPED: reason`; with
//! `CUSTODIAN_REQUIRE_FAULTS` set, as `.ci/run` does, a skip fails the test instead.
#![cfg(target_os = "linux")] // /dev/full, /proc, unshare(1), EMFILE numbers

mod common;

use std::fmt;
use std::fs;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use custodian::fs::{AtomicFile, CheckedFile, LockFile};

use common::{capture, child_role, errors};

// ---------------------------------------------------------------------------------------
// Running the child roles

/// Set in a child process, so that its role runs instead of returning at once.
const CHILD: &str = "CUSTODIAN_FAULTS_CHILD";
/// What a child role prints once every check in it passed.
const DONE: &str = "FAULT CASE DONE";

/// Runs `role` in a child process and checks that it ran to its end and exited 0 (an
/// abort or a panic shows as a failure with the child's output).
fn run_role(mut cmd: Command) -> Output {
    let output = cmd.env(CHILD, "1").output().expect("run the child role");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains(DONE),
        "child role failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    output
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Says why a case did not run; fails it where every case must run (CI).
fn skipped(reason: &str) {
    if std::env::var_os("CUSTODIAN_REQUIRE_FAULTS").is_some() {
        panic!("this fault case must run here but was skipped: {reason}");
    }
    println!("SKIPPED: {reason}");
}

fn is_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// An error whose `Display` and `Debug` panic.
struct PanickyDisplay;

impl fmt::Display for PanickyDisplay {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        panic!("Display of PanickyDisplay")
    }
}

impl fmt::Debug for PanickyDisplay {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        panic!("Debug of PanickyDisplay")
    }
}

impl std::error::Error for PanickyDisplay {}

fn fmt_subscriber() {
    tracing_subscriber::fmt()
        .with_env_filter("custodian=trace")
        .with_writer(std::io::stderr)
        .init();
}

// ---------------------------------------------------------------------------------------
// LockFile never destroys what it did not create

#[test]
fn lock_file_leaves_a_foreign_file_byte_for_byte_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let long_digits = vec![b'7'; 100_000];
    let foreign: [(&str, &[u8]); 6] = [
        ("app.toml", b"precious = true\n"),
        ("binary", &[0, 1, 2, 0xff, b'\n']),
        ("pid-and-more", b"1234\nlisten = 80\n"),
        ("two-numbers", b"12 34\n"),
        ("newline-only", b"\n"),
        ("long-digits", &long_digits),
    ];
    let shared = LockFile::builder().shared(true);
    let keep = LockFile::builder().remove_on_release(false);
    for (name, content) in foreign {
        let path = dir.path().join(name);
        fs::write(&path, content).unwrap();
        let attempts: [(&str, io::Result<LockFile>); 5] = [
            ("acquire", LockFile::acquire(&path)),
            ("try_acquire", try_acquire(&path)),
            (
                "acquire_timeout",
                LockFile::acquire_timeout(&path, std::time::Duration::from_millis(10)),
            ),
            ("shared", shared.acquire(&path)),
            ("remove_on_release(false)", keep.acquire(&path)),
        ];
        for (how, attempt) in attempts {
            let err = attempt.expect_err(&format!("{how} on {name} must be refused"));

            assert_eq!(
                err.kind(),
                io::ErrorKind::AlreadyExists,
                "{how} {name}: {err}"
            );
            let text = err.to_string();
            assert!(
                text.contains(&path.display().to_string())
                    && text.contains("is not a lock file")
                    && text.contains("left untouched"),
                "{how} {name}: {text}"
            );
            assert_eq!(fs::read(&path).unwrap(), content, "{how} changed {name}");
        }
    }
}

/// `try_acquire`, retried while it finds the lock held: a child process spawned by a
/// parallel test holds a copy of every descriptor between its fork and its exec, so a
/// lock we just dropped can look held for that long.
fn try_acquire(path: &Path) -> io::Result<LockFile> {
    for _ in 0..1000 {
        if let Ok(lock) = LockFile::try_acquire(path)? {
            return Ok(lock);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("{} stayed locked", path.display())
}

#[test]
fn lock_file_refuses_what_is_not_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let err = LockFile::acquire(&fifo).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
    assert!(err.to_string().contains("not a regular file"), "{err}");
    assert!(
        fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo_like()
    );
    // Reading who holds it does not wait for a writer on the FIFO either.
    let (tx, rx) = std::sync::mpsc::channel();
    let path = fifo.clone();
    std::thread::spawn(move || tx.send(LockFile::owner_pid(&path).ok().flatten()));
    let owner = rx.recv_timeout(std::time::Duration::from_secs(10));
    assert_eq!(owner, Ok(None), "owner_pid on a FIFO must return at once");

    let subdir = dir.path().join("subdir");
    fs::create_dir(&subdir).unwrap();
    fs::write(subdir.join("inside"), "kept").unwrap();
    let err = LockFile::acquire(&subdir).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
    assert!(
        err.to_string().contains(&subdir.display().to_string()),
        "{err}"
    );
    assert_eq!(fs::read_to_string(subdir.join("inside")).unwrap(), "kept");
}

/// `is_fifo` without a Unix-only import at each use.
trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_fifo()
    }
}

#[test]
fn lock_file_takes_over_empty_files_and_stale_records() {
    let dir = tempfile::tempdir().unwrap();
    // A pid that is certainly gone: a child that exited and was reaped.
    let mut gone = Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let ours = format!("{}\n", std::process::id());
    for (name, content) in [
        ("empty", String::new()),
        ("stale", format!("{gone_pid}\n")),
        ("stale-no-newline", format!("{gone_pid}")),
        // A record of this very process, left by a lock given away with `into_inner`.
        ("ours", ours.clone()),
    ] {
        let path = dir.path().join(name);
        fs::write(&path, &content).unwrap();
        let lock = LockFile::acquire(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(fs::read_to_string(&path).unwrap(), ours, "{name}");
        lock.close().unwrap();
        assert!(
            !path.exists(),
            "{name}: our lock file is removed on release"
        );
    }
}

/// A child that runs until killed; killed and reaped when dropped.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn lock_file_leaves_the_pid_file_of_a_running_program_alone() {
    // A daemon that writes its pid file without `flock`: running, started before its
    // record was written, and not holding the lock. Taking the file over would overwrite
    // its pid, then delete the file on release.
    let dir = tempfile::tempdir().unwrap();
    let daemon = Running(Command::new("sleep").arg("60").spawn().unwrap());
    let pid = daemon.0.id();
    let path = dir.path().join("daemon.pid");
    let record = format!("{pid}\n");
    fs::write(&path, &record).unwrap();
    let shared = || LockFile::builder().shared(true).acquire(&path);
    let timeout = || LockFile::acquire_timeout(&path, std::time::Duration::from_secs(1));
    let exclusive = || LockFile::acquire(&path);
    let try_now = || LockFile::try_acquire(&path)?.map_err(io::Error::from);
    for (how, result) in [
        ("acquire", exclusive()),
        ("try_acquire", try_now()),
        ("acquire_timeout", timeout()),
        ("shared acquire", shared()),
    ] {
        let err = result.expect_err(how);
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{how}: {err}");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{how}: {text}");
        assert!(text.contains(&format!("pid {pid}")), "{how}: {text}");
        assert!(text.contains("left untouched"), "{how}: {text}");
        assert_eq!(fs::read_to_string(&path).unwrap(), record, "{how}");
    }
}

#[test]
fn lock_file_takes_over_records_whose_pid_names_another_process_now() {
    use std::time::{Duration, SystemTime};
    let dir = tempfile::tempdir().unwrap();
    let uptime: f64 = fs::read_to_string("/proc/uptime")
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let uptime = Duration::from_secs_f64(uptime);
    let dated = |path: &Path, when: SystemTime| {
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(when)
            .unwrap();
    };
    // A running process, and two records of its pid that it cannot have written:
    let reused = Running(Command::new("sleep").arg("60").spawn().unwrap());
    for (name, age) in [
        // written after this boot but well before the process started: the writer died
        // and its pid was reused (past the judgement's two-second margin, within uptime);
        ("reused.pid", (uptime / 2).min(Duration::from_secs(3600))),
        // written before this boot: its writer died with the last one.
        ("last-boot.pid", uptime + Duration::from_secs(3600)),
    ] {
        assert!(age > Duration::from_secs(4), "uptime too short: {uptime:?}");
        let path = dir.path().join(name);
        fs::write(&path, format!("{}\n", reused.0.id())).unwrap();
        dated(&path, SystemTime::now() - age);
        let lock = LockFile::acquire(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            LockFile::owner_pid(&path).unwrap(),
            Some(std::process::id())
        );
        lock.close().unwrap();
        assert!(!path.exists());
    }

    // A zombie: the process exited and only waits to be reaped; it writes nothing.
    let mut zombie = Command::new("true").spawn().unwrap();
    let pid = zombie.id();
    let stat = format!("/proc/{pid}/stat");
    let state = || {
        let s = fs::read_to_string(&stat).unwrap();
        s[s.rfind(')').unwrap() + 2..].chars().next().unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while state() != 'Z' {
        assert!(std::time::Instant::now() < deadline, "{pid} never exited");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let path = dir.path().join("zombie.pid");
    fs::write(&path, format!("{pid}\n")).unwrap();
    let lock = LockFile::acquire(&path).unwrap();
    assert_eq!(
        LockFile::owner_pid(&path).unwrap(),
        Some(std::process::id())
    );
    lock.close().unwrap();
    zombie.wait().unwrap();
}

#[test]
fn a_shared_lock_empties_a_stale_exclusive_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.lock");
    // A record left by an exclusive holder that is gone.
    let mut gone = Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    fs::write(&path, format!("{gone_pid}\n")).unwrap();
    let reader = LockFile::builder().shared(true).acquire(&path).unwrap();
    assert_eq!(
        LockFile::owner_pid(&path).unwrap(),
        None,
        "no stale holder named"
    );
    let held = LockFile::try_acquire(&path).unwrap().unwrap_err();
    assert_eq!(held.pid(), None);
    drop(reader);
}

#[test]
fn lock_file_release_leaves_a_file_rewritten_while_held() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    for keep in [false, true] {
        let path = dir.path().join(format!("rewritten-{keep}"));
        let lock = LockFile::builder()
            .remove_on_release(!keep)
            .acquire(&path)
            .unwrap();
        lock.as_file()
            .write_all_at(b"someone's data, not a pid\n", 0)
            .unwrap();
        lock.close().unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "someone's data, not a pid\n",
            "release touched a file that no longer holds our record (keep={keep})"
        );
    }
}

// ---------------------------------------------------------------------------------------
// A failed write poisons the commit

#[test]
fn atomic_file_failed_seek_poisons_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("state.bin");
    let old = vec![b'o'; 64 * 1024];
    fs::write(&target, &old).unwrap();

    let mut file = AtomicFile::create(&target).unwrap();
    file.write_all(&[b'n'; 8 * 1024]).unwrap();
    let seek = file.seek(SeekFrom::Current(-1_000_000)).unwrap_err();
    assert_eq!(seek.kind(), io::ErrorKind::InvalidInput);
    file.write_all(b"the rest, written at an unknown place")
        .unwrap();
    let err = file.commit().unwrap_err();
    assert_eq!(err.error().kind(), io::ErrorKind::InvalidInput, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("an earlier write") && text.contains(&target.display().to_string()),
        "{text}"
    );
    assert_eq!(
        fs::read(&target).unwrap(),
        old,
        "nothing half-done is published"
    );

    // Committing the file given back fails the same way; dropping it removes the temp file.
    let file = err.into_guard().expect("the file comes back");
    let err = file.commit().unwrap_err();
    assert!(err.to_string().contains("an earlier write"), "{err}");
    drop(err);
    assert_eq!(listing(dir.path()), ["state.bin"]);

    // `reset` starts over.
    let mut file = AtomicFile::create(&target).unwrap();
    file.write_all(b"draft").unwrap();
    assert!(file.seek(SeekFrom::Current(-1_000_000)).is_err());
    file.reset().unwrap();
    file.write_all(b"final").unwrap();
    file.commit().unwrap();
    assert_eq!(fs::read(&target).unwrap(), b"final");
}

#[test]
fn checked_file_close_after_a_failed_write_reports_it() {
    let mut file = CheckedFile::create("/dev/full").unwrap();
    // Bigger than the buffer: written through at once, and refused.
    let err = file.write_all(&[0; 64 * 1024]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::StorageFull);
    let err = file
        .close()
        .expect_err("close must not report a complete file");
    assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err}");
    assert!(
        err.to_string()
            .contains("an earlier write to /dev/full failed"),
        "{err}"
    );

    // The escape hatch does not pass the incomplete file off as complete either.
    let mut file = CheckedFile::create("/dev/full").unwrap();
    assert!(file.write_all(&[0; 64 * 1024]).is_err());
    let err = CheckedFile::into_inner(file).expect_err("into_inner after a failed write");
    assert!(err.to_string().contains("an earlier write"), "{err}");
    drop(err.into_guard());

    // Dropped instead of closed: the same failure is reported and counted.
    let before = custodian::ledger::snapshot();
    let ((), events) = capture(|| {
        let mut file = CheckedFile::create("/dev/full").unwrap();
        assert!(file.write_all(&[0; 64 * 1024]).is_err());
        drop(file);
    });
    common::assert_one_failure(
        &events,
        "custodian::fs::CheckedFile",
        "/dev/full",
        Some("an earlier write"),
    );
    common::assert_failure_counted(&before, "custodian::fs::CheckedFile");
}

// ---------------------------------------------------------------------------------------
// A full disk: a small tmpfs in a private mount namespace

/// Runs `role` with a 256 KiB tmpfs mounted at a fresh directory (its path in
/// `CUSTODIAN_FAULTS_MNT`); `None` when no such mount can be made here.
fn in_small_tmpfs(role: &str) -> Option<Output> {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let script = r#"mount -t tmpfs -o size=256k custodian-faults "$1" || exit 97
        shift
        exec "$@""#;
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ])
    .arg(&mnt);
    let inner = child_role(role);
    cmd.arg(inner.get_program()).args(inner.get_args());
    cmd.env("CUSTODIAN_FAULTS_MNT", &mnt).env(CHILD, "1");
    let output = match cmd.output() {
        Ok(output) => output,
        Err(e) => {
            skipped(&format!("cannot run unshare(1): {e}"));
            return None;
        }
    };
    match output.status.code() {
        Some(0) | Some(101) => Some(output),
        _ => {
            skipped(&format!(
                "cannot mount a small tmpfs in a private mount namespace ({}): {}",
                output.status,
                stderr_of(&output)
            ));
            None
        }
    }
}

#[test]
fn full_disk_loses_nothing() {
    let Some(output) = in_small_tmpfs("child_full_disk") else {
        return;
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains(DONE),
        "{}\n{stdout}\n{}",
        output.status,
        stderr_of(&output)
    );
}

/// Fills the file system at `mnt` with 4 KiB files; returns them, in creation order.
fn fill(mnt: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for i in 0.. {
        let path = mnt.join(format!("filler-{i}"));
        match fs::write(&path, [0xAB_u8; 4096]) {
            Ok(()) => files.push(path),
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
                let _ = fs::remove_file(&path);
                return files;
            }
        }
    }
    unreachable!()
}

#[test]
#[ignore = "child role of full_disk_loses_nothing"]
fn child_full_disk() {
    if !is_child() {
        return;
    }
    let mnt = PathBuf::from(std::env::var_os("CUSTODIAN_FAULTS_MNT").unwrap());
    let target = mnt.join("state.bin");
    let old = vec![b'o'; 64 * 1024];
    fs::write(&target, &old).unwrap();
    let mut fillers = fill(&mnt);

    // 1. A write that fails after a prefix was staged: 8 KiB free, 64 KiB written.
    fs::remove_file(fillers.pop().unwrap()).unwrap();
    fs::remove_file(fillers.pop().unwrap()).unwrap();
    let mut file = AtomicFile::create(&target).unwrap();
    let err = file.write_all(&[b'n'; 64 * 1024]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::StorageFull);
    let err = file
        .commit()
        .expect_err("a partial content must not be published");
    assert_eq!(err.error().kind(), io::ErrorKind::StorageFull, "{err}");
    assert!(err.to_string().contains("an earlier write"), "{err}");
    drop(err);
    assert_eq!(
        fs::read(&target).unwrap(),
        old,
        "the old content stays whole"
    );
    assert!(
        !listing(&mnt).iter().any(|n| n.starts_with(".state.bin.")),
        "the temp file is removed: {:?}",
        listing(&mnt)
    );

    // 2. A failed flush keeps the data: the commit succeeds once space is freed.
    let more = fill(&mnt);
    let mut file = AtomicFile::create(&target).unwrap();
    file.write_all(&[b'f'; 6000]).unwrap(); // buffered
    assert_eq!(file.flush().unwrap_err().kind(), io::ErrorKind::StorageFull);
    let err = file.commit().unwrap_err();
    assert_eq!(err.error().kind(), io::ErrorKind::StorageFull);
    assert_eq!(fs::read(&target).unwrap(), old);
    let file = err.into_guard().expect("the data is still buffered");
    for path in &more {
        fs::remove_file(path).unwrap();
    }
    file.commit().unwrap();
    assert_eq!(fs::read(&target).unwrap(), vec![b'f'; 6000]);
    let _more = fill(&mnt);

    // 3. CheckedFile: close reports the failed write, not success.
    fs::remove_file(fillers.pop().unwrap()).unwrap();
    let log = mnt.join("app.log");
    let mut checked = CheckedFile::create(&log).unwrap();
    assert!(checked.write_all(&[b'l'; 64 * 1024]).is_err());
    let err = checked.close().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err}");
    fs::remove_file(&log).unwrap();
    let _refill = fill(&mnt);

    // 4. LockFile: the pid cannot be written; no empty lock file is left behind.
    let lock_path = mnt.join("app.pid");
    let err = LockFile::acquire(&lock_path).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err}");
    assert!(err.to_string().contains("app.pid"), "{err}");
    assert!(!lock_path.exists(), "acquire left the file it created");

    println!("{DONE}");
}

// ---------------------------------------------------------------------------------------
// Exhausted file descriptors (EMFILE)

const EMFILE: i32 = 24;

/// Whether `err` is EMFILE: its kind kept (`ErrorKind` has no variant of its own for it)
/// and the OS message in its text, which names what it concerns in front.
fn is_emfile(err: &io::Error) -> bool {
    let emfile = io::Error::from_raw_os_error(EMFILE);
    err.kind() == emfile.kind() && err.to_string().contains(&emfile.to_string())
}

#[test]
fn exhausted_descriptors_fail_cleanly_and_release_what_was_held() {
    run_role(child_role("child_emfile"));
}

#[test]
#[ignore = "child role of exhausted_descriptors_fail_cleanly_and_release_what_was_held"]
fn child_emfile() {
    use custodian::fs::{TempDir, TempFile};
    use custodian::net::UnixListenerGuard;
    use custodian::process::ChildGuard;
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

    if !is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    #[cfg(feature = "tokio")]
    let rt = common::current_thread();

    // Held before the descriptors run out.
    let lock = LockFile::acquire(d.join("held.lock")).unwrap();
    let mut atomic = AtomicFile::create(d.join("held.txt")).unwrap();
    atomic.write_all(b"staged").unwrap();
    let mut checked = CheckedFile::create(d.join("held.log")).unwrap();
    checked.write_all(b"logged").unwrap();
    let temp_dir = TempDir::new_in(d).unwrap();
    let temp_dir_path = temp_dir.path().to_path_buf();
    let listener = UnixListenerGuard::bind(d.join("held.sock")).unwrap();
    let child = ChildGuard::spawn({
        let mut c = Command::new("sleep");
        c.arg("30");
        c
    })
    .unwrap();
    let child_pid = child.id();

    // Run out: a low limit, filled with /dev/null.
    let open_now = fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    let limit = open_now + 16;
    let old = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(limit),
            maximum: old.maximum,
        },
    )
    .unwrap();
    let mut fillers = Vec::new();
    loop {
        match fs::File::open("/dev/null") {
            Ok(f) => fillers.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(EMFILE), "{e}");
                break;
            }
        }
    }

    // Every constructor fails with EMFILE, naming what it concerns, and leaves nothing.
    let check = |what: &str, result: io::Result<()>, names: Option<&Path>| {
        let err = result.expect_err(what);
        assert!(is_emfile(&err), "{what}: {err:?}");
        if let Some(path) = names {
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{what}: {err}"
            );
        }
    };
    check(
        "LockFile::acquire",
        LockFile::acquire(d.join("new.lock")).map(drop),
        Some(&d.join("new.lock")),
    );
    check(
        "AtomicFile::create",
        AtomicFile::create(d.join("new.txt")).map(drop),
        Some(d),
    );
    check(
        "CheckedFile::create",
        CheckedFile::create(d.join("new.log")).map(drop),
        Some(&d.join("new.log")),
    );
    check(
        "AtomicFile::create, named temp file",
        AtomicFile::builder()
            .named_temp_file(true)
            .create(d.join("named.txt"))
            .map(drop),
        Some(d),
    );
    check("TempFile::new_in", TempFile::new_in(d).map(drop), None);
    // `mkdir` needs no descriptor, but removing the directory again does (to read it):
    // the failed close gives the guard back, to close once descriptors are free.
    let starved = TempDir::new_in(d).unwrap();
    let starved_path = starved.path().to_path_buf();
    let err = starved.close().unwrap_err();
    assert!(is_emfile(err.error()), "TempDir::close: {err:?}");
    assert!(
        err.to_string()
            .contains(&starved_path.display().to_string()),
        "{err}"
    );
    let starved = err.into_guard();
    check(
        "UnixListenerGuard::bind",
        UnixListenerGuard::bind(d.join("new.sock")).map(drop),
        Some(&d.join("new.sock")),
    );
    // std spawns with posix_spawn, which may need no new descriptor: the spawn may work
    // (then the dropped guard reaps the child), or fail with EMFILE naming the program.
    if let Err(e) = ChildGuard::spawn(Command::new("true")) {
        check("ChildGuard::spawn", Err(e), Some(Path::new("true")));
    }
    #[cfg(feature = "tokio")]
    {
        let _enter = rt.enter();
        check(
            "AsyncUnixListenerGuard::bind",
            custodian::net::AsyncUnixListenerGuard::bind(d.join("new-async.sock")).map(drop),
            Some(&d.join("new-async.sock")),
        );
        let spawned =
            custodian::process::AsyncChildGuard::spawn(tokio::process::Command::new("true"));
        match spawned {
            Ok(child) => drop(rt.block_on(child.close()).unwrap()),
            Err(e) => check("AsyncChildGuard::spawn", Err(e), Some(Path::new("true"))),
        }
    }
    for name in ["new.lock", "new.log", "new.sock", "new-async.sock"] {
        assert!(
            fs::symlink_metadata(d.join(name)).is_err(),
            "a failed constructor left {name} behind"
        );
    }

    // What was held is released with no descriptor to spare.
    lock.close().unwrap();
    drop(atomic);
    checked.close().unwrap();
    listener.close().unwrap();
    let status = child.close().unwrap();
    assert!(!status.success());
    assert!(
        !Path::new(&format!("/proc/{child_pid}")).exists(),
        "the child is reaped"
    );
    let removed = temp_dir.close();
    drop(fillers);
    removed.unwrap();
    assert!(!temp_dir_path.exists());
    starved.close().unwrap();
    assert!(!starved_path.exists());
    // Nor any temp file of the failed AtomicFile::create or TempFile::new_in.
    assert_eq!(listing(d), ["held.log"], "only the closed log file is left");
    assert_eq!(fs::read(d.join("held.log")).unwrap(), b"logged");
    println!("{DONE}");
}

// ---------------------------------------------------------------------------------------
// A cleanup error whose Display panics, during a panic, with a fmt subscriber

const PLACEHOLDER: &str = "<Display of the error panicked>";

#[test]
fn panicking_display_during_an_unwind_never_aborts() {
    let mut roles = vec![
        "child_display_scope",
        "child_display_stack",
        "child_display_rollback",
    ];
    if cfg!(feature = "tokio") {
        roles.push("child_display_async_guard");
    }
    for role in roles {
        let output = run_role(child_role(role));
        if role != "child_display_rollback" {
            assert!(
                stderr_of(&output).contains(PLACEHOLDER),
                "{role}: {}",
                stderr_of(&output)
            );
        }
    }
}

/// Runs `f`, which must panic with "the body panicked", and checks that it did.
fn expect_body_panic(f: impl FnOnce()) {
    let payload = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"the body panicked"));
}

#[test]
#[ignore = "child role of panicking_display_during_an_unwind_never_aborts"]
fn child_display_scope() {
    if !is_child() {
        return;
    }
    fmt_subscriber();
    let before = custodian::ledger::snapshot();
    expect_body_panic(|| {
        let _ = custodian::scope(|s| {
            s.defer_fallible(|| Err::<(), _>(PanickyDisplay));
            if true {
                panic!("the body panicked");
            }
            Ok::<(), io::Error>(())
        });
    });
    common::assert_failure_counted(&before, "custodian::scope");
    println!("{DONE}");
}

#[test]
#[ignore = "child role of panicking_display_during_an_unwind_never_aborts"]
fn child_display_stack() {
    if !is_child() {
        return;
    }
    fmt_subscriber();
    let before = custodian::ledger::snapshot();
    expect_body_panic(|| {
        let mut stack = custodian::CleanupStack::new();
        stack.defer_fallible(|| Err::<(), _>(PanickyDisplay));
        panic!("the body panicked");
    });
    common::assert_failure_counted(&before, "custodian::CleanupStack");
    println!("{DONE}");
}

#[test]
#[ignore = "child role of panicking_display_during_an_unwind_never_aborts"]
fn child_display_rollback() {
    if !is_child() {
        return;
    }
    fmt_subscriber();
    let before = custodian::ledger::snapshot();
    expect_body_panic(|| {
        let _undo = custodian::Rollback::new((), |()| std::panic::panic_any(PanickyDisplay));
        panic!("the body panicked");
    });
    common::assert_failure_counted(&before, "custodian::Rollback");
    println!("{DONE}");
}

#[cfg(feature = "tokio")]
#[test]
#[ignore = "child role of panicking_display_during_an_unwind_never_aborts"]
fn child_display_async_guard() {
    use custodian::rt::{AsyncGuard, Reaper};

    if !is_child() {
        return;
    }
    fmt_subscriber();
    let rt = common::current_thread();
    let reaper = {
        let _enter = rt.enter();
        Reaper::new()
    };
    let guard = AsyncGuard::with_reaper(&reaper, (), |()| async { Err::<(), _>(PanickyDisplay) });
    {
        let _enter = rt.enter();
        expect_body_panic(move || {
            let _guard = guard;
            panic!("the body panicked");
        });
    }
    let report = rt.block_on(reaper.shutdown(std::time::Duration::from_secs(5)));
    assert_eq!(report.failed(), 1, "{:?}", report.failures().len());
    println!("{DONE}");
}

// ---------------------------------------------------------------------------------------
// A subscriber that panics on every event

struct PanickingSubscriber;

impl tracing::Subscriber for PanickingSubscriber {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {
        panic!("this subscriber panics on every event");
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A `Display` that returns `Err` (without panicking): shown as such, and never turned
/// into a panic (which would run the user's panic hook from `Drop`).
struct FailingDisplay;

impl fmt::Display for FailingDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("half a message")?;
        Err(fmt::Error)
    }
}

#[test]
fn a_display_that_returns_err_is_shown_not_turned_into_a_panic() {
    static KIND: custodian::ledger::Kind = custodian::ledger::Kind::new("test::failing_display");
    let ((), events) = capture(|| {
        let ticket = custodian::ledger::Ticket::new(&KIND);
        ticket.failure(&"a resource", &FailingDisplay);
    });
    let errs = errors(&events);
    assert_eq!(errs.len(), 1, "{events:?}");
    assert_eq!(
        errs[0].field("error"),
        Some("half a message<Display of the error failed>")
    );
}

#[test]
fn a_subscriber_that_panics_loses_no_report() {
    let output = run_role(child_role("child_panicking_subscriber"));
    let stderr = stderr_of(&output);
    // Every failure still reaches stderr, with the error's text.
    for expected in [
        "custodian: cleanup failed kind=custodian::CleanupStack",
        "stack entry failed",
        "custodian: cleanup failed during a panic kind=custodian::scope",
        "scope entry failed",
        PLACEHOLDER,
    ] {
        assert!(stderr.contains(expected), "{expected:?} missing:\n{stderr}");
    }
}

#[test]
#[ignore = "child role of a_subscriber_that_panics_loses_no_report"]
fn child_panicking_subscriber() {
    if !is_child() {
        return;
    }
    tracing::subscriber::set_global_default(PanickingSubscriber).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let before = custodian::ledger::snapshot();

    // From Drop, not unwinding.
    let mut stack = custodian::CleanupStack::new();
    stack.defer_fallible(|| Err::<(), _>(io::Error::other("stack entry failed")));
    drop(stack);
    // From Drop, while unwinding.
    expect_body_panic(|| {
        let _ = custodian::scope(|s| {
            s.defer_fallible(|| Err::<(), _>(io::Error::other("scope entry failed")));
            s.defer_fallible(|| Err::<(), _>(PanickyDisplay));
            if true {
                panic!("the body panicked");
            }
            Ok::<(), io::Error>(())
        });
    });
    // Guards whose Drop emits events still release their resources.
    let lock_path = dir.path().join("app.pid");
    expect_body_panic(|| {
        let _lock = LockFile::acquire(&lock_path).unwrap();
        let mut staged = AtomicFile::create(dir.path().join("state")).unwrap();
        staged.write_all(b"never committed").unwrap();
        panic!("the body panicked");
    });
    assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
    let since = custodian::ledger::snapshot().since(&before);
    assert!(since.get("custodian::CleanupStack").failed >= 1);
    assert!(since.get("custodian::scope").failed >= 2);
    println!("{DONE}");
}

// ---------------------------------------------------------------------------------------
// Guards dropped in thread-local destructors

#[test]
fn guards_dropped_in_thread_local_destructors_release_their_resources() {
    run_role(child_role("child_thread_local_drops"));
}

#[test]
#[ignore = "child role of guards_dropped_in_thread_local_destructors_release_their_resources"]
fn child_thread_local_drops() {
    use std::cell::RefCell;

    use custodian::fs::TempDir;
    use custodian::net::UnixListenerGuard;
    use custodian::process::ChildGuard;

    thread_local! {
        static PARKED: RefCell<Vec<Box<dyn std::any::Any>>> = const { RefCell::new(Vec::new()) };
    }

    if !is_child() {
        return;
    }
    fmt_subscriber();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let before = custodian::ledger::snapshot();
    let (child_pid, temp_dir) = std::thread::spawn(move || {
        let lock = LockFile::acquire(d.join("app.pid")).unwrap();
        let mut staged = AtomicFile::create(d.join("state")).unwrap();
        staged.write_all(b"never committed").unwrap();
        let mut checked = CheckedFile::create(d.join("app.log")).unwrap();
        checked.write_all(b"flushed at thread exit").unwrap();
        let temp_dir = TempDir::new_in(&d).unwrap();
        let temp_path = temp_dir.path().to_path_buf();
        let listener = UnixListenerGuard::bind(d.join("app.sock")).unwrap();
        let child = ChildGuard::spawn({
            let mut c = Command::new("sleep");
            c.arg("30");
            c
        })
        .unwrap();
        let pid = child.id();
        let mut stack = custodian::CleanupStack::new();
        let marker = d.join("stack-ran");
        stack.defer_fallible(move || fs::write(marker, "yes"));
        PARKED.with(|p| {
            let mut p = p.borrow_mut();
            p.push(Box::new(lock));
            p.push(Box::new(staged));
            p.push(Box::new(checked));
            p.push(Box::new(temp_dir));
            p.push(Box::new(listener));
            p.push(Box::new(child));
            p.push(Box::new(stack));
        });
        // The fmt layer's thread-local buffer now exists, and is destroyed first.
        tracing::info!(target: "custodian", "parked");
        (pid, temp_path)
    })
    .join()
    .expect("thread exit must not panic");
    assert_eq!(listing(dir.path()), ["app.log", "stack-ran"]);
    assert_eq!(
        fs::read(dir.path().join("app.log")).unwrap(),
        b"flushed at thread exit"
    );
    assert!(!temp_dir.exists());
    assert!(!Path::new(&format!("/proc/{child_pid}")).exists(), "reaped");
    let since = custodian::ledger::snapshot().since(&before);
    assert_eq!(since.total().failed, 0, "{since:?}");
    println!("{DONE}");
}

// ---------------------------------------------------------------------------------------
// One failure, one report: a dropped GuardError of a child guard

#[test]
fn a_dropped_close_error_does_not_report_the_failure_again() {
    use custodian::process::ChildGuard;
    use rustix::process::{WaitOptions, waitpid};

    let ((), events) = capture(|| {
        let child = ChildGuard::spawn(Command::new("true")).unwrap();
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        // Reaped behind the guard's back: its stop must fail, once.
        waitpid(Some(pid), WaitOptions::empty()).unwrap();
        let err = child.close().unwrap_err();
        assert!(err.to_string().contains("reaped by someone else"), "{err}");
        drop(err);
    });
    assert!(errors(&events).is_empty(), "reported again: {events:?}");
}
