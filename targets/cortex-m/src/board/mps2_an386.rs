//! Arm MPS2 with the AN386 image (Cortex-M4F): CMSDK APB UART0 and the FPGA LED register.

use core::convert::Infallible;

use super::{read, write};

/// Processor clock of the board (25 MHz, as QEMU models it).
pub const CPU_HZ: u32 = 25_000_000;

const UART0: usize = 0x4000_4000;
const UART_DATA: usize = UART0;
const UART_STATE: usize = UART0 + 0x04;
const UART_CTRL: usize = UART0 + 0x08;
const UART_BAUDDIV: usize = UART0 + 0x10;
/// STATE bit set while the transmit buffer is full.
const TX_FULL: u32 = 1;
/// CTRL bit that enables the transmitter.
const TX_ENABLE: u32 = 1;
/// FPGA I/O register driving LED0 (bit 0) and LED1 (bit 1).
const FPGAIO_LED: usize = 0x4002_8000;

/// The UART0 transmitter.
pub struct Uart(());

/// LED0 of the FPGA I/O block.
pub struct Led(());

/// Enables UART0's transmitter and returns it with LED0, switched off.
pub fn init() -> (Uart, Led) {
    // SAFETY: these are the UART0 and FPGA I/O registers of the MPS2 memory map, and this
    // firmware has no other driver for them.
    unsafe {
        write(UART_BAUDDIV, 16);
        write(UART_CTRL, TX_ENABLE);
        write(FPGAIO_LED, 0);
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
                while read(UART_STATE) & TX_FULL != 0 {}
                write(UART_DATA, byte as u32);
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
        // SAFETY: the FPGA LED register, as in `init`.
        unsafe { write(FPGAIO_LED, read(FPGAIO_LED) & !1) };
        Ok(())
    }

    fn set_high(&mut self) -> Result<(), Self::Error> {
        // SAFETY: the FPGA LED register, as in `init`.
        unsafe { write(FPGAIO_LED, read(FPGAIO_LED) | 1) };
        Ok(())
    }
}
