//! Decoder language models of the Llama architecture, read from GGUF files and run in f32 on
//! the host: the reference against which compressed models are measured.
//!
//! [`Llama`] keeps its weights in f32 or the runtime's quantized kinds and runs a forward pass over new tokens with a key-value
//! cache, so a prompt is processed in one pass and each generated token costs one more row.
//! [`tokenizer`] builds the byte-level BPE tokenizer and chat template stored in the file,
//! [`sample`] picks tokens from logits, and [`perplexity`] scores text.

pub mod analysis;
pub mod packed;
pub mod sample;
pub mod tokenizer;

use std::fmt;
use std::sync::Arc;

use edgefold_runtime::kernels::generic::{F32Rows, I4Rows, I8Rows, WeightRows};
use edgefold_runtime::kernels::parallel::linear_threads;
use edgefold_runtime::kernels::{matmul, Weights};

use crate::gptq::gptq_i4;
use crate::quantize::{int4_group, quantize_i4, quantize_i4_min, quantize_row_i8};
use crate::spectrum::SpectrumError;

use crate::gguf::{GgufError, GgufFile};

/// Shape and constants of a Llama-architecture model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Transformer blocks.
    pub layers: usize,
    /// Width of the residual stream.
    pub dim: usize,
    /// Hidden width of each MLP.
    pub ffn_dim: usize,
    /// Query heads.
    pub heads: usize,
    /// Key and value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Leading dimensions of each head that rotary embedding rotates.
    pub rope_dims: usize,
    /// Base of the rotary embedding's frequencies.
    pub rope_base: f32,
    /// Epsilon of every RMSNorm.
    pub norm_eps: f32,
    /// Vocabulary size.
    pub vocab: usize,
    /// Context length the model was trained for.
    pub context: usize,
}

impl LlamaConfig {
    /// Reads the configuration from a GGUF file's metadata and tensor table.
    pub fn from_gguf(file: &GgufFile) -> Result<LlamaConfig, GgufError> {
        let arch = file.require_str("general.architecture")?;
        if arch != "llama" {
            return Err(file.metadata_error(
                "general.architecture",
                format!("architecture `{arch}` is not supported; only `llama` is"),
            ));
        }

        let key = |name: &str| format!("llama.{name}");
        let usize_of = |name: &str| -> Result<usize, GgufError> {
            let v = file.require_u64(&key(name))?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0 && v <= 1 << 20)
                .ok_or_else(|| file.metadata_error(&key(name), format!("{v} is out of range")))
        };
        let layers = usize_of("block_count")?;
        let dim = usize_of("embedding_length")?;
        let ffn_dim = usize_of("feed_forward_length")?;
        let heads = usize_of("attention.head_count")?;
        let kv_heads = match file.get(&key("attention.head_count_kv")) {
            Some(_) => usize_of("attention.head_count_kv")?,
            None => heads,
        };
        if dim % heads != 0 || heads % kv_heads != 0 {
            return Err(file.metadata_error(
                &key("attention.head_count"),
                format!(
                    "{heads} query and {kv_heads} key-value heads do not divide the width {dim}"
                ),
            ));
        }

        let head_dim = dim / heads;
        let rope_dims = match file.get(&key("rope.dimension_count")) {
            Some(_) => usize_of("rope.dimension_count")?,
            None => head_dim,
        };
        if rope_dims > head_dim || rope_dims % 2 != 0 {
            return Err(file.metadata_error(
                &key("rope.dimension_count"),
                format!("{rope_dims} is odd or exceeds the head width {head_dim}"),
            ));
        }
        if let Some(kind) = file.get(&key("rope.scaling.type")) {
            if kind.as_str() != Some("none") {
                return Err(file.metadata_error(
                    &key("rope.scaling.type"),
                    format!("rotary embedding scaling {kind:?} is not supported"),
                ));
            }
        }

        let rope_base = match file.get(&key("rope.freq_base")) {
            Some(_) => file.require_f64(&key("rope.freq_base"))? as f32,
            None => 10_000.0,
        };
        let norm_eps = file.require_f64(&key("attention.layer_norm_rms_epsilon"))? as f32;

