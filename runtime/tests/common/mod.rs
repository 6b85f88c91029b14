//! A writer for small packed files, built from the runtime's own format types, so the runtime's
//! tests need no compressor.

#![allow(dead_code)]

use edgefold_runtime::crc32::crc32;
use edgefold_runtime::format::{
    DType, Dim, Header, Quant, SectionEntry, SectionKind, StrRef, SymbolEntry, TensorEntry,
    TensorKind, HEADER_LEN, MAX_RANK, NO_TENSOR, SECTION_ALIGN, SECTION_ENTRY_LEN, VERSION_MAJOR,
    VERSION_MINOR,
};
use edgefold_runtime::ops::{encode_op, Op};
use edgefold_runtime::{Error, Model};

/// A file's bytes at a 64-byte aligned address, which satisfies the runtime's 16-byte requirement
/// on every target (`u128` is only 8-byte aligned on some).
pub struct Aligned {
    blocks: Vec<Block>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([u8; 64]);

impl Aligned {
    /// Copies `bytes` to an aligned buffer.
    pub fn new(bytes: &[u8]) -> Self {
        let mut blocks = vec![Block([0; 64]); bytes.len().div_ceil(64)];
        for (block, chunk) in blocks.iter_mut().zip(bytes.chunks(64)) {
            block.0[..chunk.len()].copy_from_slice(chunk);
        }
        Aligned { blocks, len: bytes.len() }
    }

    /// Returns the copied bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `Block` is `repr(C)` around a byte array, so the vector is `64 * blocks.len()`
        // initialized bytes without padding, and `len` never exceeds that.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast::<u8>(), self.len) }
    }
}

/// Opens `bytes` as a model on a little-endian target. On a big-endian target, asserts that
/// opening fails with [`Error::BigEndianHost`] and returns `None`.
pub fn open_or_expect_big_endian(bytes: &[u8]) -> Option<Model<'_>> {
    let result = Model::open(bytes);
    if cfg!(target_endian = "big") {
        assert_eq!(result.err(), Some(Error::BigEndianHost), "big-endian targets must refuse");
        return None;
    }
    Some(result.unwrap_or_else(|e| panic!("file opens: {e}")))
}

/// Returns a constant extent.
pub fn c(value: u32) -> Dim {
    Dim::constant(value)
}

/// Builder of a packed file: tensors, ops, graph inputs and outputs, symbols and metadata.
///
/// Activations are placed one after the other in the arena, each at a multiple of 64; constants
/// likewise in the weights section.
#[derive(Default)]
pub struct FileBuilder {
    strings: Vec<u8>,
    symbols: Vec<SymbolEntry>,
    symbol_max: Vec<u64>,
    tensors: Vec<TensorEntry>,
    ops: Vec<u8>,
    op_count: u32,
    inputs: Vec<u32>,
    outputs: Vec<u32>,
    metadata: Vec<u8>,
    weights: Vec<u8>,
    arena_bytes: u64,
}

fn pad_to(bytes: &mut Vec<u8>, align: usize) {
    bytes.resize(bytes.len().next_multiple_of(align), 0);
}

impl FileBuilder {
    /// Creates a builder of a file without tensors or ops.
    pub fn new() -> Self {
        FileBuilder::default()
    }

    fn string(&mut self, s: &str) -> StrRef {
        let offset = self.strings.len() as u32;
        self.strings.extend_from_slice(s.as_bytes());
        StrRef { offset, len: s.len() as u32 }
    }

    /// Declares a symbolic dimension and returns it as an extent.
    pub fn symbol(&mut self, name: &str, max_value: u32) -> Dim {
        let index = self.symbols.len();
        let name = self.string(name);
        self.symbols.push(SymbolEntry { name, max_value });
        self.symbol_max.push(max_value as u64);
        Dim::symbol(index)
    }

    fn entry(&mut self, name: &str, dtype: DType, kind: TensorKind, shape: &[Dim]) -> TensorEntry {
        assert!(shape.len() <= MAX_RANK, "rank {} exceeds {MAX_RANK}", shape.len());
        let mut dims = [Dim::constant(1); MAX_RANK];
        dims[..shape.len()].copy_from_slice(shape);
        let mut max = [1u64; 4];
        max[..self.symbol_max.len()].copy_from_slice(&self.symbol_max);
        let count: u64 = shape.iter().map(|d| d.eval(&max).expect("extent fits u64")).product();
        let byte_len = match dtype {
            DType::I4 => {
                let [rows, cols] = shape else { panic!("int4 tensors have rank 2") };
                rows.eval(&max).unwrap() * cols.eval(&max).unwrap().div_ceil(2)
            }
            _ => dtype.bytes_for(count).expect("size fits u64"),
        };
        TensorEntry {
            name: self.string(name),
            dtype,
            kind,
            rank: shape.len() as u8,
            quant: Quant::None,
            scale_tensor: NO_TENSOR,
            group_size: 0,
            offset: 0,
            byte_len,
            dims,
        }
    }

