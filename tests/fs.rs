//! custodian::fs on real files, directories, processes and full disks: the happy paths,
//! the bad input (each error names the path and keeps its kind), and Drop's reports.
#![cfg(target_os = "linux")] // /dev/full, /dev/shm and unshare(1) for a full disk

mod common;

use std::fs::{self, Permissions};
use std::io::{self, BufRead, BufReader, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{assert_failure_counted, assert_one_failure, capture, errors};
use custodian::Close;
use custodian::fs::{AtomicFile, CheckedFile, LockFile, LockHeld, TempDir, TempFile};
use custodian::ledger;

// ---------------------------------------------------------------------------------------
// Helpers

/// Runs `f` on this thread without the capabilities that let root ignore permission bits
/// (capabilities are per thread on Linux), so that permission errors are real when the
/// suite runs as root. A no-op for an unprivileged user.
fn unprivileged<R>(f: impl FnOnce() -> R) -> R {
    use rustix::thread::{CapabilitySet, capabilities, set_capabilities};
    let before = capabilities(None).expect("capget");
    let mut lowered = before;
    lowered.effective.remove(
        CapabilitySet::DAC_OVERRIDE | CapabilitySet::DAC_READ_SEARCH | CapabilitySet::FOWNER,
    );
    set_capabilities(None, lowered).expect("capset");
    let _restore = custodian::guard((), move |()| {
        set_capabilities(None, before).expect("restoring capabilities");
    });
    f()
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Asserts that `err` names `path` and has `kind`.
#[track_caller]
fn assert_error(err: &io::Error, kind: io::ErrorKind, path: &Path) {
    assert_eq!(err.kind(), kind, "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "error does not name {}: {err}",
        path.display()
    );
}

/// Files in `dir` whose name starts with `prefix`.
fn files_starting_with(dir: &Path, prefix: &str) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Reads the child's stdout until a line equal to `marker`.
fn wait_for_line(child: &mut Child, marker: &str) {
    let out = child.stdout.as_mut().unwrap();
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).unwrap();
        assert!(n > 0, "child exited before printing {marker}");
        // libtest prints "test NAME ... " before the role's own output on the same line.
        if line.trim_end().ends_with(marker) {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// AtomicFile

/// Every name in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names = files_starting_with(dir, "");
    names.sort();
    names
}

#[test]
fn atomic_commit_replaces_and_readers_see_the_old_content_until_then() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.toml");
    fs::write(&path, "old").unwrap();
    let mut file = AtomicFile::create(&path).unwrap();
    file.write_all(b"new content").unwrap();
    file.flush().unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "old");
    if cfg!(target_os = "linux") {
        // Staged in an unnamed file: nothing new in the directory until the commit.
        assert_eq!(file.temp_path(), None);
        assert_eq!(names_in(dir.path()), ["app.toml"]);
    }
    file.commit().unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "new content");
    assert_eq!(names_in(dir.path()), ["app.toml"]);

    // The same with a named temp file, which is visible while staged.
    let mut file = AtomicFile::builder()
        .named_temp_file(true)
        .create(&path)
        .unwrap();
    file.write_all(b"newer").unwrap();
    file.flush().unwrap();
    let temp = file.temp_path().unwrap().to_path_buf();
    assert_eq!(temp.parent(), Some(dir.path()));
    assert!(
        temp.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(".app.toml.")
    );
    assert_eq!(fs::read(&temp).unwrap(), b"newer");
    assert_eq!(fs::read_to_string(&path).unwrap(), "new content");
    file.commit().unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "newer");
    assert!(!temp.exists());
    assert_eq!(names_in(dir.path()), ["app.toml"]);
}

/// The target's directory is opened once, at `create`: renamed while the file is being
/// written, it still receives the new file, and nothing appears at its old path.
#[test]
fn atomic_commit_follows_a_directory_renamed_meanwhile() {
    for named in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let before = dir.path().join("before");
        fs::create_dir(&before).unwrap();
        fs::write(before.join("a.txt"), "old").unwrap();
        let mut file = AtomicFile::builder()
            .named_temp_file(named)
            .create(before.join("a.txt"))
            .unwrap();
        file.write_all(b"new").unwrap();
        let after = dir.path().join("after");
        fs::rename(&before, &after).unwrap();
        fs::create_dir(&before).unwrap(); // a new directory at the old path
        file.commit().unwrap();
        assert_eq!(fs::read_to_string(after.join("a.txt")).unwrap(), "new");
        assert_eq!(names_in(&after), ["a.txt"], "named: {named}");
        assert_eq!(names_in(&before), Vec::<String>::new(), "named: {named}");
    }
}

/// A commit that finds the publish name `.<name>.custodian.tmp` taken by a file a killed
/// writer left there (unlocked) removes it and publishes. One in use by a live writer
/// (locked), or that is not a regular file, is left alone: the commit publishes under
/// another name.
#[cfg(target_os = "linux")]
#[test]
fn atomic_commit_removes_an_unfinished_publish_of_a_killed_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    fs::write(&path, "old").unwrap();
    let leftover = dir.path().join(".state.custodian.tmp");
    fs::write(
        &leftover,
        "complete content of a writer killed while publishing",
    )
    .unwrap();
    let mut file = AtomicFile::create(&path).unwrap();
    file.write_all(b"new").unwrap();
    file.commit().unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "new");
    assert_eq!(names_in(dir.path()), ["state"]);

    fs::write(&leftover, "a live writer's").unwrap();
    let holder = fs::File::open(&leftover).unwrap();
    holder.lock().unwrap();
    let mut file = AtomicFile::create(&path).unwrap();
    file.write_all(b"newer").unwrap();
    file.commit().unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "newer");
    assert_eq!(fs::read_to_string(&leftover).unwrap(), "a live writer's");
    drop(holder);
    fs::remove_file(&leftover).unwrap();

    fs::create_dir(&leftover).unwrap();
    let mut file = AtomicFile::create(&path).unwrap();
    file.write_all(b"newest").unwrap();
    file.commit().unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "newest");
    assert_eq!(names_in(dir.path()), [".state.custodian.tmp", "state"]);
    assert!(leftover.is_dir());
}

