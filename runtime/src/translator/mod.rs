//! Marian "tiny" translation models: a post-norm transformer encoder and a decoder whose layers
//! are an SSRU cell, cross-attention over the encoder output and a feed-forward block, each
//! followed by a residual connection and layer normalization.
//!
//! A file contains such a model as constant tensors in a fixed order and a configuration record in
//! its metadata under [`CONFIG_KEY`]; it has no op list. [`Translator`] encodes one source
//! sentence at a time and then runs the decoder one target token per step. The cross-attention
//! keys and values, the greedy search's SSRU cells and every intermediate live in the caller's
//! arena, whose size the record fixes through the maximum source length.
//!
//! The tensors keep Marian's names. First come `Wemb` `[vocab, dim]`, the token embedding and
//! output matrix, and `Wemb_b` `[vocab]`, the output bias. Each encoder layer L, from 1, follows
//! with the 16 tensors of [`ENCODER_PARTS`] named `encoder_lL_PART`, and each decoder layer with
//! the 21 tensors of [`DECODER_PARTS`] named `decoder_lL_PART`. Matrices are stored `[out, in]`
//! in any kind that [`Model::linear_weights`] accepts. Biases and layer normalization weights are
//! f32 vectors.
//!
//! The computation follows the host model of `edgefold-compressor` (`MarianModel`): embeddings
//! scaled by `sqrt(dim)` plus sinusoidal positions, ReLU feed-forward blocks, and logits from the
//! embedding matrix plus its bias.

mod check;
mod config;

pub use config::{
    PartShape, TranslatorConfig, CONFIG_KEY, CONFIG_LEN, DECODER_PARTS, ENCODER_PARTS,
};

use crate::cast::{cast, cast_mut};
use crate::error::{Error, Result};
use crate::format::SECTION_ALIGN;
use crate::kernels::generic::{F32Rows, WeightRows};
use crate::kernels::{self, Products, Weights};
use crate::model::Model;
use check::check_tensors;
use config::{
    decoder_base, encoder_base, Layout, DECODER_ATTENTION, DECODER_FFN, DECODER_SSRU,
    ENCODER_ATTENTION, ENCODER_FFN,
};

/// The arena split into its parts.
struct Parts<'s> {
    x: &'s mut [f32],
    q: &'s mut [f32],
    k: &'s mut [f32],
    v: &'s mut [f32],
    attn: &'s mut [f32],
    proj: &'s mut [f32],
    hidden: &'s mut [f32],
    scores: &'s mut [f32],
    context: &'s mut [f32],
    step: &'s mut [f32],
    step_hidden: &'s mut [f32],
    cells: &'s mut [f32],
    logits: &'s mut [f32],
    row: &'s mut [f32],
}

/// A translation model ready to run: the model, and the encoded sentence and scratch in the
/// caller's arena.
pub struct Translator<'m, 'a> {
    model: Model<'m>,
    config: TranslatorConfig,
    layout: Layout,
    arena: &'a mut [f32],
    /// Tokens of the encoded source sentence, 0 before [`Translator::encode`] succeeds.
    source_len: usize,
    products: Products,
}

impl<'m, 'a> Translator<'m, 'a> {
    /// Reads the configuration of `model`, checks every named tensor against it, and places the
    /// scratch in `arena`, whose start is rounded up to a 64-byte boundary.
    ///
    /// # Errors
    /// [`Error::NotATranslator`] without a configuration record, [`Error::InvalidTranslator`]
    /// when the record is invalid or a tensor is missing, misnamed or misshapen, and
    /// [`Error::ArenaTooSmall`] with the bytes needed.
    pub fn new(model: &Model<'m>, arena: &'a mut [u8]) -> Result<Self> {
        let record = model.metadata(CONFIG_KEY).ok_or(Error::NotATranslator)?;
        let config = TranslatorConfig::parse(record)?;
        let layout = config.layout().ok_or(Error::InvalidTranslator {
            tensor: u32::MAX,
            reason: "the arena size overflows",
        })?;
        check_tensors(model, &config)?;

        let bytes = layout.total * 4;
        let pad = arena.as_ptr().align_offset(SECTION_ALIGN);
        let too_small = Error::ArenaTooSmall {
            required: bytes.saturating_add(SECTION_ALIGN - 1) as u64,
            provided: arena.len() as u64,
        };
        if pad >= SECTION_ALIGN || arena.len() < pad.saturating_add(bytes) {
            return Err(too_small);
        }
        let arena = cast_mut::<f32>(&mut arena[pad..pad + bytes]).ok_or(too_small)?;
        Ok(Translator {
            model: *model,
            config,
            layout,
            arena,
            source_len: 0,
            products: Products { threads: 1, int8: false },
        })
    }

