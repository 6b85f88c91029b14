//! Opening a packed file: every offset, length, alignment, type, shape and index is checked
//! here once, so the executor can run without checking again.

use crate::cast::cast;
use crate::error::{Error, Result, Section};
use crate::format::{
    DType, Dim, Header, Quant, SectionEntry, SectionKind, StrRef, SymbolEntry, TensorEntry,
    TensorKind, BUFFER_ALIGN, HEADER_LEN, MAX_GRAPH_INPUTS, MAX_SYMBOLS, NO_TENSOR, SECTION_ALIGN,
    SECTION_ENTRY_LEN, SYMBOL_ENTRY_LEN, TENSOR_ENTRY_LEN,
};
use crate::kernels::generic::{F16Rows, F32Rows, I4Rows, I8Rows};
use crate::kernels::Weights;
use crate::ops::OpRecord;
use crate::shape::Shape;

/// Choices made when opening a file.
#[derive(Clone, Copy, Debug)]
pub struct OpenOptions {
    /// Verify the checksum of the weights section. The structure is always fully checked; this only
    /// guards the weight values against corruption, and costs one pass over them.
    pub verify_weights: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { verify_weights: true }
    }
}

/// A validated, read-only view of a packed file.
#[derive(Clone, Copy, Debug)]
pub struct Model<'a> {
    header: Header,
    strings: &'a [u8],
    symbols: &'a [u8],
    tensors: &'a [u8],
    ops: &'a [u8],
    io: &'a [u8],
    metadata: &'a [u8],
    weights: &'a [u8],
    symbol_max: [u64; MAX_SYMBOLS],
}

