//! The application, written against embedded-hal 1.0 and embedded-io traits only: runs the model
//! once on the reference input, prints the scores, and drives the detection pin.

#[cfg(not(feature = "footprint-baseline"))]
use edgefold_runtime::{Model, Session};
use embedded_hal::delay::DelayNs;
use embedded_hal::digital::OutputPin;
use embedded_io::Write;

use crate::clock::SysTickClock;
use crate::model;

/// Largest difference from the host runtime's scores that still passes.
const TOLERANCE: f32 = 1e-5;

/// Byte written over the arena before the run.
const ARENA_PAINT: u8 = 0xA5;

/// Elapsed time of a run, in processor clock ticks.
pub trait Stopwatch {
    /// Ticks since some fixed start.
    fn ticks(&self) -> u64;
    /// Ticks per second.
    fn hz(&self) -> u32;
}

impl Stopwatch for SysTickClock {
    fn ticks(&self) -> u64 {
        SysTickClock::ticks(self)
    }

    fn hz(&self) -> u32 {
        SysTickClock::hz(self)
    }
}

/// Iterations of the calibration loop, two instructions each.
const CALIBRATION_LOOPS: u32 = 1_000_000;

/// Runs exactly `2 * CALIBRATION_LOOPS` instructions (a subtract and a branch per iteration) and
/// returns the ticks they took. Under QEMU's `-icount shift=0`, which makes every instruction take
/// 1 ns of emulated time, this converts ticks into instructions.
fn calibrate(clock: &impl Stopwatch) -> u64 {
    let start = clock.ticks();
    // SAFETY: the loop only counts a scratch register down to zero.
    unsafe {
        core::arch::asm!(
            "2:",
            "subs {n}, {n}, #1",
            "bne 2b",
            n = inout(reg) CALIBRATION_LOOPS => _,
            options(nomem, nostack),
        );
    }
    clock.ticks() - start
}

/// Decodes little-endian f32 values.
fn decode<const N: usize>(bytes: &[u8]) -> [f32; N] {
    let mut values = [0.0; N];
    for (v, chunk) in values.iter_mut().zip(bytes.chunks_exact(4)) {
        *v = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    values
}

fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// Runs the embedded model and reports over `serial`. Returns true when every score is within
/// [`TOLERANCE`] of the host runtime's and the top class is the same.
pub fn run<C, W, P>(clock: &mut C, serial: &mut W, pin: &mut P, arena: &mut [u8]) -> bool
where
    C: DelayNs + Stopwatch,
    W: Write,
    P: OutputPin,
{
    // A 10 ms blink of the pin marks the start, as a board would show it is alive.
    let _ = pin.set_high();
    clock.delay_ms(10);
    let _ = pin.set_low();

    // Painting the arena shows afterwards how much of it the run wrote.
    arena.fill(ARENA_PAINT);
    let file: &'static [u8] = &model::MODEL.0;
    let _ = writeln!(
        serial,
        "edgefold: model {} bytes in flash at {:p}, arena {} bytes",
        file.len(),
        file.as_ptr(),
        arena.len()
    );
    let input: [f32; model::INPUT_LEN] = decode(model::INPUT);
    let expected: [f32; model::OUTPUT_LEN] = decode(model::EXPECTED);
    let Some((scores, ticks)) = infer(clock, serial, file, arena, &input, false) else {
        return false;
    };
    let written = arena.iter().rposition(|&b| b != ARENA_PAINT).map_or(0, |i| i + 1);
    let _ = writeln!(
        serial,
        "arena: {written} of {} bytes written by the run (highest byte that changed)",
        arena.len()
    );

    for (i, (&score, &host)) in scores.iter().zip(&expected).enumerate() {
        let label = model::LABELS.get(i).copied().unwrap_or("?");
        let _ = writeln!(serial, "  {i:2} {label:8} {score:.7} (host {host:.7})");
    }
    let (top, host_top) = (argmax(&scores), argmax(&expected));
    let detected = model::KEYWORDS.contains(&top);
    let _ = if detected { pin.set_high() } else { pin.set_low() };
    let micros = ticks * 1_000_000 / clock.hz() as u64;
    let _ = writeln!(
        serial,
        "top class {top} ({}), keyword {}; {ticks} ticks ({micros} us at {} Hz)",
        model::LABELS.get(top).copied().unwrap_or("?"),
        if detected { "detected" } else { "not detected" },
        clock.hz()
    );
    // Only with `-icount shift=0` do the ticks advance in step with the instructions executed.
    let calibration = calibrate(clock).max(1);
    let instructions = |ticks: u64| ticks * 2 * CALIBRATION_LOOPS as u64 / calibration;
    let instructions_f32 = instructions(ticks);
    let _ = writeln!(
        serial,
        "{} instructions took {calibration} ticks: about {instructions_f32} instructions per run \
         under QEMU -icount shift=0",
        2 * CALIBRATION_LOOPS
    );
    let finite = scores.iter().all(|s| s.is_finite());
    let ran = !cfg!(feature = "footprint-baseline");
    let difference = max_difference(&scores, &expected);
    let passed = ran && finite && difference <= TOLERANCE && top == host_top;
    let _ = writeln!(
        serial,
        "max abs difference from the host runtime {difference:e}: {}",
        if passed { "PASS" } else { "FAIL" }
    );
    #[cfg(feature = "int8-activations")]
    let passed = passed && {
        // The same input with int8 activations: integer products where the weights are int8.
        let expected: [f32; model::OUTPUT_LEN] = decode(model::EXPECTED_INT8);
        let Some((int8_scores, int8_ticks)) = infer(clock, serial, file, arena, &input, true)
        else {
            return false;
        };
        let (difference, top) = (max_difference(&int8_scores, &expected), argmax(&int8_scores));
        let _ = writeln!(
            serial,
            "int8 activations: about {} instructions per run, top class {top} ({}), largest \
             score change from f32 activations {:e}",
            instructions(int8_ticks),
            model::LABELS.get(top).copied().unwrap_or("?"),
            max_difference(&int8_scores, &scores)
        );
        let int8_passed = int8_scores.iter().all(|s| s.is_finite())
            && difference <= TOLERANCE
            && top == argmax(&expected);
        let _ = writeln!(
            serial,
            "int8 activations: max abs difference from the host runtime {difference:e}: {}",
            if int8_passed { "PASS" } else { "FAIL" }
        );
        int8_passed
    };
    // The file's own self-test, as `edgefold verify` runs it on a host.
    let self_tested = self_test(serial, file, arena);
    passed && self_tested
}

/// Returns the largest absolute difference between two sets of scores.
fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    let mut largest = 0.0f32;
    for (&x, &y) in a.iter().zip(b) {
        let difference = (x - y).abs();
        largest = if difference > largest { difference } else { largest };
    }
    largest
}

