//! Decoder-only language models of the Llama family: RMSNorm, rotary position embedding,
//! grouped-query attention over a key-value cache, and a SiLU-gated MLP, with the output
//! projection tied to the token embedding or stored apart.
//!
//! A file contains such a model as constant tensors in a fixed order and a configuration record in
//! its metadata under [`CONFIG_KEY`]; it has no op list. [`Decoder`] runs it one or more tokens at
//! a time. The key-value cache and every intermediate live in the caller's arena, whose size the
//! file states: the context length is fixed when the file is written.
//!
//! Tensor order: `token_embd` `[vocab, dim]`, `output_norm` `[dim]`, `output` `[vocab, dim]`
//! (absent when tied), then for each block `attn_norm`, `attn_q`, `attn_k`, `attn_v`,
//! `attn_output`, `ffn_norm`, `ffn_gate`, `ffn_up` and `ffn_down`, named `blk.L.PART`. Matrices
//! are stored `[out, in]` in any kind that [`Model::linear_weights`] accepts; norm weights are
//! f32.

use crate::cast::{cast, cast_mut};
use crate::error::{Error, Result};
use crate::format::{DType, TensorEntry, TensorKind, SECTION_ALIGN};
use crate::kernels::generic::{exp_approx, F32Rows, WeightRows};
use crate::kernels::{self, Products, Weights};
use crate::model::Model;

/// Metadata key of the configuration record.
pub const CONFIG_KEY: &str = "decoder.llama";

/// Length of the configuration record in bytes.
pub const CONFIG_LEN: usize = 56;

/// Version of the configuration record this runtime reads.
const CONFIG_VERSION: u32 = 1;

/// Parts of a block, in file order.
pub const BLOCK_PARTS: [&str; 9] = [
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// Shape and hyperparameters of a decoder, as stored in its configuration record.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecoderConfig {
    /// Transformer blocks.
    pub layers: u32,
    /// Width of the residual stream.
    pub dim: u32,
    /// Hidden width of the MLP.
    pub ffn_dim: u32,
    /// Query heads.
    pub heads: u32,
    /// Key and value heads; divides `heads`.
    pub kv_heads: u32,
    /// Width of one head.
    pub head_dim: u32,
    /// Leading values of each head that the rotary embedding turns (even, at most `head_dim`).
    pub rope_dims: u32,
    /// Vocabulary size.
    pub vocab: u32,
    /// Capacity of the key-value cache, in positions.
    pub max_seq: u32,
    /// Tokens run together in one pass; longer inputs run in passes of this many.
    pub rows: u32,
    /// Whether the output projection is the token embedding.
    pub tied: bool,
    /// Base of the rotary embedding's frequencies.
    pub rope_base: f32,
    /// Epsilon of RMSNorm.
    pub norm_eps: f32,
}

