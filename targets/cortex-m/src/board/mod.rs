//! The emulated board: its UART as an `embedded_io::Write` and an LED as an `OutputPin`. The
//! board follows from the target (see build.rs).

#[cfg(board = "lm3s6965evb")]
mod lm3s6965evb;
#[cfg(board = "mps2_an386")]
mod mps2_an386;

#[cfg(board = "lm3s6965evb")]
pub use lm3s6965evb::{init, CPU_HZ};
#[cfg(board = "mps2_an386")]
pub use mps2_an386::{init, CPU_HZ};

/// Reads a memory-mapped register.
///
/// # Safety
/// `address` must be a readable device register of this board.
unsafe fn read(address: usize) -> u32 {
    // SAFETY: the caller guarantees a valid register address.
    unsafe { core::ptr::read_volatile(address as *const u32) }
}

/// Writes a memory-mapped register.
///
/// # Safety
/// `address` must be a writable device register of this board, and the write must not break an
/// invariant of other code (no other code drives these peripherals).
unsafe fn write(address: usize, value: u32) {
    // SAFETY: the caller guarantees a valid register address.
    unsafe { core::ptr::write_volatile(address as *mut u32, value) }
}