    /// Returns the configuration read from the file.
    pub fn config(&self) -> &TranslatorConfig {
        &self.config
    }

    /// Returns the number of tokens of the encoded source sentence, 0 before the first
    /// successful [`Translator::encode`].
    pub fn source_len(&self) -> usize {
        self.source_len
    }

    /// Lets the matrix products split their work across up to `threads` threads (at least 1).
    #[cfg(feature = "std")]
    pub fn set_threads(&mut self, threads: usize) {
        self.products.threads = threads.max(1);
    }

    /// Lets the matrix products quantize their inputs to int8 where an integer kernel exists for
    /// the weights and the CPU ([`kernels::linear_int8`]): faster, at the cost of rounding the
    /// inputs. Off by default: then results follow the stored weights in f32. The output layer
    /// always runs in f32.
    pub fn set_int8_activations(&mut self, on: bool) {
        self.products.int8 = on;
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
            x: take(p[0]),
            q: take(p[1]),
            k: take(p[2]),
            v: take(p[3]),
            attn: take(p[4]),
            proj: take(p[5]),
            hidden: take(p[6]),
            scores: take(p[7]),
            context: take(p[8]),
            step: take(p[9]),
            step_hidden: take(p[10]),
            cells: take(p[11]),
            logits: take(p[12]),
            row: take(p[13]),
        }
    }

    /// Runs the encoder on `source`, token ids that end with `</s>`, and stores each decoder
    /// layer's cross-attention keys and values for the sentence in the arena.
    ///
    /// # Errors
    /// [`Error::InvalidTranslatorInput`] for an empty source, [`Error::SourceTooLong`] beyond
    /// [`TranslatorConfig::max_source`] tokens, and [`Error::TokenOutOfRange`] for an id outside
    /// the vocabulary. After an error no sentence is encoded.
    pub fn encode(&mut self, source: &[u32]) -> Result<()> {
        self.source_len = 0;
        let c = self.config;
        if source.is_empty() {
            return Err(Error::InvalidTranslatorInput { reason: "the source has no tokens" });
        }
        if source.len() > c.max_source as usize {
            return Err(Error::SourceTooLong { capacity: c.max_source, len: source.len() as u64 });
        }
        self.check_tokens(source)?;

        let model = self.model;
        let products = self.products;
        let (n, dim) = (source.len(), c.dim as usize);
        let p = self.parts();
        let x = &mut p.x[..n * dim];
        let embedding = weights_at(&model, 0)?;
        for (position, (row, &token)) in x.chunks_exact_mut(dim).zip(source).enumerate() {
            embed(&embedding, Some(token), position, row);
        }

        for layer in 0..c.encoder_layers {
            let base = encoder_base(&c, layer);
            let at = base + ENCODER_ATTENTION;
            let q = &mut p.q[..n * dim];
            let k = &mut p.k[..n * dim];
            let v = &mut p.v[..n * dim];
            project(&model, products, at, x, n, q)?;
            project(&model, products, at + 2, x, n, k)?;
            project(&model, products, at + 4, x, n, v)?;
            let attn = &mut p.attn[..n * dim];
            attend(&c, q, k, v, n, &mut p.scores[..n], attn);
            let proj = &mut p.proj[..n * dim];
            project(&model, products, at + 6, attn, n, proj)?;
            normalize_at(&model, &c, at + 8, x, proj)?;

            let hidden = &mut p.hidden[..n * c.ffn_dim as usize];
            let ffn = FeedForwardScratch { hidden, out: proj };
            feed_forward(&model, products, &c, base + ENCODER_FFN, x, n, ffn)?;
        }

        let rows = n * dim;
        for layer in 0..c.decoder_layers {
            let at = decoder_base(&c, layer) + DECODER_ATTENTION;
            let (keys, values) = context_at(p.context, layer as usize, c.max_source as usize, dim);
            project(&model, products, at + 2, x, n, &mut keys[..rows])?;
            project(&model, products, at + 4, x, n, &mut values[..rows])?;
        }
        self.source_len = n;
        Ok(())
    }

    /// Runs one decoder step over the encoded sentence and returns the logits of the next token:
    /// over `candidates` in their order, or over the whole vocabulary without them.
    ///
    /// `cells` contains the SSRU cells, `decoder_layers × dim` values that are zero before the
    /// first step and that the step updates. `token` is the previous target token (`None` at the
    /// first step, which embeds zeros), and `position` is the number of steps taken before this
    /// one, whose sinusoidal signal is added to the token's embedding.
    ///
    /// # Errors
    /// [`Error::NoSourceEncoded`] before a successful [`Translator::encode`],
    /// [`Error::InvalidTranslatorInput`] when `cells` has another length or there are more
    /// candidates than vocabulary entries, and [`Error::TokenOutOfRange`] for a token or
    /// candidate outside the vocabulary.
    pub fn step(
        &mut self,
        cells: &mut [f32],
        token: Option<u32>,
        position: usize,
        candidates: Option<&[u32]>,
    ) -> Result<&[f32]> {
        if self.source_len == 0 {
            return Err(Error::NoSourceEncoded);
        }
        if cells.len() != self.layout.parts[11] {
            return Err(Error::InvalidTranslatorInput {
                reason: "the cells are not decoder_layers × dim values",
            });
        }
        if let Some(token) = token {
            self.check_tokens(&[token])?;
        }
        self.check_candidates(candidates)?;

        self.parts().cells.copy_from_slice(cells);
        let count = self.run_step(token, position, candidates)?;
        let p = self.parts();
        cells.copy_from_slice(p.cells);
        let logits_at = self.logits_offset();
        Ok(&self.arena[logits_at..logits_at + count])
    }

    /// Translates `source`, token ids that end with `</s>`, by greedy search over `candidates`
    /// (a lexical shortlist) or the whole vocabulary, writes the target ids without `</s>` to
    /// `out`, and returns how many it wrote. The search stops at `</s>` or when `out` is full.
    ///
    /// # Errors
    /// As [`Translator::encode`] and [`Translator::step`], and
    /// [`Error::InvalidTranslatorInput`] when `candidates` is empty.
    pub fn translate_greedy(
        &mut self,
        source: &[u32],
        candidates: Option<&[u32]>,
        out: &mut [u32],
    ) -> Result<usize> {
        if candidates.is_some_and(<[u32]>::is_empty) {
            return Err(Error::InvalidTranslatorInput { reason: "the candidate list is empty" });
        }
        self.check_candidates(candidates)?;
        self.encode(source)?;
        self.parts().cells.fill(0.0);

        let logits_at = self.logits_offset();
        let mut previous = None;
        let mut written = 0;
        while written < out.len() {
            let count = self.run_step(previous, written, candidates)?;
            let best = argmax(&self.arena[logits_at..logits_at + count]);
            let token = match candidates {
                Some(ids) => ids[best],
                None => best as u32,
            };
            if token == self.config.eos {
                break;
            }
            out[written] = token;
            written += 1;
            previous = Some(token);
        }
        Ok(written)
    }

    fn logits_offset(&self) -> usize {
        self.layout.parts[..12].iter().sum()
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.config.vocab;
        match tokens.iter().find(|&&t| t >= vocab) {
            Some(&token) => Err(Error::TokenOutOfRange { token, vocab }),
            None => Ok(()),
        }
    }

    fn check_candidates(&self, candidates: Option<&[u32]>) -> Result<()> {
        let Some(ids) = candidates else { return Ok(()) };
        if ids.len() > self.config.vocab as usize {
            return Err(Error::InvalidTranslatorInput {
                reason: "there are more candidates than vocabulary entries",
            });
        }
        self.check_tokens(ids)
    }

    /// Runs one decoder step with the cells in the arena, on inputs already checked, writes the
    /// logits to the arena and returns their count.
    fn run_step(
        &mut self,
        token: Option<u32>,
        position: usize,
        candidates: Option<&[u32]>,
    ) -> Result<usize> {
        let c = self.config;
        let model = self.model;
        let products = self.products;
        let (n, dim) = (self.source_len, c.dim as usize);
        let p = self.parts();
        let (y, rest) = p.step.split_at_mut(dim);
        let (forget, rest) = rest.split_at_mut(dim);
        let (input, rest) = rest.split_at_mut(dim);
        let (q, rest) = rest.split_at_mut(dim);
        let (mixed, proj) = rest.split_at_mut(dim);

        let embedding = weights_at(&model, 0)?;
        embed(&embedding, token, position, y);
        for layer in 0..c.decoder_layers {
            let base = decoder_base(&c, layer);
            let cell = &mut p.cells[layer as usize * dim..][..dim];
            let gates = SsruScratch { forget: &mut *forget, input: &mut *input };
            ssru(&model, products, &c, base + DECODER_SSRU, y, cell, gates)?;

            let at = base + DECODER_ATTENTION;
            project(&model, products, at, y, 1, q)?;
            let (keys, values) = context_at(p.context, layer as usize, c.max_source as usize, dim);
            attend_over(&c, q, &keys[..n * dim], &values[..n * dim], &mut p.scores[..n], mixed);
            project(&model, products, at + 6, mixed, 1, proj)?;
            normalize_at(&model, &c, at + 8, y, proj)?;

            let ffn = FeedForwardScratch { hidden: &mut *p.step_hidden, out: &mut *proj };
            feed_forward(&model, products, &c, base + DECODER_FFN, y, 1, ffn)?;
        }

        output_logits(&model, products, &c, y, candidates, p.logits, p.row)
    }
}