impl DecoderConfig {
    /// Encodes the record.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let words = [
            CONFIG_VERSION,
            self.layers,
            self.dim,
            self.ffn_dim,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.rope_dims,
            self.vocab,
            self.max_seq,
            self.rows,
            self.tied as u32,
            self.rope_base.to_bits(),
            self.norm_eps.to_bits(),
        ];
        let mut b = [0u8; CONFIG_LEN];
        for (chunk, w) in b.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    /// Decodes and checks a record.
    ///
    /// # Errors
    /// [`Error::InvalidDecoder`] when the record has another length or version, or describes an
    /// impossible model.
    pub fn parse(bytes: &[u8]) -> Result<DecoderConfig> {
        let invalid = |reason| Error::InvalidDecoder { tensor: u32::MAX, reason };
        if bytes.len() != CONFIG_LEN {
            return Err(invalid("the record is not 56 bytes long"));
        }
        let mut words = [0u32; CONFIG_LEN / 4];
        for (w, chunk) in words.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        if words[0] != CONFIG_VERSION {
            return Err(invalid("unknown record version"));
        }
        let config = DecoderConfig {
            layers: words[1],
            dim: words[2],
            ffn_dim: words[3],
            heads: words[4],
            kv_heads: words[5],
            head_dim: words[6],
            rope_dims: words[7],
            vocab: words[8],
            max_seq: words[9],
            rows: words[10],
            tied: match words[11] {
                0 => false,
                1 => true,
                _ => return Err(invalid("the tied flag is neither 0 nor 1")),
            },
            rope_base: f32::from_bits(words[12]),
            norm_eps: f32::from_bits(words[13]),
        };
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<()> {
        let invalid = |reason| Err(Error::InvalidDecoder { tensor: u32::MAX, reason });
        let sizes = [self.layers, self.dim, self.ffn_dim, self.heads, self.kv_heads, self.head_dim];
        if sizes.contains(&0) || self.vocab == 0 || self.max_seq == 0 || self.rows == 0 {
            return invalid("a size is zero");
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return invalid("the key-value heads do not divide the query heads");
        }
        if self.rope_dims > self.head_dim || !self.rope_dims.is_multiple_of(2) {
            return invalid("the rotary width is odd or exceeds the head width");
        }
        if !(self.rope_base.is_finite() && self.rope_base > 0.0) {
            return invalid("the rotary base is not a positive number");
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return invalid("the RMSNorm epsilon is not a non-negative number");
        }
        if self.layout().is_none() {
            return invalid("the arena size overflows");
        }
        Ok(())
    }

    /// Number of tensors of the model, in the order the module documentation gives.
    pub fn tensor_count(&self) -> u64 {
        self.first_block() as u64 + 9 * self.layers as u64
    }

    fn first_block(&self) -> u32 {
        if self.tied {
            2
        } else {
            3
        }
    }

    /// Width of all query heads.
    pub fn q_dim(&self) -> u32 {
        self.heads.saturating_mul(self.head_dim)
    }

    /// Width of all key (or value) heads.
    pub fn kv_dim(&self) -> u32 {
        self.kv_heads.saturating_mul(self.head_dim)
    }

    /// Arena bytes a [`Decoder`] needs, without the alignment padding of its start; `None` when
    /// the size overflows.
    pub fn arena_bytes(&self) -> Option<u64> {
        self.layout().map(|l| l.total as u64 * 4)
    }

    /// Extents of the arena's parts, in f32 values.
    fn layout(&self) -> Option<Layout> {
        let u = |v: u32| v as usize;
        let rows = u(self.rows);
        let mul = |a: usize, b: usize| a.checked_mul(b);
        let cache = mul(mul(u(self.layers), 2)?, mul(u(self.max_seq), u(self.kv_dim()))?)?;
        let wide = u(self.dim).max(u(self.q_dim()));
        let parts = [
            cache,
            mul(rows, u(self.dim))?,      // x
            mul(rows, wide)?,             // normed
            mul(rows, u(self.q_dim()))?,  // q
            mul(rows, u(self.kv_dim()))?, // k
            mul(rows, u(self.kv_dim()))?, // v
            mul(rows, u(self.q_dim()))?,  // attention output
            mul(rows, wide)?,             // projection
            mul(rows, u(self.ffn_dim))?,  // gate
            mul(rows, u(self.ffn_dim))?,  // up
            mul(rows, u(self.head_dim))?, // one head's queries
            mul(rows, u(self.max_seq))?,  // scores
            mul(rows, u(self.head_dim))?, // one head's output
            mul(rows, u(self.vocab))?,    // logits
        ];
        let mut total = 0usize;
        for p in parts {
            total = total.checked_add(p)?;
        }
        // The byte count must fit in u64 and in the address space.
        total.checked_mul(4)?;
        Some(Layout { parts, total })
    }
}

#[derive(Clone, Copy, Debug)]
struct Layout {
    parts: [usize; 14],
    total: usize,
}

/// Selection of the logits that [`Decoder::forward`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Those of the last token only.
    Last,
    /// Those of every token, row by row. The input may then hold at most
    /// [`DecoderConfig::rows`] tokens.
    All,
}

