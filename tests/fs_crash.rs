//! Crash tests for custodian::fs with real processes and real SIGKILLs.
//!
//! - `AtomicFile`: a child rewrites a large file in a loop and is killed at random
//!   moments; after each kill the file is one complete version (checksum), versions never
//!   go back, and at most one temp file is left behind.
//! - `LockFile`: 8 processes increment a counter file under the lock; no increment is
//!   lost and no two processes are ever inside at once.
//!
//! The children are this test binary re-invoked on an `#[ignore]`d role test.
#![cfg(unix)]

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use custodian::fs::{AtomicFile, LockFile};

const MAGIC: &[u8; 8] = b"CUSTODN1";
const CHUNK: usize = 64 * 1024;

/// xorshift64*: deterministic, dependency-free randomness for payloads and kill times.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Version `v` of the file: magic, version, payload length, payload (256 KiB to 1 MiB,
/// different for every version), checksum of all that.
fn content(version: u64) -> Vec<u8> {
    let len = 256 * 1024 + (version % 13) as usize * 64 * 1024;
    let mut out = Vec::with_capacity(len + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(len as u64).to_le_bytes());
    let mut rng = Rng(version.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    while out.len() < 24 + len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(24 + len);
    let sum = fnv1a(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// The version of a complete, intact file; an error describing what is wrong otherwise.
fn check(bytes: &[u8]) -> Result<u64, String> {
    if bytes.len() < 32 || &bytes[..8] != MAGIC {
        return Err(format!("no header ({} bytes)", bytes.len()));
    }
    let version = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    let len = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    if bytes.len() != 24 + len + 8 {
        return Err(format!(
            "version {version}: {} bytes, expected {}",
            bytes.len(),
            24 + len + 8
        ));
    }
    let (body, sum) = bytes.split_at(24 + len);
    if fnv1a(body) != u64::from_le_bytes(sum.try_into().unwrap()) {
        return Err(format!("version {version}: checksum mismatch (torn write)"));
    }
    Ok(version)
}

fn temp_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".data.bin."))
        .collect()
}

fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    (nanos as u64) | 1
}

fn atomic_file_survives_sigkill(kills: u32) {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("data.bin");
    fs::write(&target, content(0)).unwrap();
    let seed = seed();
    println!("seed {seed:#x}");
    let mut rng = Rng(seed);

    let mut last = 0;
    let (mut advanced, mut mid_write) = (0, 0);
    let start = Instant::now();
    for kill in 0..kills {
        let mut child = common::child_role("child_role_atomic_writer")
            .env("CUSTODIAN_FS_CRASH_TARGET", &target)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.trim_end().ends_with("READY") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "writer exited early");
        }
        // Kill at a random moment within a few commits' time.
        std::thread::sleep(Duration::from_micros(rng.next() % 40_000));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "the writer must die by SIGKILL: {status}"
        );

        let bytes = fs::read(&target).unwrap();
        let version = check(&bytes).unwrap_or_else(|e| panic!("after kill {kill}: {e}"));
        assert!(
            version >= last,
            "after kill {kill}: version went back from {last} to {version}"
        );
        if version > last {
            advanced += 1;
        }
        last = version;
        let temps = temp_files(dir.path());
        assert!(
            temps.len() <= 1,
            "after kill {kill}: temp files accumulate: {temps:?}"
        );
        if !temps.is_empty() {
            mid_write += 1;
        }
    }
    println!(
        "{kills} kills in {:?}: final version {last}, {advanced} kills after new commits, \
         {mid_write} kills during a write",
        start.elapsed()
    );
    // The test has teeth only if the kills landed both between and inside commits.
    assert!(advanced > 0, "no kill happened after a commit");
    assert!(mid_write > 0, "no kill happened during a write");
}

#[test]
fn atomic_file_survives_200_sigkills() {
    atomic_file_survives_sigkill(200);
}

#[test]
#[ignore = "long: 1000 kills"]
fn atomic_file_survives_1000_sigkills() {
    atomic_file_survives_sigkill(1000);
}

#[test]
#[ignore = "child role of the AtomicFile crash tests"]
fn child_role_atomic_writer() {
    let Some(target) = std::env::var_os("CUSTODIAN_FS_CRASH_TARGET") else {
        return;
    };
    let target = PathBuf::from(target);
    let mut version = check(&fs::read(&target).unwrap()).unwrap();
    println!("READY");
    loop {
        version += 1;
        let bytes = content(version);
        let mut file = AtomicFile::create(&target).unwrap();
        for chunk in bytes.chunks(CHUNK) {
            file.write_all(chunk).unwrap();
        }
        file.commit().unwrap();
    }
}

fn lock_counter(processes: u32, rounds: u32) {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("counter"), "0").unwrap();
    let start = Instant::now();
    let children: Vec<_> = (0..processes)
        .map(|_| {
            common::child_role("child_role_counter")
                .env("CUSTODIAN_FS_COUNTER_DIR", dir.path())
                .env("CUSTODIAN_FS_COUNTER_ROUNDS", rounds.to_string())
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        let status = child.wait().unwrap();
        assert!(status.success(), "a counter process failed: {status}");
    }
    let total: u32 = fs::read_to_string(dir.path().join("counter"))
        .unwrap()
        .parse()
        .unwrap();
    println!(
        "{processes} processes x {rounds} rounds in {:?}: counter {total}",
        start.elapsed()
    );
    assert_eq!(total, processes * rounds, "increments were lost");
    assert!(
        !dir.path().join("counter.lock").exists(),
        "the last holder removed the lock file"
    );
}

#[test]
fn lock_file_counter_loses_no_increment() {
    lock_counter(8, 300);
}

#[test]
#[ignore = "long: 8 processes x 3000 rounds"]
fn lock_file_counter_loses_no_increment_long() {
    lock_counter(8, 3000);
}

#[test]
#[ignore = "child role of the LockFile counter tests"]
fn child_role_counter() {
    let Some(dir) = std::env::var_os("CUSTODIAN_FS_COUNTER_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let rounds: u32 = std::env::var("CUSTODIAN_FS_COUNTER_ROUNDS")
        .unwrap()
        .parse()
        .unwrap();
    let (lock_path, counter, inside) = (
        dir.join("counter.lock"),
        dir.join("counter"),
        dir.join("inside"),
    );
    for _ in 0..rounds {
        let lock = LockFile::acquire(&lock_path).unwrap();
        // Fails if another process is inside: mutual exclusion broken.
        fs::File::create_new(&inside).expect("two processes hold the lock at once");
        let n: u32 = fs::read_to_string(&counter).unwrap().parse().unwrap();
        fs::write(&counter, (n + 1).to_string()).unwrap();
        fs::remove_file(&inside).unwrap();
        lock.close().unwrap();
    }
}
