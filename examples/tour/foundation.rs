//! Chapter 1: scope (Python's `with`), Rollback, CleanupStack (ExitStack), the ledger.

use std::io::Write;
use std::path::Path;

use custodian::{CleanupStack, Rollback};

pub(crate) fn run(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    // A `with` block that knows how it ended: the report is published only on success,
    // the scratch file is removed whatever happens.
    let scratch = dir.join("scratch.txt");
    let report = dir.join("report.txt");
    let result = custodian::scope(|s| {
        let file = s.enter(std::fs::File::create(&scratch)?);
        s.defer_fallible(|| std::fs::remove_file(&scratch));
        s.on_success(|| println!("scope: body succeeded, publishing {}", report.display()));
        s.on_err(|e: &std::io::Error| println!("scope: body failed ({e}), nothing published"));
        file.write_all(b"intermediate results")?;
        std::fs::write(&report, "42")?;
        Ok::<_, std::io::Error>(42)
    });
    println!(
        "scope returned {result:?}; scratch exists: {}",
        scratch.exists()
    );

    // Three cleanups fail: all three errors are kept, in the order they ran, each with
    // the label it was registered under.
    let mut stack = CleanupStack::new();
    for name in ["a", "b", "c"] {
        let path = dir.join(name);
        stack.defer_named(format!("remove {name}"), move || std::fs::remove_file(path));
    }
    println!(
        "a stack whose cleanups fail: {}",
        stack.close().unwrap_err()
    );

    // A Rollback undoes a half-done job unless committed.
    let staged = dir.join("staged");
    std::fs::create_dir(&staged)?;
    {
        let _job = Rollback::new(staged.clone(), |path| {
            println!("rollback: removing {}", path.display());
            let _ = std::fs::remove_dir_all(path);
        });
        // ... the job fails before Rollback::commit: dropping `_job` rolls it back.
    }
    println!(
        "staged dir exists after the failed job: {}",
        staged.exists()
    );

    // A CleanupStack for a number of resources known at run time; a panicking
    // cleanup does not stop the others and is reported, not fatal.
    let mut stack = CleanupStack::new();
    for i in 0..3 {
        let path = dir.join(format!("part-{i}"));
        std::fs::write(&path, "x")?;
        stack.defer_fallible(move || std::fs::remove_file(path));
    }
    stack.defer(|| panic!("a buggy cleanup"));
    match stack.close() {
        Ok(()) => println!("stack closed cleanly"),
        Err(errors) => println!("stack closed; {errors}"),
    }

    // A leaked guard shows up in the ledger with its acquisition site: this one is leaked
    // on purpose, and the ledger report at the end of the tour names this line.
    println!(
        "leaking a CleanupStack on purpose (mem::forget, line {}): watch for it in the ledger",
        line!() + 2
    );
    std::mem::forget(CleanupStack::new());
    Ok(())
}
