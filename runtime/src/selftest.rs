//! The self-test a packed file can carry: one sample input and the output the compressor's host
//! runtime computed for it, so a device can check that it runs the file as the host did.
//!
//! The record is the metadata entry [`SELF_TEST_KEY`]. Its value, all integers little-endian:
//!
//! | Offset | Size | Field |
//! |---:|---:|---|
//! | 0 | 4 | magic `EFST` |
//! | 4 | 2 | version, 1 |
//! | 6 | 2 | reserved, 0 |
//! | 8 | 4 | `f32` tolerance: the largest absolute difference allowed on a float output |
//! | 12 | 4 | `u32` input count, equal to the model's |
//! | 16 | 4 | `u32` output count, at most the model's |
//! | 20 | | the input tensors in graph input order, then the expected output tensors |
//!
//! Each tensor: `u8` element type (the format's code), `u8` rank, two zero bytes, `rank` `u32`
//! extents, `u32` byte length, the little-endian element bytes, and zero bytes up to the next
//! multiple of 4 from the start of the value.
//!
//! [`run`] decodes the record without trusting it: any malformed value is an
//! [`Error::InvalidSelfTest`], never a panic.

use crate::format::{DType, MAX_RANK};
use crate::{Error, Model, Result, Session};

/// Metadata key of the self-test record.
pub const SELF_TEST_KEY: &str = "edgefold.self_test";

/// First bytes of a self-test record's value.
pub const MAGIC: [u8; 4] = *b"EFST";

/// Version of the record layout this runtime reads and the compressor writes.
pub const VERSION: u16 = 1;

/// Result of a self-test run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outcome {
    /// Largest absolute difference between an output element and its expected value, over the
    /// float outputs. It is infinite when an output's shape, type or integer values differ, or
    /// when an output is NaN and the expected value is not.
    pub max_abs_error: f32,
    /// The largest difference the record allows.
    pub tolerance: f32,
    /// Outputs compared.
    pub outputs: u32,
    /// Output elements compared.
    pub elements: u64,
}

impl Outcome {
    /// Returns whether every compared output is within the tolerance.
    pub fn passed(&self) -> bool {
        self.max_abs_error <= self.tolerance
    }
}

/// One tensor of a record: element type, extents and element bytes.
#[derive(Clone, Copy, Debug)]
pub struct RecordTensor<'a> {
    /// Element type.
    pub dtype: DType,
    /// Extents, `rank` of them used.
    pub dims: [usize; MAX_RANK],
    /// Number of extents.
    pub rank: usize,
    /// Little-endian element bytes.
    pub bytes: &'a [u8],
}

impl RecordTensor<'_> {
    /// The extents.
    pub fn shape(&self) -> &[usize] {
        &self.dims[..self.rank]
    }
}

/// A decoded record, borrowing the metadata value.
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    /// The largest absolute difference allowed on a float output.
    pub tolerance: f32,
    /// Number of inputs.
    pub inputs: u32,
    /// Number of expected outputs.
    pub outputs: u32,
    /// Bytes of the tensors, from offset 20 of the value.
    body: &'a [u8],
}

/// Bounds-checked reader over a record's value.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn fail(&self, reason: &'static str) -> Error {
        Error::InvalidSelfTest { at: u32::try_from(self.pos).unwrap_or(u32::MAX), reason }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or_else(|| self.fail(what))?;
        let s = self.bytes.get(self.pos..end).ok_or_else(|| self.fail(what))?;
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn tensor(&mut self) -> Result<RecordTensor<'a>> {
        let head = self.take(4, "a tensor's header is cut off")?;
        let dtype = DType::from_u8(head[0]).ok_or_else(|| self.fail("unknown element type"))?;
        if dtype == DType::I4 {
            return Err(self.fail("int4 is not an input or output element type"));
        }
        let rank = head[1] as usize;
        if rank > MAX_RANK {
            return Err(self.fail("rank above the format's limit"));
        }
        let mut dims = [1usize; MAX_RANK];
        let mut count: u64 = 1;
        for d in dims.iter_mut().take(rank) {
            let extent = self.u32("a tensor's extents are cut off")?;
            *d = extent as usize;
            count = count.checked_mul(u64::from(extent)).ok_or_else(|| self.fail("too large"))?;
        }
        let len = self.u32("a tensor's byte length is cut off")?;
        if dtype.bytes_for(count) != Some(u64::from(len)) {
            return Err(self.fail("byte length differs from the extents times the element size"));
        }
        let bytes = self.take(len as usize, "a tensor's bytes are cut off")?;
        let pad = self.pos.wrapping_neg() % 4;
        self.take(pad, "a tensor's padding is cut off")?;
        Ok(RecordTensor { dtype, dims, rank, bytes })
    }
}

