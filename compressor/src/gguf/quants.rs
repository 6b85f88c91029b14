//! ggml element types and their dequantization to f32.
//!
//! Block layouts follow ggml's `ggml-common.h` (ggml repository, `src/ggml-common.h`): the
//! legacy types store 32 values per block with an f16 scale (and minimum), the K-quants 256
//! values per super-block with 6-bit or 8-bit sub-block scales. Each decoder reads whole blocks
//! from a slice whose length was checked against the element count first.

use half::{bf16, f16};

/// Values per K-quant super-block.
const QK_K: usize = 256;

/// A ggml element type, with its number in GGUF files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types, missing_docs)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    IQ2_XXS = 16,
    IQ2_XS = 17,
    IQ3_XXS = 18,
    IQ1_S = 19,
    IQ4_NL = 20,
    IQ3_S = 21,
    IQ2_S = 22,
    IQ4_XS = 23,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    IQ1_M = 29,
    BF16 = 30,
    TQ1_0 = 34,
    TQ2_0 = 35,
}

impl GgmlType {
    /// Every type, in the order of their numbers.
    pub const ALL: [GgmlType; 31] = {
        use GgmlType::*;
        [
            F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K,
            IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS, I8, I16, I32, I64, F64,
            IQ1_M, BF16, TQ1_0, TQ2_0,
        ]
    };

    /// Returns the type numbered `raw` in GGUF files, if it is a known one.
    pub fn from_raw(raw: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| *t as u32 == raw)
    }

    /// Returns ggml's name of the type, such as `Q4_K`.
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
        }
    }

    /// Returns the number of values in one block (1 for the plain types).
    pub fn block_elements(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | F64 | I8 | I16 | I32 | I64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | IQ4_NL => 32,
            _ => QK_K,
        }
    }

    /// Returns the size of one block in bytes.
    pub fn block_bytes(self) -> usize {
        use GgmlType::*;
        match self {
            I8 => 1,
            F16 | BF16 | I16 => 2,
            F32 | I32 => 4,
            F64 | I64 => 8,
            Q4_0 | IQ4_NL => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q8_1 => 36,
            Q2_K => 84,
            Q3_K | IQ3_S => 110,
            Q4_K => 144,
            Q5_K => 176,
            Q6_K => 210,
            Q8_K => 292,
            IQ2_XXS | TQ2_0 => 66,
            IQ2_XS => 74,
            IQ3_XXS => 98,
            IQ1_S => 50,
            IQ2_S => 82,
            IQ4_XS => 136,
            IQ1_M => 56,
            TQ1_0 => 54,
        }
    }

    /// Returns the bits per value, counting scales and minimums.
    pub fn bits_per_value(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_elements() as f64
    }

    /// Returns whether [`dequantize`] decodes this type.
    pub fn can_dequantize(self) -> bool {
        decoder(self).is_some()
    }
}

/// Decodes one block into `out` (of [`GgmlType::block_elements`] values).
type Decoder = fn(&[u8], &mut [f32]);

fn decoder(t: GgmlType) -> Option<Decoder> {
    use GgmlType::*;
    Some(match t {
        F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        F16 => |b, y| y[0] = f16_at(b, 0),
        BF16 => |b, y| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        F64 => |b, y| y[0] = f64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8])) as f32,
        I8 => |b, y| y[0] = f32::from(b[0] as i8),
        I16 => |b, y| y[0] = f32::from(i16::from_le_bytes([b[0], b[1]])),
        I32 => |b, y| y[0] = i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
        Q4_0 => q4_0,
        Q4_1 => q4_1,
        Q5_0 => q5_0,
        Q5_1 => q5_1,
        Q8_0 => q8_0,
        Q2_K => q2_k,
        Q3_K => q3_k,
        Q4_K => q4_k,
        Q5_K => q5_k,
        Q6_K => q6_k,
        Q8_K => q8_k,
        _ => return None,
    })
}

/// Dequantizes `elements` values of type `t` from `bytes`.
///
/// Fails when the type has no decoder here or `bytes` does not hold exactly that many values.
pub fn dequantize(t: GgmlType, bytes: &[u8], elements: usize) -> Result<Vec<f32>, String> {
    let decode = decoder(t).ok_or_else(|| {
        let supported: Vec<&str> =
            GgmlType::ALL.iter().filter(|t| t.can_dequantize()).map(|t| t.name()).collect();
        format!(
            "dequantizing {} is not supported; supported types: {}",
            t.name(),
            supported.join(", ")
        )
    })?;
    let per_block = t.block_elements();
    if !elements.is_multiple_of(per_block) {
        return Err(format!(
            "{elements} values are not a whole number of {per_block}-value {} blocks",
            t.name()
        ));
    }
    let blocks = elements / per_block;
    let need = blocks.checked_mul(t.block_bytes());
    if need != Some(bytes.len()) {
        return Err(format!(
            "{} bytes do not hold {elements} {} values ({blocks} blocks of {} bytes)",
            bytes.len(),
            t.name(),
            t.block_bytes()
        ));
    }
    let mut out = vec![0.0f32; elements];
    for (block, y) in bytes.chunks_exact(t.block_bytes()).zip(out.chunks_exact_mut(per_block)) {
        decode(block, y);
    }
    Ok(out)
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// 4-bit values, low nibbles first: value `j` and `j + 16` share byte `j`.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = (i32::from(q & 0x0f) - 8) as f32 * d;
        y[j + 16] = (i32::from(q >> 4) - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = f32::from(q & 0x0f) * d + m;
        y[j + 16] = f32::from(q >> 4) * d + m;
    }
}