impl<'a> Model<'a> {
    /// Opens a file held in memory, verifying all checksums.
    ///
    /// # Errors
    /// Returns the first violation of the format found.
    pub fn open(bytes: &'a [u8]) -> Result<Model<'a>> {
        Model::open_with(bytes, OpenOptions::default())
    }

    /// Opens a file held in memory with explicit options.
    ///
    /// # Errors
    /// Returns the first violation of the format found.
    pub fn open_with(bytes: &'a [u8], options: OpenOptions) -> Result<Model<'a>> {
        if cfg!(target_endian = "big") {
            return Err(Error::BigEndianHost);
        }
        if !(bytes.as_ptr() as usize).is_multiple_of(BUFFER_ALIGN) {
            return Err(Error::MisalignedBuffer { required: BUFFER_ALIGN });
        }
        let header = Header::parse(bytes)?;
        // No slice, and so no arena, exceeds isize::MAX bytes, and `arena_bytes_unaligned` adds
        // up to SECTION_ALIGN - 1 bytes of padding to the stated size.
        if header.arena_bytes > isize::MAX as u64 - (SECTION_ALIGN as u64 - 1) {
            return Err(Error::InvalidSection {
                section: Section::Header,
                reason: "the arena size exceeds what this processor can address",
            });
        }
        let file_len = usize::try_from(header.file_len).unwrap_or(usize::MAX);
        let bytes = bytes.get(..file_len).ok_or(Error::Truncated {
            what: "file",
            needed: header.file_len,
            available: bytes.len() as u64,
        })?;
        let mut sections: [Option<&'a [u8]>; 7] = [None; 7];
        locate_sections(bytes, &header, options, &mut sections)?;
        let get = |kind: SectionKind| sections[kind as usize - 1].unwrap_or(&[]);
        let mut model = Model {
            header,
            strings: get(SectionKind::Strings),
            symbols: get(SectionKind::Symbols),
            tensors: get(SectionKind::Tensors),
            ops: get(SectionKind::Ops),
            io: get(SectionKind::Io),
            metadata: get(SectionKind::Metadata),
            weights: get(SectionKind::Weights),
            symbol_max: [1; MAX_SYMBOLS],
        };
        model.validate_symbols()?;
        model.validate_tensors()?;
        model.validate_io()?;
        model.validate_ops()?;
        model.validate_metadata()?;
        Ok(model)
    }

    /// The file header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Arena bytes a session needs when the arena starts at a 64-byte aligned address.
    pub fn arena_bytes(&self) -> usize {
        self.header.arena_bytes as usize
    }

    /// Arena bytes that suffice whatever the alignment of the arena's start.
    pub fn arena_bytes_unaligned(&self) -> usize {
        self.arena_bytes() + SECTION_ALIGN - 1
    }

    /// Number of tensors.
    pub fn tensor_count(&self) -> u32 {
        self.header.tensor_count
    }

    /// Number of ops.
    pub fn op_count(&self) -> u32 {
        self.header.op_count
    }

    /// Number of graph inputs.
    pub fn input_count(&self) -> usize {
        self.header.input_count as usize
    }

    /// Number of graph outputs.
    pub fn output_count(&self) -> usize {
        self.header.output_count as usize
    }

    /// Number of symbolic dimensions.
    pub fn symbol_count(&self) -> usize {
        self.header.symbol_count as usize
    }

    /// Name and maximum value of symbol `i`.
    pub fn symbol(&self, i: usize) -> Option<(&'a str, u64)> {
        let entry = self.symbol_entry(i).ok()?;
        Some((self.string(entry.name).ok()?, entry.max_value as u64))
    }

    /// Maximum values of all symbols (1 past `symbol_count`).
    pub fn symbol_max(&self) -> &[u64; MAX_SYMBOLS] {
        &self.symbol_max
    }

    /// Tensor table entry `i`.
    ///
    /// # Errors
    /// [`Error::InvalidTensor`] when `i` is out of range.
    pub fn tensor(&self, i: u32) -> Result<TensorEntry> {
        let start = (i as usize).checked_mul(TENSOR_ENTRY_LEN);
        let bytes = start
            .and_then(|s| self.tensors.get(s..s.checked_add(TENSOR_ENTRY_LEN)?))
            .ok_or(Error::InvalidTensor { tensor: i, reason: "tensor index out of range" })?;
        TensorEntry::parse(bytes, i)
    }

    /// Name of tensor `i`, or "" when it has none or `i` is out of range.
    pub fn tensor_name(&self, i: u32) -> &'a str {
        self.tensor(i).ok().and_then(|t| self.string(t.name).ok()).unwrap_or("")
    }

    /// Tensor index of graph input `i`.
    pub fn input_tensor(&self, i: usize) -> Result<u32> {
        self.io_entry(i, self.input_count())
    }

    /// Tensor index of graph output `i`.
    pub fn output_tensor(&self, i: usize) -> Result<u32> {
        self.io_entry(
            self.input_count().saturating_add(i),
            self.input_count() + self.output_count(),
        )
    }

    /// Index of the graph input with this tensor name.
    pub fn input_index(&self, name: &str) -> Option<usize> {
        (0..self.input_count())
            .find(|&i| self.input_tensor(i).map(|t| self.tensor_name(t) == name).unwrap_or(false))
    }

    /// Index of the graph output with this tensor name.
    pub fn output_index(&self, name: &str) -> Option<usize> {
        (0..self.output_count())
            .find(|&i| self.output_tensor(i).map(|t| self.tensor_name(t) == name).unwrap_or(false))
    }

    /// The op records, in execution order.
    pub fn ops(&self) -> OpIter<'a> {
        OpIter { bytes: self.ops, index: 0, count: self.header.op_count }
    }

    /// Name of an op, from its record.
    pub fn op_name(&self, record: &OpRecord<'_>) -> &'a str {
        self.string(record.name).unwrap_or("")
    }

    /// The value stored under `key` in the metadata, if any.
    pub fn metadata(&self, key: &str) -> Option<&'a [u8]> {
        self.metadata_entries().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// All metadata entries, in file order.
    pub fn metadata_entries(&self) -> MetadataIter<'a> {
        MetadataIter { bytes: self.metadata, pos: 0 }
    }

    /// Bytes of a constant tensor in the weights section.
    pub fn const_bytes(&self, t: &TensorEntry) -> &'a [u8] {
        let start = t.offset as usize;
        self.weights.get(start..start.saturating_add(t.byte_len as usize)).unwrap_or(&[])
    }

