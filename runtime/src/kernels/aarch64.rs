//! `linear` and `matmul` for aarch64 with NEON (4 lanes), which every aarch64 target with the
//! `neon` feature has, so there is nothing to detect at run time.
//!
//! [`super::LinearCall`] and [`super::check_matmul`] check the lengths before these kernels run.

use core::arch::aarch64::*;

use super::tiled::{self, Filled, I4Aligned, LinearArgs, Simd, VecRows};
use super::{LinearCall, Weights};

/// Rows from which f16 and int4 weights are decoded once per block
/// ([`tiled::linear_blocked`]) instead of once per tile.
///
/// NOTE: chosen by analogy with x86_64, where int4 gains from 8 rows on; not measured on an
/// aarch64 CPU. Both conversions cost several NEON instructions per four weights here.
const BLOCKED_ROWS: usize = 8;

/// Runs `linear` with the NEON kernels.
pub(crate) fn linear_neon(call: &mut LinearCall<'_>) {
    let args = call.args();
    let blocked = args.rows >= BLOCKED_ROWS;
    // SAFETY: NEON is enabled at compile time for this module, and `LinearCall` checked every
    // length.
    unsafe {
        match call.w {
            Weights::F32(w) => linear_direct(&args, &w),
            Weights::F16(w) if blocked => linear_blocked(&args, &w),
            Weights::F16(w) => linear_direct(&args, &w),
            Weights::I8(w) => linear_direct(&args, &w),
            Weights::I4(w) if w.group % Neon::LANES == 0 => match (w.mins.is_some(), blocked) {
                (false, true) => linear_blocked(&args, &I4Aligned::<false>::new(w)),
                (false, false) => linear_direct(&args, &I4Aligned::<false>::new(w)),
                (true, true) => linear_blocked(&args, &I4Aligned::<true>::new(w)),
                (true, false) => linear_direct(&args, &I4Aligned::<true>::new(w)),
            },
            Weights::I4(w) => match blocked {
                true => linear_blocked(&args, &Filled(&w)),
                false => linear_direct(&args, &Filled(&w)),
            },
        }
    }
}

/// Runs `matmul` with the NEON kernel.
///
/// # Panics
///
/// Panics if a slice is shorter than its shape implies.
pub(crate) fn matmul_neon(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    super::check_matmul(a, b, c, m, k, n);
    // SAFETY: NEON is enabled at compile time, and the lengths were checked above.
    unsafe { tiled::matmul::<Neon, 4, 4>(a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), m, k, n) }
}

/// `linear` with 4 x 4 tiles.
///
/// # Safety
///
/// `args` and `w` must satisfy [`tiled::linear`].
unsafe fn linear_direct<W: VecRows<Neon>>(args: &LinearArgs<'_>, w: &W) {
    // SAFETY: forwarded from the caller.
    unsafe { tiled::linear::<Neon, W, 4, 4>(args, w) }
}

/// `linear` with 4 x 4 tiles over weights decoded in blocks.
///
/// # Safety
///
/// `args` and `w` must satisfy [`tiled::linear`].
unsafe fn linear_blocked<W: VecRows<Neon>>(args: &LinearArgs<'_>, w: &W) {
    // SAFETY: forwarded from the caller.
    unsafe { tiled::linear_blocked::<Neon, W, 4, 4>(args, w) }
}

/// Converts four IEEE binary16 values, one in the low half of each lane, to f32.
///
/// The exponent and mantissa bits move into place, and a multiplication by 2^112 rebiases the
/// exponent from 15 to 127; f16 subnormals become normal f32 values on the way. Infinities and
/// NaNs take the all-ones exponent instead.
///
/// # Safety
///
/// The CPU must support NEON.
#[inline(always)]
unsafe fn f16_to_f32(h: uint32x4_t) -> float32x4_t {
    // SAFETY: NEON per the caller.
    unsafe {
        let sign = vshlq_n_u32::<16>(vandq_u32(h, vdupq_n_u32(0x8000)));
        let magnitude = vandq_u32(h, vdupq_n_u32(0x7FFF));
        let shifted = vshlq_n_u32::<13>(magnitude);
        let two_pow_112 = vreinterpretq_f32_u32(vdupq_n_u32(0x7780_0000));
        let finite = vreinterpretq_u32_f32(vmulq_f32(vreinterpretq_f32_u32(shifted), two_pow_112));
        let special = vorrq_u32(shifted, vdupq_n_u32(0x7F80_0000));
        let is_special = vcgeq_u32(magnitude, vdupq_n_u32(0x7C00));
        vreinterpretq_f32_u32(vorrq_u32(vbslq_u32(is_special, special, finite), sign))
    }
}