        let embedding = file
            .tensor("token_embd.weight")
            .ok_or_else(|| file.tensor_error("token_embd.weight", "missing"))?;
        let vocab = embedding.shape()[0];
        let context = match file.get(&key("context_length")) {
            Some(_) => usize_of("context_length")?,
            None => 2048,
        };
        Ok(LlamaConfig {
            layers,
            dim,
            ffn_dim,
            heads,
            kv_heads,
            head_dim,
            rope_dims,
            rope_base,
            norm_eps,
            vocab,
            context,
        })
    }

    /// Returns the width of all key (or value) heads of one position.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// A weight matrix of `n` rows of `k` values in one of the runtime's storage kinds.
#[derive(Debug, Clone)]
pub struct Matrix {
    n: usize,
    k: usize,
    data: MatrixData,
}

#[derive(Debug, Clone)]
enum MatrixData {
    F32(Vec<f32>),
    I8 { q: Vec<i8>, scales: Vec<f32> },
    I4 { packed: Vec<u8>, scales: Vec<u16>, mins: Option<Vec<u16>>, group: usize },
}

impl Matrix {
    fn f32(n: usize, k: usize, values: Vec<f32>) -> Matrix {
        Matrix { n, k, data: MatrixData::F32(values) }
    }

    /// Returns the matrix as the runtime's `linear` kernels take it.
    pub fn weights(&self) -> Weights<'_> {
        let k = self.k;
        match &self.data {
            MatrixData::F32(w) => Weights::F32(F32Rows { w, k }),
            MatrixData::I8 { q, scales } => Weights::I8(I8Rows { q, scales, k }),
            MatrixData::I4 { packed, scales, mins, group } => {
                Weights::I4(I4Rows { packed, scales, mins: mins.as_deref(), k, group: *group })
            }
        }
    }

    /// Returns the number of bytes the stored values and scales take.
    pub fn bytes(&self) -> usize {
        match &self.data {
            MatrixData::F32(w) => 4 * w.len(),
            MatrixData::I8 { q, scales } => q.len() + 4 * scales.len(),
            MatrixData::I4 { packed, scales, mins, .. } => {
                packed.len() + 2 * (scales.len() + mins.as_ref().map_or(0, Vec::len))
            }
        }
    }

    /// Returns the number of rows (outputs).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Returns the number of columns (inputs).
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Returns the values as f32, dequantized if stored quantized.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.n * self.k];
        let weights = self.weights();
        for (r, row) in out.chunks_exact_mut(self.k).enumerate() {
            weights.fill(r, 0, row);
        }
        out
    }

    /// Stores the matrix as `kind`, with error feedback from `gram` (the `k × k` Gram of the
    /// layer's inputs) for [`WeightKind::Int4Gptq`]. Quantized matrices are dequantized first.
    fn convert(&mut self, kind: WeightKind, gram: Option<&[f64]>) -> Result<(), SpectrumError> {
        let values = match &mut self.data {
            MatrixData::F32(w) => std::mem::take(w),
            _ => self.to_f32(),
        };
        let (n, k) = (self.n, self.k);
        self.data = match kind {
            WeightKind::F32 => MatrixData::F32(values),
            WeightKind::Int8 => int8_rows(&values, k),
            WeightKind::Int4 | WeightKind::Int4Gptq | WeightKind::Int4Min => match int4_group(k) {
                None => int8_rows(&values, k),
                Some(group) => {
                    let (packed, scales, mins) = match (kind, gram) {
                        (WeightKind::Int4Gptq, Some(gram)) => {
                            let (packed, scales) = gptq_i4(&values, n, k, gram, group)?;
                            (packed, scales, None)
                        }
                        (WeightKind::Int4Min, _) => {
                            let (packed, scales, mins) = quantize_i4_min(&values, n, k, group);
                            (packed, scales, Some(mins))
                        }
                        _ => {
                            let (packed, scales) = quantize_i4(&values, n, k, group);
                            (packed, scales, None)
                        }
                    };
                    MatrixData::I4 { packed, scales, mins, group }
                }
            },
        };
        Ok(())
    }
}

fn int8_rows(values: &[f32], k: usize) -> MatrixData {
    let mut q = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len() / k.max(1));
    for row in values.chunks_exact(k) {
        let (row_q, scale) = quantize_row_i8(row);
        q.extend(row_q);
        scales.push(scale);
    }
    MatrixData::I8 { q, scales }
}

