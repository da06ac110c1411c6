//! `Slot`: one type-erased value, stored inline when it is small, boxed otherwise.
//!
//! Scopes and stacks keep a list of cleanups of different closure types. The obvious
//! `Box<dyn FnOnce()>` costs one `malloc` + `free` per cleanup, which is most of the cost
//! of a scope with one `defer` (a cleanup usually captures a reference or two). A `Slot`
//! keeps values of up to [`WORDS`] machine words in place and boxes the rest; the owner
//! keeps, next to each slot, a function pointer monomorphised for the value's type (see
//! `Entry` in `scope.rs` and `stack.rs`), which is the only way the value is read back.
//!
//! This is the only `unsafe` storage in the crate. Its contract is small:
//! - [`Slot::take::<T>`] must be called with the `T` given to [`Slot::new`];
//! - `take` consumes the slot, so a value is read back at most once;
//! - a slot that is never taken leaks its value (like `mem::forget`), never drops it.
//!
//! The owners uphold the first point by pairing `Slot::new::<T>` and a `take::<T>` call
//! inside one generic function, and the last by running every entry they hold.
//! `tests` below run under Miri (`cargo +nightly miri test --lib slot`).

use std::mem::{MaybeUninit, align_of, size_of};

/// Values up to this many words (and word-aligned or less) are stored inline.
pub(crate) const WORDS: usize = 3;

type Buf = MaybeUninit<[usize; WORDS]>;

/// A value of a type known only to its owner; see the module documentation.
///
/// It is `Send` and `Sync` whatever it holds (it is plain bytes): the owners require
/// `Send` of the values they store where they need it, at the point of insertion.
pub(crate) struct Slot {
    buf: Buf,
}

impl Slot {
    /// `true` when a `T` is stored inline rather than boxed.
    const fn fits<T>() -> bool {
        size_of::<T>() <= size_of::<Buf>() && align_of::<T>() <= align_of::<Buf>()
    }

    /// Stores `value`: in place if it fits, else in a new `Box`.
    #[inline]
    pub(crate) fn new<T>(value: T) -> Slot {
        let mut buf = Buf::uninit();
        if Slot::fits::<T>() {
            // SAFETY: `fits` checked that `buf` is large enough and aligned enough for a
            // `T`; `buf` is a fresh local, so nothing else points into it.
            unsafe { buf.as_mut_ptr().cast::<T>().write(value) };
        } else {
            let boxed = Box::into_raw(Box::new(value));
            // SAFETY: a pointer is one word, word-aligned, and `buf` holds three.
            unsafe { buf.as_mut_ptr().cast::<*mut T>().write(boxed) };
        }
        Slot { buf }
    }

