//! Stack high-water mark by painting: at start-up the free RAM between the statics and the stack
//! pointer is filled with a pattern, and after the run the lowest word that no longer holds it
//! marks the deepest the stack (exception frames included) has reached.

use core::ptr::{addr_of, read_volatile, write_volatile};

/// Word written over the free RAM.
const PAINT: u32 = 0x5AFE_C0DE;

/// Bytes just below the stack pointer that painting leaves alone, for the painting loop itself.
const MARGIN: usize = 64;

extern "C" {
    /// End of the statics (`.data`, `.bss`, `.uninit`), from cortex-m-rt's linker script.
    static __sheap: u32;
    /// Initial stack pointer: the stack grows down from here (the end of RAM).
    static _stack_start: u32;
}

/// The painted part of RAM.
pub struct PaintedStack {
    /// Lowest painted address: the end of the statics.
    low: usize,
    /// The top of the stack.
    top: usize,
}

/// Paints the free RAM from the end of the statics up to [`MARGIN`] bytes below the current stack
/// pointer. Call it once, early, from a shallow stack.
#[inline(never)]
pub fn paint() -> PaintedStack {
    let (low, top) = (addr_of!(__sheap) as usize, addr_of!(_stack_start) as usize);
    let end = cortex_m::register::msp::read() as usize - MARGIN;
    let mut at = low;
    while at < end {
        // SAFETY: `[low, end)` lies between the statics and the stack pointer, so no live value
        // is there. Exceptions push their frames below the stack pointer while they run, and
        // those frames are gone when this loop resumes.
        unsafe { write_volatile(at as *mut u32, PAINT) };
        at += 4;
    }
    PaintedStack { low, top }
}

impl PaintedStack {
    /// Bytes from the top of the stack down to the lowest word that no longer holds the paint.
    pub fn high_water(&self) -> usize {
        let mut at = self.low;
        // SAFETY: `[low, top)` is RAM between the statics and the top of the stack.
        while at < self.top && unsafe { read_volatile(at as *const u32) } == PAINT {
            at += 4;
        }
        self.top - at
    }

    /// Bytes between the end of the statics and the top of the stack: the most the stack can use.
    pub fn capacity(&self) -> usize {
        self.top - self.low
    }
}