/// Storage kinds of [`Llama::quantize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightKind {
    /// Dense f32.
    F32,
    /// Int8 with one scale per row.
    Int8,
    /// Int4 in groups of 32 along rows with an f16 scale, rounded to nearest. Rows that no
    /// group length divides are stored as int8.
    Int4,
    /// As [`WeightKind::Int4`], with GPTQ error feedback from calibration statistics.
    Int4Gptq,
    /// Int4 in groups of 32 with an f16 scale and an f16 minimum, on the unsigned grid of
    /// llama.cpp's Q4_1, so that Q4_1 weights are stored exactly.
    Int4Min,
}

/// The weights of one transformer block, row-major `[out, in]`.
#[derive(Debug, Clone)]
struct Block {
    attn_norm: Vec<f32>,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    wo: Matrix,
    ffn_norm: Vec<f32>,
    w_gate: Matrix,
    w_up: Matrix,
    w_down: Matrix,
}

impl Block {
    fn matrices_mut(&mut self) -> [(&'static str, &mut Matrix); 7] {
        [
            ("attn_q", &mut self.wq),
            ("attn_k", &mut self.wk),
            ("attn_v", &mut self.wv),
            ("attn_output", &mut self.wo),
            ("ffn_gate", &mut self.w_gate),
            ("ffn_up", &mut self.w_up),
            ("ffn_down", &mut self.w_down),
        ]
    }

    fn matrices(&self) -> [&Matrix; 7] {
        [&self.wq, &self.wk, &self.wv, &self.wo, &self.w_gate, &self.w_up, &self.w_down]
    }
}

/// A Llama-architecture model whose matrices are stored in f32 or in the runtime's quantized
/// kinds.
#[derive(Clone)]
pub struct Llama {
    config: LlamaConfig,
    embedding: Arc<Matrix>,
    /// Blocks, shared between copies until one is changed, so that copies with blocks removed
    /// cost little memory.
    blocks: Vec<Arc<Block>>,
    /// Indices in the original model of the blocks kept.
    block_ids: Vec<usize>,
    output_norm: Vec<f32>,
    /// The output projection, or `None` when it is tied to the embedding.
    output: Option<Arc<Matrix>>,
    /// Inverse frequencies of the rotary embedding, one per rotated pair.
    inv_freq: Vec<f32>,
    threads: usize,
}

impl fmt::Debug for Llama {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Llama").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Llama {
    /// Reads and dequantizes the weights of a Llama model from a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Llama, GgufError> {
        let config = LlamaConfig::from_gguf(file)?;
        let c = &config;
        let matrix = |name: &str, n: usize, k: usize| -> Result<Matrix, GgufError> {
            Ok(Matrix::f32(n, k, file.dequantize(name, &[n, k])?))
        };
        let embedding = Arc::new(matrix("token_embd.weight", c.vocab, c.dim)?);
        let mut blocks = Vec::with_capacity(c.layers);
        for l in 0..c.layers {
            let name = |part: &str| format!("blk.{l}.{part}.weight");
            blocks.push(Arc::new(Block {
                attn_norm: file.dequantize(&name("attn_norm"), &[c.dim])?,
                wq: matrix(&name("attn_q"), c.dim, c.dim)?,
                wk: matrix(&name("attn_k"), c.kv_dim(), c.dim)?,
                wv: matrix(&name("attn_v"), c.kv_dim(), c.dim)?,
                wo: matrix(&name("attn_output"), c.dim, c.dim)?,
                ffn_norm: file.dequantize(&name("ffn_norm"), &[c.dim])?,
                w_gate: matrix(&name("ffn_gate"), c.ffn_dim, c.dim)?,
                w_up: matrix(&name("ffn_up"), c.ffn_dim, c.dim)?,
                w_down: matrix(&name("ffn_down"), c.dim, c.ffn_dim)?,
            }));
        }
        let output_norm = file.dequantize("output_norm.weight", &[c.dim])?;
        let output = match file.tensor("output.weight") {
            Some(_) => Some(Arc::new(matrix("output.weight", c.vocab, c.dim)?)),
            None => None,
        };
        let inv_freq = (0..c.rope_dims / 2)
            .map(|i| (f64::from(c.rope_base)).powf(-2.0 * i as f64 / c.rope_dims as f64) as f32)
            .collect();
        let block_ids = (0..c.layers).collect();
        Ok(Llama {
            config,
            embedding,
            blocks,
            block_ids,
            output_norm,
            output,
            inv_freq,
            threads: 1,
        })
    }