/// The arena split into its parts for one pass.
struct Parts<'s> {
    cache: &'s mut [f32],
    x: &'s mut [f32],
    normed: &'s mut [f32],
    q: &'s mut [f32],
    k: &'s mut [f32],
    v: &'s mut [f32],
    attn: &'s mut [f32],
    proj: &'s mut [f32],
    gate: &'s mut [f32],
    up: &'s mut [f32],
    q_head: &'s mut [f32],
    scores: &'s mut [f32],
    head_out: &'s mut [f32],
    logits: &'s mut [f32],
}

/// A running decoder: the model, its key-value cache and scratch in the caller's arena, and the
/// number of positions filled.
pub struct Decoder<'m, 'a> {
    model: Model<'m>,
    config: DecoderConfig,
    layout: Layout,
    arena: &'a mut [f32],
    len: usize,
    /// Settings of the matrix products; see [`Decoder::set_threads`] and
    /// [`Decoder::set_int8_activations`].
    products: Products,
}

/// Returns whether `name` is `blk.{layer}.{part}`.
fn is_block_name(name: &str, layer: u32, part: &str) -> bool {
    let Some(rest) = name.strip_prefix("blk.") else { return false };
    let Some((number, tail)) = rest.split_once('.') else { return false };
    let digits_ok = !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit())
        && (number == "0" || !number.starts_with('0'));
    digits_ok && number.parse::<u32>() == Ok(layer) && tail == part
}

impl<'m, 'a> Decoder<'m, 'a> {
    /// Reads the configuration of `model`, checks every tensor against it, and places the cache
    /// and scratch in `arena`, whose start is rounded up to a 64-byte boundary.
    ///
    /// # Errors
    /// [`Error::NotADecoder`] without a configuration record, [`Error::InvalidDecoder`] when a
    /// tensor is missing, misnamed or misshapen, [`Error::ArenaTooSmall`] with the bytes needed.
    pub fn new(model: &Model<'m>, arena: &'a mut [u8]) -> Result<Self> {
        let config = DecoderConfig::parse(model.metadata(CONFIG_KEY).ok_or(Error::NotADecoder)?)?;
        let layout = config.layout().ok_or(Error::InvalidDecoder {
            tensor: u32::MAX,
            reason: "the arena size overflows",
        })?;
        check_tensors(model, &config)?;
        let bytes = layout.total * 4;
        let pad = arena.as_ptr().align_offset(SECTION_ALIGN);
        let too_small = Error::ArenaTooSmall {
            required: (bytes + SECTION_ALIGN - 1) as u64,
            provided: arena.len() as u64,
        };
        if pad >= SECTION_ALIGN || arena.len() < pad.saturating_add(bytes) {
            return Err(too_small);
        }
        let arena = cast_mut::<f32>(&mut arena[pad..pad + bytes]).ok_or(too_small)?;
        Ok(Decoder {
            model: *model,
            config,
            layout,
            arena,
            len: 0,
            products: Products { threads: 1, int8: false },
        })
    }

    /// Returns the configuration read from the file.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// Returns the number of positions in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Returns whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops the cache's positions from `len` on, so that the next tokens follow position
    /// `len - 1`; a larger `len` changes nothing.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Lets the matrix products split their work across up to `threads` threads (at least 1).
    #[cfg(feature = "std")]
    pub fn set_threads(&mut self, threads: usize) {
        self.products.threads = threads.max(1);
    }

    /// Lets the matrix products quantize their inputs to int8 where an integer kernel exists for
    /// the weights and the CPU ([`kernels::linear_int8`]): faster token by token, at the cost of
    /// rounding the inputs. Off by default: then results follow the stored weights in f32.
    pub fn set_int8_activations(&mut self, on: bool) {
        self.products.int8 = on;
    }

