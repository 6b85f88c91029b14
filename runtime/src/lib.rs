//! Edgefold's runtime: opens a packed model file zero-copy and runs it in a caller-supplied arena,
//! without an allocator.
//!
//! ```no_run
//! # fn demo(file: &[u8]) -> Result<(), edgefold_runtime::Error> {
//! use edgefold_runtime::{Model, Session};
//! let model = Model::open(file)?;
//! let mut arena = vec![0u8; model.arena_bytes_unaligned()];
//! let mut session = Session::new(&model, &mut arena)?;
//! session.set_input::<i64>(0, &[1, 3], &[101, 7592, 102])?;
//! # Ok(()) }
//! ```
#![no_std]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod cast;
pub mod crc32;
#[cfg(feature = "decoder")]
pub mod decoder;
pub mod error;
pub mod format;
pub mod kernels;
#[cfg(feature = "mmap")]
pub mod mmap;
pub mod model;
pub mod ops;
pub mod selftest;
pub mod session;
pub mod shape;
#[cfg(feature = "translator")]
pub mod translator;
mod validate;

pub use error::{Error, Result};
pub use format::DType;
#[cfg(feature = "mmap")]
pub use mmap::MappedFile;
pub use model::{Model, OpenOptions};
pub use session::{Element, Session};
pub use shape::Shape;