    /// Returns a constant rank-2 tensor `[n, k]` as the weights of [`crate::kernels::linear`]: f32, f16,
    /// int8 per row or int4 groups. `None` for other tensors or when the bytes do not fit.
    pub fn linear_weights(&self, t: &TensorEntry) -> Option<Weights<'a>> {
        let [_, cols] = rank2(t)?;
        if t.kind != TensorKind::Const {
            return None;
        }
        let k = cols.factor as usize;
        Some(match (t.dtype, t.quant) {
            (DType::F32, Quant::None) => Weights::F32(F32Rows { w: cast(self.const_bytes(t))?, k }),
            (DType::F16, Quant::None) => Weights::F16(F16Rows { w: cast(self.const_bytes(t))?, k }),
            (DType::I8, Quant::PerRow) => {
                let scales = cast(self.const_bytes(&self.tensor(t.scale_tensor).ok()?))?;
                Weights::I8(I8Rows { q: cast(self.const_bytes(t))?, scales, k })
            }
            #[cfg(feature = "weights-int4")]
            (DType::I4, Quant::Grouped | Quant::GroupedMin) => Weights::I4(self.int4_rows(t)?),
            _ => return None,
        })
    }

    /// Returns the rows of a constant int4 tensor stored with [`Quant::Grouped`] or
    /// [`Quant::GroupedMin`], with its scales and minimums. `None` for other tensors or when the
    /// bytes do not fit.
    pub fn int4_rows(&self, t: &TensorEntry) -> Option<I4Rows<'a>> {
        let [rows, cols] = rank2(t)?;
        if t.dtype != DType::I4 || t.kind != TensorKind::Const || t.group_size == 0 {
            return None;
        }
        let (rows, k, group) = (rows.factor as usize, cols.factor as usize, t.group_size as usize);
        let table = cast::<u16>(self.const_bytes(&self.tensor(t.scale_tensor).ok()?))?;
        let count = rows.checked_mul(k / group)?;
        let (scales, mins) = match t.quant {
            Quant::Grouped => (table.get(..count)?, None),
            Quant::GroupedMin => (table.get(..count)?, Some(table.get(count..count * 2)?)),
            _ => return None,
        };
        Some(I4Rows { packed: self.const_bytes(t), scales, mins, k, group })
    }

    /// Total bytes of constant data.
    pub fn weights_len(&self) -> usize {
        self.weights.len()
    }

    /// A string from the strings section.
    pub fn string(&self, r: StrRef) -> Result<&'a str> {
        let start = r.offset as usize;
        let end = start.checked_add(r.len as usize);
        let bytes = end
            .and_then(|end| self.strings.get(start..end))
            .ok_or(Error::InvalidString { offset: r.offset })?;
        core::str::from_utf8(bytes).map_err(|_| Error::InvalidString { offset: r.offset })
    }

    fn symbol_entry(&self, i: usize) -> Result<SymbolEntry> {
        let start = i.saturating_mul(SYMBOL_ENTRY_LEN);
        let bytes = self.symbols.get(start..start.saturating_add(SYMBOL_ENTRY_LEN)).ok_or(
            Error::InvalidSection {
                section: Section::Symbols,
                reason: "symbol index out of range",
            },
        )?;
        SymbolEntry::parse(bytes)
    }

    fn io_entry(&self, slot: usize, limit: usize) -> Result<u32> {
        if slot >= limit {
            return Err(Error::UnknownIo { index: slot as u32 });
        }
        match self.io.get(4 * slot..4 * slot + 4) {
            Some(&[a, b, c, d]) => Ok(u32::from_le_bytes([a, b, c, d])),
            _ => Err(Error::UnknownIo { index: slot as u32 }),
        }
    }

    fn validate_symbols(&mut self) -> Result<()> {
        let count = self.symbol_count();
        if count > MAX_SYMBOLS || self.symbols.len() != count * SYMBOL_ENTRY_LEN {
            return Err(Error::InvalidSection {
                section: Section::Symbols,
                reason: "symbol count above 4 or section length does not match it",
            });
        }
        for i in 0..count {
            let entry = self.symbol_entry(i)?;
            self.string(entry.name)?;
            if entry.max_value == 0 {
                return Err(Error::InvalidSection {
                    section: Section::Symbols,
                    reason: "a symbol's maximum value is 0",
                });
            }
            self.symbol_max[i] = entry.max_value as u64;
        }
        Ok(())
    }

    fn validate_tensors(&self) -> Result<()> {
        let count = self.tensor_count();
        if self.tensors.len() as u64 != count as u64 * TENSOR_ENTRY_LEN as u64 {
            return Err(Error::InvalidSection {
                section: Section::Tensors,
                reason: "section length does not match the tensor count",
            });
        }
        for i in 0..count {
            let t = self.tensor(i)?;
            self.validate_tensor(i, &t)?;
        }
        Ok(())
    }

    fn validate_tensor(&self, i: u32, t: &TensorEntry) -> Result<()> {
        let invalid = |reason| Error::InvalidTensor { tensor: i, reason };
        self.string(t.name)?;
        for d in t.shape() {
            if d.factor == 0 {
                return Err(invalid("an axis has extent 0"));
            }
            let uses_unknown_symbol =
                d.exponents.iter().enumerate().any(|(s, &e)| e != 0 && s >= self.symbol_count());
            if uses_unknown_symbol {
                return Err(invalid("an axis uses an undeclared symbol"));
            }
        }
        let max_bytes = self.max_bytes(t).ok_or(invalid("size overflows"))?;
        if t.byte_len != max_bytes {
            return Err(invalid("byte length does not match shape and element type"));
        }
        if !t.offset.is_multiple_of(SECTION_ALIGN as u64) {
            return Err(invalid("offset is not a multiple of 64"));
        }
        let end = t.offset.checked_add(t.byte_len).ok_or(invalid("offset overflows"))?;
        match t.kind {
            TensorKind::Const => {
                if t.shape().iter().any(|d| d.as_constant().is_none()) {
                    return Err(invalid("a constant has a symbolic axis"));
                }
                if end > self.weights.len() as u64 {
                    return Err(invalid("constant data extends past the weights section"));
                }
            }
            TensorKind::Activation => {
                if end > self.header.arena_bytes {
                    return Err(invalid("activation extends past the arena"));
                }
                if t.quant != Quant::None || t.dtype == DType::I4 {
                    return Err(invalid("activations cannot be quantized"));
                }
            }
        }
        self.validate_quant(i, t)
    }

    /// Byte length of a tensor at the symbols' maximum values.
    fn max_bytes(&self, t: &TensorEntry) -> Option<u64> {
        let shape = t.shape();
        if t.dtype == DType::I4 {
            let (rows, cols) = match shape {
                [r, c] => (r.eval(&self.symbol_max)?, c.eval(&self.symbol_max)?),
                _ => return None,
            };
            return rows.checked_mul(cols.checked_add(1)? / 2);
        }
        let mut count = 1u64;
        for d in shape {
            count = count.checked_mul(d.eval(&self.symbol_max)?)?;
        }
        t.dtype.bytes_for(count)
    }

    fn validate_quant(&self, i: u32, t: &TensorEntry) -> Result<()> {
        let invalid = |reason| Error::InvalidTensor { tensor: i, reason };
        match t.quant {
            Quant::None => {
                if t.dtype == DType::I4 {
                    return Err(invalid("int4 data needs grouped scales"));
                }
            }
            Quant::PerRow => {
                let [rows, _] = rank2(t).ok_or(invalid("per-row quantization needs rank 2"))?;
                if t.dtype != DType::I8 || t.kind != TensorKind::Const {
                    return Err(invalid("per-row quantization needs a constant int8 tensor"));
                }
                let s = self.tensor(t.scale_tensor).map_err(|_| invalid("scale tensor missing"))?;
                if s.kind != TensorKind::Const || s.dtype != DType::F32 || s.shape() != [rows] {
                    return Err(invalid("per-row scales must be a constant f32 [rows] tensor"));
                }
            }
            Quant::Grouped | Quant::GroupedMin => {
                if !cfg!(feature = "weights-int4") {
                    return Err(Error::QuantNotBuilt { tensor: i, feature: "weights-int4" });
                }
                let [rows, cols] = rank2(t).ok_or(invalid("grouped quantization needs rank 2"))?;
                if t.dtype != DType::I4 || t.kind != TensorKind::Const {
                    return Err(invalid("grouped quantization needs a constant int4 tensor"));
                }
                let group = t.group_size;
                if group == 0 || !group.is_multiple_of(2) || !cols.factor.is_multiple_of(group) {
                    return Err(invalid("group size must be even and divide the row length"));
                }
                let s = self.tensor(t.scale_tensor).map_err(|_| invalid("scale tensor missing"))?;
                let groups = Dim::constant(cols.factor / group);
                let shape_ok = match t.quant {
                    Quant::GroupedMin => s.shape() == [Dim::constant(2), rows, groups],
                    _ => s.shape() == [rows, groups],
                };
                if s.kind != TensorKind::Const || s.dtype != DType::F16 || !shape_ok {
                    return Err(invalid(
                        "group scales must be a constant f16 [rows, groups] tensor, \
                         or [2, rows, groups] with minimums",
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_io(&self) -> Result<()> {
        let (n_in, n_out) = (self.input_count(), self.output_count());
        let invalid = |reason| Error::InvalidSection { section: Section::Io, reason };
        if n_in > MAX_GRAPH_INPUTS {
            return Err(invalid("more than 32 graph inputs"));
        }
        if self.io.len() as u64 != (n_in as u64 + n_out as u64) * 4 {
            return Err(invalid("section length does not match the input and output counts"));
        }
        let mut bound = [false; MAX_SYMBOLS];
        for i in 0..n_in {
            let t = self.tensor(self.input_tensor(i)?)?;
            if t.kind != TensorKind::Activation {
                return Err(invalid("a graph input is not an activation"));
            }
            for d in t.shape() {
                match (d.as_constant(), d.as_symbol()) {
                    (Some(_), _) => {}
                    (None, Some(s)) => bound[s] = true,
                    (None, None) => {
                        return Err(invalid("a graph input axis is neither constant nor a symbol"))
                    }
                }
            }
        }
        if bound.iter().take(self.symbol_count()).any(|b| !b) {
            return Err(invalid("a symbol is not an axis of any graph input"));
        }
        for i in 0..n_out {
            let t = self.tensor(self.output_tensor(i)?)?;
            if t.kind != TensorKind::Activation {
                return Err(invalid("a graph output is not an activation"));
            }
        }
        Ok(())
    }

    fn validate_ops(&self) -> Result<()> {
        let mut consumed = 0usize;
        for (index, item) in self.ops().enumerate() {
            let (record, len) = item?;
            consumed += len;
            crate::validate::check_op(self, index as u32, &record)?;
        }
        if consumed != self.ops.len() {
            return Err(Error::InvalidSection {
                section: Section::Ops,
                reason: "bytes left over after the last op record",
            });
        }
        Ok(())
    }

    fn validate_metadata(&self) -> Result<()> {
        let mut iter = self.metadata_entries();
        while iter.pos < self.metadata.len() {
            if iter.next().is_none() {
                return Err(Error::InvalidSection {
                    section: Section::Metadata,
                    reason: "a record is truncated or its key is not UTF-8",
                });
            }
        }
        Ok(())
    }

    /// Whether graph input `i` refers to tensor `t`.
    pub(crate) fn is_graph_input(&self, t: u32) -> bool {
        (0..self.input_count()).any(|i| self.input_tensor(i).ok() == Some(t))
    }

    /// Concrete shape of a tensor for the given symbol values.
    pub(crate) fn shape_of(&self, t: &TensorEntry, symbols: &[u64; MAX_SYMBOLS]) -> Option<Shape> {
        Shape::eval(t.shape(), symbols)
    }
}

fn rank2(t: &TensorEntry) -> Option<[Dim; 2]> {
    match t.shape() {
        [a, b] => Some([*a, *b]),
        _ => None,
    }
}

fn locate_sections<'a>(
    bytes: &'a [u8],
    header: &Header,
    options: OpenOptions,
    sections: &mut [Option<&'a [u8]>; 7],
) -> Result<()> {
    let invalid = |reason| Error::InvalidSection { section: Section::SectionTable, reason };
    let count = header.section_count as usize;
    if count != SectionKind::ALL.len() {
        return Err(invalid("the section table must have exactly 7 entries"));
    }
    let table_end = HEADER_LEN + count * SECTION_ENTRY_LEN;
    let table = bytes.get(HEADER_LEN..table_end).ok_or(Error::Truncated {
        what: "section table",
        needed: table_end as u64,
        available: bytes.len() as u64,
    })?;
    let mut previous_end = table_end as u64;
    for i in 0..count {
        let entry =
            SectionEntry::parse(&table[i * SECTION_ENTRY_LEN..(i + 1) * SECTION_ENTRY_LEN])?;
        let section = entry.kind.section();
        let slot = &mut sections[entry.kind as usize - 1];
        if slot.is_some() {
            return Err(Error::InvalidSection { section, reason: "appears twice" });
        }
        if entry.offset % SECTION_ALIGN as u64 != 0 || entry.offset < previous_end {
            return Err(Error::InvalidSection {
                section,
                reason: "offset is not 64-byte aligned or overlaps the previous section",
            });
        }
        let end = entry.offset.saturating_add(entry.len);
        // On 32-bit targets a u64 that does not fit usize must not be truncated into range.
        let range = usize::try_from(entry.offset).ok().zip(usize::try_from(end).ok());
        let data = range.and_then(|(s, e)| bytes.get(s..e)).ok_or(Error::Truncated {
            what: "section",
            needed: end,
            available: bytes.len() as u64,
        })?;
        if entry.kind != SectionKind::Weights || options.verify_weights {
            let computed = crate::crc32::crc32(data);
            if computed != entry.crc32 {
                return Err(Error::ChecksumMismatch { section, stored: entry.crc32, computed });
            }
        }
        previous_end = end;
        *slot = Some(data);
    }
    Ok(())
}

/// Iterator over op records; yields each record with its byte length.
#[derive(Clone, Debug)]
pub struct OpIter<'a> {
    bytes: &'a [u8],
    index: u32,
    count: u32,
}

impl<'a> Iterator for OpIter<'a> {
    type Item = Result<(OpRecord<'a>, usize)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.index >= self.count {
            return None;
        }
        let result = OpRecord::parse(self.bytes, self.index);
        self.index += 1;
        match result {
            Ok((record, len)) => {
                self.bytes = self.bytes.get(len..).unwrap_or(&[]);
                Some(Ok((record, len)))
            }
            Err(e) => {
                self.index = self.count;
                Some(Err(e))
            }
        }
    }
}

/// Iterator over metadata records: (key, value).
///
/// A record is key length u32, value length u32, key bytes, value bytes, then zero padding to a
/// multiple of 4.
#[derive(Clone, Debug)]
pub struct MetadataIter<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for MetadataIter<'a> {
    type Item = (&'a str, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let r = crate::format::Reader::new(self.bytes, "metadata");
        let key_len = r.u32(self.pos).ok()? as usize;
        let value_len = r.u32(self.pos.checked_add(4)?).ok()? as usize;
        let key_start = self.pos.checked_add(8)?;
        let value_start = key_start.checked_add(key_len)?;
        let end = value_start.checked_add(value_len)?;
        let key = core::str::from_utf8(self.bytes.get(key_start..value_start)?).ok()?;
        let value = self.bytes.get(value_start..end)?;
        self.pos = end.checked_add(3)? & !3;
        Some((key, value))
    }
}

/// Whether `t` is a tensor index or the "absent" marker.
pub(crate) fn is_absent(t: u32) -> bool {
    t == NO_TENSOR
}