    /// Runs `tokens`, which follow the cached positions, appends their keys and values to the
    /// cache, and returns the logits that `which` selects (`vocab` values per token).
    ///
    /// # Errors
    /// [`Error::ContextFull`] when the cache has no room for the tokens,
    /// [`Error::TokenOutOfRange`] for an id outside the vocabulary, [`Error::InvalidDecoder`]
    /// when [`Logits::All`] is requested for more tokens than one pass takes. On an error the cache
    /// keeps the positions of the passes that finished.
    pub fn forward(&mut self, tokens: &[u32], which: Logits) -> Result<&[f32]> {
        let rows = self.config.rows as usize;
        let vocab = self.config.vocab as usize;
        if which == Logits::All && tokens.len() > rows {
            return Err(Error::InvalidDecoder {
                tensor: u32::MAX,
                reason: "all logits are returned for at most one pass of tokens",
            });
        }
        let needed = self.len as u64 + tokens.len() as u64;
        if needed > self.config.max_seq as u64 {
            return Err(Error::ContextFull { capacity: self.config.max_seq, needed });
        }
        if let Some(&token) = tokens.iter().find(|&&t| t >= self.config.vocab) {
            return Err(Error::TokenOutOfRange { token, vocab: self.config.vocab });
        }
        let mut produced = 0;
        let passes = tokens.len().div_ceil(rows);
        for (i, chunk) in tokens.chunks(rows).enumerate() {
            produced = match which {
                _ if i + 1 < passes => 0,
                Logits::Last => 1,
                Logits::All => chunk.len(),
            };
            self.pass(chunk, produced)?;
        }
        let logits_at = self.layout.total - self.layout.parts[13];
        Ok(&self.arena[logits_at..logits_at + produced * vocab])
    }

    fn parts(&mut self) -> Parts<'_> {
        let mut rest: &mut [f32] = self.arena;
        let mut take = |len: usize| {
            let (head, tail) = core::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            head
        };
        let p = self.layout.parts;
        Parts {
            cache: take(p[0]),
            x: take(p[1]),
            normed: take(p[2]),
            q: take(p[3]),
            k: take(p[4]),
            v: take(p[5]),
            attn: take(p[6]),
            proj: take(p[7]),
            gate: take(p[8]),
            up: take(p[9]),
            q_head: take(p[10]),
            scores: take(p[11]),
            head_out: take(p[12]),
            logits: take(p[13]),
        }
    }

    /// Runs one pass of at most `rows` tokens, already checked against the vocabulary and the
    /// cache's room, and computes the logits of its last `logit_rows` tokens.
    fn pass(&mut self, tokens: &[u32], logit_rows: usize) -> Result<()> {
        let c = self.config;
        let model = self.model;
        let products = self.products;
        let start = self.len;
        let t = tokens.len();
        let (dim, q_dim, kv_dim) = (c.dim as usize, c.q_dim() as usize, c.kv_dim() as usize);
        let ffn = c.ffn_dim as usize;
        let p = self.parts();

        let embedding = weights_at(&model, 0)?;
        for (row, &token) in p.x.chunks_exact_mut(dim).zip(tokens) {
            embedding.fill(token as usize, 0, row);
        }
        let x = &mut p.x[..t * dim];
        let normed = &mut p.normed[..t * dim];
        let first = c.first_block();
        for layer in 0..c.layers {
            let at = |part: u32| first + 9 * layer + part;
            rms_norm(x, norm_at(&model, at(0))?, c.norm_eps, normed);
            let q = &mut p.q[..t * q_dim];
            let k = &mut p.k[..t * kv_dim];
            let v = &mut p.v[..t * kv_dim];
            products.linear(normed, t, weights_at(&model, at(1))?, None, q);
            products.linear(normed, t, weights_at(&model, at(2))?, None, k);
            products.linear(normed, t, weights_at(&model, at(3))?, None, v);
            rope(&c, q, start, c.heads as usize);
            rope(&c, k, start, c.kv_heads as usize);
            store_cache(&c, p.cache, layer as usize, start, k, v);
            let scratch = AttentionScratch {
                q_head: &mut *p.q_head,
                scores: &mut *p.scores,
                head_out: &mut *p.head_out,
            };
            let attn = &mut p.attn[..t * q_dim];
            attention(&c, q, p.cache, layer as usize, start, t, scratch, attn);
            let proj = &mut p.proj[..t * dim];
            products.linear(attn, t, weights_at(&model, at(4))?, None, proj);
            add_in_place(x, proj);

            rms_norm(x, norm_at(&model, at(5))?, c.norm_eps, normed);
            let gate = &mut p.gate[..t * ffn];
            let up = &mut p.up[..t * ffn];
            products.linear(normed, t, weights_at(&model, at(6))?, None, gate);
            products.linear(normed, t, weights_at(&model, at(7))?, None, up);
            for (g, &u) in gate.iter_mut().zip(up.iter()) {
                *g = *g / (1.0 + exp_approx(-*g)) * u;
            }
            products.linear(gate, t, weights_at(&model, at(8))?, None, proj);
            add_in_place(x, proj);
        }

        let rows = logit_rows.min(t);
        if rows > 0 {
            let last = &x[(t - rows) * dim..];
            let normed = &mut normed[..rows * dim];
            rms_norm(last, norm_at(&model, 1)?, c.norm_eps, normed);
            let output = weights_at(&model, if c.tied { 0 } else { 2 })?;
            let logits = &mut p.logits[..rows * c.vocab as usize];
            products.linear(normed, rows, output, None, logits);
        }
        self.len = start + t;
        Ok(())
    }
}

