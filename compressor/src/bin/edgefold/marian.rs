//! `edgefold compress` for Marian translation models: int4 storage of groups of matrices and
//! encoder layer removal, fixed or chosen by a search verified by BLEU, packed into one file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use edgefold_compressor::bleu::corpus_bleu;
use edgefold_compressor::marian::{
    pack, MarianCalibration, MarianModel, MarianPart, MatrixStorage,
};
use edgefold_compressor::pipeline::source_metadata;

use crate::output::{write_output, write_packed};
use crate::report::json_float;
use crate::translate::{find_model_files, ModelFiles, Translator};

/// Storage of a Marian model's matrices without a search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarianStorage {
    /// Every matrix as the file stores it (int8 for the Firefox Translations models).
    AsStored,
    /// The embedding and the feed-forward matrices as int4 groups of 32 (with error feedback
    /// when calibration sentences are given), the rest as stored.
    Int4,
}

/// Sentences whose matrix inputs give the error feedback statistics.
const GRAM_SENTENCES: usize = 300;

/// The storage that one step of the search gives a part's matrices.
#[derive(Debug, Clone, Copy)]
enum PartStorage {
    /// Symmetric int4 with error feedback from the calibration statistics.
    Gptq,
    /// Int4 rounded to the nearest grid point, with or without minimums.
    Rounded(MatrixStorage),
}

impl PartStorage {
    fn name(self) -> &'static str {
        match self {
            PartStorage::Gptq => "int4 (GPTQ)",
            PartStorage::Rounded(s) => s.name(),
        }
    }

    fn apply(self, model: &mut MarianModel, part: MarianPart, calibration: &MarianCalibration) {
        match self {
            PartStorage::Gptq => model.quantize_part_gptq(part, calibration),
            PartStorage::Rounded(s) => model.quantize_part(part, s),
        }
    }
}

/// Records the inputs of every matrix while the original translates the first
/// [`GRAM_SENTENCES`] of `sources`.
fn calibrate(translator: &Translator, sources: &[String]) -> Result<MarianCalibration> {
    let spinner = ProgressBar::new_spinner();
    spinner.set_message("recording the inputs of each matrix");
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let mut failure = None;
    let calibration = translator.model().calibrate(|model| {
        for source in sources.iter().take(GRAM_SENTENCES) {
            if let Err(e) = translator.translate_with(model, source) {
                failure = Some(e);
                break;
            }
        }
        Ok(())
    })?;
    spinner.finish_and_clear();
    match failure {
        Some(e) => Err(e.context("translating a calibration sentence failed")),
        None => Ok(calibration),
    }
}

/// Settings of `edgefold compress` for a Marian model.
pub struct MarianCompressOptions {
    /// Storage without a search.
    pub storage: MarianStorage,
    /// With it, the smallest model whose calibration BLEU keeps this fraction of the original's.
    pub min_quality: Option<f64>,
    /// Source sentences for the search, one per line.
    pub calibration: Option<PathBuf>,
    /// Reference translations, one per line of `calibration`.
    pub reference: Option<PathBuf>,
    /// Calibration sentences used, from the start of the file: two thirds score the search's
    /// candidates and the last third confirms the chosen model.
    pub samples: usize,
    /// Print one JSON object on stdout.
    pub json: bool,
}

/// Returns whether `path` is a Marian model: a directory with one, or a `.bin` file that is not
/// a lexical shortlist.
pub fn is_marian(path: &Path) -> bool {
    if path.is_dir() {
        return true;
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with(".bin") && !name.starts_with("lex.")
}

/// One step of the search: what it changes, and its size and quality once verified.
struct Step {
    change: String,
    bytes: usize,
    quality: f64,
    kept: bool,
}

/// Translates `sources` with `model` and returns the corpus BLEU against `references`.
fn bleu(
    translator: &Translator,
    model: &MarianModel,
    sources: &[String],
    references: &[String],
) -> Result<f64> {
    let mut hypotheses = Vec::with_capacity(sources.len());
    for (i, source) in sources.iter().enumerate() {
        let translation = translator
            .translate_with(model, source)
            .with_context(|| format!("translating calibration line {} failed", i + 1))?;
        hypotheses.push(translation);
    }
    Ok(corpus_bleu(&hypotheses, &[references])?.score)
}

fn read_lines(path: &Path, samples: usize) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text.lines().take(samples).map(|l| l.strip_suffix('\r').unwrap_or(l).to_owned()).collect())
}