impl<'a> Record<'a> {
    /// Decodes the header of a record's value; the tensors are decoded as they are read.
    ///
    /// # Errors
    /// [`Error::InvalidSelfTest`] when the magic, version or counts are wrong.
    pub fn parse(value: &'a [u8]) -> Result<Self> {
        let mut r = Reader { bytes: value, pos: 0 };
        if r.take(4, "the record is shorter than its magic")? != MAGIC {
            return Err(Error::InvalidSelfTest { at: 0, reason: "the magic bytes are missing" });
        }
        let version = r.take(4, "the record's version is cut off")?;
        if u16::from_le_bytes([version[0], version[1]]) != VERSION {
            return Err(Error::InvalidSelfTest {
                at: 4,
                reason: "record version not supported by this runtime",
            });
        }
        let tolerance = f32::from_bits(r.u32("the tolerance is cut off")?);
        if tolerance.is_nan() || tolerance < 0.0 {
            return Err(Error::InvalidSelfTest { at: 8, reason: "the tolerance is not >= 0" });
        }
        let inputs = r.u32("the input count is cut off")?;
        let outputs = r.u32("the output count is cut off")?;
        Ok(Record { tolerance, inputs, outputs, body: &value[r.pos..] })
    }

    /// Decodes the input tensors, then the expected output tensors, in order.
    ///
    /// Each item is a tensor or the error that ended decoding; iteration stops after an error.
    pub fn tensors(&self) -> impl Iterator<Item = Result<RecordTensor<'a>>> + 'a {
        let mut r = Reader { bytes: self.body, pos: 0 };
        let total = u64::from(self.inputs) + u64::from(self.outputs);
        let mut done = 0u64;
        let mut failed = false;
        core::iter::from_fn(move || {
            if failed || done == total {
                return None;
            }
            done += 1;
            let t = r.tensor().map_err(|e| match e {
                // Offsets count from the start of the value, whose header is 20 bytes.
                Error::InvalidSelfTest { at, reason } => {
                    Error::InvalidSelfTest { at: at.saturating_add(20), reason }
                }
                other => other,
            });
            failed = t.is_err();
            Some(t)
        })
    }
}

/// Runs the self-test record of `model` in `arena` and compares each output with the record's.
///
/// The arena must hold what [`Session::new`] needs. A differing output is an [`Outcome`] that
/// does not pass, not an error.
///
/// # Errors
/// [`Error::NoSelfTest`] without a record, [`Error::InvalidSelfTest`] for a malformed one, and
/// any error of setting the inputs or running the model.
pub fn run(model: &Model<'_>, arena: &mut [u8]) -> Result<Outcome> {
    let value = model.metadata(SELF_TEST_KEY).ok_or(Error::NoSelfTest)?;
    let record = Record::parse(value)?;
    if record.inputs as usize != model.input_count() {
        return Err(Error::InvalidSelfTest {
            at: 12,
            reason: "input count differs from the model's",
        });
    }
    if record.outputs as usize > model.output_count() {
        return Err(Error::InvalidSelfTest { at: 16, reason: "more outputs than the model has" });
    }
    let mut session = Session::new(model, arena)?;
    let mut tensors = record.tensors();
    for index in 0..record.inputs as usize {
        let t =
            tensors.next().ok_or(Error::InvalidSelfTest { at: 20, reason: "input missing" })??;
        session.set_input_bytes(index, t.dtype, t.shape(), t.bytes)?;
    }
    session.run()?;

    let mut outcome =
        Outcome { max_abs_error: 0.0, tolerance: record.tolerance, outputs: 0, elements: 0 };
    for index in 0..record.outputs as usize {
        let expected =
            tensors.next().ok_or(Error::InvalidSelfTest { at: 20, reason: "output missing" })??;
        let (shape, dtype, bytes) = session.output_bytes(index)?;
        outcome.outputs += 1;
        if shape.as_slice() != expected.shape() || dtype != expected.dtype {
            outcome.max_abs_error = f32::INFINITY;
            continue;
        }
        outcome.elements += shape.numel() as u64;
        let error = difference(dtype, bytes, expected.bytes);
        outcome.max_abs_error = outcome.max_abs_error.max(error);
    }
    Ok(outcome)
}