/// Returns the matrix at tensor `index`, checked by [`check_tensors`].
fn weights_at<'a>(model: &Model<'a>, index: u32) -> Result<Weights<'a>> {
    let t = model.tensor(index)?;
    model.linear_weights(&t).ok_or(Error::InvalidDecoder {
        tensor: index,
        reason: "the matrix's data does not match its shape",
    })
}

/// Returns the f32 norm weights at tensor `index`.
fn norm_at<'a>(model: &Model<'a>, index: u32) -> Result<&'a [f32]> {
    let t = model.tensor(index)?;
    cast::<f32>(model.const_bytes(&t))
        .ok_or(Error::InvalidDecoder { tensor: index, reason: "norm weights are not f32" })
}

/// Checks that the tensor table contains the model that `config` describes, in order.
fn check_tensors(model: &Model<'_>, config: &DecoderConfig) -> Result<()> {
    if (model.tensor_count() as u64) < config.tensor_count() {
        return Err(Error::InvalidDecoder {
            tensor: model.tensor_count(),
            reason: "the file has fewer tensors than the configuration names",
        });
    }
    let (dim, q_dim, kv_dim) = (config.dim, config.q_dim(), config.kv_dim());
    let matrix = |index: u32, name_ok: bool, n: u32, k: u32| -> Result<()> {
        let invalid = |reason| Error::InvalidDecoder { tensor: index, reason };
        let t = model.tensor(index)?;
        if !name_ok {
            return Err(invalid("the tensor's name is not the one its position calls for"));
        }
        if !is_matrix(&t, n, k) || model.linear_weights(&t).is_none() {
            return Err(invalid("the matrix has another shape or storage than expected"));
        }
        Ok(())
    };
    let norm = |index: u32, name_ok: bool| -> Result<()> {
        let invalid = |reason| Error::InvalidDecoder { tensor: index, reason };
        let t = model.tensor(index)?;
        if !name_ok {
            return Err(invalid("the tensor's name is not the one its position calls for"));
        }
        let shape_ok = t.rank == 1 && t.dims[0].as_constant() == Some(dim);
        if t.kind != TensorKind::Const || t.dtype != DType::F32 || !shape_ok {
            return Err(invalid("norm weights must be a constant f32 [dim] tensor"));
        }
        norm_at(model, index).map(|_| ())
    };
    let named = |index: u32, name: &str| model.tensor_name(index) == name;
    matrix(0, named(0, "token_embd"), config.vocab, dim)?;
    norm(1, named(1, "output_norm"))?;
    if !config.tied {
        matrix(2, named(2, "output"), config.vocab, dim)?;
    }
    let shapes = [(0, 0), (q_dim, dim), (kv_dim, dim), (kv_dim, dim), (dim, q_dim), (0, 0)];
    let mlp = [(config.ffn_dim, dim), (config.ffn_dim, dim), (dim, config.ffn_dim)];
    for layer in 0..config.layers {
        let base = config.first_block() + 9 * layer;
        for (part, name) in BLOCK_PARTS.iter().enumerate() {
            let index = base + part as u32;
            let name_ok = is_block_name(model.tensor_name(index), layer, name);
            match part {
                0 | 5 => norm(index, name_ok)?,
                1..=4 => matrix(index, name_ok, shapes[part].0, shapes[part].1)?,
                _ => matrix(index, name_ok, mlp[part - 6].0, mlp[part - 6].1)?,
            }
        }
    }
    Ok(())
}

