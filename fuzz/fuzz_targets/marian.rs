//! Parses arbitrary bytes as a Marian model file. A file that parses then has each tensor read as
//! f32 values (and each intgemm8 tensor as an int8 matrix), its configuration read, and a model
//! built from it. Each step must end in a typed error or in values whose count matches the
//! tensor's shape.
#![no_main]

use std::path::Path;

use edgefold_compressor::marian::{ElementType, MarianConfig, MarianFile, MarianModel};
use libfuzzer_sys::fuzz_target;

/// Id of `</s>` given to the model: every vocabulary has at least one token, so 0 is inside it.
const EOS: u32 = 0;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = MarianFile::from_bytes(Path::new("fuzz.bin"), data.to_vec()) else {
        return;
    };
    for info in file.tensors() {
        // Non-finite values and types without a conversion are typed errors.
        if let Ok(values) = file.tensor_f32(&info.name, Some(&info.shape)) {
            assert_eq!(values.len(), info.elements(), "tensor `{}`", info.name);
        }
        if info.element_type == ElementType::Intgemm8 {
            if let Ok(matrix) = file.int8_matrix(&info.name, None) {
                assert_eq!(matrix.rows * matrix.cols, info.elements(), "tensor `{}`", info.name);
                assert_eq!(matrix.values.len(), info.elements(), "tensor `{}`", info.name);
            }
        }
    }
    if MarianConfig::from_file(&file).is_ok() {
        let _ = MarianModel::from_file(&file, EOS);
    }
});
