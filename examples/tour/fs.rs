//! Chapter: files that never lose data or an error — an atomic config rewrite, a pid lock
//! held by a second process, and a failing close on a full disk.

use std::io::{self, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use custodian::fs::{AtomicFile, CheckedFile, LockFile, TempDir};

pub(crate) fn run(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    atomic_config_rewrite(dir)?;
    pid_lock_held_by_another_process(dir)?;
    failing_close_on_a_full_disk()?;

    // A TempDir is tempfile's, with its removal checked.
    let scratch = TempDir::new_in(dir)?;
    std::fs::write(scratch.path().join("spill.bin"), [0u8; 1024])?;
    scratch.close()?;
    println!("temp dir removed, and we would have heard if it had not been");
    Ok(())
}

fn atomic_config_rewrite(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let config = dir.join("app.toml");
    std::fs::write(&config, "port = 80\n")?;

    let mut file = AtomicFile::create(&config)?;
    writeln!(file, "port = 8080")?;
    writeln!(file, "workers = 4")?;
    file.flush()?;
    println!(
        "while rewriting, a reader still sees {:?} (new content staged in {})",
        std::fs::read_to_string(&config)?,
        match file.temp_path().and_then(|p| p.file_name()) {
            Some(name) => name.to_string_lossy().into_owned(),
            None => "an unnamed file, invisible until the commit".to_owned(),
        }
    );
    file.commit()?; // flush, fsync, rename, fsync the directory
    println!("after commit: {:?}", std::fs::read_to_string(&config)?);

    // A rewrite that fails half-way is rolled back: the old file stays whole.
    let rewrite = || -> io::Result<()> {
        let mut file = AtomicFile::create(&config)?;
        write!(file, "port = ")?;
        Err(io::Error::other("the new port failed validation"))?;
        file.commit()?;
        Ok(())
    };
    if let Err(e) = rewrite() {
        println!(
            "rewrite failed ({e}); the file is still {:?}",
            std::fs::read_to_string(&config)?
        );
    }
    Ok(())
}

fn pid_lock_held_by_another_process(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let pid_file = dir.join("daemon.pid");
    // util-linux's flock(1) takes the same flock; its shell records flock's pid in the file
    // and holds on until we close its stdin.
    let spawned = Command::new("flock")
        .arg("--close")
        .arg(&pid_file)
        .arg("-c")
        .arg(format!("echo $PPID > '{}'; read _", pid_file.display()))
        .stdin(Stdio::piped())
        .spawn();
    let mut holder = match spawned {
        Ok(child) => child,
        Err(e) => {
            println!("(flock(1) not available: {e}; skipping the two-process lock demo)");
            return Ok(());
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while LockFile::owner_pid(&pid_file)? != Some(holder.id()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "flock(1), pid {}, holds {}",
        holder.id(),
        pid_file.display()
    );

    println!(
        "try_acquire while it holds the lock: {}",
        match LockFile::try_acquire(&pid_file)? {
            Err(held) => held.to_string(),
            Ok(_) => "unexpected: got it".to_owned(),
        }
    );
    match LockFile::acquire_timeout(&pid_file, Duration::from_millis(300)) {
        Ok(_) => println!("unexpected: got the lock"),
        Err(e) => println!("acquire_timeout: {e}"),
    }

    drop(holder.stdin.take()); // the holder reads EOF, exits, and the kernel unlocks
    holder.wait()?;
    let lock = LockFile::acquire_timeout(&pid_file, Duration::from_secs(10))?;
    println!(
        "the holder exited; we hold the lock now and recorded our pid {:?}",
        LockFile::owner_pid(&pid_file)?
    );
    lock.close()?; // removes the pid file while still holding the lock
    println!("released: pid file removed: {}", !pid_file.exists());
    Ok(())
}

fn failing_close_on_a_full_disk() -> Result<(), Box<dyn std::error::Error>> {
    // std: the data is buffered, the flush in Drop fails, nobody hears about it.
    let mut plain = io::BufWriter::new(std::fs::File::create("/dev/full")?);
    plain.write_all(b"important")?;
    drop(plain);
    println!("std BufWriter<File> on /dev/full dropped: the lost write went unnoticed");

    // CheckedFile: close returns it...
    let mut file = CheckedFile::create("/dev/full")?;
    file.write_all(b"important")?;
    match file.close() {
        Ok(()) => println!("unexpected: close succeeded"),
        Err(e) => println!("CheckedFile::close: {e}"),
    }
    // ...and a drop without close reports it (the error event above this line).
    let mut file = CheckedFile::create("/dev/full")?;
    file.write_all(b"important")?;
    drop(file);
    Ok(())
}
