//! Helpers shared by the fuzz targets: an aligned copy of the fuzzer's bytes, checksum repair, a
//! read-only walk over an opened model, and session inputs drawn from fuzz bytes.
//!
//! The walk asserts what a successful `Model::open` promises: every table entry it validated reads
//! back without error. A failed assertion is a validation gap, and libFuzzer reports it as a crash.

use std::hint::black_box;

use edgefold_runtime::crc32::crc32;
use edgefold_runtime::format::{
    DType, TensorKind, BUFFER_ALIGN, HEADER_LEN, MAX_SYMBOLS, SECTION_ENTRY_LEN,
};
use edgefold_runtime::{Element, Model, Session};

/// Offset of the header's `section_count` field.
const SECTION_COUNT_AT: usize = 32;
/// Offset of the header's `header_crc32` field, which covers the bytes before it.
const HEADER_CRC_AT: usize = HEADER_LEN - 4;
/// Entries of a valid section table.
const SECTION_COUNT: usize = 7;

/// A copy of the fuzzer's bytes that starts at a [`BUFFER_ALIGN`]-aligned address, as
/// `Model::open` requires (libFuzzer's buffer has no alignment guarantee).
pub struct AlignedCopy {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedCopy {
    /// Copies `bytes` to an aligned address.
    pub fn new(bytes: &[u8]) -> Self {
        let mut storage = vec![0u8; bytes.len() + BUFFER_ALIGN];
        let start = storage.as_ptr().align_offset(BUFFER_ALIGN);
        storage[start..start + bytes.len()].copy_from_slice(bytes);
        AlignedCopy { storage, start, len: bytes.len() }
    }

    /// Returns the copied bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// Returns the copied bytes for in-place repairs.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// Rewrites the CRC-32 of every section that the section table places inside `bytes`, then the
/// header's CRC-32, so that a mutated file fails on its structure rather than on a checksum.
///
/// Entries that point outside `bytes` are left as they are, because opening rejects them anyway.
/// No checksum covers the section table itself, so rewriting its CRC fields changes no
/// checksummed byte of a valid layout.
pub fn repair_checksums(bytes: &mut [u8]) {
    if bytes.len() < HEADER_LEN {
        return;
    }
    let count = read_u32(bytes, SECTION_COUNT_AT).map_or(0, |c| c as usize).min(SECTION_COUNT);
    for i in 0..count {
        let entry = HEADER_LEN + i * SECTION_ENTRY_LEN;
        if entry + SECTION_ENTRY_LEN > bytes.len() {
            break;
        }
        let (Some(offset), Some(len)) = (read_u64(bytes, entry + 8), read_u64(bytes, entry + 16))
        else {
            break;
        };
        let range =
            usize::try_from(offset).ok().zip(usize::try_from(offset.saturating_add(len)).ok());
        let Some(section) = range.and_then(|(start, end)| bytes.get(start..end)) else {
            continue;
        };
        let crc = crc32(section);
        bytes[entry + 24..entry + 28].copy_from_slice(&crc.to_le_bytes());
    }
    let crc = crc32(&bytes[..HEADER_CRC_AT]);
    bytes[HEADER_CRC_AT..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
}

/// Reads every part of an opened model through its public accessors.
///
/// # Panics
/// Panics when an entry that opening validated fails to read back.
pub fn walk_model(model: &Model<'_>) {
    black_box((model.header(), model.arena_bytes(), model.arena_bytes_unaligned()));
    black_box((model.weights_len(), model.symbol_max()));
    for i in 0..model.symbol_count() {
        assert!(model.symbol(i).is_some(), "symbol {i} of {} is unreadable", model.symbol_count());
    }
    walk_tensors(model);
    walk_io(model);
    for (index, item) in model.ops().enumerate() {
        let (record, len) = item.unwrap_or_else(|e| panic!("op {index} is unreadable: {e}"));
        black_box((model.op_name(&record), record.op.name(), len));
        for i in 0..record.input_count() {
            black_box(record.input(i));
        }
        black_box(record.output(0));
    }
    for (key, value) in model.metadata_entries() {
        assert!(model.metadata(key).is_some(), "metadata key {key:?} is not found again");
        black_box(value);
    }
}

fn walk_tensors(model: &Model<'_>) {
    for i in 0..model.tensor_count() {
        let t = model.tensor(i).unwrap_or_else(|e| panic!("tensor {i} is unreadable: {e}"));
        black_box(model.tensor_name(i));
        if t.kind == TensorKind::Const {
            let data = model.const_bytes(&t);
            assert_eq!(data.len() as u64, t.byte_len, "constant {i} has fewer bytes than stated");
            black_box(data.iter().fold(0u8, |acc, &b| acc ^ b));
        }
    }
}

fn walk_io(model: &Model<'_>) {
    for i in 0..model.input_count() {
        let t = model.input_tensor(i).unwrap_or_else(|e| panic!("input {i} is unreadable: {e}"));
        assert!(model.tensor(t).is_ok(), "input {i} names tensor {t}, which is unreadable");
        let name = model.tensor_name(t);
        let found = model.input_index(name).expect("an input is found by its own name");
        assert_eq!(model.tensor_name(model.input_tensor(found).unwrap()), name);
    }
    for i in 0..model.output_count() {
        let t = model.output_tensor(i).unwrap_or_else(|e| panic!("output {i} is unreadable: {e}"));
        assert!(model.tensor(t).is_ok(), "output {i} names tensor {t}, which is unreadable");
        let name = model.tensor_name(t);
        let found = model.output_index(name).expect("an output is found by its own name");
        assert_eq!(model.tensor_name(model.output_tensor(found).unwrap()), name);
    }
}

/// Fuzz bytes consumed front to back as input shapes and values; zeros once they run out.
pub struct InputFeed<'a> {
    bytes: &'a [u8],
}

impl<'a> InputFeed<'a> {
    /// Creates a feed over `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        InputFeed { bytes }
    }