struct SsruScratch<'s> {
    forget: &'s mut [f32],
    input: &'s mut [f32],
}

/// Applies the SSRU cell whose tensors start at `index` to the row `y` in place, updating `cell`:
/// `f = sigmoid(y Wfᵀ + bf)`, `cell = f cell + (1 - f) y Wᵀ`, `y = norm(y + relu(cell))`.
fn ssru(
    model: &Model<'_>,
    products: Products,
    c: &TranslatorConfig,
    index: u32,
    y: &mut [f32],
    cell: &mut [f32],
    s: SsruScratch<'_>,
) -> Result<()> {
    project(model, products, index + 1, y, 1, s.forget)?;
    products.linear(y, 1, weights_at(model, index)?, None, s.input);
    for ((state, &f), out) in cell.iter_mut().zip(s.forget.iter()).zip(s.input.iter_mut()) {
        let f = sigmoid(f);
        *state = f * *state + (1.0 - f) * *out;
        *out = state.max(0.0);
    }
    normalize_at(model, c, index + 3, y, s.input)
}

/// Writes the logits of the hidden row `y` to `logits`, over `candidates` in their order or over
/// the whole vocabulary, and returns their count. `row` is scratch for one embedding row.
fn output_logits(
    model: &Model<'_>,
    products: Products,
    c: &TranslatorConfig,
    y: &[f32],
    candidates: Option<&[u32]>,
    logits: &mut [f32],
    row: &mut [f32],
) -> Result<usize> {
    let embedding = weights_at(model, 0)?;
    let bias = vector_at(model, 1)?;
    let Some(ids) = candidates else {
        // The output layer runs in f32 whatever the settings, as the host model's does.
        let f32_products = Products { threads: products.threads, int8: false };
        let logits = &mut logits[..c.vocab as usize];
        f32_products.linear(y, 1, embedding, Some(bias), logits);
        return Ok(logits.len());
    };
    let dim = c.dim as usize;
    for (&id, logit) in ids.iter().zip(logits.iter_mut()) {
        fill_row(&embedding, id as usize, row);
        let weights = Weights::F32(F32Rows { w: row, k: dim });
        let b = &bias[id as usize..id as usize + 1];
        kernels::linear(y, 1, dim, weights, 1, Some(b), core::slice::from_mut(logit));
    }
    Ok(ids.len())
}