#[test]
fn atomic_drop_without_commit_rolls_back_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    fs::write(&path, "old").unwrap();
    let check = ledger::LeakCheck::new();
    let file = AtomicFile::create(&path).unwrap();
    let leaked = check.leaked();
    assert_eq!(leaked.len(), 1);
    assert_eq!(leaked[0].kind(), "custodian::fs::AtomicFile");
    assert_eq!(leaked[0].site().file(), file!());
    let ((), events) = capture(|| drop(file));
    assert_eq!(names_in(dir.path()), ["state"]);
    assert_eq!(fs::read_to_string(&path).unwrap(), "old");
    assert!(errors(&events).is_empty());
    assert!(
        events
            .iter()
            .any(|e| e.message == "cleanup ran from Drop, not close"
                && e.field("resource") == Some(&*path.display().to_string())),
        "{events:?}"
    );
    check.finish().unwrap();
}

#[test]
fn atomic_discard_removes_the_temp_file() {
    for named in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let mut file = AtomicFile::builder()
            .named_temp_file(named)
            .create(&path)
            .unwrap();
        file.write_all(b"draft").unwrap();
        if let Some(temp) = file.temp_path() {
            assert!(temp.exists());
        }
        file.discard().unwrap();
        assert_eq!(names_in(dir.path()), Vec::<String>::new(), "named: {named}");
    }
}

/// `into_inner` gives the staged content as an open file with no name, whether the temp
/// file was named or not: nothing is left in the directory.
#[test]
fn atomic_into_inner_gives_an_unnamed_file() {
    for named in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut file = AtomicFile::builder()
            .named_temp_file(named)
            .create(dir.path().join("a"))
            .unwrap();
        file.write_all(b"kept aside").unwrap();
        let mut staged = AtomicFile::into_inner(file).unwrap();
        assert_eq!(names_in(dir.path()), Vec::<String>::new(), "named: {named}");
        staged.seek(io::SeekFrom::Start(0)).unwrap();
        let mut content = String::new();
        staged.read_to_string(&mut content).unwrap();
        assert_eq!(content, "kept aside");
    }
}

#[test]
fn atomic_missing_parent_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let err = AtomicFile::create(missing.join("a.txt")).unwrap_err();
    assert_error(&err, io::ErrorKind::NotFound, &missing);
}

#[test]
fn atomic_read_only_directory() {
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    fs::create_dir(&ro).unwrap();
    fs::write(ro.join("a.txt"), "old").unwrap();
    chmod(&ro, 0o555);
    let err = unprivileged(|| AtomicFile::create(ro.join("a.txt"))).unwrap_err();
    chmod(&ro, 0o755);
    assert_error(&err, io::ErrorKind::PermissionDenied, &ro);
    assert_eq!(fs::read_to_string(ro.join("a.txt")).unwrap(), "old");
}

#[test]
fn atomic_permission_denied_on_an_unsearchable_directory() {
    let dir = tempfile::tempdir().unwrap();
    let locked = dir.path().join("locked");
    fs::create_dir(&locked).unwrap();
    chmod(&locked, 0o000);
    let target = locked.join("a.txt");
    let err = unprivileged(|| AtomicFile::create(&target)).unwrap_err();
    chmod(&locked, 0o755);
    assert_error(&err, io::ErrorKind::PermissionDenied, &target);
}

#[test]
fn atomic_target_is_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("sub");
    fs::create_dir(&target).unwrap();
    let err = AtomicFile::create(&target).unwrap_err();
    assert_error(&err, io::ErrorKind::IsADirectory, &target);
    assert_eq!(
        files_starting_with(dir.path(), ".sub."),
        Vec::<String>::new()
    );
}

#[test]
fn atomic_replaces_a_symlink_at_the_target_not_the_file_it_points_to() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = dir.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let real = elsewhere.join("real.conf");
    fs::write(&real, "untouched").unwrap();
    chmod(&real, 0o640);
    let link = dir.path().join("app.conf");
    symlink(&real, &link).unwrap();

    let mut file = AtomicFile::builder()
        .named_temp_file(true)
        .create(&link)
        .unwrap();
    assert_eq!(file.temp_path().unwrap().parent(), Some(dir.path()));
    file.write_all(b"new").unwrap();
    file.commit().unwrap();

    assert!(
        !fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::read_to_string(&link).unwrap(), "new");
    assert_eq!(fs::read_to_string(&real).unwrap(), "untouched");
    assert_eq!(
        mode_of(&link),
        0o640,
        "the linked file's permissions are kept"
    );
}

