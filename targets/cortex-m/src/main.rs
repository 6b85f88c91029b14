//! Keyword spotting firmware: runs the packed model from flash on the reference input and prints
//! the class scores over the UART. It exits QEMU through semihosting with status 0 only when the
//! scores match the host runtime's within 1e-5 and the top class is the same.
#![no_std]
#![no_main]

mod app;
mod board;
mod clock;
mod stack;

/// Constants of the embedded model, written by build.rs.
// The footprint baseline does not run the model, so it leaves the input shape unused.
#[cfg_attr(feature = "footprint-baseline", allow(dead_code))]
mod model {
    include!(concat!(env!("OUT_DIR"), "/model.rs"));
}

use cortex_m_rt::entry;
use embedded_io::Write;
use panic_semihosting as _;

/// A value at a 64-byte aligned address, the alignment of the format's sections and arena.
#[repr(C, align(64))]
pub struct Aligned<T: ?Sized>(pub T);

/// The session's arena, sized from the model's header at build time: a model whose activations
/// do not fit the board's RAM fails to link.
static mut ARENA: Aligned<[u8; model::ARENA_BYTES]> = Aligned([0; model::ARENA_BYTES]);

#[entry]
fn main() -> ! {
    let painted = stack::paint();
    let core = cortex_m::Peripherals::take().expect("core peripherals are taken once");
    let mut clock = clock::SysTickClock::new(core.SYST, board::CPU_HZ);
    let (mut serial, mut pin) = board::init();
    // SAFETY: `main` runs once and never returns, and no other code names ARENA, so this is the
    // only reference to it.
    let arena = unsafe { &mut (*core::ptr::addr_of_mut!(ARENA)).0 };

    let passed = app::run(&mut clock, &mut serial, &mut pin, arena);
    let _ = writeln!(
        serial,
        "stack: high-water {} of {} bytes free for it (painted)",
        painted.high_water(),
        painted.capacity()
    );
    semihosting::process::exit(if passed { 0 } else { 1 })
}