/// Largest absolute difference between two tensors of `dtype` given as element bytes: per
/// element for f32 and f16, zero or infinite for the other types (which must match exactly).
/// A NaN where the other side is not NaN counts as infinite.
fn difference(dtype: DType, actual: &[u8], expected: &[u8]) -> f32 {
    if actual.len() != expected.len() {
        return f32::INFINITY;
    }
    let widen = |chunk: &[u8]| -> f32 {
        match dtype {
            DType::F16 => half::f16::from_le_bytes([chunk[0], chunk[1]]).to_f32(),
            _ => f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]),
        }
    };
    match dtype {
        DType::F32 | DType::F16 => {
            let mut worst = 0.0f32;
            for (a, e) in actual.chunks_exact(dtype.size()).zip(expected.chunks_exact(dtype.size()))
            {
                let (a, e) = (widen(a), widen(e));
                let d = if a.is_nan() && e.is_nan() {
                    0.0
                } else if a == e {
                    // Equal infinities differ by nothing.
                    0.0
                } else {
                    let d = (a - e).abs();
                    if d.is_nan() {
                        f32::INFINITY
                    } else {
                        d
                    }
                };
                worst = worst.max(d);
            }
            worst
        }
        _ if actual == expected => 0.0,
        _ => f32::INFINITY,
    }
}