#[test]
fn atomic_through_a_symlinked_directory_stages_in_the_real_one() {
    let dir = tempfile::tempdir().unwrap();
    let real_dir = dir.path().join("real");
    fs::create_dir(&real_dir).unwrap();
    let link_dir = dir.path().join("link");
    symlink(&real_dir, &link_dir).unwrap();

    let mut file = AtomicFile::builder()
        .named_temp_file(true)
        .create(link_dir.join("a.txt"))
        .unwrap();
    let temp = file.temp_path().unwrap().to_path_buf();
    assert!(
        fs::canonicalize(&temp)
            .unwrap()
            .starts_with(fs::canonicalize(&real_dir).unwrap())
    );
    file.write_all(b"through the link").unwrap();
    file.commit().unwrap();
    assert_eq!(
        fs::read_to_string(real_dir.join("a.txt")).unwrap(),
        "through the link"
    );
}

#[test]
fn atomic_temp_dir_on_another_filesystem_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let shm = Path::new("/dev/shm");
    let (Ok(a), Ok(b)) = (fs::metadata(dir.path()), fs::metadata(shm)) else {
        println!("skipped: /dev/shm is missing");
        return;
    };
    if a.dev() == b.dev() {
        println!(
            "skipped: {} and /dev/shm are on the same file system",
            dir.path().display()
        );
        return;
    }
    let target = dir.path().join("a.txt");
    let err = AtomicFile::builder()
        .temp_dir(shm)
        .create(&target)
        .unwrap_err();
    assert_error(&err, io::ErrorKind::CrossesDevices, shm);
    assert!(
        err.to_string().contains(&dir.path().display().to_string()),
        "{err}"
    );
    assert!(!target.exists());
}

#[test]
fn atomic_failed_rename_gives_the_file_back_intact() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("a.txt");
    let mut file = AtomicFile::create(&target).unwrap();
    file.write_all(b"precious").unwrap();
    fs::create_dir(&target).unwrap(); // the target became a directory meanwhile
    fs::write(target.join("inside"), "x").unwrap();

    let err = file.commit().unwrap_err();
    assert_error(err.error(), io::ErrorKind::IsADirectory, &target);
    assert!(!err.is_replaced());
    let file = err
        .into_guard()
        .expect("the rename failed: the content is intact");
    fs::remove_dir_all(&target).unwrap();
    file.commit().unwrap();
    assert_eq!(fs::read_to_string(&target).unwrap(), "precious");
}

#[test]
fn atomic_does_not_keep_setuid_or_setgid_bits() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("tool");
    fs::write(&target, "old").unwrap();
    chmod(&target, 0o6755);
    let mut file = AtomicFile::create(&target).unwrap();
    file.write_all(b"new").unwrap();
    file.commit().unwrap();
    assert_eq!(
        mode_of(&target) & 0o7777,
        0o755,
        "setuid/setgid dropped, the rest kept"
    );

    fs::set_permissions(&target, Permissions::from_mode(0o1755)).unwrap();
    let file = AtomicFile::create(&target).unwrap();
    file.commit().unwrap();
    assert_eq!(mode_of(&target) & 0o7777, 0o1755, "the sticky bit is kept");
}

#[test]
fn atomic_permissions_kept_defaulted_or_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let kept = dir.path().join("kept");
    fs::write(&kept, "old").unwrap();
    chmod(&kept, 0o664); // group-writable: a usual umask (022) would drop that bit
    AtomicFile::create(&kept).unwrap().commit().unwrap();
    assert_eq!(mode_of(&kept), 0o664);

    let fresh = dir.path().join("fresh");
    AtomicFile::create(&fresh).unwrap().commit().unwrap();
    assert_eq!(mode_of(&fresh), 0o600);

    AtomicFile::builder()
        .permissions(Permissions::from_mode(0o604))
        .create(&kept)
        .unwrap()
        .commit()
        .unwrap();
    assert_eq!(mode_of(&kept), 0o604);

    AtomicFile::builder()
        .keep_permissions(false)
        .create(&kept)
        .unwrap()
        .commit()
        .unwrap();
    assert_eq!(mode_of(&kept), 0o600);
}

#[test]
fn atomic_without_sync_still_replaces() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache");
    let mut file = AtomicFile::builder()
        .sync(false)
        .buffer_capacity(0)
        .create(&path)
        .unwrap();
    file.write_all(b"fast").unwrap();
    file.commit().unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"fast");
}

#[test]
fn atomic_writes_smaller_than_the_buffer_wait_for_the_flush_larger_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.bin");
    let staged_len = |file: &AtomicFile| {
        fs::metadata(file.temp_path().expect("a named temp file"))
            .unwrap()
            .len()
    };
    let mut file = AtomicFile::builder()
        .named_temp_file(true)
        .buffer_capacity(1024)
        .create(&path)
        .unwrap();
    file.write_all(&[b'a'; 1500]).unwrap(); // larger than the buffer: straight through
    assert_eq!(staged_len(&file), 1500);
    file.write_all(&[b'b'; 1000]).unwrap(); // smaller: buffered
    file.write_all(&[b'c'; 20]).unwrap();
    assert_eq!(staged_len(&file), 1500);
    file.write_all(&[b'd'; 2000]).unwrap(); // the buffer first, then this one
    assert_eq!(staged_len(&file), 4520);
    file.write_all(b"tail").unwrap();
    file.commit().unwrap();
    let mut expected = vec![b'a'; 1500];
    expected.extend([b'b'; 1000]);
    expected.extend([b'c'; 20]);
    expected.extend([b'd'; 2000]);
    expected.extend(b"tail");
    assert_eq!(fs::read(&path).unwrap(), expected);
}

