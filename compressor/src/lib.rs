//! Edgefold's offline compressor: imports trained models, measures their redundancy, compresses
//! them and packs them into the file format that `edgefold-runtime` opens.
#![warn(missing_docs)]

pub mod bleu;
pub mod blocks;
pub mod calibrate;
pub mod datasets;
pub mod embed;
pub mod exec;
mod file_bytes;
pub mod fusion;
pub mod gguf;
pub mod gptq;
pub mod ir;
pub mod llm;
pub mod marian;
pub mod metrics;
pub mod npy;
pub mod onnx;
pub mod passes;
pub mod pipeline;
pub mod plan;
pub mod planner;
pub mod plots;
pub mod quantize;
pub mod reference;
pub mod selftest;
pub mod spectrum;
pub mod tensor;
pub mod testdata;
pub mod text;
pub mod whiten;
pub mod writer;
