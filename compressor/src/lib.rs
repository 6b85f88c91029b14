//! Edgefold's offline compressor: imports trained models, measures their redundancy, compresses
//! them and packs them into the file format that `edgefold-runtime` opens.
//!
//! Without the default `compress` feature, only the readers of GGUF and Marian files are built:
//! [`gguf`], [`marian`] and [`llm::tokenizer`].
#![warn(missing_docs)]

#[cfg(feature = "compress")]
pub mod bleu;
#[cfg(feature = "compress")]
pub mod blocks;
#[cfg(feature = "compress")]
pub mod calibrate;
#[cfg(feature = "compress")]
pub mod datasets;
#[cfg(feature = "compress")]
pub mod embed;
#[cfg(feature = "compress")]
pub mod exec;
mod file_bytes;
#[cfg(feature = "compress")]
pub mod fusion;
pub mod gguf;
#[cfg(feature = "compress")]
pub mod gptq;
#[cfg(feature = "compress")]
pub mod ir;
#[cfg(feature = "compress")]
pub mod llm;
/// Language models stored in GGUF files. Without the `compress` feature, only their tokenizer.
#[cfg(not(feature = "compress"))]
pub mod llm {
    #[path = "tokenizer.rs"]
    pub mod tokenizer;
}
pub mod marian;
#[cfg(feature = "compress")]
pub mod metrics;
#[cfg(feature = "compress")]
pub mod npy;
#[cfg(feature = "compress")]
pub mod onnx;
#[cfg(feature = "compress")]
pub mod passes;
#[cfg(feature = "compress")]
pub mod pipeline;
#[cfg(feature = "compress")]
pub mod plan;
#[cfg(feature = "compress")]
pub mod planner;
#[cfg(feature = "compress")]
pub mod plots;
#[cfg(feature = "compress")]
pub mod quantize;
#[cfg(feature = "compress")]
pub mod reference;
#[cfg(feature = "compress")]
pub mod selftest;
#[cfg(feature = "compress")]
pub mod spectrum;
#[cfg(test)]
mod temp_file;
#[cfg(feature = "compress")]
pub mod tensor;
#[cfg(feature = "compress")]
pub mod testdata;
#[cfg(feature = "compress")]
pub mod text;
#[cfg(feature = "compress")]
pub mod whiten;
#[cfg(feature = "compress")]
pub mod writer;
