//! custodian::fs against its peers: the same work written by hand with tempfile and std,
//! the `atomic-write-file` crate, and the `fd-lock` crate.
//!
//! Run once with a short configuration, e.g.
//! `cargo bench --bench fs -- --warm-up-time 1 --measurement-time 3`.
//! Files live in a temp dir on the default temp file system (`TMPDIR`), so the fsync
//! figures are that disk's.
//!
//! Two more modes of the same binary (`target/release/deps/fs-HASH`) for the `AtomicFile`
//! rows of BENCHMARKS.md:
//! - `fs-HASH count <scenario> <N> [files]`: one 4 KiB atomic write of `<scenario>`, N
//!   times, in a fresh directory of `/dev/shm` holding `files` other files, and nothing
//!   else; under `strace -c -f`, (calls(N) - calls(0)) / N is the syscalls per write.
//! - `fs-HASH rounds <R> <ops> <scenario>[:files]...`: R rounds, each timing `ops` writes
//!   of every scenario in turn (A, B, C, A, B, C, ...), each in its own `/dev/shm`
//!   directory holding `files` other files; prints each scenario's median time per write
//!   and the min and median over rounds of its ratio to the first scenario.
//!
//! Scenarios: `custodian`, `custodian-nosync`, `custodian-named` (a named temp file, as
//! where `O_TMPFILE` is refused), `custodian-named-keys` (the same, to a new target each
//! write), `hand`, `hand-nosync`, `atomic-write-file`.

use std::fs::{self, File, OpenOptions};
use std::hint::black_box;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use criterion::{BatchSize, Criterion, criterion_group};
use custodian::fs::{AtomicFile, CheckedFile, LockFile, TempDir};

/// The hand-written peer: what careful code does without custodian.
fn hand_written(path: &Path, data: &[u8], sync: bool) {
    let dir = path.parent().unwrap();
    let mut temp = tempfile::NamedTempFile::new_in(dir).unwrap();
    temp.write_all(data).unwrap();
    if sync {
        temp.as_file().sync_all().unwrap();
    }
    temp.persist(path).unwrap();
    if sync {
        File::open(dir).unwrap().sync_all().unwrap();
    }
}

fn custodian_atomic(path: &Path, data: &[u8], sync: bool) {
    let mut file = AtomicFile::builder().sync(sync).create(path).unwrap();
    file.write_all(data).unwrap();
    file.commit().unwrap();
}

fn atomic_write_file(path: &Path, data: &[u8]) {
    let mut file = atomic_write_file::AtomicWriteFile::open(path).unwrap();
    file.write_all(data).unwrap();
    file.commit().unwrap();
}

/// On the disk (the default temp dir, where fsync costs what the disk costs and the
/// shared machine's other I/O adds noise), and on tmpfs (`/dev/shm`: fsync is free, so
/// what is left is each implementation's own overhead).
fn atomic(c: &mut Criterion) {
    let disk = tempfile::tempdir().unwrap();
    atomic_in(c, "disk", disk.path());
    if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
        atomic_in(c, "tmpfs", shm.path());
    }
}

fn atomic_in(c: &mut Criterion, fs_label: &str, dir: &Path) {
    let path = dir.join("target.bin");
    for (label, size) in [("4KiB", 4 * 1024), ("1MiB", 1024 * 1024)] {
        let data = vec![0x5a_u8; size];
        fs::write(&path, &data).unwrap();

        let mut group = c.benchmark_group(format!("atomic_write_{label}_{fs_label}"));
        group.sample_size(20);
        group.bench_function("custodian_AtomicFile", |b| {
            b.iter(|| custodian_atomic(&path, black_box(&data), true))
        });
        group.bench_function("hand_written_tempfile", |b| {
            b.iter(|| hand_written(&path, black_box(&data), true))
        });
        group.bench_function("atomic_write_file", |b| {
            b.iter(|| atomic_write_file(&path, black_box(&data)))
        });
        group.finish();

        let mut group = c.benchmark_group(format!("atomic_write_{label}_{fs_label}_nosync"));
        group.bench_function("custodian_AtomicFile", |b| {
            b.iter(|| custodian_atomic(&path, black_box(&data), false))
        });
        group.bench_function("hand_written_tempfile", |b| {
            b.iter(|| hand_written(&path, black_box(&data), false))
        });
        group.bench_function("custodian_AtomicFile_named_temp_file", |b| {
            b.iter(|| {
                let mut file = AtomicFile::builder()
                    .sync(false)
                    .named_temp_file(true)
                    .create(&path)
                    .unwrap();
                file.write_all(black_box(&data)).unwrap();
                file.commit().unwrap();
            })
        });
        group.finish();
    }
    if fs_label == "tmpfs" {
        atomic_dir_size(c, dir);
    }
}