    /// Returns the model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Sets the number of threads for the matrix products (at least 1).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// Returns the bytes the weights take in their storage kinds (norm weights in f32).
    pub fn weight_bytes(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                4 * (b.attn_norm.len() + b.ffn_norm.len())
                    + b.matrices().iter().map(|m| m.bytes()).sum::<usize>()
            })
            .sum();
        self.embedding.bytes()
            + blocks
            + 4 * self.output_norm.len()
            + self.output.as_ref().map_or(0, |m| m.bytes())
    }

    /// Returns block `block`'s matrix `name` (`attn_q`, `attn_k`, `attn_v`, `attn_output`,
    /// `ffn_gate`, `ffn_up` or `ffn_down`).
    pub fn block_matrix(&self, block: usize, name: &str) -> Option<&Matrix> {
        let b = self.blocks.get(block)?;
        Some(match name {
            "attn_q" => &b.wq,
            "attn_k" => &b.wk,
            "attn_v" => &b.wv,
            "attn_output" => &b.wo,
            "ffn_gate" => &b.w_gate,
            "ffn_up" => &b.w_up,
            "ffn_down" => &b.w_down,
            _ => return None,
        })
    }

    /// Returns the indices, in the original model, of the blocks this model keeps.
    pub fn block_ids(&self) -> &[usize] {
        &self.block_ids
    }

    /// Removes the blocks whose original indices are in `ids`.
    pub fn remove_blocks(&mut self, ids: &[usize]) {
        let mut kept_blocks = Vec::with_capacity(self.blocks.len());
        let mut kept_ids = Vec::with_capacity(self.blocks.len());
        for (block, id) in self.blocks.drain(..).zip(self.block_ids.drain(..)) {
            if !ids.contains(&id) {
                kept_blocks.push(block);
                kept_ids.push(id);
            }
        }
        self.blocks = kept_blocks;
        self.block_ids = kept_ids;
        self.config.layers = self.blocks.len();
    }

    /// Stores every block matrix as `kind`, and the embedding (tied to the output) as int8 when
    /// `kind` is not f32. [`WeightKind::Int4Gptq`] needs `stats` from [`Llama::calibrate`]
    /// for this model's blocks.
    pub fn quantize(
        &mut self,
        kind: WeightKind,
        stats: Option<&Calibration>,
    ) -> Result<(), SpectrumError> {
        for (i, block) in self.blocks.iter_mut().enumerate() {
            for (name, matrix) in Arc::make_mut(block).matrices_mut() {
                let gram = stats.and_then(|s| s.gram(i, name));
                matrix.convert(kind, gram)?;
            }
        }
        let table_kind = if kind == WeightKind::F32 { WeightKind::F32 } else { WeightKind::Int8 };
        Arc::make_mut(&mut self.embedding).convert(table_kind, None)?;
        if let Some(output) = &mut self.output {
            Arc::make_mut(output).convert(table_kind, None)?;
        }
        Ok(())
    }

    /// Returns an empty key-value cache for up to `capacity` positions.
    ///
    /// # Panics
    /// When the allocation fails; [`Llama::try_new_cache`] returns an error instead.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(&self.config, capacity)
    }

    /// Allocates an empty key-value cache for up to `capacity` positions.
    ///
    /// # Errors
    /// When the size overflows `usize` or the allocator fails.
    pub fn try_new_cache(&self, capacity: usize) -> Result<KvCache, CacheAllocError> {
        KvCache::try_new(&self.config, capacity)
    }

    fn linear(&self, x: &[f32], rows: usize, w: &Matrix, y: &mut [f32]) {
        linear_threads(self.threads, x, rows, w.k, w.weights(), w.n, None, y);
    }

    fn linear_f32(&self, x: &[f32], rows: usize, w: &[f32], k: usize, n: usize, y: &mut [f32]) {
        let weights = Weights::F32(F32Rows { w, k });
        linear_threads(self.threads, x, rows, k, weights, n, None, y);
    }

    /// Runs the model on `tokens`, which follow the cache's positions, and appends their keys
    /// and values to the cache.
    ///
    /// Returns the logits of every new position (`tokens.len() × vocab`, row-major) when
    /// `all_logits` is set, and of the last one only otherwise.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        all_logits: bool,
    ) -> Result<Vec<f32>, ForwardError> {
        self.forward_observed(tokens, cache, all_logits, &mut |_| {})
    }

    /// [`Llama::forward`], calling `observe` with what each block reads and writes.
    pub fn forward_observed(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        all_logits: bool,
        observe: &mut dyn FnMut(Observation<'_>),
    ) -> Result<Vec<f32>, ForwardError> {
        let c = &self.config;
        let t = tokens.len();
        if t == 0 {
            return Ok(Vec::new());
        }
        let start = cache.len;
        if start + t > cache.capacity {
            return Err(ForwardError::ContextFull { capacity: cache.capacity, needed: start + t });
        }
        let mut x = vec![0.0f32; t * c.dim];
        let table = self.embedding.weights();
        for (row, &token) in x.chunks_exact_mut(c.dim).zip(tokens) {
            let token = token as usize;
            if token >= c.vocab {
                return Err(ForwardError::TokenOutOfRange { token, vocab: c.vocab });
            }
            table.fill(token, 0, row);
        }

        let mut h = vec![0.0f32; t * c.dim];
        let mut q = vec![0.0f32; t * c.dim];
        let mut k = vec![0.0f32; t * c.kv_dim()];
        let mut v = vec![0.0f32; t * c.kv_dim()];
        let mut attn = vec![0.0f32; t * c.dim];
        let mut proj = vec![0.0f32; t * c.dim];
        let mut gate = vec![0.0f32; t * c.ffn_dim];
        let mut up = vec![0.0f32; t * c.ffn_dim];
        for (layer, b) in self.blocks.iter().enumerate() {
            observe(Observation::BlockInput { block: layer, hidden: &x });
            rms_norm(&x, &b.attn_norm, c.norm_eps, &mut h);
            observe(Observation::LinearInput { block: layer, name: "attn_q", x: &h });
            self.linear(&h, t, &b.wq, &mut q);
            self.linear(&h, t, &b.wk, &mut k);
            self.linear(&h, t, &b.wv, &mut v);
            self.rope(&mut q, start, c.heads);
            self.rope(&mut k, start, c.kv_heads);
            cache.append(layer, start, &k, &v);
            self.attention(&q, cache, layer, start, t, &mut attn);
            observe(Observation::LinearInput { block: layer, name: "attn_output", x: &attn });
            self.linear(&attn, t, &b.wo, &mut proj);
            add_in_place(&mut x, &proj);

            rms_norm(&x, &b.ffn_norm, c.norm_eps, &mut h);
            observe(Observation::LinearInput { block: layer, name: "ffn_gate", x: &h });
            self.linear(&h, t, &b.w_gate, &mut gate);
            self.linear(&h, t, &b.w_up, &mut up);
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            observe(Observation::LinearInput { block: layer, name: "ffn_down", x: &gate });
            self.linear(&gate, t, &b.w_down, &mut proj);
            add_in_place(&mut x, &proj);
        }
        observe(Observation::BlockInput { block: self.blocks.len(), hidden: &x });
        cache.len = start + t;

        let rows = if all_logits { t } else { 1 };
        let last = &x[(t - rows) * c.dim..];
        let mut normed = vec![0.0f32; rows * c.dim];
        rms_norm(last, &self.output_norm, c.norm_eps, &mut normed);
        let mut logits = vec![0.0f32; rows * c.vocab];
        let output = self.output.as_deref().unwrap_or(&self.embedding);
        self.linear(&normed, rows, output, &mut logits);
        Ok(logits)
    }

    /// Rotates pairs `(2i, 2i + 1)` of the first `rope_dims` values of every head, at positions
    /// from `start` on, as llama.cpp's normal (not NeoX) rotary embedding does.
    fn rope(&self, x: &mut [f32], start: usize, heads: usize) {
        let hd = self.config.head_dim;
        for (i, row) in x.chunks_exact_mut(heads * hd).enumerate() {
            let pos = (start + i) as f32;
            for (pair, &freq) in self.inv_freq.iter().enumerate() {
                let (sin, cos) = (pos * freq).sin_cos();
                for head in row.chunks_exact_mut(hd) {
                    let (a, b) = (head[2 * pair], head[2 * pair + 1]);
                    head[2 * pair] = a * cos - b * sin;
                    head[2 * pair + 1] = a * sin + b * cos;
                }
            }
        }
    }

    /// Causal grouped-query attention of `t` new queries over the cache's first `start + t`
    /// positions, writing `[t, heads × head_dim]` to `out`.
    fn attention(
        &self,
        q: &[f32],
        cache: &KvCache,
        layer: usize,
        start: usize,
        t: usize,
        out: &mut [f32],
    ) {
        let c = &self.config;
        let hd = c.head_dim;
        let total = start + t;
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut q_head = vec![0.0f32; t * hd];
        let mut scores = vec![0.0f32; t * total];
        let mut head_out = vec![0.0f32; t * hd];
        for head in 0..c.heads {
            let kv_head = head / group;
            for (dst, row) in q_head.chunks_exact_mut(hd).zip(q.chunks_exact(c.dim)) {
                dst.copy_from_slice(&row[head * hd..(head + 1) * hd]);
            }
            let keys = cache.keys(layer, kv_head, total);
            let values = cache.values(layer, kv_head, total);
            self.linear_f32(&q_head, t, keys, hd, total, &mut scores);
            for (i, row) in scores.chunks_exact_mut(total).enumerate() {
                let visible = start + i + 1;
                softmax_prefix(row, visible, scale);
            }
            matmul(&scores, values, &mut head_out, t, total, hd);
            for (src, row) in head_out.chunks_exact(hd).zip(out.chunks_exact_mut(c.dim)) {
                row[head * hd..(head + 1) * hd].copy_from_slice(src);
            }
        }
    }
}