/// Encodes a self-test record's value from the inputs, the expected outputs and the tolerance.
///
/// Writes into `out` and returns the bytes used, or `None` when `out` is too small or a tensor's
/// extents, rank or byte length do not fit the layout.
pub fn encode(
    tolerance: f32,
    inputs: &[RecordTensor<'_>],
    outputs: &[RecordTensor<'_>],
    out: &mut [u8],
) -> Option<usize> {
    let mut w = Writer { out, pos: 0 };
    w.put(&MAGIC)?;
    w.put(&VERSION.to_le_bytes())?;
    w.put(&[0, 0])?;
    w.put(&tolerance.to_bits().to_le_bytes())?;
    w.put(&u32::try_from(inputs.len()).ok()?.to_le_bytes())?;
    w.put(&u32::try_from(outputs.len()).ok()?.to_le_bytes())?;
    for t in inputs.iter().chain(outputs) {
        if t.rank > MAX_RANK {
            return None;
        }
        w.put(&[t.dtype as u8, t.rank as u8, 0, 0])?;
        for &d in t.shape() {
            w.put(&u32::try_from(d).ok()?.to_le_bytes())?;
        }
        w.put(&u32::try_from(t.bytes.len()).ok()?.to_le_bytes())?;
        w.put(t.bytes)?;
        let pad = w.pos.wrapping_neg() % 4;
        w.put(&[0; 3][..pad])?;
    }
    Some(w.pos)
}

/// Bytes [`encode`] needs for these tensors.
pub fn encoded_len(inputs: &[RecordTensor<'_>], outputs: &[RecordTensor<'_>]) -> usize {
    20 + inputs
        .iter()
        .chain(outputs)
        .map(|t| (4 + 4 * t.rank + 4 + t.bytes.len()).next_multiple_of(4))
        .sum::<usize>()
}

/// Bounds-checked writer for [`encode`].
struct Writer<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> Option<()> {
        let end = self.pos.checked_add(bytes.len())?;
        self.out.get_mut(self.pos..end)?.copy_from_slice(bytes);
        self.pos = end;
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor<'a>(dtype: DType, shape: &[usize], bytes: &'a [u8]) -> RecordTensor<'a> {
        let mut dims = [1; MAX_RANK];
        dims[..shape.len()].copy_from_slice(shape);
        RecordTensor { dtype, dims, rank: shape.len(), bytes }
    }

    /// Encodes a record with an f32 input of 3 elements, an i64 input of 1 and a bool output of
    /// 1 into `out`.
    fn sample(out: &mut [u8; 128]) -> usize {
        let floats: [u8; 12] = [0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64];
        let ids = 7i64.to_le_bytes();
        let inputs = [tensor(DType::F32, &[1, 3], &floats), tensor(DType::I64, &[1], &ids)];
        let outputs = [tensor(DType::Bool, &[1, 1], &[1])];
        let len = encode(0.5, &inputs, &outputs, out).expect("fits");
        assert_eq!(len, encoded_len(&inputs, &outputs));
        len
    }

    #[test]
    fn encoded_record_reads_back() {
        let mut buf = [0u8; 128];
        let len = sample(&mut buf);
        let record = Record::parse(&buf[..len]).expect("parses");
        assert_eq!((record.tolerance, record.inputs, record.outputs), (0.5, 2, 1));
        let tensors: std::vec::Vec<_> = record.tensors().map(|t| t.expect("decodes")).collect();
        assert_eq!(tensors.len(), 3);
        assert_eq!((tensors[0].dtype, tensors[0].shape()), (DType::F32, &[1usize, 3][..]));
        assert_eq!(f32::from_le_bytes(tensors[0].bytes[8..12].try_into().unwrap()), 3.0);
        assert_eq!(tensors[1].bytes, 7i64.to_le_bytes());
        assert_eq!((tensors[2].dtype, tensors[2].bytes), (DType::Bool, &[1u8][..]));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let mut buf = [0u8; 128];
        let len = sample(&mut buf);
        for cut in 0..len {
            let value = &buf[..cut];
            let failed = match Record::parse(value) {
                Err(e) => matches!(e, Error::InvalidSelfTest { .. }),
                Ok(r) => r.tensors().any(|t| matches!(t, Err(Error::InvalidSelfTest { .. }))),
            };
            assert!(failed, "a record cut at {cut} of {len} bytes decoded without error");
        }
    }

    #[test]
    fn every_byte_flip_decodes_or_fails_cleanly() {
        let mut buf = [0u8; 128];
        let len = sample(&mut buf);
        for at in 0..len {
            for bit in 0..8 {
                let mut value = buf;
                value[at] ^= 1 << bit;
                if let Ok(r) = Record::parse(&value[..len]) {
                    for t in r.tensors().flatten() {
                        assert!(t.rank <= MAX_RANK);
                        assert_eq!(
                            Some(t.bytes.len() as u64),
                            t.dtype.bytes_for(t.shape().iter().map(|&d| d as u64).product())
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn header_faults_name_their_offset() {
        let mut buf = [0u8; 128];
        let len = sample(&mut buf);
        let mut bad = buf;
        bad[0] = b'X';
        assert_eq!(
            Record::parse(&bad[..len]).unwrap_err(),
            Error::InvalidSelfTest { at: 0, reason: "the magic bytes are missing" }
        );
        let mut bad = buf;
        bad[4] = 2;
        assert!(matches!(Record::parse(&bad[..len]), Err(Error::InvalidSelfTest { at: 4, .. })));
        let mut bad = buf;
        bad[8..12].copy_from_slice(&(-1.0f32).to_le_bytes());
        assert!(matches!(Record::parse(&bad[..len]), Err(Error::InvalidSelfTest { at: 8, .. })));
        bad[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(Record::parse(&bad[..len]), Err(Error::InvalidSelfTest { at: 8, .. })));
    }

    #[test]
    fn encode_refuses_a_short_buffer() {
        let bytes = [0u8; 8];
        let inputs = [tensor(DType::F32, &[2], &bytes)];
        // 20 header bytes, then 4 for type and rank, 4 for the extent, 4 for the length, 8 data.
        let mut out = [0u8; 39];
        assert_eq!(encoded_len(&inputs, &[]), 40);
        assert_eq!(encode(0.0, &inputs, &[], &mut out), None);
    }

    #[test]
    fn difference_counts_nan_and_type_mismatches() {
        let f =
            |v: &[f32]| -> std::vec::Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let d = difference(DType::F32, &f(&[1.0, 2.0, -3.0]), &f(&[1.0, 2.5, -3.25]));
        assert_eq!(d, 0.5);
        assert_eq!(difference(DType::F32, &f(&[f32::NAN]), &f(&[f32::NAN])), 0.0);
        assert_eq!(difference(DType::F32, &f(&[f32::NAN]), &f(&[0.0])), f32::INFINITY);
        assert_eq!(difference(DType::F32, &f(&[f32::INFINITY]), &f(&[f32::INFINITY])), 0.0);
        assert_eq!(difference(DType::F32, &f(&[1.0]), &f(&[1.0, 2.0])), f32::INFINITY);
        assert_eq!(difference(DType::I64, &[1, 0], &[1, 0]), 0.0);
        assert_eq!(difference(DType::I64, &[1, 0], &[2, 0]), f32::INFINITY);
    }
}