/// Reads the fifth bits of the 32 values: bit `j` of a little-endian u32 belongs to value `j`.
fn q5_high_bits(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = q5_high_bits(&b[2..6]);
    for (j, &q) in b[6..22].iter().enumerate() {
        let lo = u32::from(q & 0x0f) | (((qh >> j) & 1) << 4);
        let hi = u32::from(q >> 4) | (((qh >> (j + 16)) & 1) << 4);
        y[j] = (lo as i32 - 16) as f32 * d;
        y[j + 16] = (hi as i32 - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = q5_high_bits(&b[4..8]);
    for (j, &q) in b[8..24].iter().enumerate() {
        let lo = u32::from(q & 0x0f) | (((qh >> j) & 1) << 4);
        let hi = u32::from(q >> 4) | (((qh >> (j + 16)) & 1) << 4);
        y[j] = lo as f32 * d + m;
        y[j + 16] = hi as f32 * d + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (out, &q) in y.iter_mut().zip(&b[2..34]) {
        *out = f32::from(q as i8) * d;
    }
}

/// Layout: 16 bytes of 4-bit scale and minimum pairs, 64 bytes of 2-bit values, then the f16
/// super-block scale and minimum.
fn q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    let mut is = 0;
    for half in 0..2 {
        let q = &b[16 + 32 * half..16 + 32 * half + 32];
        let y = &mut y[128 * half..128 * half + 128];
        for j in 0..4 {
            let shift = 2 * j;
            for part in 0..2 {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * f32::from(sc & 0x0f), dmin * f32::from(sc >> 4));
                for l in 0..16 {
                    let v = (q[16 * part + l] >> shift) & 3;
                    y[32 * j + 16 * part + l] = dl * f32::from(v) - ml;
                }
            }
        }
    }
}

/// Layout: 32 bytes of high-bit masks, 64 bytes of 2-bit values, 12 bytes of packed 6-bit
/// scales and the f16 super-block scale.
fn q3_k(b: &[u8], y: &mut [f32]) {
    let hmask = &b[0..32];
    let d = f16_at(b, 108);
    let scales = q3_k_scales(&b[96..108]);
    let mut is = 0;
    let mut m = 1u8;
    for half in 0..2 {
        let q = &b[32 + 32 * half..32 + 32 * half + 32];
        let y = &mut y[128 * half..128 * half + 128];
        for j in 0..4 {
            let shift = 2 * j;
            for part in 0..2 {
                let dl = d * f32::from(scales[is] - 32);
                is += 1;
                for l in 0..16 {
                    let i = 16 * part + l;
                    let low = i32::from((q[i] >> shift) & 3);
                    let high = if hmask[i] & m != 0 { 0 } else { 4 };
                    y[32 * j + i] = dl * (low - high) as f32;
                }
            }
            m = m.wrapping_shl(1);
        }
    }
}

/// Unpacks the sixteen 6-bit scales of a Q3_K block: the low four bits of scale `i` are in
/// byte `i % 8` (low nibble for `i < 8`), the high two in byte `8 + i % 4` at bit `2 * (i / 4)`.
fn q3_k_scales(packed: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, s) in out.iter_mut().enumerate() {
        let low = if i < 8 { packed[i] & 0x0f } else { packed[i - 8] >> 4 };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = (low | (high << 4)) as i8;
    }
    out
}

/// Returns the 6-bit scale and minimum of sub-block `j` from the 12 packed bytes of a Q4_K or
/// Q5_K block.
fn k_scale_min(j: usize, q: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    };
    (f32::from(sc), f32::from(m))
}

/// Layout: f16 scale and minimum, 12 bytes of 6-bit sub-block scales and minimums, 128 bytes
/// of 4-bit values (low nibbles for one 32-value sub-block, high nibbles for the next).
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    for chunk in 0..4 {
        let q = &b[16 + 32 * chunk..16 + 32 * chunk + 32];
        let (s1, m1) = k_scale_min(2 * chunk, scales);
        let (s2, m2) = k_scale_min(2 * chunk + 1, scales);
        let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
        let y = &mut y[64 * chunk..64 * chunk + 64];
        for l in 0..32 {
            y[l] = d1 * f32::from(q[l] & 0x0f) - m1;
            y[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

/// Q4_K with a fifth bit per value from 32 bytes of high bits.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    for chunk in 0..4 {
        let q = &b[48 + 32 * chunk..48 + 32 * chunk + 32];
        let (s1, m1) = k_scale_min(2 * chunk, scales);
        let (s2, m2) = k_scale_min(2 * chunk + 1, scales);
        let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
        let (u1, u2) = (1u8 << (2 * chunk), 1u8 << (2 * chunk + 1));
        let y = &mut y[64 * chunk..64 * chunk + 64];
        for l in 0..32 {
            let lo = (q[l] & 0x0f) + if qh[l] & u1 != 0 { 16 } else { 0 };
            let hi = (q[l] >> 4) + if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * f32::from(lo) - m1;
            y[l + 32] = d2 * f32::from(hi) - m2;
        }
    }
}

/// Layout: 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 signed 8-bit scales and the
/// f16 super-block scale.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            let scale = |i: usize| d * f32::from(sc[i] as i8);
            y[l] = scale(is) * q1 as f32;
            y[l + 32] = scale(is + 2) * q2 as f32;
            y[l + 64] = scale(is + 4) * q3 as f32;
            y[l + 96] = scale(is + 6) * q4 as f32;
        }
    }
}

/// Layout: f32 scale, 256 signed 8-bit values and 16 i16 block sums (unused here).
fn q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (out, &q) in y.iter_mut().zip(&b[4..260]) {
        *out = d * f32::from(q as i8);
    }
}