/// The same 4 KiB commit in a directory of 0, 10 000 and 100 000 other files: the cost of
/// a commit must not depend on what else the directory holds.
fn atomic_dir_size(c: &mut Criterion, parent: &Path) {
    let data = vec![0x5a_u8; 4096];
    let mut group = c.benchmark_group("atomic_write_4KiB_tmpfs_dir");
    group.sample_size(20);
    for files in [0, 10_000, 100_000] {
        let dir = filled_dir(parent, files);
        let path = dir.join("target.bin");
        fs::write(&path, &data).unwrap();
        group.bench_function(format!("custodian_AtomicFile_{files}_files"), |b| {
            b.iter(|| custodian_atomic(&path, black_box(&data), true))
        });
        group.bench_function(format!("hand_written_tempfile_{files}_files"), |b| {
            b.iter(|| hand_written(&path, black_box(&data), true))
        });
        fs::remove_dir_all(&dir).unwrap();
    }
    group.finish();
}

/// A new directory in `parent` holding `files` empty files.
fn filled_dir(parent: &Path, files: usize) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix("dir")
        .tempdir_in(parent)
        .unwrap()
        .keep();
    for i in 0..files {
        File::create(dir.join(format!("file-{i:06}"))).unwrap();
    }
    dir
}

/// One 4 KiB atomic write of `data` to a path.
type Write4k = fn(&Path, &[u8]);

/// One 4 KiB atomic write, by name (see the module docs).
fn scenario(name: &str) -> Write4k {
    match name {
        "custodian" => |p, d| custodian_atomic(p, d, true),
        "custodian-nosync" => |p, d| custodian_atomic(p, d, false),
        "custodian-named" => |p, d| {
            let mut file = AtomicFile::builder()
                .named_temp_file(true)
                .create(p)
                .unwrap();
            file.write_all(d).unwrap();
            file.commit().unwrap();
        },
        // A new key each write, as a cache does: with the named fallback, the stale-file
        // scan must not list the directory once per target.
        "custodian-named-keys" => |p, d| {
            static KEY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let key = KEY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut file = AtomicFile::builder()
                .named_temp_file(true)
                .create(p.with_file_name(format!("key-{key}")))
                .unwrap();
            file.write_all(d).unwrap();
            file.commit().unwrap();
        },
        "hand" => |p, d| hand_written(p, d, true),
        "hand-nosync" => |p, d| hand_written(p, d, false),
        "atomic-write-file" => atomic_write_file,
        other => panic!("unknown scenario {other}"),
    }
}

/// `count <scenario> <N> [files]`: N writes and nothing else, for `strace -c`.
fn count(args: &[String]) {
    let run = scenario(&args[0]);
    let n: usize = args[1].parse().unwrap();
    let files = args.get(2).map_or(0, |f| f.parse().unwrap());
    let dir = filled_dir(Path::new("/dev/shm"), files);
    let path = dir.join("target.bin");
    let data = vec![0x5a_u8; 4096];
    fs::write(&path, &data).unwrap();
    for _ in 0..n {
        run(&path, black_box(&data));
    }
    fs::remove_dir_all(&dir).unwrap();
}

