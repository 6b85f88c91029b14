//! TI Stellaris LM3S6965 evaluation board (Cortex-M3): UART0 and the user LED on GPIO port F
//! pin 0.

use core::convert::Infallible;

use super::{read, write};

/// Processor clock after reset: the 12 MHz internal oscillator drives the core until software
/// configures the PLL, which this firmware does not do.
pub const CPU_HZ: u32 = 12_000_000;

const UART0: usize = 0x4000_C000;
const UART_DR: usize = UART0;
const UART_FR: usize = UART0 + 0x18;
const UART_CTL: usize = UART0 + 0x30;
/// FR bit set while the transmit FIFO is full.
const TX_FULL: u32 = 1 << 5;
/// CTL bits: UART enable, transmit enable, receive enable.
const UART_ENABLE: u32 = 1 | (1 << 8) | (1 << 9);
const GPIO_F: usize = 0x4002_5000;
const GPIO_DIR: usize = GPIO_F + 0x400;
const GPIO_DEN: usize = GPIO_F + 0x51C;
/// The data register masked to pin 0: address bits 9..2 select the pins a write changes.
const GPIO_PIN0_DATA: usize = GPIO_F + (1 << 2);
/// System control: run-mode clock gating of the GPIO ports (bit 5 is port F).
const RCGC2: usize = 0x400F_E108;

/// The UART0 transmitter.
pub struct Uart(());

/// The user LED.
pub struct Led(());

/// Enables UART0 and GPIO port F pin 0 as an output, and returns them with the LED off.
pub fn init() -> (Uart, Led) {
    // SAFETY: these are the system control, UART0 and GPIO port F registers of the LM3S6965, and
    // this firmware has no other driver for them.
    unsafe {
        write(RCGC2, read(RCGC2) | (1 << 5));
        write(UART_CTL, UART_ENABLE);
        write(GPIO_DIR, read(GPIO_DIR) | 1);
        write(GPIO_DEN, read(GPIO_DEN) | 1);
        write(GPIO_PIN0_DATA, 0);
    }
    (Uart(()), Led(()))
}

impl embedded_io::ErrorType for Uart {
    type Error = Infallible;
}

impl embedded_io::Write for Uart {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Infallible> {
        for &byte in buf {
            // SAFETY: UART0 registers, as in `init`.
            unsafe {
                while read(UART_FR) & TX_FULL != 0 {}
                write(UART_DR, byte as u32);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), Infallible> {
        Ok(())
    }
}

impl embedded_hal::digital::ErrorType for Led {
    type Error = Infallible;
}

impl embedded_hal::digital::OutputPin for Led {
    fn set_low(&mut self) -> Result<(), Self::Error> {
        // SAFETY: the masked GPIO data register, as in `init`.
        unsafe { write(GPIO_PIN0_DATA, 0) };
        Ok(())
    }

    fn set_high(&mut self) -> Result<(), Self::Error> {
        // SAFETY: the masked GPIO data register, as in `init`.
        unsafe { write(GPIO_PIN0_DATA, 1) };
        Ok(())
    }
}