fn is_matrix(t: &TensorEntry, n: u32, k: u32) -> bool {
    t.rank == 2 && t.dims[0].as_constant() == Some(n) && t.dims[1].as_constant() == Some(k)
}

/// `out = x / sqrt(mean(x²) + eps) · weight`, row by row.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    for (row, dst) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mean_square = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / libm::sqrtf(mean_square + eps);
        for ((d, &v), &w) in dst.iter_mut().zip(row).zip(weight) {
            *d = v * inv * w;
        }
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Rotates pairs `(2i, 2i + 1)` of the first `rope_dims` values of every head, at positions from
/// `start` on (llama.cpp's normal rotary mode, for which GGUF files store their query and key
/// rows permuted).
// NOTE: every layer recomputes the same angles (a power, a sine and a cosine per pair and
// position): about 5,800 libm calls per token for SmolLM2, an estimated 1 % of its time.
fn rope(c: &DecoderConfig, x: &mut [f32], start: usize, heads: usize) {
    let hd = c.head_dim as usize;
    let pairs = c.rope_dims as usize / 2;
    for (i, row) in x.chunks_exact_mut(heads * hd).enumerate() {
        let pos = (start + i) as f32;
        for pair in 0..pairs {
            let exponent = -2.0 * pair as f64 / c.rope_dims as f64;
            let freq = libm::pow(c.rope_base as f64, exponent) as f32;
            let angle = pos * freq;
            let (sin, cos) = (libm::sinf(angle), libm::cosf(angle));
            for head in row.chunks_exact_mut(hd) {
                let (a, b) = (head[2 * pair], head[2 * pair + 1]);
                head[2 * pair] = a * cos - b * sin;
                head[2 * pair + 1] = a * sin + b * cos;
            }
        }
    }
}

/// Offset of `(layer, keys or values, kv_head, pos)` in the cache, laid out
/// `[layer][keys, values][kv_head][pos][head_dim]`.
fn cache_at(c: &DecoderConfig, layer: usize, values: bool, kv_head: usize, pos: usize) -> usize {
    let (hd, seq) = (c.head_dim as usize, c.max_seq as usize);
    (((layer * 2 + values as usize) * c.kv_heads as usize + kv_head) * seq + pos) * hd
}

fn store_cache(
    c: &DecoderConfig,
    cache: &mut [f32],
    layer: usize,
    start: usize,
    k: &[f32],
    v: &[f32],
) {
    let hd = c.head_dim as usize;
    let kv_dim = c.kv_dim() as usize;
    for (i, (k_row, v_row)) in k.chunks_exact(kv_dim).zip(v.chunks_exact(kv_dim)).enumerate() {
        for h in 0..c.kv_heads as usize {
            let ks = cache_at(c, layer, false, h, start + i);
            cache[ks..ks + hd].copy_from_slice(&k_row[h * hd..(h + 1) * hd]);
            let vs = cache_at(c, layer, true, h, start + i);
            cache[vs..vs + hd].copy_from_slice(&v_row[h * hd..(h + 1) * hd]);
        }
    }
}

struct AttentionScratch<'s> {
    q_head: &'s mut [f32],
    scores: &'s mut [f32],
    head_out: &'s mut [f32],
}

