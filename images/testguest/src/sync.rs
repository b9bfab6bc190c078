//! Two tiny synchronisation helpers for ring 3: a value set once by the BSP before the APs read it,
//! and a spin lock (for whole console lines).

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// A value written once (by the BSP during boot) and read by every CPU afterwards.
pub struct Once<T> {
    state: AtomicU8, // 0 empty, 1 being written, 2 ready
    value: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: the value is written once, before `state` becomes 2 with Release ordering, and only read
// (shared) after an Acquire load sees 2, so no reference to it is ever aliased by a write.
unsafe impl<T: Sync + Send> Sync for Once<T> {}

impl<T> Once<T> {
    pub const fn new() -> Self {
        Once { state: AtomicU8::new(0), value: UnsafeCell::new(MaybeUninit::uninit()) }
    }

    /// Stores the value; panics if it was already set.
    pub fn set(&self, value: T) {
        if self.state.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed).is_err() {
            panic!("Once::set twice");
        }
        // SAFETY: the compare-exchange above made us the only writer, and no reader looks at the
        // value before state is 2.
        unsafe { (*self.value.get()).write(value) };
        self.state.store(2, Ordering::Release);
    }

    /// The value; panics if it was not set yet.
    pub fn get(&self) -> &T {
        if self.state.load(Ordering::Acquire) != 2 {
            panic!("Once::get before set");
        }
        // SAFETY: state 2 means the value was fully written and will never be written again.
        unsafe { (*self.value.get()).assume_init_ref() }
    }
}

/// A test-and-set spin lock guarding nothing but the order of console lines. A byte: 1 = held
/// (traps.rs takes it from ring 0 with `xchg` too).
#[repr(transparent)]
pub struct SpinLock(AtomicBool);

impl SpinLock {
    pub const fn new() -> Self {
        SpinLock(AtomicBool::new(false))
    }

    pub fn lock(&self) {
        while self.0.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            core::hint::spin_loop();
        }
    }

    pub fn unlock(&self) {
        self.0.store(false, Ordering::Release);
    }
}
