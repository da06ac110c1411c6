use std::collections::BTreeMap;
use std::fmt;

use super::{LiveResource, counters, live};

/// One kind's counters. `#[non_exhaustive]`: more counters may come.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counts {
    /// Resources acquired (tickets created).
    pub acquired: u64,
    /// Resources released (tickets dropped), whether or not their cleanup succeeded.
    pub released: u64,
    /// Cleanups that failed (reported with [`Ticket::failure`](super::Ticket::failure)).
    pub failed: u64,
}

impl Counts {
    /// Resources alive: acquired minus released. In a snapshot taken while other threads
    /// acquire and release it may be low, never high (see [`snapshot`]); in a difference
    /// made by [`Snapshot::since`] it can be negative (more released than acquired in
    /// between).
    pub fn live(&self) -> i64 {
        self.acquired as i64 - self.released as i64
    }
}

/// The ledger's counters at one moment, per kind. Made by [`snapshot`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    kinds: BTreeMap<&'static str, Counts>,
}

/// The ledger's counters now, per kind.
///
/// Every acquisition and release that happened before the call (in the happens-before
/// sense) is counted, on every thread; when no other thread is acquiring or releasing,
/// the figures are exact.
///
/// While other threads acquire and release, the counters move during the call. For
/// each kind they are read so that [`Counts::live`] is **never more** than the number
/// of that kind's resources alive at one moment during the call, and **never
/// negative**: `acquired` is read first, then `released`, capped at `acquired`. Under
/// churn `live` can therefore be low (a release counted whose acquisition came after
/// the read), but never high: a snapshot never reports a leak that is not there.
///
/// ```
/// let snapshot = custodian::ledger::snapshot();
/// println!("{snapshot}");
/// ```
pub fn snapshot() -> Snapshot {
    let mut kinds = BTreeMap::<&'static str, Counts>::new();
    for (name, acquired, released, failed) in counters::totals() {
        let counts = kinds.entry(name).or_default();
        counts.acquired += acquired;
        counts.released += released;
        counts.failed += failed;
    }
    Snapshot { kinds }
}

impl Snapshot {
    /// The counters of `kind` (all zero for a kind never seen).
    pub fn get(&self, kind: &str) -> Counts {
        self.kinds.get(kind).copied().unwrap_or_default()
    }

    /// Every kind with its counters, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, Counts)> + '_ {
        self.kinds.iter().map(|(&k, &c)| (k, c))
    }

    /// The sum over all kinds.
    pub fn total(&self) -> Counts {
        self.kinds.values().fold(Counts::default(), |a, c| Counts {
            acquired: a.acquired + c.acquired,
            released: a.released + c.released,
            failed: a.failed + c.failed,
        })
    }

    /// What happened between `earlier` and this snapshot.
    ///
    /// ```
    /// use custodian::ledger;
    ///
    /// let before = ledger::snapshot();
    /// drop(custodian::CleanupStack::new());
    /// let delta = ledger::snapshot().since(&before);
    /// assert_eq!(delta.get("custodian::CleanupStack").acquired, 1);
    /// ```
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        let kinds = self
            .kinds
            .iter()
            .map(|(&kind, now)| {
                let then = earlier.get(kind);
                let delta = Counts {
                    acquired: now.acquired.saturating_sub(then.acquired),
                    released: now.released.saturating_sub(then.released),
                    failed: now.failed.saturating_sub(then.failed),
                };
                (kind, delta)
            })
            .filter(|(_, c)| *c != Counts::default())
            .collect();
        Snapshot { kinds }
    }
}

impl fmt::Display for Snapshot {
    /// A table: kind, live, acquired, released, failed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.kinds.keys().map(|k| k.len()).max().unwrap_or(0).max(4);
        writeln!(
            f,
            "{:<width$}  {:>8}  {:>10}  {:>10}  {:>8}",
            "kind", "live", "acquired", "released", "failed"
        )?;
        for (kind, c) in &self.kinds {
            writeln!(
                f,
                "{:<width$}  {:>8}  {:>10}  {:>10}  {:>8}",
                kind,
                c.live(),
                c.acquired,
                c.released,
                c.failed
            )?;
        }
        Ok(())
    }
}

/// The full ledger report: counters per kind and every tracked live resource.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Report {
    /// Counters per kind.
    pub snapshot: Snapshot,
    /// Live resources acquired while site tracking was on.
    pub live: Vec<LiveResource>,
}

/// The ledger's counters and live resources now; prints as a table.
///
/// ```
/// println!("{}", custodian::ledger::report());
/// ```
pub fn report() -> Report {
    Report {
        snapshot: snapshot(),
        live: live::live(),
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.snapshot)?;
        if self.live.is_empty() {
            writeln!(f, "no tracked resource is alive")
        } else {
            writeln!(f, "alive:")?;
            for r in &self.live {
                writeln!(f, "  {r}")?;
            }
            Ok(())
        }
    }
}
