//! A hand-built file opened and run through the public API, checked against values worked out by
//! hand. On big-endian targets opening must fail with `Error::BigEndianHost`.

mod common;

use common::{c, open_or_expect_big_endian, Aligned, FileBuilder};
use edgefold_runtime::format::{DType, Quant};
use edgefold_runtime::ops::{Op, UnaryKind};
use edgefold_runtime::{Error, Session};

/// `h = x · wᵀ + b` with int8 weights scaled per row, then `y = relu(h)`, for `x: [batch, 4]`
/// with `batch` up to 2. Outputs: `y`, then `h`.
fn linear_relu_file() -> Vec<u8> {
    let mut f = FileBuilder::new();
    let batch = f.symbol("batch", 2);
    let x = f.activation("x", DType::F32, &[batch, c(4)]);
    let q: [i8; 12] = [1, -2, 3, -4, 0, 1, 0, 1, 2, 2, 2, 2];
    let w = f.constant("w", DType::I8, &[c(3), c(4)], &q.map(|v| v as u8));
    let scales = f.constant_f32("w.scales", &[c(3)], &[0.5, 0.25, 0.125]);
    f.quantize(w, Quant::PerRow, scales, 0);
    let b = f.constant_f32("b", &[c(3)], &[0.0, -1.0, 0.5]);
    let h = f.activation("h", DType::F32, &[batch, c(3)]);
    let y = f.activation("y", DType::F32, &[batch, c(3)]);
    f.op("fc", Op::Linear { activation: None }, &[x, w, b], &[h]);
    let relu = Op::Unary { kind: UnaryKind::Relu, alpha: 0.0, beta: 0.0 };
    f.op("relu", relu, &[h], &[y]);
    f.io(&[x], &[y, h]);
    f.metadata("producer", b"runtime tests");
    f.build()
}

#[test]
fn linear_relu_known_answers() {
    let file = Aligned::new(&linear_relu_file());
    let Some(model) = open_or_expect_big_endian(file.bytes()) else {
        return;
    };
    assert_eq!(model.input_count(), 1);
    assert_eq!(model.output_count(), 2);
    assert_eq!(model.symbol(0), Some(("batch", 2)));
    assert_eq!(model.metadata("producer"), Some(&b"runtime tests"[..]));
    assert_eq!(model.output_index("h"), Some(1));

    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).expect("arena is large enough");
    assert_eq!(session.output::<f32>(0).err(), Some(Error::NotRun));

    session.set_input::<f32>(0, &[2, 4], &[1.0, 2.0, 3.0, 4.0, -1.0, 0.0, 1.0, 0.5]).unwrap();
    session.run().expect("run succeeds");
    let (shape, y) = session.output::<f32>(0).unwrap();
    assert_eq!(shape.as_slice(), &[2, 3]);
    assert_eq!(y, &[0.0, 0.5, 3.0, 0.0, 0.0, 0.625]);
    let (_, h) = session.output::<f32>(1).unwrap();
    assert_eq!(h, &[-5.0, 0.5, 3.0, 0.0, -0.875, 0.625]);

    // A smaller batch binds the symbol to 1 and reuses the same arena.
    session.set_input::<f32>(0, &[1, 4], &[-1.0, 0.0, 1.0, 0.5]).unwrap();
    session.run().expect("run succeeds");
    assert_eq!(session.symbols()[0], 1);
    let (shape, y) = session.output::<f32>(0).unwrap();
    assert_eq!(shape.as_slice(), &[1, 3]);
    assert_eq!(y, &[0.0, 0.0, 0.625]);
}

#[test]
fn oversized_batch_is_rejected() {
    let file = Aligned::new(&linear_relu_file());
    let Some(model) = open_or_expect_big_endian(file.bytes()) else {
        return;
    };
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).unwrap();
    let err = session.set_input::<f32>(0, &[3, 4], &[0.0; 12]).unwrap_err();
    let expected =
        Error::InputShapeMismatch { input: 0, axis: 0, expected: 2, given: 3, variable: true };
    assert_eq!(err, expected);
    assert_eq!(session.run().err(), Some(Error::InputNotSet { input: 0 }));
}

/// `y = x · wᵀ` with int4 weights in one group of 4 per row, scales 0.5 and 0.25, signed nibbles.
fn int4_linear_file() -> Vec<u8> {
    let mut f = FileBuilder::new();
    let x = f.activation("x", DType::F32, &[c(1), c(4)]);
    // Row 0 contains 1, -2, 3, -8 and row 1 contains 7, 0, -1, 2, as two's-complement nibbles with the
    // low nibble first.
    let packed = [0xE1, 0x83, 0x07, 0x2F];
    let w = f.constant("w", DType::I4, &[c(2), c(4)], &packed);
    let scales = [half::f16::from_f32(0.5), half::f16::from_f32(0.25)];
    let scale_bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
    let s = f.constant("w.scales", DType::F16, &[c(2), c(1)], &scale_bytes);
    f.quantize(w, Quant::Grouped, s, 4);
    let y = f.activation("y", DType::F32, &[c(1), c(2)]);
    f.op("fc", Op::Linear { activation: None }, &[x, w], &[y]);
    f.io(&[x], &[y]);
    f.build()
}

/// A file with int4 weights runs when the runtime is built with `weights-int4`, and otherwise is
/// refused when it is opened, naming the tensor and the feature.
#[test]
fn int4_weights_follow_their_feature() {
    let file = Aligned::new(&int4_linear_file());
    if cfg!(target_endian = "big") {
        assert_eq!(edgefold_runtime::Model::open(file.bytes()).err(), Some(Error::BigEndianHost));
        return;
    }
    if !cfg!(feature = "weights-int4") {
        let err = edgefold_runtime::Model::open(file.bytes()).err();
        assert_eq!(err, Some(Error::QuantNotBuilt { tensor: 1, feature: "weights-int4" }));
        return;
    }
    let model = open_or_expect_big_endian(file.bytes()).expect("little-endian host");
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).expect("arena is large enough");
    session.set_input(0, &[1, 4], &[1.0f32, 2.0, 3.0, 4.0]).unwrap();
    session.run().unwrap();
    let (_, y) = session.output::<f32>(0).unwrap();
    // Row 0: (1 - 4 + 9 - 32) * 0.5; row 1: (7 + 0 - 3 + 8) * 0.25.
    assert_eq!(y, [-13.0, 3.0]);
}
