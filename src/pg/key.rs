//! Lock keys and the SQL that names them.

use std::borrow::Cow;
use std::fmt;

/// What an advisory lock is keyed on: an `i64`, a pair of `i32`, or a name.
///
/// The three forms map to PostgreSQL's two advisory-lock key spaces:
/// - `Id(k)` is `pg_advisory_lock(k::bigint)`;
/// - `Pair(a, b)` is `pg_advisory_lock(a::int, b::int)`, a separate key space
///   (`Pair(0, 1)` and `Id(1)` are different locks);
/// - `Name(s)` is `Id(hashtextextended(s, 0))`, hashed **by the server**, so that every
///   client in any language that runs `pg_advisory_lock(hashtextextended('s', 0))` takes
///   the same lock. Two names may hash to the same key (a 64-bit hash: unlikely, but
///   pick `Id` keys from a registry where that matters).
///
/// ```
/// use custodian::pg::LockKey;
///
/// assert_eq!(LockKey::from(42), LockKey::Id(42));
/// assert_eq!(LockKey::from((7, 9)), LockKey::Pair(7, 9));
/// assert_eq!(LockKey::from("nightly-report").to_string(), "\"nightly-report\"");
/// ```
///
/// More key forms may come (`#[non_exhaustive]`): a `match` on a key needs a `_` arm.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LockKey {
    /// A 64-bit key.
    Id(i64),
    /// A pair of 32-bit keys (PostgreSQL's two-argument form).
    Pair(i32, i32),
    /// A name, hashed by the server with `hashtextextended(name, 0)`.
    Name(Cow<'static, str>),
}

impl From<i64> for LockKey {
    fn from(k: i64) -> Self {
        LockKey::Id(k)
    }
}

impl From<(i32, i32)> for LockKey {
    fn from((a, b): (i32, i32)) -> Self {
        LockKey::Pair(a, b)
    }
}

impl From<&'static str> for LockKey {
    fn from(name: &'static str) -> Self {
        LockKey::Name(Cow::Borrowed(name))
    }
}

impl From<String> for LockKey {
    fn from(name: String) -> Self {
        LockKey::Name(Cow::Owned(name))
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockKey::Id(k) => write!(f, "{k}"),
            LockKey::Pair(a, b) => write!(f, "({a}, {b})"),
            LockKey::Name(name) => write!(f, "{name:?}"),
        }
    }
}

/// A key as the server sees it: a name is resolved to its hash first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Resolved {
    Id(i64),
    Pair(i32, i32),
}

impl Resolved {
    /// The lock functions' arguments.
    pub(crate) fn args(self) -> &'static str {
        match self {
            Resolved::Id(_) => "$1::int8",
            Resolved::Pair(..) => "$1::int4, $2::int4",
        }
    }

    /// The key in the fence table: `(space, key)`, with a pair packed into 64 bits.
    pub(crate) fn fence_columns(self) -> &'static str {
        match self {
            Resolved::Id(_) => "1, $1::int8",
            Resolved::Pair(..) => "2, (($1::int8 << 32) | ($2::int8 & 4294967295))",
        }
    }

    /// How `pg_locks` shows the key: `(classid, objid, objsubid)`.
    pub(crate) fn pg_locks(self) -> (u32, u32, i16) {
        match self {
            // The high and low halves of the 64-bit key, as unsigned oids.
            Resolved::Id(k) => ((k as u64 >> 32) as u32, k as u64 as u32, 1),
            Resolved::Pair(a, b) => (a as u32, b as u32, 2),
        }
    }

    /// Which statements a key of this form needs (one set per form).
    pub(crate) fn form(self) -> usize {
        match self {
            Resolved::Id(_) => 0,
            Resolved::Pair(..) => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_locks_splits_a_64_bit_key_into_unsigned_halves() {
        assert_eq!(Resolved::Id(1).pg_locks(), (0, 1, 1));
        assert_eq!(Resolved::Id(-1).pg_locks(), (u32::MAX, u32::MAX, 1));
        assert_eq!(
            Resolved::Id(0x1234_5678_9abc_def0).pg_locks(),
            (0x1234_5678, 0x9abc_def0, 1)
        );
        assert_eq!(Resolved::Pair(-2, 3).pg_locks(), (u32::MAX - 1, 3, 2));
    }
}