/// Causal grouped-query attention of `t` queries at positions from `start` on over the cached
/// positions up to each, writing `[t, heads × head_dim]` to `out`.
#[allow(clippy::too_many_arguments)]
fn attention(
    c: &DecoderConfig,
    q: &[f32],
    cache: &[f32],
    layer: usize,
    start: usize,
    t: usize,
    s: AttentionScratch<'_>,
    out: &mut [f32],
) {
    let hd = c.head_dim as usize;
    let q_dim = c.q_dim() as usize;
    let total = start + t;
    let group = (c.heads / c.kv_heads) as usize;
    let scale = 1.0 / libm::sqrtf(hd as f32);
    let q_head = &mut s.q_head[..t * hd];
    let scores = &mut s.scores[..t * total];
    let head_out = &mut s.head_out[..t * hd];
    for head in 0..c.heads as usize {
        let kv_head = head / group;
        for (dst, row) in q_head.chunks_exact_mut(hd).zip(q.chunks_exact(q_dim)) {
            dst.copy_from_slice(&row[head * hd..(head + 1) * hd]);
        }
        let keys_at = cache_at(c, layer, false, kv_head, 0);
        let values_at = cache_at(c, layer, true, kv_head, 0);
        let keys = Weights::F32(F32Rows { w: &cache[keys_at..keys_at + total * hd], k: hd });
        kernels::linear(q_head, t, hd, keys, total, None, scores);
        for (i, row) in scores.chunks_exact_mut(total).enumerate() {
            softmax_prefix(row, start + i + 1, scale);
        }
        let values = &cache[values_at..values_at + total * hd];
        kernels::matmul(scores, values, head_out, t, total, hd);
        for (src, row) in head_out.chunks_exact(hd).zip(out.chunks_exact_mut(q_dim)) {
            row[head * hd..(head + 1) * hd].copy_from_slice(src);
        }
    }
}

/// Softmax of the first `visible` scores times `scale`; the rest become 0.
fn softmax_prefix(row: &mut [f32], visible: usize, scale: f32) {
    let (live, masked) = row.split_at_mut(visible.min(row.len()));
    masked.fill(0.0);
    let max = live.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s * scale));
    let mut sum = 0.0f32;
    for s in live.iter_mut() {
        *s = exp_approx(*s * scale - max);
        sum += *s;
    }
    let inv = 1.0 / sum;
    for s in live.iter_mut() {
        *s *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_rejects_bad_records() {
        let config = DecoderConfig {
            layers: 2,
            dim: 8,
            ffn_dim: 16,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            rope_dims: 4,
            vocab: 11,
            max_seq: 6,
            rows: 3,
            tied: true,
            rope_base: 10_000.0,
            norm_eps: 1e-5,
        };
        assert_eq!(DecoderConfig::parse(&config.to_bytes()), Ok(config));
        let mut odd_rope = config;
        odd_rope.rope_dims = 3;
        assert!(DecoderConfig::parse(&odd_rope.to_bytes()).is_err());
        let mut heads = config;
        heads.kv_heads = 3;
        assert!(DecoderConfig::parse(&heads.to_bytes()).is_err());
        let mut huge = config;
        huge.max_seq = u32::MAX;
        huge.layers = u32::MAX;
        assert!(DecoderConfig::parse(&huge.to_bytes()).is_err());
        assert!(DecoderConfig::parse(&config.to_bytes()[..40]).is_err());
    }

    #[test]
    fn block_names_match_exactly() {
        assert!(is_block_name("blk.12.attn_q", 12, "attn_q"));
        assert!(is_block_name("blk.0.ffn_up", 0, "ffn_up"));
        assert!(!is_block_name("blk.012.attn_q", 12, "attn_q"));
        assert!(!is_block_name("blk.12.attn_q", 13, "attn_q"));
        assert!(!is_block_name("blk.12.attn_qx", 12, "attn_q"));
        assert!(!is_block_name("blk..attn_q", 0, "attn_q"));
    }

    #[test]
    fn softmax_prefix_masks_the_future() {
        let mut row = [1.0f32, 2.0, 3.0, 100.0];
        softmax_prefix(&mut row, 3, 1.0);
        assert_eq!(row[3], 0.0);
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6, "{row:?}");
        assert!(row[2] > row[1]);
        assert!(row[1] > row[0]);
    }
}
