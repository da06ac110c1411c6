//! Non-Unix platforms: the weaker behaviour documented on each guard.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};

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

/// No Unix modes here: options unchanged.
pub(crate) fn create_mode(options: &mut OpenOptions, _mode: u32) -> &mut OpenOptions {
    options
}

/// No stable file identity in std here: every file compares equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileId;

impl FileId {
    pub(crate) fn of(_meta: &Metadata) -> FileId {
        FileId
    }
}

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
