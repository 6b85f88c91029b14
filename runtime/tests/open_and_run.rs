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
    f.op("fc", Op::Linear, &[x, w, b], &[h]);
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
    assert_eq!(err, Error::InputShapeMismatch { input: 0, axis: 0, expected: 2, given: 3 });
    assert_eq!(session.run().err(), Some(Error::InputNotSet { input: 0 }));
}
