//! A free-running SysTick counter: elapsed ticks for timing, and `DelayNs` for the application.

use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m::peripheral::SYST;
use cortex_m_rt::exception;
use embedded_hal::delay::DelayNs;

/// SysTick counts down over 24 bits.
const RELOAD: u32 = 0x00FF_FFFF;

/// Times the 24-bit counter wrapped around, counted by the SysTick exception.
static WRAPS: AtomicU32 = AtomicU32::new(0);

#[exception]
fn SysTick() {
    WRAPS.fetch_add(1, Ordering::Relaxed);
}

/// SysTick clocked by the processor clock, counting from power-up.
pub struct SysTickClock {
    _syst: SYST,
    hz: u32,
}

impl SysTickClock {
    /// Starts the counter with its wrap-around exception enabled.
    pub fn new(mut syst: SYST, hz: u32) -> Self {
        syst.set_clock_source(SystClkSource::Core);
        syst.set_reload(RELOAD);
        syst.clear_current();
        syst.enable_interrupt();
        syst.enable_counter();
        SysTickClock { _syst: syst, hz }
    }

    /// Processor clock ticks since [`new`](Self::new).
    pub fn ticks(&self) -> u64 {
        loop {
            let wraps = WRAPS.load(Ordering::Relaxed);
            let current = SYST::get_current();
            // A wrap between the two loads would pair an old count with a new value.
            if WRAPS.load(Ordering::Relaxed) == wraps {
                return ((wraps as u64) << 24) + (RELOAD - current) as u64;
            }
        }
    }

    /// Processor clock frequency in hertz.
    pub fn hz(&self) -> u32 {
        self.hz
    }
}

impl DelayNs for SysTickClock {
    fn delay_ns(&mut self, ns: u32) {
        let wait = (ns as u64 * self.hz as u64).div_ceil(1_000_000_000);
        let start = self.ticks();
        while self.ticks() - start < wait {}
    }
}