    /// Takes `N` token ids of one byte each, zero-padded when fewer remain.
    pub fn tokens<const N: usize>(&mut self) -> [u32; N] {
        self.take::<N>().map(u32::from)
    }

    /// Takes `N` bytes, zero-padded when fewer remain.
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.bytes.len());
        out[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        out
    }
}

/// Element types that an input can be filled with, read from the feed.
trait FromFeed: Element {
    fn from_feed(feed: &mut InputFeed<'_>) -> Self;
}

impl FromFeed for f32 {
    fn from_feed(feed: &mut InputFeed<'_>) -> Self {
        f32::from_le_bytes(feed.take())
    }
}

/// Integer inputs are mostly indices, so one signed byte each keeps them near the valid range,
/// negative values (counted from the end) included.
impl FromFeed for i64 {
    fn from_feed(feed: &mut InputFeed<'_>) -> Self {
        i8::from_le_bytes(feed.take()) as i64
    }
}

impl FromFeed for i32 {
    fn from_feed(feed: &mut InputFeed<'_>) -> Self {
        i8::from_le_bytes(feed.take()) as i32
    }
}

impl FromFeed for u8 {
    fn from_feed(feed: &mut InputFeed<'_>) -> Self {
        feed.take::<1>()[0]
    }
}

/// Sets every graph input whose element type a session accepts, with values from `feed`.
///
/// Each symbol takes one value in `1..=max`, shared by every input that uses it, so the inputs
/// agree with each other. Errors are ignored, and `run` then reports the input as not set.
pub fn set_inputs(session: &mut Session<'_, '_>, feed: &mut InputFeed<'_>) {
    let model = *session.model();
    let mut symbols = [1u64; MAX_SYMBOLS];
    for (s, value) in symbols.iter_mut().enumerate().take(model.symbol_count()) {
        let max = model.symbol_max()[s];
        *value = 1 + u16::from_le_bytes(feed.take()) as u64 % max;
    }
    for i in 0..model.input_count() {
        let Ok(t) = model.input_tensor(i).and_then(|t| model.tensor(t)) else {
            continue;
        };
        let shape: Option<Vec<usize>> = t
            .shape()
            .iter()
            .map(|d| d.eval(&symbols).and_then(|v| usize::try_from(v).ok()))
            .collect();
        let Some(shape) = shape else {
            continue;
        };
        let _ = match t.dtype {
            DType::F32 => set_input::<f32>(session, i, &shape, feed),
            DType::I64 => set_input::<i64>(session, i, &shape, feed),
            DType::I32 => set_input::<i32>(session, i, &shape, feed),
            DType::U8 => set_input::<u8>(session, i, &shape, feed),
            _ => continue,
        };
    }
}

fn set_input<T: FromFeed>(
    session: &mut Session<'_, '_>,
    index: usize,
    shape: &[usize],
    feed: &mut InputFeed<'_>,
) -> edgefold_runtime::Result<()> {
    // The input's region lies within the arena, so its element count is bounded by the arena.
    let count: usize = shape.iter().product();
    let values: Vec<T> = (0..count).map(|_| T::from_feed(feed)).collect();
    session.set_input(index, shape, &values)
}

/// Reads every output of a session after a successful run.
///
/// # Panics
/// Panics when an output's value count differs from its shape's element count.
pub fn read_outputs(session: &Session<'_, '_>) {
    for i in 0..session.model().output_count() {
        let Ok(dtype) = session.output_dtype(i) else {
            continue;
        };
        match dtype {
            DType::F32 => read_output::<f32>(session, i),
            DType::I64 => read_output::<i64>(session, i),
            DType::I32 => read_output::<i32>(session, i),
            DType::U8 => read_output::<u8>(session, i),
            _ => {}
        }
    }
}

fn read_output<T: Element>(session: &Session<'_, '_>, index: usize) {
    if let Ok((shape, values)) = session.output::<T>(index) {
        assert_eq!(values.len(), shape.numel(), "output {index} does not match its shape");
        black_box(values);
    }
}
