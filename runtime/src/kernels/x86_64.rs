//! `linear` and `matmul` for x86_64 with AVX2 + FMA + F16C (8 lanes) and AVX-512F (16 lanes).
//!
//! The safe functions here check the CPU features before calling the `#[target_feature]`
//! functions; [`super::LinearCall`] and [`super::check_matmul`] have already checked the lengths.

use core::arch::x86_64::*;

use super::tiled::{self, Filled, I4Aligned, LinearArgs, Simd, VecRows};
use super::{LinearCall, Weights};

/// Returns whether the CPU runs the AVX2 kernels (AVX2, FMA and F16C).
pub(crate) fn has_avx2() -> bool {
    #[cfg(feature = "std")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(feature = "std"))]
    {
        cfg!(all(target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))
    }
}

/// Returns whether the CPU runs the AVX-512 kernels (AVX-512F on top of [`has_avx2`]).
pub(crate) fn has_avx512() -> bool {
    #[cfg(feature = "std")]
    {
        has_avx2() && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(feature = "std"))]
    {
        has_avx2() && cfg!(target_feature = "avx512f")
    }
}

/// Rows from which int4 weights are decoded once per block ([`tiled::linear_blocked`]) instead
/// of once per tile. On a Zen 4 core (AMD EPYC, k = 384, n = 1536, best of 60 runs) the blocked
/// kernel is faster from 8 rows on, with AVX2 and with AVX-512.
const BLOCKED_ROWS_INT4: usize = 8;

/// Rows from which f16 weights are decoded once per block with AVX-512, because a 16-lane f16
/// conversion is slow on Zen 4 (faster blocked from 16 rows on, measured as above). With AVX2 the
/// conversion in every tile costs nothing measurable.
const BLOCKED_ROWS_F16_AVX512: usize = 16;

/// Runs `linear` with the AVX2 kernels.
///
/// # Panics
///
/// Panics if the CPU lacks AVX2, FMA or F16C.
pub(crate) fn linear_avx2(call: &mut LinearCall<'_>) {
    assert!(has_avx2(), "the CPU does not support AVX2, FMA and F16C");
    let args = call.args();
    let blocked = args.rows >= BLOCKED_ROWS_INT4;
    // SAFETY: the features were checked above, and `LinearCall` checked every length.
    unsafe {
        match call.w {
            Weights::F32(w) => linear_avx2_direct(&args, &w),
            Weights::F16(w) => linear_avx2_direct(&args, &w),
            Weights::I8(w) => linear_avx2_direct(&args, &w),
            Weights::I4(w) if w.group % Avx2::LANES == 0 => match (w.mins.is_some(), blocked) {
                (false, true) => linear_avx2_blocked(&args, &I4Aligned::<false>::new(w)),
                (false, false) => linear_avx2_direct(&args, &I4Aligned::<false>::new(w)),
                (true, true) => linear_avx2_blocked(&args, &I4Aligned::<true>::new(w)),
                (true, false) => linear_avx2_direct(&args, &I4Aligned::<true>::new(w)),
            },
            Weights::I4(w) => match blocked {
                true => linear_avx2_blocked(&args, &Filled(&w)),
                false => linear_avx2_direct(&args, &Filled(&w)),
            },
        }
    }
}

