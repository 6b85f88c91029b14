use std::path::Path;

use super::*;
use crate::temp_file::TempFile;

/// One tensor of a synthetic model file: name, type code, shape and data.
struct Entry {
    name: &'static str,
    type_code: u64,
    shape: Vec<i32>,
    data: Vec<u8>,
}

/// Writes tensors in Marian's binary layout, padding the data start to 256 bytes.
fn model_bytes(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&1u64.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&(e.name.len() as u64 + 1).to_le_bytes());
        out.extend_from_slice(&e.type_code.to_le_bytes());
        out.extend_from_slice(&(e.shape.len() as u64).to_le_bytes());
        out.extend_from_slice(&(e.data.len() as u64).to_le_bytes());
    }
    for e in entries {
        out.extend_from_slice(e.name.as_bytes());
        out.push(0);
    }
    for e in entries {
        for d in &e.shape {
            out.extend_from_slice(&d.to_le_bytes());
        }
    }
    let padding = (256 - (out.len() + 8) % 256) % 256;
    out.extend_from_slice(&(padding as u64).to_le_bytes());
    out.resize(out.len() + padding, 0);
    for e in entries {
        out.extend_from_slice(&e.data);
    }
    out
}

fn f32_entry(name: &'static str, shape: Vec<i32>, values: &[f32]) -> Entry {
    let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Entry { name, type_code: 0x404, shape, data }
}

/// Builds an intgemm8 tensor whose stored bytes are `stored`, followed by `multiplier`.
fn int8_entry(name: &'static str, shape: Vec<i32>, stored: &[i8], multiplier: f32) -> Entry {
    let mut data: Vec<u8> = stored.iter().map(|&v| v as u8).collect();
    data.extend_from_slice(&multiplier.to_le_bytes());
    Entry { name, type_code: 0x4101, shape, data }
}

fn sample_entries() -> Vec<Entry> {
    let yaml = b"type: transformer\ndim-vocabs:\n  - 3\n  - 3\ntransformer-preprocess: \"\"\n\0";
    vec![
        // Stored column-major: the logical matrix is [[1, 2, 3], [4, 5, 6]].
        int8_entry("layer_W", vec![2, 3], &[1, 4, 2, 5, 3, 6], 2.0),
        // Wemb is stored row-major.
        int8_entry("Wemb", vec![3, 2], &[1, 2, 3, 4, 5, 6], 4.0),
        f32_entry("layer_b", vec![1, 3], &[0.5, -1.0, 2.0]),
        Entry {
            name: "special:model.yml",
            type_code: 0x101,
            shape: vec![yaml.len() as i32],
            data: yaml.to_vec(),
        },
    ]
}

fn write_temp(name: &str, bytes: &[u8]) -> TempFile {
    TempFile::new("marian-unit", name, bytes)
}

