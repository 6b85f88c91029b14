//! Helpers shared by the integration tests: aligned file buffers and runs of packed graphs.

#![allow(dead_code)]

use edgefold_compressor::ir::Graph;
use edgefold_compressor::plan::plan_arena;
use edgefold_compressor::tensor::{HostTensor, TensorData};
use edgefold_compressor::writer::pack;
use edgefold_runtime::{DType, Model, Session};

/// A packed file in a 16-byte aligned buffer, as the runtime requires.
pub struct Aligned {
    words: Vec<u128>,
    len: usize,
}

impl Aligned {
    pub fn new(bytes: &[u8]) -> Self {
        let mut words = vec![0u128; bytes.len().div_ceil(16)];
        for (i, chunk) in bytes.chunks(16).enumerate() {
            let mut b = [0u8; 16];
            b[..chunk.len()].copy_from_slice(chunk);
            words[i] = u128::from_le_bytes(b);
        }
        Aligned { words, len: bytes.len() }
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: u128 has no padding, so its memory is `16 * words.len()` initialized bytes;
        // `len` never exceeds that.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }
}

/// Plans and packs a graph.
pub fn pack_graph(graph: &Graph) -> Aligned {
    let plan = plan_arena(graph);
    Aligned::new(&pack(graph, &plan, &[]).expect("graph packs"))
}

/// Runs a packed file on host tensors and returns every output.
pub fn run(file: &Aligned, inputs: &[HostTensor]) -> Vec<HostTensor> {
    let model = Model::open(file.bytes()).expect("file opens");
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).expect("arena fits");
    for (i, t) in inputs.iter().enumerate() {
        match &t.data {
            TensorData::F32(v) => session.set_input::<f32>(i, &t.shape, v),
            TensorData::I64(v) => session.set_input::<i64>(i, &t.shape, v),
            TensorData::I32(v) => session.set_input::<i32>(i, &t.shape, v),
            TensorData::Bool(_) => panic!("boolean inputs are not used in tests"),
        }
        .expect("input accepted");
    }
    session.run().expect("run succeeds");
    (0..model.output_count())
        .map(|i| match session.output_dtype(i).unwrap() {
            DType::F32 => {
                let (s, v) = session.output::<f32>(i).unwrap();
                HostTensor::f32(s.as_slice().to_vec(), v.to_vec())
            }
            DType::I64 => {
                let (s, v) = session.output::<i64>(i).unwrap();
                HostTensor::i64(s.as_slice().to_vec(), v.to_vec())
            }
            other => panic!("output type {other:?} is not used in tests"),
        })
        .collect()
}

/// Largest absolute difference between two f32 tensors of the same shape.
pub fn max_abs_diff(a: &HostTensor, b: &HostTensor) -> f32 {
    assert_eq!(a.shape, b.shape, "shapes differ");
    let (x, y) = (a.as_f32().expect("f32"), b.as_f32().expect("f32"));
    x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max)
}

/// Deterministic pseudo-random f32 values in [-1, 1).
pub fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}
