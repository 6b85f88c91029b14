//! Parses arbitrary bytes as a GGUF file. A file that parses then has each tensor of a type with a
//! decoder dequantized, and its tokenizer parts read, round-tripped through JSON and built into a
//! tokenizer. Each step must end in a typed error or in values that agree with the tensor table.
//!
//! NOTE: the chat template is not rendered. Nested loops over ranges let a short template run for
//! hours, which would stall the fuzzer rather than find a reader bug.
#![no_main]

use std::path::Path;

use edgefold_compressor::gguf::{dequantize, GgufFile};
use edgefold_compressor::llm::tokenizer::{GgufTokenizer, TokenizerSpec};
use libfuzzer_sys::fuzz_target;

/// Tensors with more elements are skipped, so that one tensor costs at most 4 MiB of f32 values.
/// Inputs within the `-max_len` that scripts/fuzz.sh sets never reach it.
const MAX_DEQUANTIZE_ELEMENTS: u64 = 1 << 20;

/// Text encoded and decoded by every tokenizer that builds: ASCII, digits, the control token of
/// compressor/tests/fixtures/llm/tiny-llama.gguf and multi-byte characters.
const SAMPLE_TEXT: &str = "the 2 cats<|endoftext|> é 雪";

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(Path::new("fuzz.gguf"), data.to_vec()) else {
        return;
    };
    dequantize_tensors(&file);
    read_tokenizer(&file);
});

fn dequantize_tensors(file: &GgufFile) {
    for info in file.tensors() {
        let elements = info.elements();
        if !info.ggml_type.can_dequantize() || elements > MAX_DEQUANTIZE_ELEMENTS {
            continue;
        }
        // Parsing checked that the data contains exactly `elements` values of the tensor's type.
        let values = dequantize(info.ggml_type, file.tensor_bytes(info), elements as usize)
            .unwrap_or_else(|e| panic!("tensor `{}` does not dequantize: {e}", info.name));
        assert_eq!(values.len() as u64, elements, "tensor `{}`", info.name);
    }
    // Dequantizing by name also runs the lookup and the shape check.
    if let Some(info) = file.tensors().first() {
        if info.ggml_type.can_dequantize() && info.elements() <= MAX_DEQUANTIZE_ELEMENTS {
            let values = file.dequantize(&info.name, &info.shape());
            assert!(
                values.is_ok(),
                "tensor `{}` is not found by its own name and shape",
                info.name
            );
        }
    }
}

fn read_tokenizer(file: &GgufFile) {
    let Ok(spec) = TokenizerSpec::from_gguf(file) else {
        return;
    };
    // A packed file stores the parts as this JSON, so they must come back unchanged.
    let decoded = TokenizerSpec::from_json(&spec.to_json())
        .unwrap_or_else(|e| panic!("the tokenizer's JSON does not decode: {e}"));
    assert!(decoded == spec, "the tokenizer's parts change through JSON");

    let Ok(tokenizer) = GgufTokenizer::from_spec(spec) else {
        return;
    };
    if let Ok(ids) = tokenizer.encode(SAMPLE_TEXT) {
        for &id in &ids {
            assert!((id as usize) < tokenizer.vocab(), "token {id} is outside the vocabulary");
        }
        let _ = tokenizer.decode(&ids);
    }
}
