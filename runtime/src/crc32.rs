//! CRC-32 (IEEE 802.3 polynomial, reflected), the checksum of every section.
//!
//! With `std`, the crc32fast crate computes it: carry-less multiplication on x86_64 (PCLMULQDQ)
//! and the CRC instructions on aarch64, detected at run time, so that opening a file is not
//! held up by its checksums. Without `std`, hosts use slicing-by-8 (eight 1 KiB tables, several
//! bytes per cycle) and bare-metal targets one table, keeping flash use at 1 KiB.

const POLY: u32 = 0xEDB8_8320;

const fn make_tables<const N: usize>() -> [[u32; 256]; N] {
    let mut tables = [[0u32; 256]; N];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { POLY ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        tables[0][i] = c;
        i += 1;
    }
    let mut t = 1;
    while t < N {
        let mut i = 0;
        while i < 256 {
            let prev = tables[t - 1][i];
            tables[t][i] = (prev >> 8) ^ tables[0][(prev & 0xFF) as usize];
            i += 1;
        }
        t += 1;
    }
    tables
}

#[cfg(not(target_os = "none"))]
static TABLES: [[u32; 256]; 8] = make_tables::<8>();
#[cfg(target_os = "none")]
static TABLES: [[u32; 256]; 1] = make_tables::<1>();

/// Computes the CRC-32 of `bytes` (the same value as zlib's `crc32`).
pub fn crc32(bytes: &[u8]) -> u32 {
    #[cfg(feature = "std")]
    {
        crc32fast::hash(bytes)
    }
    #[cfg(not(feature = "std"))]
    {
        crc32_tables(bytes)
    }
}

/// [`crc32`] from the lookup tables.
#[cfg_attr(feature = "std", allow(dead_code))]
fn crc32_tables(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    #[cfg(target_os = "none")]
    let rest = bytes;
    #[cfg(not(target_os = "none"))]
    let rest = {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
            let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
            crc = TABLES[7][(lo & 0xFF) as usize]
                ^ TABLES[6][((lo >> 8) & 0xFF) as usize]
                ^ TABLES[5][((lo >> 16) & 0xFF) as usize]
                ^ TABLES[4][(lo >> 24) as usize]
                ^ TABLES[3][(hi & 0xFF) as usize]
                ^ TABLES[2][((hi >> 8) & 0xFF) as usize]
                ^ TABLES[1][((hi >> 16) & 0xFF) as usize]
                ^ TABLES[0][(hi >> 24) as usize];
        }
        chunks.remainder()
    };
    for &b in rest {
        crc = TABLES[0][((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::{crc32, crc32_tables};

    fn bytewise(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { 0xEDB8_8320 ^ (crc >> 1) } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn crc32_known_vectors() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b"The quick brown fox jumps over the lazy dog"), 0x414F_A339);
    }

    #[test]
    fn crc32_matches_bitwise_for_all_lengths() {
        let data: std::vec::Vec<u8> =
            (0..1000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        // Miri interprets every operation, so under it this checks every length up to 17 (each
        // remainder after zero and one 8-byte chunks, from each start) and one long one.
        let lengths: std::vec::Vec<usize> =
            if cfg!(miri) { (0..=17).chain([100]).collect() } else { (0..data.len()).collect() };
        for len in lengths {
            for start in [0, 1, 3, 7] {
                let s = &data[start.min(len)..len];
                assert_eq!(crc32(s), bytewise(s), "length {len}, start {start}");
                assert_eq!(crc32_tables(s), bytewise(s), "tables, length {len}, start {start}");
            }
        }
    }
}