    /// Gives the value back, consuming the slot.
    ///
    /// # Safety
    /// `self` must have been made by `Slot::new::<T>` with this same `T`.
    #[inline]
    pub(crate) unsafe fn take<T>(self) -> T {
        if Slot::fits::<T>() {
            // SAFETY: by the caller's promise, `new::<T>` wrote a `T` at the start of
            // `buf` (same `fits` answer: it depends on `T` only), and the slot is
            // consumed here, so the value is read out once. Moving the `MaybeUninit`
            // bytes in and out keeps pointer provenance.
            unsafe { self.buf.as_ptr().cast::<T>().read() }
        } else {
            // SAFETY: as above, `new::<T>` stored the pointer from `Box::into_raw` of a
            // `Box<T>`; it is turned back into a `Box` once, here.
            unsafe { *Box::from_raw(self.buf.as_ptr().cast::<*mut T>().read()) }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Run under Miri too: `cargo +nightly miri test --lib slot` (it also reports leaks).

    use super::Slot;
    use std::cell::Cell;
    use std::marker::PhantomData;
    use std::rc::Rc;

    /// A slot and the type it was made from, so that `take` below cannot get it wrong.
    fn store<T>(value: T) -> (Slot, PhantomData<T>) {
        (Slot::new(value), PhantomData)
    }

    fn take<T>((slot, _): (Slot, PhantomData<T>)) -> T {
        // SAFETY: `store` made `slot` from a `T`.
        unsafe { slot.take::<T>() }
    }

    #[test]
    fn a_borrowing_closure_is_inline_and_runs_once() {
        let hits = Cell::new(0);
        let stored = store(|| hits.set(hits.get() + 1));
        assert!(Slot::fits::<&Cell<i32>>());
        take(stored)();
        assert_eq!(hits.get(), 1);
    }

    #[test]
    fn owned_values_are_moved_out_and_dropped_once() {
        let shared = Rc::new(7);
        // Three words exactly: inline. Moved around between new and take.
        let s = String::from("three words");
        assert!(Slot::fits::<String>());
        let make = |k: i32| {
            let c = Rc::clone(&shared);
            move || *c + k
        };
        let mut slots = Vec::new();
        slots.push(store(make(1)));
        slots.shrink_to_fit();
        let text = store(s);
        for _ in 0..10 {
            slots.push(store(make(0))); // the Vec grows: the slots move
        }
        assert_eq!(Rc::strong_count(&shared), 12);
        assert_eq!(take(text), "three words");
        let mut sum = 0;
        for stored in slots.drain(..).rev() {
            sum += take(stored)();
        }
        assert_eq!(sum, 8 + 7 * 10);
        assert_eq!(Rc::strong_count(&shared), 1, "every capture dropped once");
    }

    #[test]
    fn large_and_overaligned_values_are_boxed_and_freed() {
        #[derive(Debug, PartialEq)]
        #[repr(align(32))]
        struct Aligned(u8);
        assert!(!Slot::fits::<Aligned>());
        assert!(!Slot::fits::<[u64; 4]>());
        let shared = Rc::new(());
        let c = Rc::clone(&shared);
        let big = [1u64, 2, 3, 4];
        let stored = store(move || {
            let _keep = &c;
            big.iter().sum::<u64>()
        });
        assert_eq!(take(stored)(), 10);
        assert_eq!(Rc::strong_count(&shared), 1);
        assert_eq!(take(store(Aligned(9))), Aligned(9));
    }

    #[test]
    fn zero_sized_values_round_trip() {
        let hits = Cell::new(0);
        fn bump(c: &Cell<i32>) {
            c.set(c.get() + 1);
        }
        assert!(Slot::fits::<()>());
        take(store(bump))(&hits);
        take(store(()));
        assert_eq!(hits.get(), 1);
    }

    /// The containers built on `Slot`, through their public API: small (inline) and
    /// large (boxed) cleanups, a list that spills to the heap, an entered guard used
    /// while the list grows, a failing and a panicking cleanup. Under Miri this checks
    /// the `unsafe` in `scope.rs` and `stack.rs` too, and that nothing leaks.
    #[test]
    fn scopes_and_stacks_run_inline_and_boxed_cleanups_exactly_once() {
        use crate::{CleanupStack, Rollback, ScopeError};
        use std::cell::RefCell;
        use std::sync::Arc;

        let shared = Rc::new(());
        let log_cell = RefCell::new(Vec::new());
        let log = &log_cell;
        let big = [1u64; 8]; // captured with `log`: 72 bytes, boxed
        let result: Result<(), ScopeError<&str>> = crate::scope(|s| {
            let c = Rc::clone(&shared);
            s.defer(move || {
                let _c = c;
            });
            s.defer(move || log.borrow_mut().push(big.iter().sum::<u64>()));
            let undo = s.enter(Rollback::new(vec![1u64, 2], move |v| {
                log.borrow_mut().push(v.len() as u64)
            }));
            for i in 0..6 {
                s.on_err(move |_| log.borrow_mut().push(100 + i)); // spills past 4 entries
                undo.push(i); // the entered guard stays usable while the list moves
            }
            s.on_success(move || log.borrow_mut().push(999));
            s.defer_fallible(|| Err::<(), _>("cleanup failed"));
            s.defer(|| panic!("cleanup panicked"));
            Err("body")
        });
        let (body, cleanups) = result.unwrap_err().into_parts();
        assert_eq!(body, Some("body"));
        assert_eq!(cleanups.len(), 2);
        assert_eq!(*log.borrow(), [105, 104, 103, 102, 101, 100, 8, 8]);
        assert_eq!(Rc::strong_count(&shared), 1);

        let counter = Arc::new(());
        let mut stack = CleanupStack::new();
        for i in 0..6u64 {
            let c = Arc::clone(&counter);
            stack.defer(move || drop(c));
            let wide = [i; 5]; // 40 bytes: boxed
            stack.defer_fallible(move || match wide[0] {
                3 => Err("three"),
                _ => Ok(()),
            });
        }
        stack.defer(|| panic!("entry panicked"));
        let mut moved = stack.take();
        assert_eq!(stack.close().map_err(|e| e.len()), Ok(()));
        moved.push(crate::CleanupStack::new());
        assert_eq!(moved.close().unwrap_err().len(), 2);
        assert_eq!(Arc::strong_count(&counter), 1);
    }
}