#[test]
fn atomic_close_commits_through_a_cleanup_stack() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let mut file = AtomicFile::create(&path).unwrap();
    file.write_all(b"via Close").unwrap();
    Close::close(file).unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"via Close");

    let mut stack = custodian::CleanupStack::new();
    let mut file = AtomicFile::create(&path).unwrap();
    file.write_all(b"via the stack").unwrap();
    stack.push(file);
    stack.close().unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"via the stack");
}

/// Named temp files only (an unnamed one leaves nothing to remove); a process looks once
/// per directory, so each case has its own directory.
#[test]
fn atomic_removes_stale_temp_files_of_dead_writers_only() {
    let named = || {
        let mut builder = AtomicFile::builder();
        builder = builder.named_temp_file(true);
        builder
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    // A writer that died: its pid is reaped and gone.
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let stale = dir
        .path()
        .join(format!(".data.custodian.AbC123.{dead_pid}.tmp"));
    fs::write(&stale, "half").unwrap();
    // Another target's, left by a dead writer too: removed in the same listing.
    let other = dir
        .path()
        .join(format!(".other.custodian.AbC123.{dead_pid}.tmp"));
    fs::write(&other, "half").unwrap();
    // A writer that is alive (this process), and files that only look alike.
    let live = dir
        .path()
        .join(format!(".data.custodian.XyZ789.{}.tmp", std::process::id()));
    fs::write(&live, "in progress").unwrap();
    let lookalikes = [
        format!(".data.AbC123.{dead_pid}.tmp"), // no marker: another program's
        format!("data.custodian.AbC123.{dead_pid}.tmp"),
        format!(".custodian.AbC123.{dead_pid}.tmp"),
        format!(".data.custodian.AbC12.{dead_pid}.tmp"),
        format!(".data.custodian.AbC123.{dead_pid}.json"),
        ".data.custodian.AbC123.99999999.tmp".to_owned(), // no process has that pid
        ".data.tmp".to_owned(),
    ];
    for name in &lookalikes {
        fs::write(dir.path().join(name), "a user's file").unwrap();
    }
    // The right name, but a FIFO (opening it must not hang the scan) and, when we can
    // make one, a file of another user: neither is what a writer of ours left.
    let fifo = dir
        .path()
        .join(format!(".pipe.custodian.FiFo12.{dead_pid}.tmp"));
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let foreign = dir
        .path()
        .join(format!(".theirs.custodian.AbC123.{dead_pid}.tmp"));
    fs::write(&foreign, "another user's").unwrap();
    let foreign_owned = std::os::unix::fs::chown(&foreign, Some(65534), None).is_ok();

    let file = named().create(&path).unwrap();
    assert!(!stale.exists(), "a dead writer's temp file is removed");
    assert!(!other.exists(), "so is one of another target");
    assert!(live.exists(), "a live writer's temp file is kept");
    assert!(fifo.exists(), "a FIFO is not a temp file of ours");
    if foreign_owned {
        assert!(foreign.exists(), "another user's file is kept");
    }
    for name in &lookalikes {
        assert_eq!(
            fs::read_to_string(dir.path().join(name)).unwrap(),
            "a user's file",
            "{name}"
        );
    }
    file.commit().unwrap();

    // Once per directory and process: a file that appears later waits for the next
    // process, whichever target is written next.
    let later = dir
        .path()
        .join(format!(".data.custodian.LaTeR1.{dead_pid}.tmp"));
    fs::write(&later, "half").unwrap();
    named().create(&path).unwrap().commit().unwrap();
    named()
        .create(dir.path().join("third"))
        .unwrap()
        .commit()
        .unwrap();
    assert!(
        later.exists(),
        "no second listing of the directory, for this target or another"
    );

    // A dead pid, but the file is locked (a writer in another pid namespace): kept.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    let locked = dir
        .path()
        .join(format!(".data.custodian.LoCkEd.{dead_pid}.tmp"));
    fs::write(&locked, "foreign writer").unwrap();
    let holder = fs::File::open(&locked).unwrap();
    holder.lock().unwrap();
    named().create(&path).unwrap().commit().unwrap();
    assert!(locked.exists());
    drop(holder);

    // An unnamed temp file (the default on Linux) never lists the directory.
    if cfg!(target_os = "linux") {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let stale = dir
            .path()
            .join(format!(".data.custodian.AbC123.{dead_pid}.tmp"));
        fs::write(&stale, "half").unwrap();
        AtomicFile::create(&path).unwrap().commit().unwrap();
        assert!(stale.exists());
    }
}

#[test]
fn atomic_drop_reports_a_failed_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    fs::create_dir(&sub).unwrap();
    let path = sub.join("a");
    let before = ledger::snapshot();
    let file = AtomicFile::builder()
        .named_temp_file(true)
        .create(&path)
        .unwrap();
    let temp = file.temp_path().unwrap().to_path_buf();
    chmod(&sub, 0o555);
    let ((), events) = unprivileged(|| capture(|| drop(file)));
    chmod(&sub, 0o755);
    assert_one_failure(
        &events,
        "custodian::fs::AtomicFile",
        &path.display().to_string(),
        Some("Permission denied"),
    );
    assert!(temp.exists(), "the removal really failed");
    assert_failure_counted(&before, "custodian::fs::AtomicFile");

    // An unnamed temp file has nothing to remove: its rollback cannot fail.
    if cfg!(target_os = "linux") {
        fs::remove_file(&temp).unwrap();
        let file = AtomicFile::create(&path).unwrap();
        chmod(&sub, 0o555);
        let ((), events) = unprivileged(|| capture(|| drop(file)));
        chmod(&sub, 0o755);
        assert!(errors(&events).is_empty(), "{events:?}");
        assert_eq!(names_in(&sub), Vec::<String>::new());
    }
}

