//! A cheap monotonic clock for ages and hold times that need not be finer than a few
//! milliseconds.
//!
//! On Linux it is `CLOCK_MONOTONIC_COARSE` (a vDSO read of the time of the last timer
//! tick: a few nanoseconds, against 20–60 ns for `Instant::now` on a virtual machine),
//! behind by at most one tick (1–10 ms, 4 ms with `HZ=250`). Elsewhere it is `Instant`.
//!
//! It is read through the C library rather than rustix: rustix finds the vDSO by parsing
//! the auxiliary vector itself, which crashes programs run under valgrind (rustix issue
//! 1559); the C library's `clock_gettime` falls back to the system call there. Since the
//! ledger reads this clock in every debug-build guard, a crash there would make every
//! program using custodian impossible to run under valgrind.

/// Nanoseconds on the coarse clock, from an arbitrary fixed start.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[inline]
pub(crate) fn coarse_now() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable `timespec`; `CLOCK_MONOTONIC_COARSE` exists on
    // every Linux since 2.6.32 and cannot fail with a valid pointer (if it did, `t` stays
    // zero, which only makes ages read as longer).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut t) };
    (t.tv_sec as u64).wrapping_mul(1_000_000_000) + t.tv_nsec as u64
}

/// Nanoseconds since the first call (no coarse clock here: `Instant`).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
#[inline]
pub(crate) fn coarse_now() -> u64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}
