//! Crash tests for custodian::fs with real processes and real SIGKILLs.
//!
//! - `AtomicFile`: a child rewrites a large file in a loop and is killed at random
//!   moments; after each kill the file is one complete version (checksum), versions never
//!   go back, and at most one temp file is left behind. On Linux (unnamed temp files)
//!   nothing is left but, after a kill while publishing, the complete new content under
//!   the publish name, which the next commit removes.
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

/// The publish name of the target `data.bin` (see `AtomicFile`'s *Crashes*).
const PUBLISH_NAME: &str = ".data.bin.custodian.tmp";

/// `kills` writers killed at random moments, staging in named temp files if `named`.
/// With unnamed temp files (Linux), after each kill no temp file at all may remain but
/// the publish name holding a complete version, and after the kills and one more commit,
/// nothing at all.
fn atomic_file_survives_sigkill(kills: u32, named: bool) {
    let nothing_left = !named && cfg!(target_os = "linux");
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("data.bin");
    fs::write(&target, content(0)).unwrap();
    let seed = seed();
    println!("seed {seed:#x}");
    let mut rng = Rng(seed);

    let mut last = 0;
    let (mut advanced, mut mid_write, mut publishing) = (0, 0, 0);
    let start = Instant::now();
    for kill in 0..kills {
        let mut child = common::child_role("child_role_atomic_writer")
            .env("CUSTODIAN_FS_CRASH_TARGET", &target)
            .env(
                "CUSTODIAN_FS_CRASH_NAMED",
                if named { "named" } else { "unnamed" },
            )
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
        // The child says `W` before each create and `C` after each commit.
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        if rest.lines().last() == Some("W") {
            mid_write += 1;
        }
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
        if nothing_left && let Some(temp) = temps.first() {
            assert_eq!(temp, PUBLISH_NAME, "after kill {kill}: a temp file is left");
            let bytes = fs::read(dir.path().join(temp)).unwrap();
            check(&bytes).unwrap_or_else(|e| panic!("after kill {kill}, {temp}: {e}"));
            publishing += 1;
        }
    }
    println!(
        "{kills} kills in {:?}: final version {last}, {advanced} kills after new commits, \
         {mid_write} kills during a write, {publishing} left the publish name",
        start.elapsed()
    );
    if nothing_left {
        let mut file = AtomicFile::create(&target).unwrap();
        file.write_all(&content(last + 1)).unwrap();
        file.commit().unwrap();
        assert_eq!(
            temp_files(dir.path()),
            Vec::<String>::new(),
            "one more commit leaves no temp file at all"
        );
    }
    // The test has teeth only if the kills landed both between and inside commits.
    assert!(advanced > 0, "no kill happened after a commit");
    assert!(mid_write > 0, "no kill happened during a write");
}

/// The default staging: on Linux an unnamed temp file, so no temp file is left at all.
#[test]
fn atomic_file_survives_200_sigkills() {
    atomic_file_survives_sigkill(200, false);
}

/// Named temp files (as where unnamed ones are refused): at most one stale temp file,
/// removed by the next writer process.
#[test]
fn atomic_file_with_named_temp_files_survives_100_sigkills() {
    atomic_file_survives_sigkill(100, true);
}

#[test]
#[ignore = "long: 1000 kills"]
fn atomic_file_survives_1000_sigkills() {
    atomic_file_survives_sigkill(1000, false);
}

#[test]
#[ignore = "child role of the AtomicFile crash tests"]
fn child_role_atomic_writer() {
    let Some(target) = std::env::var_os("CUSTODIAN_FS_CRASH_TARGET") else {
        return;
    };
    let target = PathBuf::from(target);
    let named = std::env::var("CUSTODIAN_FS_CRASH_NAMED").is_ok_and(|v| v == "named");
    let mut version = check(&fs::read(&target).unwrap()).unwrap();
    println!("READY");
    loop {
        version += 1;
        let bytes = content(version);
        println!("W");
        let mut file = AtomicFile::builder()
            .named_temp_file(named)
            .create(&target)
            .unwrap();
        for chunk in bytes.chunks(CHUNK) {
            file.write_all(chunk).unwrap();
        }
        file.commit().unwrap();
        println!("C");
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