/// Says why a case did not run; fails it where every case must run (CI sets
/// `CUSTODIAN_REQUIRE_FAULTS`).
fn skipped(reason: &str) {
    if std::env::var_os("CUSTODIAN_REQUIRE_FAULTS").is_some() {
        panic!("this case must run here but was skipped: {reason}");
    }
    println!("SKIPPED: {reason}");
}

/// A full disk: a 256 KiB tmpfs mounted in a private mount namespace (needs root or
/// user namespaces; skipped with the reason otherwise). The commit's flush fails with
/// ENOSPC, the target keeps its old content, the AtomicFile comes back, and once space is
/// freed the same AtomicFile commits everything.
#[test]
fn atomic_commit_on_a_full_disk_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let exe = std::env::current_exe().unwrap();
    let script = r#"mount -t tmpfs -o size=256k custodian-full "$1" || exit 97
        shift
        exec "$@""#;
    let output = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&mnt)
        .arg(&exe)
        .args([
            "child_role_full_disk",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CUSTODIAN_FS_FULL_DISK", &mnt)
        .output();
    let output = match output {
        Ok(o) => o,
        Err(e) => {
            skipped(&format!("cannot run unshare(1): {e}"));
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    match output.status.code() {
        Some(0) => assert!(stdout.contains("FULL DISK CHECKED"), "{stdout}"),
        Some(101) => panic!("the full-disk child failed:\n{stdout}\n{stderr}"),
        _ => skipped(&format!(
            "cannot mount a small tmpfs in a private mount namespace ({}): {stderr}",
            output.status
        )),
    }
}

#[test]
#[ignore = "child role of atomic_commit_on_a_full_disk_loses_nothing"]
fn child_role_full_disk() {
    let Some(mnt) = std::env::var_os("CUSTODIAN_FS_FULL_DISK") else {
        return;
    };
    let mnt = PathBuf::from(mnt);
    let target = mnt.join("config");
    fs::write(&target, "old content").unwrap();

    // Fill the file system.
    let filler = mnt.join("filler");
    let mut fill = fs::File::create(&filler).unwrap();
    let chunk = [0xAB_u8; 4096];
    let err = loop {
        if let Err(e) = fill.write_all(&chunk) {
            break e;
        }
    };
    assert_eq!(err.kind(), io::ErrorKind::StorageFull);
    drop(fill);

    let new = vec![b'n'; 6000];
    let mut file = AtomicFile::create(&target).unwrap();
    file.write_all(&new).unwrap(); // buffered: the disk is not touched yet
    let err = file.commit().unwrap_err();
    assert_error(err.error(), io::ErrorKind::StorageFull, &target);
    assert_eq!(fs::read_to_string(&target).unwrap(), "old content");
    let file = err
        .into_guard()
        .expect("the flush failed: the data is still buffered");

    // A write too big for the buffer fails at once, naming nothing lost either.
    let mut big = AtomicFile::create(mnt.join("big")).unwrap();
    let err = big.write_all(&vec![0; 64 * 1024]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::StorageFull);
    big.discard().unwrap();

    fs::remove_file(&filler).unwrap();
    file.commit().unwrap();
    assert_eq!(fs::read(&target).unwrap(), new);
    assert_eq!(files_starting_with(&mnt, ".config."), Vec::<String>::new());
    println!("FULL DISK CHECKED");
}

// ---------------------------------------------------------------------------------------
// LockFile

#[test]
fn lock_records_the_pid_and_removes_the_file_on_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.pid");
    // A stale record longer than ours: emptied before our pid is written.
    fs::write(&path, "  4294967295  \n").unwrap();
    let lock = LockFile::acquire(&path).unwrap();
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        format!("{}\n", std::process::id())
    );
    assert_eq!(
        LockFile::owner_pid(&path).unwrap(),
        Some(std::process::id())
    );
    assert_eq!(mode_of(&path) & !0o644, 0, "not writable by others");
    lock.close().unwrap();
    assert!(!path.exists());
}

#[test]
fn lock_try_acquire_sees_a_holder_in_the_same_process() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lock");
    let held = LockFile::try_acquire(&path).unwrap().expect("free");
    assert!(LockFile::try_acquire(&path).unwrap().is_err());
    let err = LockFile::acquire_timeout(&path, Duration::from_millis(30)).unwrap_err();
    assert_error(&err, io::ErrorKind::WouldBlock, &path);
    assert!(
        err.to_string()
            .contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    assert!(LockHeld::of(&err).unwrap().waited() >= Duration::from_millis(30));
    drop(held);
    assert!(LockFile::try_acquire(&path).unwrap().is_ok());
}

#[test]
fn lock_held_by_another_process_names_its_pid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.pid");
    let mut holder = common::child_role("child_role_hold_lock")
        .env("CUSTODIAN_FS_LOCK", &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_line(&mut holder, "LOCKED");

    let held = LockFile::try_acquire(&path).unwrap().unwrap_err();
    assert_eq!(
        held.pid(),
        Some(holder.id()),
        "try_acquire names the holder"
    );
    assert_eq!(held.path(), path);
    assert!(
        held.to_string()
            .contains(&format!("held by pid {}", holder.id()))
    );

    // Waiting without blocking a runtime thread: the runtime's one thread keeps running
    // other tasks, and a wait cut short by a timeout holds nothing.
    #[cfg(feature = "tokio")]
    common::current_thread().block_on(async {
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let ticker = tokio::spawn({
            let ticks = ticks.clone();
            async move {
                loop {
                    ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        let waited =
            tokio::time::timeout(Duration::from_millis(200), LockFile::acquire_async(&path)).await;
        assert!(waited.is_err(), "still held by the child");
        assert!(
            ticks.load(std::sync::atomic::Ordering::Relaxed) >= 5,
            "runtime blocked"
        );
        ticker.abort();
    });
    assert_eq!(LockFile::owner_pid(&path).unwrap(), Some(holder.id()));

    let err = LockFile::acquire_timeout(&path, Duration::from_millis(100)).unwrap_err();
    assert_error(&err, io::ErrorKind::WouldBlock, &path);
    let held = LockHeld::of(&err).expect("a LockHeld inside");
    assert_eq!(held.pid(), Some(holder.id()));
    assert!(
        err.to_string()
            .contains(&format!("held by pid {}", holder.id())),
        "{err}"
    );

    drop(holder.stdin.take()); // the holder releases and exits
    #[cfg(feature = "tokio")]
    let lock = common::current_thread()
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(60), LockFile::acquire_async(&path)).await
        })
        .expect("released by the child")
        .unwrap();
    #[cfg(not(feature = "tokio"))]
    let lock = LockFile::acquire_timeout(&path, Duration::from_secs(60)).unwrap();
    assert!(holder.wait().unwrap().success());
    assert_eq!(
        LockFile::owner_pid(&path).unwrap(),
        Some(std::process::id())
    );
    lock.close().unwrap();
}

#[test]
#[ignore = "child role of lock tests"]
fn child_role_hold_lock() {
    let Some(path) = std::env::var_os("CUSTODIAN_FS_LOCK") else {
        return;
    };
    let lock = LockFile::acquire(&path).unwrap();
    println!("LOCKED");
    // Hold until the parent closes our stdin (or kills us).
    let _ = io::stdin().read_to_end(&mut Vec::new());
    lock.close().unwrap();
}

#[test]
fn lock_left_by_a_killed_process_does_not_block() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.pid");
    let mut holder = common::child_role("child_role_hold_lock")
        .env("CUSTODIAN_FS_LOCK", &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_line(&mut holder, "LOCKED");
    let dead_pid = holder.id();
    holder.kill().unwrap();
    assert_eq!(holder.wait().unwrap().signal(), Some(9));
    assert_eq!(
        LockFile::owner_pid(&path).unwrap(),
        Some(dead_pid),
        "its pid file stays"
    );

    let lock = LockFile::try_acquire(&path)
        .unwrap()
        .expect("the kernel released its lock");
    assert_eq!(
        LockFile::owner_pid(&path).unwrap(),
        Some(std::process::id())
    );
    lock.close().unwrap();
}

#[test]
fn lock_shared_holders_coexist_and_the_last_one_removes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.lock");
    let mut opts = LockFile::builder();
    opts = opts.shared(true);
    let a = opts.acquire(&path).unwrap();
    let b = opts
        .try_acquire(&path)
        .unwrap()
        .expect("shared locks coexist");
    assert!(a.is_shared());
    assert!(LockFile::try_acquire(&path).unwrap().is_err());
    let err = LockFile::acquire_timeout(&path, Duration::ZERO).unwrap_err();
    assert!(err.to_string().contains("no pid recorded"), "{err}");
    a.close().unwrap();
    assert!(path.exists(), "b still holds it");
    assert!(LockFile::try_acquire(&path).unwrap().is_err());
    b.close().unwrap();
    assert!(!path.exists(), "the last shared holder removes it");

    let writer = LockFile::acquire(&path).unwrap();
    assert!(opts.try_acquire(&path).unwrap().is_err());
    drop(writer);
}

#[test]
fn lock_refuses_a_planted_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    fs::write(&victim, "do not truncate").unwrap();
    let path = dir.path().join("app.pid");
    symlink(&victim, &path).unwrap();
    let err = LockFile::acquire(&path).unwrap_err();
    let eloop = io::Error::from_raw_os_error(rustix::io::Errno::LOOP.raw_os_error());
    assert_error(&err, eloop.kind(), &path);
    assert_eq!(fs::read_to_string(&victim).unwrap(), "do not truncate");
}