/// An event that [`Llama::forward_observed`] reports while it runs.
#[derive(Debug, Clone, Copy)]
pub enum Observation<'a> {
    /// The residual stream `[tokens, dim]` entering block `block`. Block `layers` is the
    /// stream after the last block.
    BlockInput {
        /// Block index in this model.
        block: usize,
        /// The hidden states.
        hidden: &'a [f32],
    },
    /// The input `[tokens, k]` of a block's linear layer. `attn_q` stands for the query, key
    /// and value projections, and `ffn_gate` for the gate and up projections, which read the
    /// same input.
    LinearInput {
        /// Block index in this model.
        block: usize,
        /// The GGUF name of the layer.
        name: &'static str,
        /// The input rows.
        x: &'a [f32],
    },
}

/// Input Gram matrices `XᵀX` of every block linear layer, in f64, gathered over calibration
/// text.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// Per block: Grams of the inputs of `attn_q`, `attn_output`, `ffn_gate` and `ffn_down`.
    grams: Vec<[Vec<f64>; 4]>,
    /// Tokens seen.
    pub tokens: usize,
}

impl Calibration {
    fn slot(name: &str) -> Option<usize> {
        match name {
            "attn_q" | "attn_k" | "attn_v" => Some(0),
            "attn_output" => Some(1),
            "ffn_gate" | "ffn_up" => Some(2),
            "ffn_down" => Some(3),
            _ => None,
        }
    }