/// Runs `linear` with the AVX-512 kernels.
///
/// # Panics
///
/// Panics if the CPU lacks AVX-512F, AVX2, FMA or F16C.
pub(crate) fn linear_avx512(call: &mut LinearCall<'_>) {
    assert!(has_avx512(), "the CPU does not support AVX-512F");
    let args = call.args();
    let blocked = args.rows >= BLOCKED_ROWS_INT4;
    // SAFETY: the features were checked above, and `LinearCall` checked every length.
    unsafe {
        match call.w {
            #[cfg(feature = "std")]
            Weights::F32(w) if super::broadcast::applies(&call.w, args.rows, args.k) => {
                super::broadcast::linear(&args, &w)
            }
            #[cfg(feature = "std")]
            Weights::I8(w) if super::broadcast::applies(&call.w, args.rows, args.k) => {
                super::broadcast::linear(&args, &w)
            }
            #[cfg(feature = "std")]
            Weights::F16(w) if super::broadcast::applies(&call.w, args.rows, args.k) => {
                super::broadcast::linear(&args, &w)
            }
            #[cfg(feature = "std")]
            Weights::I4(w) if !blocked && super::nibbles::applies(&w) => {
                super::nibbles::linear(&args, &w)
            }
            #[cfg(feature = "std")]
            Weights::I4(w) if super::broadcast::applies(&call.w, args.rows, args.k) => {
                match w.mins.is_some() {
                    true => super::broadcast::linear(&args, &I4Aligned::<true>::new(w)),
                    false => super::broadcast::linear(&args, &I4Aligned::<false>::new(w)),
                }
            }
            Weights::F32(w) => linear_avx512_direct(&args, &w),
            Weights::F16(w) if args.rows >= BLOCKED_ROWS_F16_AVX512 => {
                linear_avx512_blocked(&args, &w)
            }
            Weights::F16(w) => linear_avx512_direct(&args, &w),
            Weights::I8(w) => linear_avx512_direct(&args, &w),
            Weights::I4(w) if w.group % Avx512::LANES == 0 => match (w.mins.is_some(), blocked) {
                (false, true) => linear_avx512_blocked(&args, &I4Aligned::<false>::new(w)),
                (false, false) => linear_avx512_direct(&args, &I4Aligned::<false>::new(w)),
                (true, true) => linear_avx512_blocked(&args, &I4Aligned::<true>::new(w)),
                (true, false) => linear_avx512_direct(&args, &I4Aligned::<true>::new(w)),
            },
            Weights::I4(w) => match blocked {
                true => linear_avx512_blocked(&args, &Filled(&w)),
                false => linear_avx512_direct(&args, &Filled(&w)),
            },
        }
    }
}

/// Runs `matmul` with the AVX2 kernel.
///
/// # Panics
///
/// Panics if the CPU lacks AVX2, FMA or F16C, or if a slice is shorter than its shape.
pub(crate) fn matmul_avx2(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    super::check_matmul(a, b, c, m, k, n);
    assert!(has_avx2(), "the CPU does not support AVX2, FMA and F16C");
    // SAFETY: the features and the lengths were checked above.
    unsafe { matmul_avx2_unchecked(a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), m, k, n) }
}

/// Runs `matmul` with the AVX-512 kernel.
///
/// # Panics
///
/// Panics if the CPU lacks AVX-512F, AVX2, FMA or F16C, or if a slice is shorter than its shape.
pub(crate) fn matmul_avx512(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    super::check_matmul(a, b, c, m, k, n);
    assert!(has_avx512(), "the CPU does not support AVX-512F");
    // SAFETY: the features and the lengths were checked above.
    unsafe { matmul_avx512_unchecked(a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), m, k, n) }
}

/// `linear` on 8-lane vectors with 4 x 2 tiles.
///
/// # Safety
///
/// The CPU must support AVX2, FMA and F16C, and `args` and `w` must satisfy [`tiled::linear`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn linear_avx2_direct<W: VecRows<Avx2>>(args: &LinearArgs<'_>, w: &W) {
    align_frame();
    // SAFETY: forwarded from the caller.
    unsafe { tiled::linear::<Avx2, W, 4, 2>(args, w) }
}

/// `linear` on 8-lane vectors with 4 x 2 tiles over weights decoded in blocks.
///
/// # Safety
///
/// The CPU must support AVX2, FMA and F16C, and `args` and `w` must satisfy [`tiled::linear`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn linear_avx2_blocked<W: VecRows<Avx2>>(args: &LinearArgs<'_>, w: &W) {
    // SAFETY: forwarded from the caller.
    unsafe { tiled::linear_blocked::<Avx2, W, 4, 2>(args, w) }
}