#[test]
fn lock_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("lock");
    let err = LockFile::acquire(&path).unwrap_err();
    assert_error(&err, io::ErrorKind::NotFound, &path);
    let err = LockFile::try_acquire(&path).unwrap_err();
    assert_error(&err, io::ErrorKind::NotFound, &path);
}

#[test]
fn lock_path_with_a_nul_byte_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app\0.pid");
    let err = LockFile::acquire(&path).unwrap_err();
    assert_error(&err, io::ErrorKind::InvalidInput, &path);
    assert!(fs::read_dir(dir.path()).unwrap().next().is_none());
}

#[test]
fn lock_permission_denied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lock");
    fs::write(&path, "").unwrap();
    chmod(&path, 0o444);
    let err = unprivileged(|| LockFile::acquire(&path)).unwrap_err();
    assert_error(&err, io::ErrorKind::PermissionDenied, &path);
}

#[test]
fn lock_waiter_on_a_removed_file_retries_on_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lock");
    for _ in 0..5 {
        let first = LockFile::acquire(&path).unwrap();
        let waiter = {
            let path = path.clone();
            std::thread::spawn(move || {
                let lock = LockFile::acquire(&path).unwrap();
                let ours = lock.as_file().metadata().unwrap();
                let now = fs::metadata(&path).expect("the path names a file");
                assert_eq!((ours.dev(), ours.ino()), (now.dev(), now.ino()));
                lock.close().unwrap();
            })
        };
        std::thread::sleep(Duration::from_millis(50)); // let the waiter open the old file
        first.close().unwrap(); // unlinks it
        waiter.join().unwrap();
    }
}