    /// Returns the input Gram of layer `name` of block `block`, if gathered.
    pub fn gram(&self, block: usize, name: &str) -> Option<&[f64]> {
        let slot = Self::slot(name)?;
        self.grams.get(block).map(|g| g[slot].as_slice()).filter(|g| !g.is_empty())
    }
}

impl Llama {
    /// Runs `tokens` in windows of `window` and gathers the input Gram of every block linear
    /// layer. `progress` is called with the number of windows done.
    pub fn calibrate(
        &self,
        tokens: &[u32],
        window: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Calibration, ForwardError> {
        let c = &self.config;
        let widths = [c.dim, c.dim, c.dim, c.ffn_dim];
        let mut grams: Vec<[Vec<f64>; 4]> =
            (0..self.blocks.len()).map(|_| widths.map(|k| vec![0.0f64; k * k])).collect();
        let mut cache = self.new_cache(window.max(1));
        let mut windows = 0;
        for chunk in tokens.chunks(window.max(1)) {
            cache.clear();
            self.forward_observed(chunk, &mut cache, false, &mut |o| {
                if let Observation::LinearInput { block, name, x } = o {
                    if let Some(slot) = Calibration::slot(name) {
                        add_gram(&mut grams[block][slot], x, widths[slot]);
                    }
                }
            })?;
            windows += 1;
            progress(windows);
        }
        Ok(Calibration { grams, tokens: tokens.len() })
    }
}

/// Adds `xᵀx` of the rows of `x` (each `k` wide) to the `k × k` matrix `gram`.
fn add_gram(gram: &mut [f64], x: &[f32], k: usize) {
    let rows = x.len() / k;
    let a = faer::Mat::<f64>::from_fn(rows, k, |r, c| f64::from(x[r * k + c]));
    let product = a.transpose() * &a;
    for i in 0..k {
        for j in 0..k {
            gram[i * k + j] += product[(i, j)];
        }
    }
}

/// Scales the first `visible` scores, replaces them with their softmax and zeroes the rest.
fn softmax_prefix(row: &mut [f32], visible: usize, scale: f32) {
    let (live, masked) = row.split_at_mut(visible);
    masked.fill(0.0);
    let max = live.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s * scale));
    let mut sum = 0.0f32;
    for s in live.iter_mut() {
        *s = (*s * scale - max).exp();
        sum += *s;
    }
    for s in live.iter_mut() {
        *s /= sum;
    }
}

