use std::path::PathBuf;

use super::*;
use crate::temp_file::TempFile;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/quants.gguf")
}

/// Writes `bytes` to a fresh temporary file and returns it.
fn temp_file(name: &str, bytes: &[u8]) -> TempFile {
    TempFile::new("gguf", name, bytes)
}

fn parse_err(bytes: &[u8]) -> String {
    match parse(bytes) {
        Ok(_) => panic!("{} bytes parsed without an error", bytes.len()),
        Err((_, reason)) => reason,
    }
}

/// A minimal GGUF writer: header, metadata and one tensor table entry per call.
struct Builder {
    kv: Vec<u8>,
    kv_count: u64,
    infos: Vec<u8>,
    tensor_count: u64,
    data: Vec<u8>,
}

impl Builder {
    fn new() -> Builder {
        Builder {
            kv: Vec::new(),
            kv_count: 0,
            infos: Vec::new(),
            tensor_count: 0,
            data: Vec::new(),
        }
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn kv_u32(mut self, key: &str, v: u32) -> Builder {
        Self::string(&mut self.kv, key);
        self.kv.extend(4u32.to_le_bytes());
        self.kv.extend(v.to_le_bytes());
        self.kv_count += 1;
        self
    }

    fn kv_raw(mut self, key: &str, kind: u32, payload: &[u8]) -> Builder {
        Self::string(&mut self.kv, key);
        self.kv.extend(kind.to_le_bytes());
        self.kv.extend(payload);
        self.kv_count += 1;
        self
    }

    fn tensor(mut self, name: &str, dims: &[u64], kind: u32, offset: u64, data: &[u8]) -> Builder {
        Self::string(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(kind.to_le_bytes());
        self.infos.extend(offset.to_le_bytes());
        self.tensor_count += 1;
        self.data.extend(data);
        self
    }

    fn build(self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.tensor_count.to_le_bytes());
        out.extend(self.kv_count.to_le_bytes());
        out.extend(self.kv);
        out.extend(self.infos);
        out.resize(out.len().div_ceil(32) * 32, 0);
        out.extend(self.data);
        out
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn dequantize_matches_gguf_py() {
    let file = GgufFile::open(&fixture()).unwrap();
    let mut checked = Vec::new();
    for info in file.tensors() {
        if info.name.ends_with(".expected") {
            continue;
        }
        let expected_name = format!("{}.expected", info.name);
        let expected = file.dequantize(&expected_name, &info.shape()).unwrap();
        let got = file.dequantize(&info.name, &info.shape()).unwrap();
        assert_eq!(got.len(), expected.len(), "{}", info.name);
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            // gguf-py evaluates the same products in f32 but may group them differently.
            let tolerance = 1e-6 * e.abs().max(1e-3);
            assert!((g - e).abs() <= tolerance, "{} value {i}: {g} against {e}", info.name);
        }
        checked.push(info.ggml_type.name());
    }
    let all = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"];
    for name in all.iter().chain(&["F16", "F32", "BF16"]) {
        assert!(checked.contains(name), "{name} is missing from the fixture");
    }
}

#[test]
fn fixture_metadata_reads() {
    let file = GgufFile::open(&fixture()).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.require_str("general.name").unwrap(), "dequantization fixture");
    assert_eq!(file.require_u64("test.rows").unwrap(), 3);
    let list: Vec<u64> = file
        .require("test.list")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(list, [1, 2, 3]);
    let err = file.require_u64("general.name").unwrap_err().to_string();
    assert!(err.contains("general.name"), "{err}");
    assert!(err.contains("integer"), "{err}");
    let err = file.dequantize("Q4_K", &[512, 3]).unwrap_err().to_string();
    assert!(err.contains("[3, 512]"), "{err}");
}

#[test]
fn q8_k_block_decodes() {
    let mut block = vec![0u8; 292];
    block[..4].copy_from_slice(&0.5f32.to_le_bytes());
    for i in 0..256 {
        block[4 + i] = (i as i8).wrapping_sub(100) as u8;
    }
    let values = dequantize(GgmlType::Q8_K, &block, 256).unwrap();
    for (i, v) in values.iter().enumerate() {
        assert_eq!(*v, 0.5 * f32::from((i as i8).wrapping_sub(100)));
    }
}

#[test]
fn unsupported_type_names_supported_ones() {
    let err = dequantize(GgmlType::IQ2_XXS, &[0; 66], 256).unwrap_err();
    assert!(err.contains("IQ2_XXS"), "{err}");
    assert!(err.contains("Q4_K"), "{err}");
    let err = dequantize(GgmlType::Q4_0, &[0; 17], 32).unwrap_err();
    assert!(err.contains("17 bytes"), "{err}");
}

#[test]
fn truncated_fixture_never_parses() {
    let bytes = std::fs::read(fixture()).unwrap();
    assert!(parse(&bytes).is_ok());
    // Every prefix lacks part of the header, the table or the last tensor's data.
    for len in 0..bytes.len() {
        assert!(parse(&bytes[..len]).is_err(), "a {len}-byte prefix parsed");
    }
}

#[test]
fn flipped_header_bytes_never_panic() {
    let bytes = std::fs::read(fixture()).unwrap();
    let table_end = 1472;
    for at in 0..table_end {
        for bit in [0x01u8, 0x80, 0xff] {
            let mut damaged = bytes.clone();
            damaged[at] ^= bit;
            // Either outcome is fine, as long as there is no panic and a success is consistent.
            if let Ok((_, _, tensors)) = parse(&damaged) {
                for t in tensors {
                    assert!(t.start + t.len <= damaged.len());
                }
            }
        }
    }
}

#[test]
fn bad_headers_name_the_problem() {
    let good = Builder::new().build();
    assert!(parse(&good).is_ok());

    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    assert!(parse_err(&bad_magic).contains("magic"));

    let mut v1 = good.clone();
    v1[4] = 1;
    assert!(parse_err(&v1).contains("version 1"));

    let mut big_endian = good.clone();
    big_endian[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(parse_err(&big_endian).contains("big-endian"));

    let mut many_tensors = good.clone();
    many_tensors[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(parse_err(&many_tensors).contains("tensor count"));

    let long_key = {
        let mut b = good.clone();
        b[16..24].copy_from_slice(&1u64.to_le_bytes());
        b.truncate(24);
        b.extend(u64::MAX.to_le_bytes());
        b.extend([0; 8]);
        b
    };
    assert!(parse_err(&long_key).contains("metadata key"));
}

#[test]
fn bad_metadata_names_the_problem() {
    let unknown_kind = Builder::new().kv_raw("x", 99, &[]).build();
    assert!(parse_err(&unknown_kind).contains("value type 99"));

    let bad_bool = Builder::new().kv_raw("x", 7, &[2]).build();
    assert!(parse_err(&bad_bool).contains("bool"));

    let mut huge_array = 4u32.to_le_bytes().to_vec();
    huge_array.extend(u64::MAX.to_le_bytes());
    let huge = Builder::new().kv_raw("x", 9, &huge_array).build();
    assert!(parse_err(&huge).contains("array length"));

    // An array of arrays of arrays... deeper than any real file.
    let mut nested = Vec::new();
    for _ in 0..8 {
        nested.extend(9u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
    }
    let deep = Builder::new().kv_raw("x", 9, &nested).build();
    assert!(parse_err(&deep).contains("nest"));

    let twice = Builder::new().kv_u32("x", 1).kv_u32("x", 2).build();
    assert!(parse_err(&twice).contains("twice"));

    let odd_alignment = Builder::new().kv_u32("general.alignment", 24).build();
    assert!(parse_err(&odd_alignment).contains("alignment"));
}

#[test]
fn bad_tensors_name_the_problem() {
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    let good = Builder::new().tensor("t", &[4], 0, 0, &data).build();
    let (_, _, tensors) = parse(&good).unwrap();
    assert_eq!(tensors[0].len, 16);

    let cases: &[(&str, Vec<u8>)] = &[
        ("unknown element type 99", Builder::new().tensor("t", &[4], 99, 0, &data).build()),
        ("rank 5", Builder::new().tensor("t", &[1, 1, 1, 1, 4], 0, 0, &data).build()),
        ("zero dimension", Builder::new().tensor("t", &[4, 0], 0, 0, &data).build()),
        ("overflow", Builder::new().tensor("t", &[u64::MAX, 4], 0, 0, &data).build()),
        ("runs past the end", Builder::new().tensor("t", &[8], 0, 0, &data).build()),
        ("runs past the end", Builder::new().tensor("t", &[4], 0, u64::MAX - 31, &data).build()),
        ("alignment", Builder::new().tensor("t", &[4], 0, 4, &data).build()),
        (
            "multiple of the 32-element blocks",
            Builder::new().tensor("t", &[8], 2, 0, &data).build(),
        ),
        (
            "twice",
            Builder::new()
                .tensor("t", &[2], 0, 0, &data[..8])
                .tensor("t", &[2], 0, 0, &data[8..])
                .build(),
        ),
    ];
    for (expected, bytes) in cases {
        let reason = parse_err(bytes);
        assert!(reason.contains(expected), "expected `{expected}` in: {reason}");
    }
}

#[test]
fn open_errors_name_the_file() {
    let path = temp_file("not-gguf.gguf", b"PK\x03\x04 a zip file");
    let err = GgufFile::open(&path).unwrap_err().to_string();
    assert!(err.contains("not-gguf.gguf"), "{err}");
    assert!(err.contains("magic"), "{err}");

    let missing = std::env::temp_dir().join("edgefold-no-such-file.gguf");
    let err = GgufFile::open(&missing).unwrap_err().to_string();
    assert!(err.contains("edgefold-no-such-file.gguf"), "{err}");
}

#[test]
fn from_bytes_matches_open() {
    let opened = GgufFile::open(&fixture()).unwrap();
    let bytes = std::fs::read(fixture()).unwrap();
    let name = Path::new("in-memory.gguf");
    let parsed = GgufFile::from_bytes(name, bytes).unwrap();
    assert_eq!(parsed.path(), name);
    assert_eq!(parsed.version(), opened.version());
    assert_eq!(parsed.metadata(), opened.metadata());
    assert_eq!(parsed.tensors(), opened.tensors());
    for info in opened.tensors() {
        assert_eq!(parsed.tensor_bytes(info), opened.tensor_bytes(info), "{}", info.name);
    }

    let err = GgufFile::from_bytes(name, b"GGUF".to_vec()).unwrap_err().to_string();
    assert!(err.contains("in-memory.gguf"), "{err}");
    assert!(err.contains("version"), "{err}");
}