/// Searches for the smallest model that keeps `floor` of the original's BLEU on the
/// calibration sentences. Each part's matrices, largest part first, are tried as int4 with
/// error feedback, then rounded int4, then int4 with minimums, and the first that meets the
/// floor is kept. Then each encoder layer is removed in turn, last first, and a removal is kept
/// only when the model without the layer meets the floor.
fn search(
    translator: &Translator,
    floor: f64,
    sentences: &Sentences,
    confirmation: &Sentences,
) -> Result<(MarianModel, f64, f64, Vec<Step>)> {
    let (sources, references) = (&sentences.sources[..], &sentences.references[..]);
    let original = translator.model();
    let baseline = bleu(translator, original, sources, references)?;
    if baseline <= 0.0 {
        bail!(
            "the original model scores BLEU {baseline:.2} on the calibration data, so no fraction \
             of it can be measured; check that --reference matches --calibration line by line"
        );
    }
    log::info!("original: BLEU {baseline:.2} on {} calibration sentences", sources.len());

    let calibration = calibrate(translator, sources)?;
    let storages = [
        PartStorage::Gptq,
        PartStorage::Rounded(MatrixStorage::Int4),
        PartStorage::Rounded(MatrixStorage::Int4Min),
    ];
    let layers = original.config().encoder_layers;
    let total = MarianPart::ALL.len() * storages.len() + layers;
    let bar = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("valid template"),
    );
    bar.set_message("searching");

    let mut current = original.clone();
    let mut quality = 1.0;
    let mut steps: Vec<Step> = Vec::new();
    let mut kept_changes: Vec<Change> = Vec::new();
    // Scores a candidate on the calibration sentences and returns its fraction of the original.
    let evaluate = |candidate: &MarianModel, change: &str| -> Result<f64> {
        let score = bleu(translator, candidate, sources, references)?;
        let fraction = score / baseline;
        log::info!(
            "{change}: BLEU {score:.2} ({:.2} % of the original), {} bytes",
            fraction * 100.0,
            candidate.weight_bytes()
        );
        bar.inc(1);
        Ok(fraction)
    };
    for part in MarianPart::ALL {
        // The first storage that meets the floor is kept. Error feedback comes first: rounded
        // int4 takes the same bytes but scores higher only by the noise of the calibration BLEU
        // on most parts, and such picks held up worse on other sentences.
        let mut tried: Vec<(f64, MarianModel, String, Change)> = Vec::new();
        for storage in storages {
            if tried.iter().any(|(fraction, ..)| *fraction >= floor) {
                bar.inc(1);
                continue;
            }
            let mut candidate = current.clone();
            storage.apply(&mut candidate, part, &calibration);
            let change = format!("{} as {}", part.name(), storage.name());
            let fraction = evaluate(&candidate, &change)?;
            tried.push((fraction, candidate, change, Change::Store(part, storage)));
        }
        let best = tried
            .iter()
            .enumerate()
            .filter(|(_, (fraction, ..))| *fraction >= floor)
            .max_by(|a, b| (a.1).0.total_cmp(&(b.1).0))
            .map(|(i, _)| i);
        for (i, (fraction, candidate, change, action)) in tried.into_iter().enumerate() {
            let kept = Some(i) == best;
            let bytes = candidate.weight_bytes();
            steps.push(Step { change, bytes, quality: fraction, kept });
            if kept {
                current = candidate;
                quality = fraction;
                kept_changes.push(action);
            }
        }
    }
    // Layers go last first, so a removal leaves the indices of the layers still to try as
    // they were.
    for layer in (0..layers).rev() {
        if current.config().encoder_layers == 1 {
            break;
        }
        let mut candidate = current.clone();
        candidate.remove_encoder_layers(&[layer])?;
        let change = format!("remove encoder layer {}", layer + 1);
        let fraction = evaluate(&candidate, &change)?;
        let kept = fraction >= floor;
        steps.push(Step { change, bytes: candidate.weight_bytes(), quality: fraction, kept });
        if kept {
            current = candidate;
            quality = fraction;
            kept_changes.push(Change::RemoveLayer(layer));
        }
    }
    bar.finish_and_clear();
    if confirmation.sources.is_empty() {
        return Ok((current, baseline, quality, steps));
    }

    // Many changes each kept at the floor overrate the result on the sentences that chose them,
    // so the model is scored again on sentences held apart. Changes are undone, last first,
    // until it meets the floor there.
    let (sources, references) = (&confirmation.sources[..], &confirmation.references[..]);
    let held_baseline = bleu(translator, original, sources, references)?;
    if held_baseline <= 0.0 {
        bail!("the original model scores BLEU 0 on the held-apart calibration sentences");
    }
    for count in (1..=kept_changes.len()).rev() {
        let mut model = original.clone();
        for change in &kept_changes[..count] {
            change.apply(&mut model, &calibration)?;
        }
        let fraction = bleu(translator, &model, sources, references)? / held_baseline;
        let kept = fraction >= floor;
        log::info!(
            "the first {count} kept changes keep {:.2} % on {} held-apart sentences: {}",
            fraction * 100.0,
            sources.len(),
            if kept { "confirmed" } else { "undoing the last" }
        );
        steps.push(Step {
            change: format!("confirm the first {count} kept changes on held-apart sentences"),
            bytes: model.weight_bytes(),
            quality: fraction,
            kept,
        });
        if kept {
            return Ok((model, held_baseline, fraction, steps));
        }
    }
    log::warn!(
        "no kept change meets the floor on the held-apart sentences; the model stays as it is"
    );
    Ok((original.clone(), held_baseline, 1.0, steps))
}