/// `linear` on 16-lane vectors with 4 x 4 tiles.
///
/// # Safety
///
/// The CPU must support AVX-512F, AVX2, FMA and F16C, and `args` and `w` must satisfy
/// [`tiled::linear`].
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn linear_avx512_direct<W: VecRows<Avx512>>(args: &LinearArgs<'_>, w: &W) {
    align_frame();
    // SAFETY: forwarded from the caller.
    unsafe { tiled::linear::<Avx512, W, 4, 4>(args, w) }
}

/// A 64-byte aligned value for [`align_frame`].
#[repr(C, align(64))]
struct FrameAlign([u8; 64]);

/// Places a 64-byte aligned local on the stack, which makes LLVM realign the frame of the
/// function this is inlined into.
///
/// Some instantiations of the direct kernels spill an accumulator inside the loop (LLVM of Rust
/// 1.95). Where the spill slot straddled two cache lines, they ran up to 1.8 times slower,
/// depending on where the stack happened to start.
#[inline(always)]
fn align_frame() {
    let mut frame = FrameAlign([0; 64]);
    core::hint::black_box(&mut frame);
}

/// `linear` on 16-lane vectors with 4 x 4 tiles over weights decoded in blocks.
///
/// # Safety
///
/// The CPU must support AVX-512F, AVX2, FMA and F16C, and `args` and `w` must satisfy
/// [`tiled::linear`].
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn linear_avx512_blocked<W: VecRows<Avx512>>(args: &LinearArgs<'_>, w: &W) {
    // SAFETY: forwarded from the caller.
    unsafe { tiled::linear_blocked::<Avx512, W, 4, 4>(args, w) }
}

/// `matmul` on 8-lane vectors with tiles of 4 rows by 2 vectors.
///
/// # Safety
///
/// The CPU must support AVX2, FMA and F16C; `a`, `b` and `c` must be valid for `m * k`, `k * n`
/// and `m * n` elements.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn matmul_avx2_unchecked(
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    m: usize,
    k: usize,
    n: usize,
) {
    // SAFETY: forwarded from the caller.
    unsafe { tiled::matmul::<Avx2, 4, 2>(a, b, c, m, k, n) }
}

/// `matmul` on 16-lane vectors with tiles of 4 rows by 4 vectors.
///
/// # Safety
///
/// The CPU must support AVX-512F, AVX2, FMA and F16C; `a`, `b` and `c` must be valid for
/// `m * k`, `k * n` and `m * n` elements.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn matmul_avx512_unchecked(
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    m: usize,
    k: usize,
    n: usize,
) {
    // SAFETY: forwarded from the caller.
    unsafe { tiled::matmul::<Avx512, 4, 4>(a, b, c, m, k, n) }
}

/// Lane sums of four 8-lane vectors.
///
/// # Safety
///
/// The CPU must support AVX.
#[inline(always)]
unsafe fn reduce_add4_256(v: [__m256; 4]) -> [f32; 4] {
    // SAFETY: AVX is guaranteed by the caller; the store writes 4 values into `out`.
    unsafe {
        let ab = _mm256_hadd_ps(v[0], v[1]);
        let cd = _mm256_hadd_ps(v[2], v[3]);
        let abcd = _mm256_hadd_ps(ab, cd);
        let sum = _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps::<1>(abcd));
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), sum);
        out
    }
}

/// Lane sum of an 8-lane vector.
///
/// # Safety
///
/// The CPU must support AVX.
#[inline(always)]
unsafe fn reduce_add_256(v: __m256) -> f32 {
    // The additions pair the lanes as `reduce_add4_256` does, so that an output summed alone
    // rounds like one summed in a group of four.
    // SAFETY: AVX is guaranteed by the caller.
    unsafe {
        let pairs = _mm256_hadd_ps(v, v);
        let quads = _mm256_hadd_ps(pairs, pairs);
        let s = _mm_add_ss(_mm256_castps256_ps128(quads), _mm256_extractf128_ps::<1>(quads));
        _mm_cvtss_f32(s)
    }
}