/// `out = x / sqrt(mean(x²) + eps) · weight`, row by row.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    for (row, dst) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mean_square = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (mean_square + eps).sqrt();
        for ((d, &v), &w) in dst.iter_mut().zip(row).zip(weight) {
            *d = v * inv * w;
        }
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Errors from [`Llama::forward`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ForwardError {
    /// The tokens do not fit in the cache.
    ContextFull {
        /// Positions the cache holds.
        capacity: usize,
        /// Positions the call needs.
        needed: usize,
    },
    /// A token id is not in the vocabulary.
    TokenOutOfRange {
        /// The token id.
        token: usize,
        /// Vocabulary size.
        vocab: usize,
    },
    /// The runtime failed on a packed model.
    Runtime(edgefold_runtime::Error),
}

impl fmt::Display for ForwardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardError::ContextFull { capacity, needed } => write!(
                f,
                "the context holds {capacity} tokens but {needed} are needed; \
                 use a shorter prompt or fewer new tokens"
            ),
            ForwardError::TokenOutOfRange { token, vocab } => {
                write!(f, "token id {token} is outside the vocabulary of {vocab}")
            }
            ForwardError::Runtime(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ForwardError {}

/// A key-value cache that could not be allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheAllocError {
    /// Positions requested.
    pub positions: usize,
    /// Bytes of the keys and values together.
    pub bytes: u128,
}

impl fmt::Display for CacheAllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "failed to allocate {} bytes for a key-value cache of {} positions",
            self.bytes, self.positions
        )
    }
}

impl std::error::Error for CacheAllocError {}

/// Keys and values of past positions, per layer and key-value head: `[layer][head][pos][dim]`.
#[derive(Debug, Clone)]
pub struct KvCache {
    keys: Vec<f32>,
    values: Vec<f32>,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
}

impl KvCache {
    fn new(c: &LlamaConfig, capacity: usize) -> KvCache {
        let size = c.layers * c.kv_heads * capacity * c.head_dim;
        KvCache {
            keys: vec![0.0; size],
            values: vec![0.0; size],
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            capacity,
            len: 0,
        }
    }

    fn try_new(c: &LlamaConfig, capacity: usize) -> Result<KvCache, CacheAllocError> {
        let per_position = (c.layers * c.kv_heads * c.head_dim) as u128;
        let floats = per_position * capacity as u128;
        let bytes = floats * 2 * std::mem::size_of::<f32>() as u128;
        let error = CacheAllocError { positions: capacity, bytes };
        let size = usize::try_from(floats).map_err(|_| error.clone())?;
        let keys = try_zeroed(size).ok_or_else(|| error.clone())?;
        let values = try_zeroed(size).ok_or(error)?;
        Ok(KvCache { keys, values, kv_heads: c.kv_heads, head_dim: c.head_dim, capacity, len: 0 })
    }

    /// Returns the number of positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Returns whether no position is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Returns the number of positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    fn head_start(&self, layer: usize, head: usize) -> usize {
        (layer * self.kv_heads + head) * self.capacity * self.head_dim
    }

    fn append(&mut self, layer: usize, start: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        let kv_dim = self.kv_heads * hd;
        for (i, (k_row, v_row)) in k.chunks_exact(kv_dim).zip(v.chunks_exact(kv_dim)).enumerate() {
            for head in 0..self.kv_heads {
                let at = self.head_start(layer, head) + (start + i) * hd;
                self.keys[at..at + hd].copy_from_slice(&k_row[head * hd..(head + 1) * hd]);
                self.values[at..at + hd].copy_from_slice(&v_row[head * hd..(head + 1) * hd]);
            }
        }
    }

    fn keys(&self, layer: usize, head: usize, positions: usize) -> &[f32] {
        let at = self.head_start(layer, head);
        &self.keys[at..at + positions * self.head_dim]
    }

    fn values(&self, layer: usize, head: usize, positions: usize) -> &[f32] {
        let at = self.head_start(layer, head);
        &self.values[at..at + positions * self.head_dim]
    }
}