#[test]
fn lock_release_leaves_a_replaced_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lock");
    let lock = LockFile::acquire(&path).unwrap();
    let replacement = dir.path().join("replacement");
    fs::write(&replacement, "someone else's").unwrap();
    fs::rename(&replacement, &path).unwrap();
    lock.close().unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "someone else's");
}

#[test]
fn lock_acquire_timeout_gets_a_lock_released_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lock");
    let first = LockFile::acquire(&path).unwrap();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        first.close().unwrap();
    });
    let lock = LockFile::acquire_timeout(&path, Duration::from_secs(60)).unwrap();
    releaser.join().unwrap();
    assert_eq!(
        LockFile::owner_pid(&path).unwrap(),
        Some(std::process::id())
    );
    drop(lock);
}

#[test]
fn lock_kept_file_is_emptied_on_release() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.pid");
    let lock = LockFile::builder()
        .remove_on_release(false)
        .acquire(&path)
        .unwrap();
    assert!(!fs::read(&path).unwrap().is_empty());
    drop(lock);
    assert_eq!(fs::read(&path).unwrap(), b"");
    assert_eq!(LockFile::owner_pid(&path).unwrap(), None);
}

#[test]
fn lock_drop_reports_a_failed_removal() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("run");
    fs::create_dir(&sub).unwrap();
    let path = sub.join("app.pid");
    let lock = LockFile::acquire(&path).unwrap();
    chmod(&sub, 0o555);
    let ((), events) = unprivileged(|| capture(|| drop(lock)));
    assert_one_failure(
        &events,
        "custodian::fs::LockFile",
        &path.display().to_string(),
        None,
    );
    // The lock itself was released.
    assert!(
        LockFile::builder()
            .remove_on_release(false)
            .try_acquire(&path)
            .unwrap()
            .is_ok()
    );

    let lock = LockFile::acquire(&path).unwrap();
    let err = unprivileged(|| lock.close()).unwrap_err();
    chmod(&sub, 0o755);
    assert_error(&err, io::ErrorKind::PermissionDenied, &path);
}

// ---------------------------------------------------------------------------------------
// CheckedFile

#[test]
fn checked_close_writes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out");
    let mut file = CheckedFile::create(&path).unwrap().sync_on_close(true);
    for i in 0..1000 {
        writeln!(file, "line {i}").unwrap();
    }
    file.close().unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 1000);
}

#[test]
fn checked_close_on_a_full_disk_returns_the_error() {
    let mut file = CheckedFile::create("/dev/full").unwrap();
    file.write_all(b"lost by std's Drop").unwrap(); // buffered
    let err = file.close().unwrap_err();
    assert_error(&err, io::ErrorKind::StorageFull, Path::new("/dev/full"));
}

#[test]
fn checked_drop_on_a_full_disk_reports_the_error() {
    let before = ledger::snapshot();
    let mut file = CheckedFile::create("/dev/full").unwrap();
    file.write_all(b"lost by std's Drop").unwrap();
    let ((), events) = capture(|| drop(file));
    assert_one_failure(
        &events,
        "custodian::fs::CheckedFile",
        "/dev/full",
        Some("No space left"),
    );
    assert_failure_counted(&before, "custodian::fs::CheckedFile");
}

#[test]
fn checked_flush_keeps_the_data_for_a_retry() {
    let mut file = CheckedFile::create("/dev/full").unwrap();
    file.write_all(b"keep me").unwrap();
    let err = file.flush().unwrap_err();
    assert_error(&err, io::ErrorKind::StorageFull, Path::new("/dev/full"));
    let err = CheckedFile::into_inner(file).unwrap_err();
    assert_eq!(err.error().kind(), io::ErrorKind::StorageFull);
    let file = err.into_guard();
    assert!(
        file.close().is_err(),
        "the data is still there, still unwritable"
    );
}

#[test]
fn checked_failed_fsync_is_reported() {
    // fsync(2) on a character device fails with EINVAL.
    let file = CheckedFile::create("/dev/null")
        .unwrap()
        .sync_on_close(true);
    let err = file.close().unwrap_err();
    assert_error(&err, io::ErrorKind::InvalidInput, Path::new("/dev/null"));
}

#[test]
fn checked_bad_paths() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("out");
    assert_error(
        &CheckedFile::create(&missing).unwrap_err(),
        io::ErrorKind::NotFound,
        &missing,
    );

    let victim = dir.path().join("victim");
    fs::write(&victim, "do not truncate").unwrap();
    let link = dir.path().join("out");
    symlink(&victim, &link).unwrap();
    let err = CheckedFile::create(&link).unwrap_err();
    assert!(
        err.to_string().contains(&link.display().to_string()),
        "{err}"
    );
    assert_eq!(fs::read_to_string(&victim).unwrap(), "do not truncate");

    let ro = dir.path().join("ro");
    fs::write(&ro, "").unwrap();
    chmod(&ro, 0o444);
    let err = unprivileged(|| CheckedFile::create(&ro)).unwrap_err();
    assert_error(&err, io::ErrorKind::PermissionDenied, &ro);
}