/// Source sentences and their reference translations.
struct Sentences {
    sources: Vec<String>,
    references: Vec<String>,
}

/// A change that the search kept, replayed on the original during confirmation.
#[derive(Clone, Copy)]
enum Change {
    Store(MarianPart, PartStorage),
    RemoveLayer(usize),
}

impl Change {
    fn apply(self, model: &mut MarianModel, calibration: &MarianCalibration) -> Result<()> {
        match self {
            Change::Store(part, storage) => storage.apply(model, part, calibration),
            Change::RemoveLayer(layer) => model.remove_encoder_layers(&[layer])?,
        }
        Ok(())
    }
}

/// Returns the tokenizer and the shortlist of the original that must be copied beside the output,
/// where `translate` looks for them, as (source, target) pairs. A file of the same name and the
/// same bytes already there needs no copy.
///
/// # Errors
/// When a file of the same name but other bytes is there, as another model's tokenizer or
/// shortlist would be: `translate` would then run this model with it.
fn companions_to_copy(files: &ModelFiles, output: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let dir = match output.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut pairs = Vec::new();
    for source in std::iter::once(&files.tokenizer).chain(&files.shortlist) {
        let Some(name) = source.file_name() else { continue };
        let target = dir.join(name);
        if !target.exists() {
            pairs.push((source.clone(), target));
            continue;
        }
        let read = |path: &Path| {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
        };
        if read(source)? != read(&target)? {
            bail!(
                "{} already exists and differs from the model's {}, so `translate` would run {} \
                 with another model's file; write the model into its own folder",
                target.display(),
                source.display(),
                output.display()
            );
        }
    }
    Ok(pairs)
}

/// Copies each (source, target) pair of [`companions_to_copy`] and returns the targets.
fn copy_companions(pairs: Vec<(PathBuf, PathBuf)>) -> Result<Vec<PathBuf>> {
    let mut copied = Vec::new();
    for (source, target) in pairs {
        let bytes =
            std::fs::read(&source).with_context(|| format!("cannot read {}", source.display()))?;
        write_output(&target, &bytes)?;
        copied.push(target);
    }
    Ok(copied)
}