/// Returns `len` zeros, or `None` when the allocator fails.
fn try_zeroed(len: usize) -> Option<Vec<f32>> {
    let mut values = Vec::new();
    values.try_reserve_exact(len).ok()?;
    values.resize(len, 0.0);
    Some(values)
}

/// Perplexity of a text, scored over non-overlapping windows.
#[derive(Debug, Clone, PartialEq)]
pub struct Perplexity {
    /// `exp` of the mean negative log-likelihood.
    pub perplexity: f64,
    /// Mean negative log-likelihood in nats per token.
    pub mean_nll: f64,
    /// Tokens scored (every token of a window but its first).
    pub scored: usize,
    /// Windows run.
    pub windows: usize,
}

/// A causal language model with its own key-value cache, run on the host ([`HostLm`]) or from a
/// packed file ([`packed::PackedLm`]).
pub trait CausalLm {
    /// Vocabulary size: the length of one row of logits.
    fn vocab(&self) -> usize;
    /// Positions the cache holds.
    fn capacity(&self) -> usize;
    /// Positions in the cache.
    fn len(&self) -> usize;
    /// Returns whether the cache is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Empties the cache.
    fn clear(&mut self);
    /// Runs `tokens` after the cached positions and returns the logits of every one of them
    /// (`all_logits`) or of the last.
    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>, ForwardError>;
}

/// A [`Llama`] with a cache, run on the host.
#[derive(Debug)]
pub struct HostLm {
    model: Llama,
    cache: KvCache,
}

impl HostLm {
    /// Pairs `model` with a cache of `capacity` positions.
    ///
    /// # Panics
    /// When the cache cannot be allocated; [`HostLm::try_new`] returns an error instead.
    pub fn new(model: Llama, capacity: usize) -> HostLm {
        let cache = model.new_cache(capacity);
        HostLm { model, cache }
    }

    /// Pairs `model` with a cache of `capacity` positions.
    ///
    /// # Errors
    /// When the cache cannot be allocated.
    pub fn try_new(model: Llama, capacity: usize) -> Result<HostLm, CacheAllocError> {
        let cache = model.try_new_cache(capacity)?;
        Ok(HostLm { model, cache })
    }

    /// Returns the model.
    pub fn model(&self) -> &Llama {
        &self.model
    }
}

impl CausalLm for HostLm {
    fn vocab(&self) -> usize {
        self.model.config.vocab
    }

    fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    fn len(&self) -> usize {
        self.cache.len()
    }

    fn clear(&mut self) {
        self.cache.clear();
    }

    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>, ForwardError> {
        self.model.forward(tokens, &mut self.cache, all_logits)
    }
}

/// Scores `tokens` in non-overlapping windows of `window` tokens, each run from an empty cache:
/// every token of a window after the first is predicted from the ones before it in the window.
/// A last partial window of at least two tokens is scored too. `progress` is called with the
/// number of windows done. The model's cache must hold `window` positions.
pub fn perplexity_of(
    lm: &mut dyn CausalLm,
    tokens: &[u32],
    window: usize,
    mut progress: impl FnMut(usize),
) -> Result<Perplexity, ForwardError> {
    let window = window.max(2);
    let vocab = lm.vocab();
    let mut total_nll = 0.0f64;
    let mut scored = 0usize;
    let mut windows = 0usize;
    for chunk in tokens.chunks(window).filter(|c| c.len() >= 2) {
        lm.clear();
        let logits = lm.forward(chunk, true)?;
        for (row, &next) in logits.chunks_exact(vocab).zip(&chunk[1..]) {
            total_nll += negative_log_likelihood(row, next as usize);
            scored += 1;
        }
        windows += 1;
        progress(windows);
    }
    let mean_nll = if scored == 0 { f64::NAN } else { total_nll / scored as f64 };
    Ok(Perplexity { perplexity: mean_nll.exp(), mean_nll, scored, windows })
}

/// [`perplexity_of`] for a host model with a cache of `window` positions.
pub fn perplexity(
    model: &Llama,
    tokens: &[u32],
    window: usize,
    progress: impl FnMut(usize),
) -> Result<Perplexity, ForwardError> {
    let mut lm = HostLm::new(model.clone(), window.max(2));
    perplexity_of(&mut lm, tokens, window, progress)
}

/// Returns `-log softmax(logits)[target]`, computed in f64.
pub fn negative_log_likelihood(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln() - logits[target] as f64
}