/// AVX2 + FMA + F16C, 8 lanes.
#[derive(Clone, Copy)]
pub(crate) struct Avx2;

// SAFETY: every method uses only AVX, AVX2, FMA and F16C instructions and reads or writes exactly
// the documented number of elements.
unsafe impl Simd for Avx2 {
    const LANES: usize = 8;
    type V = __m256;

    #[inline(always)]
    unsafe fn zero() -> __m256 {
        // SAFETY: AVX per the trait contract.
        unsafe { _mm256_setzero_ps() }
    }

    #[inline(always)]
    unsafe fn splat(v: f32) -> __m256 {
        // SAFETY: AVX per the trait contract.
        unsafe { _mm256_set1_ps(v) }
    }

    #[inline(always)]
    unsafe fn splat_f16(bits: u16) -> __m256 {
        // SAFETY: AVX2 and F16C per the trait contract.
        unsafe { _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))) }
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        // SAFETY: `p` is valid for 8 reads per the trait contract.
        unsafe { _mm256_loadu_ps(p) }
    }

    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        // SAFETY: `p` is valid for 8 writes per the trait contract.
        unsafe { _mm256_storeu_ps(p, v) }
    }

    #[inline(always)]
    unsafe fn mul_add(a: __m256, b: __m256, acc: __m256) -> __m256 {
        // SAFETY: FMA per the trait contract.
        unsafe { _mm256_fmadd_ps(a, b, acc) }
    }

    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX per the trait contract.
        unsafe { _mm256_mul_ps(a, b) }
    }

    #[inline(always)]
    unsafe fn reduce_add(v: __m256) -> f32 {
        // SAFETY: AVX per the trait contract.
        unsafe { reduce_add_256(v) }
    }

    #[inline(always)]
    unsafe fn reduce_add4(v: [__m256; 4]) -> [f32; 4] {
        // SAFETY: AVX per the trait contract.
        unsafe { reduce_add4_256(v) }
    }

    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m256 {
        // SAFETY: `p` is valid for 8 `u16` reads (16 bytes) per the trait contract.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }

    #[inline(always)]
    unsafe fn load_i8(p: *const i8) -> __m256 {
        // SAFETY: `p` is valid for 8 bytes per the trait contract; `_mm_loadl_epi64` reads 8.
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()))) }
    }

    #[inline(always)]
    unsafe fn load_i4(p: *const u8) -> __m256 {
        // SAFETY: `p` is valid for 4 bytes per the trait contract.
        unsafe {
            let word = core::ptr::read_unaligned(p.cast::<i32>());
            // Lane i takes nibble i: shift it to the top, then shift back with sign extension.
            let shifts = _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0);
            let top = _mm256_sllv_epi32(_mm256_set1_epi32(word), shifts);
            _mm256_cvtepi32_ps(_mm256_srai_epi32::<28>(top))
        }
    }

    #[inline(always)]
    unsafe fn load_partial(p: *const f32, len: usize) -> __m256 {
        // SAFETY: the mask enables the first `len` lanes, which the caller made valid to read.
        unsafe { _mm256_maskload_ps(p, first_lanes_256(len)) }
    }

    #[inline(always)]
    unsafe fn store_partial(p: *mut f32, v: __m256, len: usize) {
        // SAFETY: the mask enables the first `len` lanes, which the caller made valid to write.
        unsafe { _mm256_maskstore_ps(p, first_lanes_256(len), v) }
    }
}

/// A mask with the sign bit set in lanes `0..len`.
///
/// # Safety
///
/// The CPU must support AVX2.
#[inline(always)]
unsafe fn first_lanes_256(len: usize) -> __m256i {
    // SAFETY: AVX2 per the caller; `len < 8` fits in an i32.
    unsafe {
        let index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32), index)
    }
}

/// AVX-512F, 16 lanes.
#[derive(Clone, Copy)]
pub(crate) struct Avx512;

/// A mask of lanes `0..len`, for `len < 16`.
#[inline(always)]
fn first_lanes_512(len: usize) -> __mmask16 {
    ((1u32 << len) - 1) as __mmask16
}