/// NEON, 4 lanes.
#[derive(Clone, Copy)]
pub(crate) struct Neon;

// SAFETY: every method uses only NEON instructions, which this module is compiled with, and
// reads or writes exactly the documented number of elements.
unsafe impl Simd for Neon {
    const LANES: usize = 4;
    type V = float32x4_t;

    #[inline(always)]
    unsafe fn zero() -> float32x4_t {
        // SAFETY: NEON per the trait contract.
        unsafe { vdupq_n_f32(0.0) }
    }

    #[inline(always)]
    unsafe fn splat(v: f32) -> float32x4_t {
        // SAFETY: NEON per the trait contract.
        unsafe { vdupq_n_f32(v) }
    }

    #[inline(always)]
    unsafe fn splat_f16(bits: u16) -> float32x4_t {
        // SAFETY: NEON per the trait contract.
        unsafe { f16_to_f32(vdupq_n_u32(bits as u32)) }
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> float32x4_t {
        // SAFETY: `p` is valid for 4 reads per the trait contract.
        unsafe { vld1q_f32(p) }
    }

    #[inline(always)]
    unsafe fn store(p: *mut f32, v: float32x4_t) {
        // SAFETY: `p` is valid for 4 writes per the trait contract.
        unsafe { vst1q_f32(p, v) }
    }

    #[inline(always)]
    unsafe fn mul_add(a: float32x4_t, b: float32x4_t, acc: float32x4_t) -> float32x4_t {
        // SAFETY: NEON per the trait contract.
        unsafe { vfmaq_f32(acc, a, b) }
    }

    #[inline(always)]
    unsafe fn mul(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON per the trait contract.
        unsafe { vmulq_f32(a, b) }
    }

    #[inline(always)]
    unsafe fn reduce_add(v: float32x4_t) -> f32 {
        // SAFETY: NEON per the trait contract.
        unsafe { vaddvq_f32(v) }
    }

    #[inline(always)]
    unsafe fn reduce_add4(v: [float32x4_t; 4]) -> [f32; 4] {
        // SAFETY: NEON per the trait contract; the store writes 4 values into `out`.
        unsafe {
            let sums = vpaddq_f32(vpaddq_f32(v[0], v[1]), vpaddq_f32(v[2], v[3]));
            let mut out = [0f32; 4];
            vst1q_f32(out.as_mut_ptr(), sums);
            out
        }
    }

    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> float32x4_t {
        // SAFETY: `p` is valid for 4 `u16` reads per the trait contract.
        unsafe { f16_to_f32(vmovl_u16(vld1_u16(p))) }
    }

    #[inline(always)]
    unsafe fn load_i8(p: *const i8) -> float32x4_t {
        // SAFETY: `p` is valid for 4 bytes per the trait contract.
        unsafe {
            let word = core::ptr::read_unaligned(p.cast::<u32>());
            let bytes = vcreate_s8(u64::from(word));
            vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(bytes))))
        }
    }

    #[inline(always)]
    unsafe fn load_i4(p: *const u8) -> float32x4_t {
        // SAFETY: `p` is valid for 2 bytes per the trait contract.
        unsafe {
            let word = core::ptr::read_unaligned(p.cast::<u16>());
            // Lane i takes nibble i: shift it to the top, then shift back with sign extension.
            const SHIFTS: [i32; 4] = [28, 24, 20, 16];
            let top = vshlq_u32(vdupq_n_u32(u32::from(word)), vld1q_s32(SHIFTS.as_ptr()));
            vcvtq_f32_s32(vshrq_n_s32::<28>(vreinterpretq_s32_u32(top)))
        }
    }
}
