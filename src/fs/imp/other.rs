//! Non-Unix platforms: the weaker behaviour documented on each guard.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Whether the result of closing a descriptor is visible on this platform.
pub(crate) const CHECKS_CLOSE: bool = false;

/// Closes `file`. The result of closing the handle is not visible through std here.
pub(crate) fn close(file: File) -> io::Result<()> {
    drop(file);
    Ok(())
}

/// No `O_NOFOLLOW` here: options unchanged.
pub(crate) fn no_follow(options: &mut OpenOptions) -> &mut OpenOptions {
    options
}

/// Nothing to add here: options unchanged.
pub(crate) fn no_follow_inert(options: &mut OpenOptions) -> &mut OpenOptions {
    options
}

/// A path a guard keeps: as given (std's functions take it as it is here).
#[derive(Debug)]
pub(crate) struct PathName(PathBuf);

impl PathName {
    pub(crate) fn new(path: &Path) -> io::Result<PathName> {
        Ok(PathName(path.to_path_buf()))
    }

    pub(crate) fn as_path(&self) -> &Path {
        &self.0
    }
}

/// Opens `name` for reading and writing; with `create_new`, creates it.
pub(crate) fn open_rw_inert(name: &PathName, create_new: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create_new)
        .open(&name.0)
}

/// What std's metadata says about an open file.
pub(crate) struct FileInfo(Metadata);

impl FileInfo {
    pub(crate) fn id(&self) -> FileId {
        FileId
    }

    pub(crate) fn is_file(&self) -> bool {
        self.0.is_file()
    }

    pub(crate) fn size(&self) -> u64 {
        self.0.len()
    }

    pub(crate) fn modified(&self) -> Option<SystemTime> {
        self.0.modified().ok()
    }
}

pub(crate) fn file_info(file: &File) -> io::Result<FileInfo> {
    file.metadata().map(FileInfo)
}

/// Whether something is at `name` (no identity to give here).
pub(crate) fn path_id(name: &PathName) -> io::Result<FileId> {
    fs::symlink_metadata(&name.0).map(|_| FileId)
}

pub(crate) fn remove(name: &PathName) -> io::Result<()> {
    fs::remove_file(&name.0)
}

/// No stable file identity in std here: every file compares equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileId;

/// No stable device id in std here: assumed the same (the rename reports otherwise).
pub(crate) fn same_device(_a: &Metadata, _b: &Metadata) -> bool {
    true
}

/// Writes `bytes` at offset 0 (moves the cursor).
pub(crate) fn write_at_start(mut file: &File, bytes: &[u8]) -> io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    file.write_all(bytes)
}

/// Reads from offset 0 (moves the cursor).
pub(crate) fn read_at_start(mut file: &File, buf: &mut [u8]) -> io::Result<usize> {
    file.seek(SeekFrom::Start(0))?;
    file.read(buf)
}

/// No liveness check of a pid here: a lock record nobody holds is taken over.
pub(crate) fn record_writer_running(_pid: u32, _written: Option<std::time::SystemTime>) -> bool {
    false
}

/// Whether removing files of crashed writers is supported here.
pub(crate) const CLEANS_STALE: bool = false;

/// Whether a lock file's identity can be re-checked (and so safely unlinked) here.
pub(crate) const CHECKS_IDENTITY: bool = false;