/// Returns the keys and values `[max_source, dim]` of decoder layer `layer` in the cross-attention
/// part of the arena, laid out `[layer][keys, values][max_source][dim]`.
fn context_at(
    context: &mut [f32],
    layer: usize,
    max_source: usize,
    dim: usize,
) -> (&mut [f32], &mut [f32]) {
    let rows = max_source * dim;
    context[layer * 2 * rows..][..2 * rows].split_at_mut(rows)
}

/// Computes `y = x Wᵀ + b` with the matrix at `index` and its bias at `index + 1`, for `rows` rows.
fn project(
    model: &Model<'_>,
    products: Products,
    index: u32,
    x: &[f32],
    rows: usize,
    y: &mut [f32],
) -> Result<()> {
    let bias = vector_at(model, index + 1)?;
    products.linear(x, rows, weights_at(model, index)?, Some(bias), y);
    Ok(())
}

struct FeedForwardScratch<'s> {
    hidden: &'s mut [f32],
    out: &'s mut [f32],
}

/// Applies the feed-forward block whose tensors start at `index` to `rows` rows of `x` in place:
/// `x = norm(x + relu(x W1ᵀ + b1) W2ᵀ + b2)`.
fn feed_forward(
    model: &Model<'_>,
    products: Products,
    c: &TranslatorConfig,
    index: u32,
    x: &mut [f32],
    rows: usize,
    s: FeedForwardScratch<'_>,
) -> Result<()> {
    let hidden = &mut s.hidden[..rows * c.ffn_dim as usize];
    let out = &mut s.out[..rows * c.dim as usize];
    project(model, products, index, x, rows, hidden)?;
    for h in hidden.iter_mut() {
        *h = h.max(0.0);
    }
    project(model, products, index + 2, hidden, rows, out)?;
    normalize_at(model, c, index + 4, x, out)
}