    /// Adds an activation at the next free 64-byte aligned arena offset.
    pub fn activation(&mut self, name: &str, dtype: DType, shape: &[Dim]) -> u32 {
        let mut t = self.entry(name, dtype, TensorKind::Activation, shape);
        t.offset = self.arena_bytes;
        self.arena_bytes = (t.offset + t.byte_len).next_multiple_of(SECTION_ALIGN as u64);
        self.push(t)
    }

    /// Adds a constant whose bytes are `data`.
    pub fn constant(&mut self, name: &str, dtype: DType, shape: &[Dim], data: &[u8]) -> u32 {
        let mut t = self.entry(name, dtype, TensorKind::Const, shape);
        assert_eq!(t.byte_len, data.len() as u64, "{name}: data length differs from its shape");
        pad_to(&mut self.weights, SECTION_ALIGN);
        t.offset = self.weights.len() as u64;
        self.weights.extend_from_slice(data);
        self.push(t)
    }

    /// Adds an f32 constant.
    pub fn constant_f32(&mut self, name: &str, shape: &[Dim], values: &[f32]) -> u32 {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.constant(name, DType::F32, shape, &data)
    }

    /// Marks constant `t` as quantized with scales in tensor `scales`.
    pub fn quantize(&mut self, t: u32, quant: Quant, scales: u32, group_size: u32) {
        let entry = &mut self.tensors[t as usize];
        entry.quant = quant;
        entry.scale_tensor = scales;
        entry.group_size = group_size;
    }

    fn push(&mut self, t: TensorEntry) -> u32 {
        self.tensors.push(t);
        self.tensors.len() as u32 - 1
    }

    /// Appends an op record.
    pub fn op(&mut self, name: &str, op: Op, inputs: &[u32], outputs: &[u32]) {
        let name = self.string(name);
        encode_op(&mut self.ops, &op, name, 0, inputs, outputs);
        self.op_count += 1;
    }

    /// Declares the graph inputs and outputs.
    pub fn io(&mut self, inputs: &[u32], outputs: &[u32]) {
        self.inputs = inputs.to_vec();
        self.outputs = outputs.to_vec();
    }

    /// Appends a metadata record.
    pub fn metadata(&mut self, key: &str, value: &[u8]) {
        self.metadata.extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.metadata.extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.metadata.extend_from_slice(key.as_bytes());
        self.metadata.extend_from_slice(value);
        pad_to(&mut self.metadata, 4);
    }

    /// Returns the arena bytes that the file states.
    pub fn arena_bytes(&self) -> u64 {
        self.arena_bytes
    }

    /// Lays out the sections in the order of [`SectionKind::ALL`] and writes the checksums.
    pub fn build(&self) -> Vec<u8> {
        let symbols: Vec<u8> = self.symbols.iter().flat_map(|s| s.to_bytes()).collect();
        let tensors: Vec<u8> = self.tensors.iter().flat_map(|t| t.to_bytes()).collect();
        let io: Vec<u8> =
            self.inputs.iter().chain(&self.outputs).flat_map(|t| t.to_le_bytes()).collect();
        let sections: [&[u8]; 7] =
            [&self.strings, &symbols, &tensors, &self.ops, &io, &self.metadata, &self.weights];

        let mut file = vec![0u8; HEADER_LEN + SectionKind::ALL.len() * SECTION_ENTRY_LEN];
        for (i, (kind, data)) in SectionKind::ALL.iter().zip(sections).enumerate() {
            pad_to(&mut file, SECTION_ALIGN);
            let entry = SectionEntry {
                kind: *kind,
                offset: file.len() as u64,
                len: data.len() as u64,
                crc32: crc32(data),
            };
            let at = HEADER_LEN + i * SECTION_ENTRY_LEN;
            file[at..at + SECTION_ENTRY_LEN].copy_from_slice(&entry.to_bytes());
            file.extend_from_slice(data);
        }

        let header = Header {
            version_major: VERSION_MAJOR,
            version_minor: VERSION_MINOR,
            file_len: file.len() as u64,
            arena_bytes: self.arena_bytes,
            section_count: SectionKind::ALL.len() as u32,
            tensor_count: self.tensors.len() as u32,
            op_count: self.op_count,
            input_count: self.inputs.len() as u32,
            output_count: self.outputs.len() as u32,
            symbol_count: self.symbols.len() as u32,
            flags: 0,
        };
        file[..HEADER_LEN].copy_from_slice(&header.to_bytes());
        file
    }
}
