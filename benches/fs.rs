//! custodian::fs against its peers: the same work written by hand with tempfile and std,
//! the `atomic-write-file` crate, and the `fd-lock` crate.
//!
//! Run once with a short configuration, e.g.
//! `cargo bench --bench fs -- --warm-up-time 1 --measurement-time 3`.
//! Files live in a temp dir on the default temp file system (`TMPDIR`), so the fsync
//! figures are that disk's.

use std::fs::{self, File, OpenOptions};
use std::hint::black_box;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
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
        group.bench_function("custodian_AtomicFile_no_stale_scan", |b| {
            b.iter(|| {
                let mut file = AtomicFile::builder()
                    .sync(false)
                    .remove_stale(false)
                    .create(&path)
                    .unwrap();
                file.write_all(black_box(&data)).unwrap();
                file.commit().unwrap();
            })
        });
        group.finish();
    }
}

fn lock(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.lock");
    let mut group = c.benchmark_group("lock_acquire_release");
    group.bench_function("custodian_LockFile", |b| {
        b.iter(|| LockFile::acquire(&path).unwrap().close().unwrap())
    });
    let keep = {
        let mut options = LockFile::options();
        options.remove_on_release(false);
        options
    };
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
criterion_main!(benches);

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