/// Adds `residual` to `x` and applies the layer normalization whose scale is at `index` and
/// bias at `index + 1`, row by row.
fn normalize_at(
    model: &Model<'_>,
    c: &TranslatorConfig,
    index: u32,
    x: &mut [f32],
    residual: &[f32],
) -> Result<()> {
    let scale = vector_at(model, index)?;
    let bias = vector_at(model, index + 1)?;
    let dim = c.dim as usize;
    for (row, res) in x.chunks_exact_mut(dim).zip(residual.chunks_exact(dim)) {
        for (v, &r) in row.iter_mut().zip(res) {
            *v += r;
        }
        let mean = row.iter().sum::<f32>() / dim as f32;
        let variance = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
        let inv = 1.0 / libm::sqrtf(variance + c.norm_eps);
        for ((v, &s), &b) in row.iter_mut().zip(scale).zip(bias) {
            *v = (*v - mean) * inv * s + b;
        }
    }
    Ok(())
}

/// Computes multi-head attention of the `n` rows of `q` over the `n` rows of `k` and `v`, writing the
/// heads' outputs side by side to `out`.
fn attend(
    c: &TranslatorConfig,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let dim = c.dim as usize;
    for (query, target) in q.chunks_exact(dim).zip(out.chunks_exact_mut(dim)).take(n) {
        attend_over(c, query, k, v, scores, target);
    }
}

