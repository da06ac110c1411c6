//! The service's durable key-value state: an append log with group commit, compacted
//! into a snapshot with `AtomicFile`.
//!
//! - `SET` hands its record to one committer thread and waits. The committer takes every
//!   record that is waiting, appends them to `log` in one write, `fsync`s once (checked:
//!   a failed `fsync` poisons the log, nothing is acknowledged after it), then applies
//!   them to the map and acknowledges them. So a `SET` is acknowledged only once it is
//!   on disk, and many clients' writes share one `fsync`.
//! - At start and at shutdown the whole map is written to `snapshot` with `AtomicFile`
//!   (temp file, fsync, rename, fsync the directory), then `log` is emptied. A crash at
//!   any moment leaves the old snapshot or the new one, never half of one; temp files of
//!   a crashed compaction are removed by the next one.
//! - A crash in the middle of an append leaves a torn last line in `log`: recovery drops
//!   it (it was never acknowledged) and keeps every complete record before it.
//!
//! Both files hold one record per line: `key value\n` (a key has no spaces; a value is
//! the rest of the line).

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, mpsc};
use std::thread::JoinHandle;

use custodian::fs::{AtomicFile, CheckedFile};
use tokio::sync::oneshot;

/// The most records committed by one `fsync` (bounds the latency of the first one).
const MAX_BATCH: usize = 1024;

/// Counters shown by the admin socket's `STATUS`.
#[derive(Debug, Default)]
pub struct Stats {
    /// `SET`s made durable and acknowledged.
    pub acked: AtomicU64,
    /// `fsync`s of the log (each commits a batch of `SET`s).
    pub fsyncs: AtomicU64,
}

/// What recovery found at start.
#[derive(Debug)]
pub struct Recovered {
    /// Keys in the state after replaying the snapshot and the log.
    pub keys: usize,
    /// Complete records replayed from the log.
    pub log_records: usize,
    /// Bytes of a torn record at the end of the log, dropped.
    pub torn_bytes: usize,
}

type Map = Arc<RwLock<HashMap<String, String>>>;
/// Where the committer says whether a `SET` is durable.
type Ack = oneshot::Sender<Result<(), String>>;

enum Msg {
    Set {
        key: String,
        value: String,
        ack: Ack,
    },
    Stop,
}

/// The state directory's data: owned by the service, closed once at shutdown.
#[derive(Debug)]
pub struct Store {
    handle: StoreHandle,
    dir: PathBuf,
    committer: JoinHandle<io::Result<CheckedFile>>,
}

/// What connections use: `set` (waits until durable) and `get`. Cheap to clone.
#[derive(Clone, Debug)]
pub struct StoreHandle {
    map: Map,
    to_committer: mpsc::Sender<Msg>,
    stats: Arc<Stats>,
}