/// Runs `edgefold compress` on a Marian model directory or `.bin` file.
pub fn cmd_compress_marian(
    model: &Path,
    output: &Path,
    options: MarianCompressOptions,
) -> Result<()> {
    let started = Instant::now();
    let translator = Translator::open(model, true, 1)?;
    let files = find_model_files(model, true)?;
    // Checked before the search and again before writing, so that a clash fails before minutes
    // of work.
    companions_to_copy(&files, output)?;
    let original_bytes = std::fs::metadata(&files.model)
        .with_context(|| format!("cannot read {}", files.model.display()))?
        .len();

    let (compressed, measured, steps) = match options.min_quality {
        Some(floor) => {
            if !(0.0..=1.0).contains(&floor) || floor == 0.0 {
                bail!("--min-quality {floor} is outside (0, 1]; give a fraction such as 0.97");
            }
            let calibration = options.calibration.as_deref().context(
                "--min-quality on a translation model needs --calibration SRC.txt (source \
                 sentences, one per line) and --reference REF.txt (their translations)",
            )?;
            let reference = options.reference.as_deref().context(
                "--min-quality on a translation model needs --reference REF.txt with one \
                 translation per line of --calibration",
            )?;
            if options.samples == 0 {
                bail!("--samples 0 leaves no calibration sentences; use 1 or more");
            }
            let mut sources = read_lines(calibration, options.samples)?;
            let mut references = read_lines(reference, options.samples)?;
            if sources.len() != references.len() || sources.is_empty() {
                bail!(
                    "{} gives {} sentences and {} gives {}; each calibration sentence needs one \
                     reference line",
                    calibration.display(),
                    sources.len(),
                    reference.display(),
                    references.len()
                );
            }
            // Two thirds choose the changes and the last third confirms the result.
            let held_apart = sources.len() / 3;
            let confirmation = Sentences {
                sources: sources.split_off(sources.len() - held_apart),
                references: references.split_off(references.len() - held_apart),
            };
            let sentences = Sentences { sources, references };
            let (model, baseline, quality, steps) =
                search(&translator, floor, &sentences, &confirmation)?;
            // With a confirmation, `baseline` and `quality` are those of the held-apart third.
            let scored = if held_apart > 0 { held_apart } else { sentences.sources.len() };
            (model, Some((baseline, quality, scored, held_apart > 0)), steps)
        }
        None => {
            let mut m = translator.model().clone();
            if options.storage == MarianStorage::Int4 {
                let calibration = match &options.calibration {
                    Some(path) => {
                        let sources = read_lines(path, options.samples.max(1))?;
                        Some(calibrate(&translator, &sources)?)
                    }
                    None => None,
                };
                for part in [MarianPart::Embedding, MarianPart::EncoderFfn, MarianPart::DecoderFfn]
                {
                    match &calibration {
                        Some(c) => m.quantize_part_gptq(part, c),
                        None => m.quantize_part(part, MatrixStorage::Int4),
                    }
                }
            }
            (m, None, Vec::new())
        }
    };

    let metadata = source_metadata(&files.model)?;
    let bytes = pack(&compressed, &metadata).context("cannot pack the translation model")?;
    let companions = companions_to_copy(&files, output)?;
    write_packed(output, &bytes)?;
    let copied = copy_companions(companions)?;
    for path in &copied {
        log::info!("copied {} beside the output", path.display());
    }
    let ratio = bytes.len() as f64 / original_bytes as f64;
    let seconds = started.elapsed().as_secs_f64();
    let config = compressed.config();
    if options.json {
        let report = json!({
            "model": model,
            "output": output,
            "source_bytes": original_bytes,
            "output_bytes": bytes.len(),
            "ratio": json_float(ratio),
            "encoder_layers": config.encoder_layers,
            "calibration_bleu": measured.map(|(b, ..)| json_float(b)),
            "quality": measured.map(|(_, q, ..)| json_float(q)),
            "calibration_sentences": measured.map(|(_, _, n, _)| n),
            "confirmed_on_held_apart_sentences": measured.map(|(.., confirmed)| confirmed),
            "steps": steps.iter().map(|s| json!({
                "change": s.change,
                "bytes": s.bytes,
                "quality": json_float(s.quality),
                "kept": s.kept,
            })).collect::<Vec<_>>(),
            "copied": copied,
            "seconds": seconds,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for s in &steps {
        println!(
            "  {:<40} {:>6.2} % of BLEU  {:>10} bytes  {}",
            s.change,
            s.quality * 100.0,
            s.bytes,
            if s.kept { "kept" } else { "turned down" }
        );
    }
    println!(
        "wrote {}: {} bytes, {:.1} % of {} ({} bytes), {} encoder layers{}, in {seconds:.1} s",
        output.display(),
        bytes.len(),
        ratio * 100.0,
        model.display(),
        original_bytes,
        config.encoder_layers,
        match measured {
            Some((b, q, n, confirmed)) => format!(
                "; keeps {:.2} % of the original's BLEU ({b:.2}) on {n} calibration sentences{}",
                q * 100.0,
                if confirmed { " that the search did not score" } else { "" }
            ),
            None => String::new(),
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns an empty directory for one test, under the system's temporary directory.
    fn scratch_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("edgefold-companions-{name}-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Writes a model directory with a tokenizer and a shortlist of the given contents.
    fn model_dir(dir: &Path, tokenizer: &[u8], shortlist: &[u8]) -> ModelFiles {
        std::fs::create_dir_all(dir).unwrap();
        let files = ModelFiles {
            model: dir.join("model.enpt.intgemm.alphas.bin"),
            tokenizer: dir.join("tokenizer.json"),
            shortlist: Some(dir.join("lex.50.50.enpt.s2t.bin")),
        };
        std::fs::write(&files.model, b"model").unwrap();
        std::fs::write(&files.tokenizer, tokenizer).unwrap();
        std::fs::write(files.shortlist.as_ref().unwrap(), shortlist).unwrap();
        files
    }

    #[test]
    fn companions_copied_into_empty_folder() {
        let dir = scratch_dir("empty");
        let files = model_dir(&dir.join("original"), b"tokenizer", b"shortlist");
        let output = dir.join("out").join("a.fold");
        std::fs::create_dir_all(output.parent().unwrap()).unwrap();

        let pairs = companions_to_copy(&files, &output).unwrap();
        let copied = copy_companions(pairs).unwrap();
        let tokenizer = dir.join("out/tokenizer.json");
        let shortlist = dir.join("out/lex.50.50.enpt.s2t.bin");
        assert_eq!(copied, vec![tokenizer.clone(), shortlist.clone()]);
        assert_eq!(std::fs::read(tokenizer).unwrap(), b"tokenizer");
        assert_eq!(std::fs::read(shortlist).unwrap(), b"shortlist");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn companions_with_same_bytes_kept() {
        let dir = scratch_dir("same");
        let files = model_dir(&dir.join("original"), b"tokenizer", b"shortlist");
        let output = dir.join("out").join("b.fold");
        model_dir(&dir.join("out"), b"tokenizer", b"shortlist");

        let pairs = companions_to_copy(&files, &output).unwrap();
        assert!(pairs.is_empty(), "identical files copied again: {:?}", pairs);
        // The output beside its own model: every companion is its own source.
        let beside = files.model.with_file_name("packed.fold");
        assert!(companions_to_copy(&files, &beside).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn companions_of_other_model_rejected() {
        let dir = scratch_dir("other");
        let files = model_dir(&dir.join("original"), b"tokenizer", b"shortlist");
        let output = dir.join("out").join("b.fold");

        model_dir(&dir.join("out"), b"another tokenizer", b"shortlist");
        let error = companions_to_copy(&files, &output).unwrap_err().to_string();
        assert!(error.contains(&dir.join("out/tokenizer.json").display().to_string()), "{error}");
        assert!(error.contains(&files.tokenizer.display().to_string()), "{error}");
        assert!(error.contains("its own folder"), "{error}");

        model_dir(&dir.join("out"), b"tokenizer", b"another shortlist");
        let error = companions_to_copy(&files, &output).unwrap_err().to_string();
        assert!(error.contains("lex.50.50.enpt.s2t.bin"), "{error}");
        assert_eq!(
            std::fs::read(dir.join("out/lex.50.50.enpt.s2t.bin")).unwrap(),
            b"another shortlist"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