/// Runs the self-test that the packed model carries and reports it; true when it passes.
#[cfg(all(feature = "self-test", not(feature = "footprint-baseline")))]
fn self_test<W: Write>(serial: &mut W, file: &'static [u8], arena: &mut [u8]) -> bool {
    let outcome = Model::open(file).and_then(|m| edgefold_runtime::selftest::run(&m, arena));
    match outcome {
        Ok(o) => {
            let verdict = if o.passed() { "PASS" } else { "FAIL" };
            let _ = writeln!(
                serial,
                "self-test: max abs error {:e} over {} elements (tolerance {:e}): {verdict}",
                o.max_abs_error, o.elements, o.tolerance
            );
            o.passed()
        }
        Err(e) => {
            let _ = writeln!(serial, "self-test: {}: FAIL", e.reason());
            false
        }
    }
}

/// Without the `self-test` feature there is nothing to run; the footprint baseline runs no model,
/// so it fails.
#[cfg(not(all(feature = "self-test", not(feature = "footprint-baseline"))))]
fn self_test<W: Write>(serial: &mut W, _file: &'static [u8], _arena: &mut [u8]) -> bool {
    let _ = writeln!(serial, "self-test: not built into this image");
    !cfg!(feature = "footprint-baseline")
}

/// Opens the packed model `file`, runs it on `input` in `arena`, and returns its scores with the
/// ticks that setting the input and running took. Prints the error and returns `None` on failure.
#[cfg(not(feature = "footprint-baseline"))]
fn infer<C: Stopwatch, W: Write>(
    clock: &C,
    serial: &mut W,
    file: &'static [u8],
    arena: &mut [u8],
    input: &[f32; model::INPUT_LEN],
    int8_activations: bool,
) -> Option<([f32; model::OUTPUT_LEN], u64)> {
    let model = match Model::open(file) {
        Ok(model) => model,
        Err(e) => {
            let _ = writeln!(serial, "error: the model does not open: {}", e.reason());
            return None;
        }
    };
    let mut session = match Session::new(&model, arena) {
        Ok(session) => session,
        Err(e) => {
            let _ = writeln!(serial, "error: {}", e.reason());
            return None;
        }
    };
    session.set_int8_activations(int8_activations);
    let start = clock.ticks();
    let result = session.set_input(0, &model::INPUT_SHAPE, input).and_then(|()| session.run());
    let ticks = clock.ticks() - start;
    if let Err(e) = result {
        let _ = writeln!(serial, "error: the run failed: {}", e.reason());
        return None;
    }
    let mut scores = [0.0f32; model::OUTPUT_LEN];
    match session.output::<f32>(0) {
        Ok((_, values)) if values.len() == scores.len() => scores.copy_from_slice(values),
        Ok((_, values)) => {
            let _ = writeln!(serial, "error: {} scores, expected {}", values.len(), scores.len());
            return None;
        }
        Err(e) => {
            let _ = writeln!(serial, "error: {}", e.reason());
            return None;
        }
    }
    Some((scores, ticks))
}

/// The footprint baseline: the same application without the runtime, for `footprint.sh`. It
/// returns the host runtime's scores without running anything, so the difference between this
/// image and the normal one is the code and data that the runtime adds. A baseline image always
/// reports FAIL.
#[cfg(feature = "footprint-baseline")]
fn infer<C: Stopwatch, W: Write>(
    clock: &C,
    serial: &mut W,
    _file: &'static [u8],
    _arena: &mut [u8],
    input: &[f32; model::INPUT_LEN],
    int8_activations: bool,
) -> Option<([f32; model::OUTPUT_LEN], u64)> {
    // Keeps the reference input in the image, as the normal build does.
    core::hint::black_box(input);
    let _ = writeln!(serial, "footprint baseline: the model is not run");
    // Times nothing, but through the same clock reads, so that the code that reports the time
    // stays in both images.
    let start = clock.ticks();
    let ticks = clock.ticks() - start;
    #[cfg(feature = "int8-activations")]
    let expected = if int8_activations { model::EXPECTED_INT8 } else { model::EXPECTED };
    #[cfg(not(feature = "int8-activations"))]
    let expected = {
        let _ = int8_activations;
        model::EXPECTED
    };
    Some((core::hint::black_box(decode(expected)), core::hint::black_box(ticks)))
}