impl Store {
    /// Recovers the state in `dir` (snapshot, then the log's complete records), compacts
    /// it into a new snapshot, and starts the committer on an empty log.
    pub fn open(dir: &Path) -> io::Result<(Store, Recovered)> {
        let mut map = HashMap::new();
        let snapshot = dir.join("snapshot");
        match fs::read(&snapshot) {
            Ok(bytes) => {
                let (records, rest) = replay(&bytes, &mut map);
                if rest != 0 {
                    // AtomicFile never publishes half a snapshot: this is damage.
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: malformed after {records} records", snapshot.display()),
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(named(e, "cannot read", &snapshot)),
        }
        let log_path = dir.join("log");
        let (log_records, torn_bytes) = match fs::read(&log_path) {
            Ok(bytes) => replay(&bytes, &mut map),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (0, 0),
            Err(e) => return Err(named(e, "cannot read", &log_path)),
        };

        // Compact: the snapshot takes everything, then the log (torn tail included) goes.
        write_snapshot(&snapshot, &map)?;
        let mut log =
            CheckedFile::open_with(&log_path, OpenOptions::new().append(true).create(true))?
                .sync_on_close(true);
        empty_log(&mut log)?;

        let recovered = Recovered {
            keys: map.len(),
            log_records,
            torn_bytes,
        };
        let map: Map = Arc::new(RwLock::new(map));
        let stats = Arc::new(Stats::default());
        let (to_committer, from_clients) = mpsc::channel();
        let committer = {
            let (map, stats) = (Arc::clone(&map), Arc::clone(&stats));
            std::thread::Builder::new()
                .name("committer".into())
                .spawn(move || commit_loop(log, &from_clients, &map, &stats))?
        };
        let handle = StoreHandle {
            map,
            to_committer,
            stats,
        };
        Ok((
            Store {
                handle,
                dir: dir.to_path_buf(),
                committer,
            },
            recovered,
        ))
    }

    /// A handle for a connection.
    pub fn handle(&self) -> StoreHandle {
        self.handle.clone()
    }

    /// Commits what is still queued, writes the final snapshot and empties the log.
    /// Returns the number of keys written. `SET`s sent after this are refused.
    pub fn close(self) -> io::Result<usize> {
        // The channel is FIFO: every SET queued before `Stop` is committed first.
        let _ = self.handle.to_committer.send(Msg::Stop);
        let mut log = self
            .committer
            .join()
            .map_err(|_| io::Error::other("the committer thread panicked"))??;
        let map = self.handle.map.read().unwrap_or_else(|e| e.into_inner());
        write_snapshot(&self.dir.join("snapshot"), &map)?;
        empty_log(&mut log)?;
        log.close()?;
        Ok(map.len())
    }
}

impl StoreHandle {
    /// Stores `key = value`; returns once it is on disk.
    ///
    /// # Errors
    /// The log cannot be written or synced (the message of the first failure, for every
    /// later `SET` too), or the store is closed.
    pub async fn set(&self, key: &str, value: &str) -> Result<(), String> {
        let (ack, acked) = oneshot::channel();
        let msg = Msg::Set {
            key: key.to_owned(),
            value: value.to_owned(),
            ack,
        };
        self.to_committer
            .send(msg)
            .map_err(|_| "the store is closed".to_owned())?;
        acked.await.map_err(|_| "the store is closed".to_owned())?
    }

    /// The durable value of `key`.
    pub fn get(&self, key: &str) -> Option<String> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.get(key).cloned()
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

/// The committer thread: one write and one `fsync` per batch of waiting `SET`s.
fn commit_loop(
    mut log: CheckedFile,
    queue: &mpsc::Receiver<Msg>,
    map: &RwLock<HashMap<String, String>>,
    stats: &Stats,
) -> io::Result<CheckedFile> {
    let mut poisoned: Option<String> = None;
    let mut batch = Vec::new();
    // Ends on `Stop`, or when every handle is gone.
    while let Ok(first) = queue.recv() {
        let mut stop = false;
        for msg in std::iter::once(first).chain(std::iter::from_fn(|| queue.try_recv().ok())) {
            match msg {
                Msg::Set { key, value, ack } => batch.push((key, value, ack)),
                Msg::Stop => {
                    stop = true;
                    break;
                }
            }
            if batch.len() == MAX_BATCH {
                break;
            }
        }
        if !batch.is_empty() {
            let written = match &poisoned {
                Some(first) => Err(first.clone()),
                None => {
                    stats.fsyncs.fetch_add(1, Ordering::Relaxed);
                    append(&mut log, &batch).map_err(|e| e.to_string())
                }
            };
            if let Err(e) = &written {
                // Like PostgreSQL since "fsyncgate": after a failed fsync the kernel may
                // have dropped the dirty pages; nothing written later can be trusted.
                if poisoned.is_none() {
                    tracing::error!("log not durable, refusing writes from now on: {e}");
                    poisoned = Some(e.clone());
                }
            }
            let mut map = map.write().unwrap_or_else(|e| e.into_inner());
            for (key, value, ack) in batch.drain(..) {
                if written.is_ok() {
                    map.insert(key, value);
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                }
                let _ = ack.send(written.clone());
            }
        }
        if stop {
            break;
        }
    }
    match poisoned {
        None => Ok(log),
        Some(e) => Err(io::Error::other(format!("the log was not durable: {e}"))),
    }
}

fn append(log: &mut CheckedFile, batch: &[(String, String, Ack)]) -> io::Result<()> {
    for (key, value, _) in batch {
        writeln!(log, "{key} {value}")?;
    }
    log.sync_all() // flush + fsync, errors checked and naming the file
}

/// Replays `key value` lines into `map`; returns the records replayed and the bytes left
/// after the last complete, well-formed one.
fn replay(bytes: &[u8], map: &mut HashMap<String, String>) -> (usize, usize) {
    let mut records = 0;
    let mut done = 0;
    while let Some(end) = bytes[done..].iter().position(|&b| b == b'\n') {
        let line = &bytes[done..done + end];
        let Some((key, value)) = std::str::from_utf8(line)
            .ok()
            .and_then(|l| l.split_once(' '))
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        else {
            break;
        };
        map.insert(key.to_owned(), value.to_owned());
        records += 1;
        done += end + 1;
    }
    (records, bytes.len() - done)
}

fn write_snapshot(path: &Path, map: &HashMap<String, String>) -> io::Result<()> {
    let mut file = AtomicFile::create(path)?;
    for (key, value) in map {
        writeln!(file, "{key} {value}")?;
    }
    file.commit()?; // flush, fsync, rename over the old snapshot, fsync the directory
    Ok(())
}

/// Empties the log once the snapshot holds everything.
fn empty_log(log: &mut CheckedFile) -> io::Result<()> {
    log.flush()?;
    log.get_ref()
        .set_len(0)
        .map_err(|e| named(e, "cannot truncate", log.path()))?;
    log.sync_all()
}

fn named(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}