// SAFETY: every method uses only AVX-512F and the AVX2 family instructions, and reads or writes
// exactly the documented number of elements (masked lanes are not accessed).
unsafe impl Simd for Avx512 {
    const LANES: usize = 16;
    type V = __m512;

    #[inline(always)]
    unsafe fn zero() -> __m512 {
        // SAFETY: AVX-512F per the trait contract.
        unsafe { _mm512_setzero_ps() }
    }

    #[inline(always)]
    unsafe fn splat(v: f32) -> __m512 {
        // SAFETY: AVX-512F per the trait contract.
        unsafe { _mm512_set1_ps(v) }
    }

    #[inline(always)]
    unsafe fn splat_f16(bits: u16) -> __m512 {
        // SAFETY: AVX-512F and F16C per the trait contract.
        unsafe { _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))) }
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: `p` is valid for 16 reads per the trait contract.
        unsafe { _mm512_loadu_ps(p) }
    }

    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        // SAFETY: `p` is valid for 16 writes per the trait contract.
        unsafe { _mm512_storeu_ps(p, v) }
    }

    #[inline(always)]
    unsafe fn mul_add(a: __m512, b: __m512, acc: __m512) -> __m512 {
        // SAFETY: AVX-512F per the trait contract.
        unsafe { _mm512_fmadd_ps(a, b, acc) }
    }

    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F per the trait contract.
        unsafe { _mm512_mul_ps(a, b) }
    }

    #[inline(always)]
    unsafe fn reduce_add(v: __m512) -> f32 {
        // SAFETY: AVX-512F per the trait contract.
        unsafe { reduce_add_256(fold_512(v)) }
    }

    #[inline(always)]
    unsafe fn reduce_add4(v: [__m512; 4]) -> [f32; 4] {
        // SAFETY: AVX-512F per the trait contract.
        unsafe { reduce_add4_256([fold_512(v[0]), fold_512(v[1]), fold_512(v[2]), fold_512(v[3])]) }
    }

    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m512 {
        // SAFETY: `p` is valid for 16 `u16` reads (32 bytes) per the trait contract.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }

    #[inline(always)]
    unsafe fn load_i8(p: *const i8) -> __m512 {
        // SAFETY: `p` is valid for 16 bytes per the trait contract.
        unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast()))) }
    }

    #[inline(always)]
    unsafe fn load_i4(p: *const u8) -> __m512 {
        // SAFETY: `p` is valid for 8 bytes per the trait contract.
        unsafe {
            let low = core::ptr::read_unaligned(p.cast::<i32>());
            let high = core::ptr::read_unaligned(p.add(4).cast::<i32>());
            let words = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_set1_epi32(low)),
                _mm256_set1_epi32(high),
            );
            // Lane i takes nibble i % 8 of its word: shift it to the top, then shift back with
            // sign extension.
            let shifts =
                _mm512_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
            let top = _mm512_sllv_epi32(words, shifts);
            _mm512_cvtepi32_ps(_mm512_srai_epi32::<28>(top))
        }
    }

    #[inline(always)]
    unsafe fn load_partial(p: *const f32, len: usize) -> __m512 {
        // SAFETY: the mask enables the first `len` lanes, which the caller made valid to read.
        unsafe { _mm512_maskz_loadu_ps(first_lanes_512(len), p) }
    }

    #[inline(always)]
    unsafe fn store_partial(p: *mut f32, v: __m512, len: usize) {
        // SAFETY: the mask enables the first `len` lanes, which the caller made valid to write.
        unsafe { _mm512_mask_storeu_ps(p, first_lanes_512(len), v) }
    }
}

/// Adds the upper eight lanes of `v` to the lower eight.
///
/// # Safety
///
/// The CPU must support AVX-512F.
#[inline(always)]
unsafe fn fold_512(v: __m512) -> __m256 {
    // SAFETY: AVX-512F per the caller.
    unsafe {
        let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        _mm256_add_ps(_mm512_castps512_ps256(v), high)
    }
}