// ---------------------------------------------------------------------------------------
// TempDir and TempFile

#[test]
fn tempdir_close_and_drop_remove_it() {
    let parent = tempfile::tempdir().unwrap();
    let dir = TempDir::new_in(parent.path()).unwrap();
    fs::write(dir.path().join("x"), "x").unwrap();
    let path = dir.path().to_path_buf();
    dir.close().unwrap();
    assert!(!path.exists());

    let dir = TempDir::new_in(parent.path()).unwrap();
    let path = dir.path().to_path_buf();
    drop(dir);
    assert!(!path.exists());

    let dir = TempDir::new_in(parent.path()).unwrap();
    let kept = TempDir::keep(dir);
    assert!(kept.exists());
}

/// A `TempDir` in `parent` holding a read-only subdirectory with a file: removing it
/// fails for a process without `CAP_DAC_OVERRIDE` (see `unprivileged`). Also returns the
/// subdirectory, to make it writable again.
fn stuck_tempdir(parent: &Path) -> (TempDir, PathBuf) {
    let dir = TempDir::new_in(parent).unwrap();
    let sub = dir.path().join("read-only");
    fs::create_dir(&sub).unwrap();
    fs::write(sub.join("stuck"), "x").unwrap();
    chmod(&sub, 0o555);
    (dir, sub)
}

#[test]
fn tempdir_failed_removal_is_returned_and_reported() {
    let parent = tempfile::tempdir().unwrap();
    let (dir, sub) = stuck_tempdir(parent.path());
    let path = dir.path().to_path_buf();
    let err = unprivileged(|| dir.close()).unwrap_err();
    assert_eq!(err.error().kind(), io::ErrorKind::PermissionDenied, "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    // The guard comes back with the error: once the cause is fixed, it closes.
    let dir = err.into_guard();
    assert_eq!(dir.path(), path);
    chmod(&sub, 0o755);
    let before = ledger::snapshot();
    let ((), events) = capture(|| dir.close().unwrap());
    assert!(!path.exists());
    assert!(common::errors(&events).is_empty(), "{events:?}");
    assert_eq!(
        ledger::snapshot()
            .since(&before)
            .get("custodian::fs::TempDir")
            .failed,
        0
    );

    // A returned failure dropped with its guard: tried once more, counted, not reported
    // a second time.
    let (dir, _) = stuck_tempdir(parent.path());
    let path = dir.path().to_path_buf();
    let before = ledger::snapshot();
    let ((), events) = unprivileged(|| capture(|| drop(dir.close().unwrap_err())));
    assert!(common::errors(&events).is_empty(), "{events:?}");
    assert_failure_counted(&before, "custodian::fs::TempDir");
    assert!(path.exists(), "the removal really failed twice");

    let before = ledger::snapshot();
    let (dir, _) = stuck_tempdir(parent.path());
    let path2 = dir.path().to_path_buf();
    let ((), events) = unprivileged(|| capture(|| drop(dir)));
    assert_one_failure(
        &events,
        "custodian::fs::TempDir",
        &path2.display().to_string(),
        None,
    );
    assert_failure_counted(&before, "custodian::fs::TempDir");

    for p in [&path, &path2] {
        chmod(&p.join("read-only"), 0o755);
        fs::remove_dir_all(p).unwrap();
    }
}

#[test]
fn tempfile_failed_removal_is_returned_and_reported() {
    let parent = tempfile::tempdir().unwrap();
    let file = TempFile::new_in(parent.path()).unwrap();
    let path = file.path().to_path_buf();
    chmod(parent.path(), 0o555);
    let err = unprivileged(|| file.close()).unwrap_err();
    chmod(parent.path(), 0o755);
    assert_error(err.error(), io::ErrorKind::PermissionDenied, &path);
    // The guard comes back with the error, content untouched: once the cause is fixed,
    // it closes.
    let file = err.into_guard();
    assert_eq!(file.path(), path);
    file.close().unwrap();
    assert!(!path.exists());

    let mut file = TempFile::new_in(parent.path()).unwrap();
    file.write_all(b"spill").unwrap();
    let path2 = file.path().to_path_buf();
    chmod(parent.path(), 0o555);
    let ((), events) = unprivileged(|| capture(|| drop(file)));
    chmod(parent.path(), 0o755);
    assert_one_failure(
        &events,
        "custodian::fs::TempFile",
        &path2.display().to_string(),
        None,
    );
    assert!(path2.exists(), "the removal really failed");
}

#[test]
fn tempfile_reads_writes_and_closes() {
    let mut file = TempFile::new().unwrap();
    file.write_all(b"round trip").unwrap();
    let mut back = String::new();
    file.reopen().unwrap().read_to_string(&mut back).unwrap();
    assert_eq!(back, "round trip");
    let path = file.path().to_path_buf();
    let ((), events) = capture(|| file.close().unwrap());
    assert!(!path.exists());
    assert!(
        !events
            .iter()
            .any(|e| e.message == "cleanup ran from Drop, not close")
    );
}
