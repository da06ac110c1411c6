//! Non-Unix staging of an `AtomicFile`: a named temp file from tempfile, renamed by path
//! (no directory handle, no removal of crashed writers' files: the weaker behaviour
//! documented in `custodian::fs`).

use std::ffi::OsStr;
use std::fs::{self, File, Permissions};
use std::io;
use std::path::{Path, PathBuf};

use tempfile::TempPath;

use super::{RAND_LEN, temp_prefix};
use crate::fs::imp;
use crate::io_error::path_error;

/// What `create` needs to know to stage the new content.
pub(super) struct Options<'a> {
    pub(super) permissions: Option<Permissions>,
    pub(super) keep_permissions: bool,
    pub(super) temp_dir: Option<&'a Path>,
    /// Unused here: crashed writers' files are not looked for.
    pub(super) remove_stale: bool,
    /// Always a named temp file here.
    pub(super) named: bool,
}

/// Where the new content is staged and how it is published.
pub(super) struct Stage {
    /// The named temp file, removed when dropped; `None` once published or discarded.
    temp: Option<TempPath>,
    target: PathBuf,
    dir: PathBuf,
}

impl Stage {
    pub(super) fn create(
        target: &Path,
        dir: &Path,
        name: &OsStr,
        options: &Options<'_>,
    ) -> io::Result<(File, Stage)> {
        let _ = (options.remove_stale, options.named);
        let permissions = mode_for(target, options)?;
        let staging = match options.temp_dir {
            Some(staging) => {
                check_same_fs(staging, dir)?;
                staging
            }
            None => dir,
        };
        let mut builder = tempfile::Builder::new();
        builder
            .prefix(&temp_prefix(name))
            .suffix(".tmp")
            .rand_bytes(RAND_LEN);
        if let Some(permissions) = permissions {
            builder.permissions(permissions);
        }
        let temp = builder
            .tempfile_in(staging)
            .map_err(|e| path_error("cannot create a temp file in", staging, e))?;
        let (file, path) = temp.into_parts();
        Ok((
            file,
            Stage {
                temp: Some(path),
                target: target.to_path_buf(),
                dir: dir.to_path_buf(),
            },
        ))
    }

    pub(super) fn temp_path(&self) -> Option<&Path> {
        self.temp.as_deref()
    }

    pub(super) fn publish(
        &mut self,
        file: &File,
        target: &Path,
        sync: bool,
    ) -> Result<(), Publish> {
        if sync {
            file.sync_all().map_err(Publish::Sync)?;
        }
        let Some(temp) = self.temp.take() else {
            unreachable!("an AtomicFile is published at most once")
        };
        match temp.persist(&self.target) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.temp = Some(e.path);
                Err(Publish::Rename(path_error(
                    "cannot rename the new content over",
                    target,
                    e.error,
                )))
            }
        }
    }

    pub(super) fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir).and_then(|d| d.sync_all())
    }

    pub(super) fn discard(&mut self) -> io::Result<()> {
        match self.temp.take() {
            Some(temp) => temp.close(),
            None => Ok(()),
        }
    }
}

/// Why [`Stage::publish`] failed.
pub(super) enum Publish {
    Sync(io::Error),
    /// Naming the target.
    Rename(io::Error),
}

/// The permissions the new file gets; fails if the target is a directory.
fn mode_for(target: &Path, options: &Options<'_>) -> io::Result<Option<Permissions>> {
    match fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => {
            return Err(path_error(
                "cannot replace",
                target,
                io::Error::new(io::ErrorKind::IsADirectory, "it is a directory"),
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(path_error("cannot inspect", target, e)),
    }
    // Permission bits are a Unix notion: only explicit ones are passed on, and
    // `keep_permissions` has nothing to keep.
    let _ = options.keep_permissions;
    Ok(options.permissions.clone())
}

/// Fails with `CrossesDevices` if `staging` is not on `dir`'s file system.
fn check_same_fs(staging: &Path, dir: &Path) -> io::Result<()> {
    let staging_meta =
        fs::metadata(staging).map_err(|e| path_error("cannot inspect the temp dir", staging, e))?;
    let dir_meta = fs::metadata(dir).map_err(|e| path_error("cannot inspect", dir, e))?;
    if imp::same_device(&staging_meta, &dir_meta) {
        return Ok(());
    }
    Err(path_error(
        "cannot stage the new file in",
        staging,
        io::Error::new(
            io::ErrorKind::CrossesDevices,
            format!(
                "it is on another file system than {}, so the rename could not be atomic",
                dir.display()
            ),
        ),
    ))
}