#[test]
fn reader_dequantizes_and_transposes() {
    let path = write_temp("sample.bin", &model_bytes(&sample_entries()));
    let file = MarianFile::open(&path).unwrap();
    assert_eq!(file.tensors().len(), 4);

    let w = file.int8_matrix("layer_W", Some(&[2, 3])).unwrap();
    assert_eq!(w.values, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(w.multiplier, 2.0);
    assert_eq!(file.tensor_f32("layer_W", None).unwrap(), vec![0.5, 1.0, 1.5, 2.0, 2.5, 3.0]);

    let emb = file.int8_matrix("Wemb", None).unwrap();
    assert_eq!(emb.values, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(file.tensor_f32("Wemb", None).unwrap()[5], 1.5);
    assert_eq!(file.tensor_f32("layer_b", Some(&[1, 3])).unwrap(), vec![0.5, -1.0, 2.0]);
}

#[test]
fn reader_parses_embedded_yaml() {
    let path = write_temp("yaml.bin", &model_bytes(&sample_entries()));
    let file = MarianFile::open(&path).unwrap();
    assert_eq!(file.config_value("type").and_then(YamlValue::as_str), Some("transformer"));
    let vocabs = file.config_value("dim-vocabs").unwrap();
    assert_eq!(vocabs, &YamlValue::List(vec!["3".into(), "3".into()]));
    assert_eq!(file.config_value("transformer-preprocess").and_then(YamlValue::as_str), Some(""));
}

#[test]
fn reader_reports_tensor_errors() {
    let path = write_temp("tensor-errors.bin", &model_bytes(&sample_entries()));
    let file = MarianFile::open(&path).unwrap();

    let missing = file.tensor_f32("nothing", None).unwrap_err().to_string();
    assert!(missing.contains("tensor `nothing`: missing"), "{missing}");
    assert!(missing.contains("tensor-errors.bin"), "{missing}");

    let shape = file.tensor_f32("layer_W", Some(&[3, 2])).unwrap_err().to_string();
    assert!(shape.contains("expected [3, 2]"), "{shape}");

    let kind = file.int8_matrix("layer_b", None).unwrap_err().to_string();
    assert!(kind.contains("expected intgemm8"), "{kind}");

    let text = file.tensor_f32("special:model.yml", None).unwrap_err().to_string();
    assert!(text.contains("cannot be converted"), "{text}");
}

#[test]
fn reader_rejects_bad_multiplier() {
    let mut entries = sample_entries();
    entries[0] = int8_entry("layer_W", vec![2, 3], &[1, 4, 2, 5, 3, 6], f32::NAN);
    let path = write_temp("nan.bin", &model_bytes(&entries));
    let file = MarianFile::open(&path).unwrap();
    let err = file.tensor_f32("layer_W", None).unwrap_err().to_string();
    assert!(err.contains("multiplier NaN"), "{err}");
}

/// Opens `bytes` as a model file and returns the error message.
fn open_error(name: &str, bytes: &[u8]) -> String {
    let path = write_temp(name, bytes);
    let err = MarianFile::open(&path).unwrap_err().to_string();
    assert!(err.contains(name), "the error does not name the file: {err}");
    err
}

#[test]
fn reader_rejects_every_truncation() {
    let bytes = model_bytes(&sample_entries());
    for len in 0..bytes.len() {
        let err = open_error("cut.bin", &bytes[..len]);
        assert!(err.contains("invalid file at byte"), "cut at {len}: {err}");
    }
}

#[test]
fn reader_rejects_damaged_headers() {
    let good = model_bytes(&sample_entries());
    let patch = |at: usize, value: u64| {
        let mut bytes = good.clone();
        bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
        bytes
    };
    let cases = [
        ("version.bin", patch(0, 2), "format version 2"),
        ("count.bin", patch(8, u64::MAX), "tensor count"),
        ("name-length.bin", patch(16, 1 << 40), "name length"),
        ("rank.bin", patch(16 + 16, 9), "rank 9"),
        ("data-length.bin", patch(16 + 24, u64::MAX / 2), "data of tensor `layer_W`"),
        ("short-data.bin", patch(16 + 24, 3), "needs 10 bytes"),
    ];
    for (name, bytes, expected) in cases {
        let err = open_error(name, &bytes);
        assert!(err.contains(expected), "{name}: {err}");
    }

    // The shapes follow the headers and the NUL-terminated names; the first dimension is 2.
    let entries = sample_entries();
    let names: usize = entries.iter().map(|e| e.name.len() + 1).sum();
    let shape_at = 16 + 32 * entries.len() + names;
    assert_eq!(good[shape_at..shape_at + 4], 2i32.to_le_bytes());
    let mut negative = good.clone();
    negative[shape_at..shape_at + 4].copy_from_slice(&(-2i32).to_le_bytes());
    let err = open_error("negative.bin", &negative);
    assert!(err.contains("dimension -2"), "{err}");
}

#[test]
fn reader_rejects_duplicate_names() {
    let mut entries = sample_entries();
    entries[2].name = "layer_W";
    let err = open_error("duplicate.bin", &model_bytes(&entries));
    assert!(err.contains("appears twice"), "{err}");
}

#[test]
fn yaml_subset_parses_and_rejects() {
    let entries = parse_yaml("a: 1\nb:\n  - x\n  - 'y'\nc: []\nd: \"q\"\n").unwrap();
    assert_eq!(entries[0], ("a".into(), YamlValue::Scalar("1".into())));
    assert_eq!(entries[1].1, YamlValue::List(vec!["x".into(), "y".into()]));
    assert_eq!(entries[2].1, YamlValue::List(vec![]));
    assert_eq!(entries[3].1.as_str(), Some("q"));

    assert_eq!(parse_yaml("- x\n").unwrap_err().0, 1);
    assert_eq!(parse_yaml("a: 1\n  b: 2\n").unwrap_err().0, 2);
    assert_eq!(parse_yaml("a: [1, 2]\n").unwrap_err().0, 1);
    assert_eq!(parse_yaml("a: 1\na: 2\n").unwrap_err().0, 2);
    assert_eq!(parse_yaml("no colon\n").unwrap_err().0, 1);
}

#[test]
fn model_rejects_missing_configuration() {
    let entries = vec![int8_entry("Wemb", vec![3, 2], &[1, 2, 3, 4, 5, 6], 4.0)];
    let path = write_temp("no-config.bin", &model_bytes(&entries));
    let file = MarianFile::open(&path).unwrap();
    let err = MarianModel::from_file(&file, 0).unwrap_err().to_string();
    assert!(err.contains("special:model.yml"), "{err}");
}

fn shortlist_bytes(first: u64, offsets: &[u64], entries: &[u32]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in [0xF11A_48D5_0134_17F5, 0, first, 2, offsets.len() as u64, entries.len() as u64] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in offsets {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in entries {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[test]
fn shortlist_unions_lists() {
    // Source id 0 lists [5, 6], source id 1 lists [7], source id 2 lists nothing.
    let path = write_temp("lex.bin", &shortlist_bytes(2, &[0, 2, 3, 3], &[5, 6, 7]));
    let shortlist = Shortlist::open(&path).unwrap();
    assert_eq!(shortlist.first(), 2);
    assert_eq!(shortlist.candidates(&[0, 2], 9, 10).unwrap(), vec![0, 1, 2, 5, 6, 9]);
    assert_eq!(shortlist.candidates(&[1], 9, 10).unwrap(), vec![0, 1, 7, 9]);

    let err = shortlist.candidates(&[3], 9, 10).unwrap_err().to_string();
    assert!(err.contains("source id 3 has no shortlist"), "{err}");
    let err = shortlist.candidates(&[0], 9, 6).unwrap_err().to_string();
    assert!(err.contains("target id 9 is outside"), "{err}");
}

#[test]
fn shortlist_rejects_damaged_files() {
    let good = shortlist_bytes(2, &[0, 2, 3, 3], &[5, 6, 7]);
    let mut bad_magic = good.clone();
    bad_magic[0] ^= 1;
    let mut decreasing = good.clone();
    decreasing[48 + 8..48 + 16].copy_from_slice(&9u64.to_le_bytes());
    let cases = [
        ("lex-cut.bin", good[..good.len() - 1].to_vec(), "do not fit"),
        ("lex-short.bin", good[..20].to_vec(), "shorter than"),
        ("lex-magic.bin", bad_magic, "magic"),
        ("lex-offsets.bin", decreasing, "offset 9 of source id 0"),
    ];
    for (name, bytes, expected) in cases {
        let path = write_temp(name, &bytes);
        let err = Shortlist::open(&path).unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
        assert!(err.contains(expected), "{name}: {err}");
    }
}

#[test]
fn reader_parses_bytes_like_a_file() {
    let bytes = model_bytes(&sample_entries());
    let opened = MarianFile::open(&write_temp("from-bytes.bin", &bytes)).unwrap();
    let name = Path::new("in-memory.bin");
    let parsed = MarianFile::from_bytes(name, bytes.clone()).unwrap();
    assert_eq!(parsed.path(), name);
    assert_eq!(parsed.tensors(), opened.tensors());
    assert_eq!(parsed.config(), opened.config());
    assert_eq!(parsed.tensor_f32("layer_W", None).unwrap(), vec![0.5, 1.0, 1.5, 2.0, 2.5, 3.0]);

    let err = MarianFile::from_bytes(name, bytes[..20].to_vec()).unwrap_err().to_string();
    assert!(err.contains("in-memory.bin"), "{err}");
    assert!(err.contains("invalid file at byte"), "{err}");
}

#[test]
fn shortlist_parses_bytes_like_a_file() {
    let bytes = shortlist_bytes(2, &[0, 2, 3, 3], &[5, 6, 7]);
    let name = Path::new("in-memory.s2t.bin");
    let shortlist = Shortlist::from_bytes(name, &bytes).unwrap();
    assert_eq!(shortlist.first(), 2);
    assert_eq!(shortlist.candidates(&[0], 9, 10).unwrap(), vec![0, 1, 5, 6, 9]);

    let err = Shortlist::from_bytes(name, &bytes[..20]).unwrap_err().to_string();
    assert!(err.contains("in-memory.s2t.bin"), "{err}");
    assert!(err.contains("shorter than"), "{err}");
}

/// Returns a configuration of the supported architecture with the given depths, for a width of 2
/// with one head.
fn supported_yaml(encoder_layers: u64, decoder_layers: u64) -> Vec<u8> {
    let yaml = format!(
        "type: transformer\ntransformer-decoder-autoreg: rnn\ndec-cell: ssru\n\
         transformer-ffn-activation: relu\ntransformer-ffn-depth: 2\n\
         transformer-postprocess: dan\ntransformer-preprocess: \"\"\n\
         transformer-postprocess-emb: d\ntied-embeddings-all: true\n\
         enc-depth: {encoder_layers}\ndec-depth: {decoder_layers}\ndim-emb: 2\n\
         transformer-heads: 1\ntransformer-dim-ffn: 4\n\0"
    );
    yaml.into_bytes()
}

/// Names of one-value tensors that pad a tensor table.
const FILLERS: [&str; 18] = [
    "f0", "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9", "f10", "f11", "f12", "f13", "f14",
    "f15", "f16", "f17",
];

#[test]
fn config_rejects_depth_beyond_tensors() {
    // With 2 tensors no layer fits. With 20, one encoder layer (16 tensors) fits but no decoder
    // layer (21 tensors). Each depth is rejected before the model reserves room for its layers.
    let cases = [
        ("deep-encoder.bin", supported_yaml(100_000_000_000_000, 1), 0, "enc-depth", "2 tensors"),
        ("deep-decoder.bin", supported_yaml(1, u64::MAX), 18, "dec-depth", "20 tensors"),
    ];
    for (name, yaml, fillers, key, tensors) in cases {
        let mut entries = vec![
            int8_entry("Wemb", vec![3, 2], &[1, 2, 3, 4, 5, 6], 4.0),
            Entry {
                name: "special:model.yml",
                type_code: 0x101,
                shape: vec![yaml.len() as i32],
                data: yaml,
            },
        ];
        for filler in &FILLERS[..fillers] {
            entries.push(f32_entry(filler, vec![1], &[0.0]));
        }
        let file = MarianFile::open(&write_temp(name, &model_bytes(&entries))).unwrap();

        let err = MarianConfig::from_file(&file).unwrap_err().to_string();
        assert!(err.contains(&format!("configuration key `{key}`")), "{name}: {err}");
        assert!(err.contains(&format!("{tensors} are enough for at most 0 layers")), "{err}");
        let err = MarianModel::from_file(&file, 0).unwrap_err().to_string();
        assert!(err.contains(key), "{name}: {err}");
    }
}
