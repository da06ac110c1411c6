//! Every public error type prints its cause or returns it from `source()`, never both: a
//! report that walks the chain (anyhow's `{:#}`, `tracing-error`, `eyre`) shows each
//! message once.

use std::error::Error;
use std::io::{self, Write};

use custodian::fs::{AtomicFile, CheckedFile, LockFile, LockHeld};

/// The messages of `err`'s chain: its own `Display`, then each `source`'s.
fn chain(err: &(dyn Error + 'static)) -> Vec<String> {
    let mut messages = vec![err.to_string()];
    let mut next = err.source();
    while let Some(e) = next {
        messages.push(e.to_string());
        next = e.source();
    }
    messages
}

/// Asserts that no message of the chain is already contained in an earlier one.
#[track_caller]
fn assert_no_repeats(what: &str, err: &(dyn Error + 'static)) {
    let messages = chain(err);
    for (i, later) in messages.iter().enumerate().skip(1) {
        for earlier in &messages[..i] {
            assert!(
                !earlier.contains(later.as_str()),
                "{what}: {later:?} repeats what {earlier:?} printed; chain: {messages:#?}"
            );
        }
    }
}

/// An error with a source of its own, to see that deeper causes stay reachable.
#[derive(Debug)]
struct Outer(io::Error);
impl std::fmt::Display for Outer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("could not release the session")
    }
}
impl Error for Outer {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.0)
    }
}

fn failing_stack(n: usize) -> custodian::CleanupErrors {
    let mut stack = custodian::CleanupStack::new();
    for i in 0..n {
        stack.defer_fallible(move || std::fs::remove_file(format!("/no/such/file-{i}")));
    }
    stack.close().unwrap_err()
}

#[test]
fn cleanup_errors_print_each_message_once() {
    let one = failing_stack(1);
    assert_no_repeats("CleanupErrors (1)", &one);
    assert_no_repeats("CleanupError", one.iter().next().unwrap());
    assert_eq!(chain(&one).len(), 1, "{:?}", chain(&one));
    assert_no_repeats("CleanupErrors (3)", &failing_stack(3));

    // A deeper cause is still reachable, once.
    let mut stack = custodian::CleanupStack::new();
    stack.defer_fallible(|| Err::<(), _>(Outer(io::Error::other("connection reset"))));
    let errors = stack.close().unwrap_err();
    assert_no_repeats("CleanupErrors (nested)", &errors);
    assert_eq!(chain(&errors).last().unwrap(), "connection reset");

    let as_io = io::Error::from(failing_stack(2));
    assert_eq!(as_io.kind(), io::ErrorKind::NotFound);
    assert_no_repeats("io::Error from CleanupErrors", &as_io);
}

#[test]
fn scope_errors_print_each_message_once() {
    let body_only = custodian::scope(|_| Err::<(), _>(io::Error::other("body failed")));
    let err = body_only.unwrap_err();
    assert_no_repeats("ScopeError (body)", &err);

    let cleanup_only = custodian::scope(|s| {
        s.defer_fallible(|| std::fs::remove_file("/no/such/scratch"));
        Ok::<(), io::Error>(())
    });
    let err = cleanup_only.unwrap_err();
    assert_no_repeats("ScopeError (cleanup)", &err);

    let both = custodian::scope(|s| {
        s.defer_fallible(|| std::fs::remove_file("/no/such/scratch"));
        Err::<(), _>(Outer(io::Error::other("connection reset")))
    });
    let err = both.unwrap_err();
    assert_no_repeats("ScopeError (both)", &err);
    assert_eq!(chain(&err).last().unwrap(), "connection reset");

    let err = io::Error::from(
        custodian::scope(|s| {
            s.defer_fallible(|| std::fs::remove_file("/no/such/scratch"));
            Err::<(), _>(io::Error::other("body failed"))
        })
        .unwrap_err(),
    );
    assert_no_repeats("io::Error from ScopeError", &err);
}

#[cfg(target_os = "linux")] // /dev/full
#[test]
fn fs_errors_print_each_message_once() {
    let dir = tempfile::tempdir().unwrap();

    // A path error: context in front of the OS message.
    let err = LockFile::acquire(dir.path().join("missing/app.pid")).unwrap_err();
    assert_no_repeats("LockFile::acquire", &err);

    let _held = LockFile::acquire(dir.path().join("held.pid")).unwrap();
    let err =
        LockFile::acquire_timeout(dir.path().join("held.pid"), Default::default()).unwrap_err();
    assert!(LockHeld::of(&err).is_some());
    assert_no_repeats("LockHeld", &err);

    // CommitError: a failed rename (the target became a directory).
    let target = dir.path().join("state");
    let mut file = AtomicFile::create(&target).unwrap();
    file.write_all(b"new").unwrap();
    std::fs::create_dir(&target).unwrap();
    let err = file.commit().unwrap_err();
    assert_no_repeats("CommitError", &err);

    // GuardError from CheckedFile::into_inner: a flush that fails.
    let mut full = CheckedFile::create("/dev/full").unwrap();
    full.write_all(b"x").unwrap();
    let err = CheckedFile::into_inner(full).unwrap_err();
    assert_no_repeats("GuardError<CheckedFile>", &err);
    let err = err.into_guard().close().unwrap_err();
    assert_no_repeats("CheckedFile::close", &err);
}

#[cfg(feature = "process")]
#[test]
fn process_close_error_prints_each_message_once() {
    use rustix::process::{Pid, WaitOptions, waitpid};

    let child = custodian::process::ChildGuard::spawn(std::process::Command::new("true")).unwrap();
    waitpid(Pid::from_raw(child.id() as i32), WaitOptions::empty()).unwrap();
    let err = child.close().unwrap_err();
    assert_no_repeats("GuardError<ChildGuard>", &err);
}

#[test]
fn panicked_labelled_and_leak_errors_print_each_message_once() {
    // A panicking cleanup and a labelled one, in one stack.
    let mut stack = custodian::CleanupStack::new();
    stack.defer(|| panic!("disk gone"));
    stack.defer_named("remove /no/such/file", || {
        std::fs::remove_file("/no/such/file")
    });
    let errors = stack.close().unwrap_err();
    assert_no_repeats("CleanupErrors (panicked + named)", &errors);
    for e in errors.iter() {
        assert_no_repeats("CleanupError (panicked or named)", e);
    }
    assert!(chain(&errors)[0].contains("remove /no/such/file"));

    // Leaks found by a LeakCheck.
    let check = custodian::ledger::LeakCheck::new();
    std::mem::forget(custodian::CleanupStack::new());
    let leaks = check.finish().unwrap_err();
    assert_no_repeats("Leaks", &leaks);
}

#[cfg(feature = "tokio")]
#[test]
fn async_scope_errors_print_each_message_once() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(custodian::rt::scope(|s| async move {
            s.defer_named("log out session 1", async {
                Err::<(), _>(Outer(io::Error::other("connection reset")))
            });
            Err::<(), _>(io::Error::other("body failed"))
        }))
        .unwrap_err();
    assert_no_repeats("rt::scope's ScopeError", &err);
    assert_no_repeats(
        "io::Error from rt::scope's ScopeError",
        &io::Error::from(err),
    );
}