/// `rounds <R> <ops> <scenario>[:files]...`: interleaved rounds (see the module docs).
fn rounds(args: &[String]) {
    let rounds: usize = args[0].parse().unwrap();
    let ops: u32 = args[1].parse().unwrap();
    let data = vec![0x5a_u8; 4096];
    let specs: Vec<(String, Write4k, PathBuf)> = args[2..]
        .iter()
        .map(|spec| {
            let (name, files) = spec.split_once(':').unwrap_or((spec, "0"));
            let dir = filled_dir(Path::new("/dev/shm"), files.parse().unwrap());
            let path = dir.join("target.bin");
            fs::write(&path, &data).unwrap();
            (spec.clone(), scenario(name), path)
        })
        .collect();
    // ns per write, [scenario][round]
    let mut times = vec![Vec::with_capacity(rounds); specs.len()];
    for round in 0..=rounds {
        for (i, (_, run, path)) in specs.iter().enumerate() {
            let start = Instant::now();
            for _ in 0..ops {
                run(path, black_box(&data));
            }
            let per_op = start.elapsed().as_nanos() as f64 / f64::from(ops);
            if round > 0 {
                times[i].push(per_op); // round 0 warms up
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (i, (spec, _, path)) in specs.iter().enumerate() {
        let mut ratios: Vec<f64> = (0..rounds).map(|r| times[i][r] / times[0][r]).collect();
        let mut own = times[i].clone();
        let med = median(&mut own);
        let med_ratio = median(&mut ratios);
        println!(
            "{spec:<28} median {:>9.2} us  ratio to {}: min {:.3} median {:.3}",
            med / 1000.0,
            specs[0].0,
            ratios[0],
            med_ratio
        );
        fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}

fn lock(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.lock");
    let mut group = c.benchmark_group("lock_acquire_release");
    group.bench_function("custodian_LockFile", |b| {
        b.iter(|| LockFile::acquire(&path).unwrap().close().unwrap())
    });
    let keep = LockFile::builder().remove_on_release(false);
    group.bench_function("custodian_LockFile_keep_file", |b| {
        b.iter(|| keep.acquire(&path).unwrap().close().unwrap())
    });
    // What LockFile does, written by hand: record the pid, then unlink (or empty) the file
    // before unlocking (without the inode re-check).
    let pid = format!("{}\n", std::process::id());
    group.bench_function("hand_written_pid_file_unlink", |b| {
        b.iter(|| {
            let file = open_rw(&path);
            file.lock().unwrap();
            file.write_all_at(pid.as_bytes(), 0).unwrap();
            fs::remove_file(&path).unwrap();
            file.unlock().unwrap();
            drop(file);
        })
    });
    group.bench_function("hand_written_pid_file_truncate", |b| {
        b.iter(|| {
            let file = open_rw(&path);
            file.lock().unwrap();
            file.write_all_at(pid.as_bytes(), 0).unwrap();
            file.set_len(0).unwrap();
            file.unlock().unwrap();
            drop(file);
        })
    });
    group.bench_function("open_lock_unlock_close", |b| {
        b.iter(|| {
            let file = open_rw(&path);
            file.lock().unwrap();
            file.unlock().unwrap();
            drop(file);
        })
    });
    let open = open_rw(&path);
    group.bench_function("raw_lock_unlock_open_file", |b| {
        b.iter(|| {
            open.lock().unwrap();
            open.unlock().unwrap();
        })
    });
    let mut rw = fd_lock::RwLock::new(open.try_clone().unwrap());
    group.bench_function("fd_lock_open_file", |b| {
        b.iter(|| drop(rw.write().unwrap()))
    });
    group.bench_function("fd_lock_open_lock_unlock_close", |b| {
        b.iter(|| {
            let file = open_rw(&path);
            let mut lock = fd_lock::RwLock::new(file);
            drop(lock.write().unwrap());
        })
    });
    group.finish();
}

fn checked(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.bin");
    let open = || {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap()
    };
    let mut group = c.benchmark_group("close");
    group.bench_function("custodian_CheckedFile_close", |b| {
        b.iter_batched(
            || CheckedFile::from_file(open(), &path),
            |file| file.close().unwrap(),
            BatchSize::NumIterations(64),
        )
    });
    group.bench_function("std_File_drop", |b| {
        b.iter_batched(open, drop, BatchSize::NumIterations(64))
    });
    group.finish();

    let data = vec![0x5a_u8; 4096];
    let mut group = c.benchmark_group("create_write_4KiB_close");
    group.bench_function("custodian_CheckedFile_close", |b| {
        b.iter(|| {
            let mut file = CheckedFile::create(&path).unwrap();
            file.write_all(black_box(&data)).unwrap();
            file.close().unwrap();
        })
    });
    group.bench_function("std_File_drop", |b| {
        b.iter(|| {
            let mut file = File::create(&path).unwrap();
            file.write_all(black_box(&data)).unwrap();
            drop(file);
        })
    });
    group.finish();
}

fn temp_dir(c: &mut Criterion) {
    let parent = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("tempdir_create_remove");
    group.bench_function("custodian_TempDir_close", |b| {
        b.iter(|| TempDir::new_in(parent.path()).unwrap().close().unwrap())
    });
    group.bench_function("custodian_TempDir_drop", |b| {
        b.iter(|| drop(TempDir::new_in(parent.path()).unwrap()))
    });
    group.bench_function("tempfile_TempDir_drop", |b| {
        b.iter(|| drop(tempfile::TempDir::new_in(parent.path()).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, atomic, lock, checked, temp_dir);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("count") => count(&args[1..]),
        Some("rounds") => rounds(&args[1..]),
        _ => {
            benches();
            Criterion::default().configure_from_args().final_summary();
        }
    }
}

/// Opens (creating if needed) a lock file for reading and writing, as the by-hand peers do.
fn open_rw(path: &std::path::Path) -> std::fs::File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap()
}