/// Computes multi-head attention of one query row over every row of `k` and `v`. Per head, a
/// softmax of the scaled dot products weights the value rows.
fn attend_over(
    c: &TranslatorConfig,
    query: &[f32],
    k: &[f32],
    v: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (dim, head_dim) = (c.dim as usize, c.head_dim() as usize);
    let scale = 1.0 / libm::sqrtf(head_dim as f32);
    out.fill(0.0);
    for h in 0..c.heads as usize {
        let cols = h * head_dim..(h + 1) * head_dim;
        let q_head = &query[cols.clone()];
        for (score, key) in scores.iter_mut().zip(k.chunks_exact(dim)) {
            *score = dot(q_head, &key[cols.clone()]) * scale;
        }
        softmax_in_place(scores);
        let target = &mut out[cols.clone()];
        for (&weight, value) in scores.iter().zip(v.chunks_exact(dim)) {
            for (t, &x) in target.iter_mut().zip(&value[cols.clone()]) {
                *t += weight * x;
            }
        }
    }
}

/// Returns the dot product, summed left to right as the host model sums it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn softmax_in_place(values: &mut [f32]) {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in values.iter_mut() {
        *v = libm::expf(*v - max);
        sum += *v;
    }
    for v in values.iter_mut() {
        *v /= sum;
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + libm::expf(-x))
}

/// Returns the index of the largest value, the first one on ties, and 0 for no values.
fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// Writes the embedding of `token` scaled by `sqrt(dim)`, or zeros for `None`, plus the
/// sinusoidal signal of `position` into `row`.
fn embed(embedding: &Weights<'_>, token: Option<u32>, position: usize, row: &mut [f32]) {
    match token {
        Some(token) => {
            fill_row(embedding, token as usize, row);
            let scale = libm::sqrtf(row.len() as f32);
            for v in row.iter_mut() {
                *v *= scale;
            }
        }
        None => row.fill(0.0),
    }
    add_position(row, position);
}

/// Adds Marian's sinusoidal position signal to one row: sines in the first half and cosines in
/// the second, with timescales from 1 to 10,000 spaced as `10000^(i / (dim/2 - 1))`.
fn add_position(row: &mut [f32], position: usize) {
    let half = row.len() / 2;
    let increment = libm::logf(10000.0) / (half as f32 - 1.0).max(1.0);
    for i in 0..half {
        let angle = position as f32 * libm::expf(-(i as f32) * increment);
        row[i] += libm::sinf(angle);
        row[half + i] += libm::cosf(angle);
    }
}

/// Writes row `row` of `w` to `out` as f32.
fn fill_row(w: &Weights<'_>, row: usize, out: &mut [f32]) {
    match w {
        Weights::F32(w) => w.fill(row, 0, out),
        Weights::F16(w) => w.fill(row, 0, out),
        Weights::I8(w) => w.fill(row, 0, out),
        Weights::I4(w) => w.fill(row, 0, out),
    }
}

/// Returns the matrix at tensor `index`, checked by [`check_tensors`].
fn weights_at<'a>(model: &Model<'a>, index: u32) -> Result<Weights<'a>> {
    let t = model.tensor(index)?;
    model.linear_weights(&t).ok_or(Error::InvalidTranslator {
        tensor: index,
        reason: "the matrix's data does not match its shape",
    })
}

/// Returns the f32 vector at tensor `index`.
fn vector_at<'a>(model: &Model<'a>, index: u32) -> Result<&'a [f32]> {
    let t = model.tensor(index)?;
    cast::<f32>(model.const_bytes(&t)).ok_or(Error::InvalidTranslator {
        tensor: index,
        reason: "a bias or layer normalization weight is not f32",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one() {
        let mut values = [1.0f32, 2.0, 3.0];
        softmax_in_place(&mut values);
        let sum: f32 = values.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6, "{values:?}");
        assert!(values[2] > values[1]);
    }
}
