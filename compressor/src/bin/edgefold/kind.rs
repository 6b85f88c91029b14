//! The kind of model that a packed file contains, read from its metadata records. A subcommand
//! given a packed file of another kind names the subcommand that runs it, instead of failing on
//! a missing part.

use std::path::Path;

use anyhow::{bail, Result};

use edgefold_runtime::{MappedFile, Model, OpenOptions};

/// The kind of model in a packed file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PackedKind {
    /// A Llama-family language model with the `decoder.llama` record, which `generate` runs.
    LanguageModel,
    /// A Marian translation model with the `translator.marian` record, which `translate` runs.
    Translator,
    /// A graph of ops with an embedded `tokenizer.json`, which `embed` runs on sentences.
    SentenceEncoder,
    /// A graph of ops without a tokenizer, which `run` runs on .npy inputs.
    Graph,
}

impl PackedKind {
    /// Returns the kind of `model`.
    pub(crate) fn of(model: &Model<'_>) -> PackedKind {
        if model.metadata(edgefold_runtime::decoder::CONFIG_KEY).is_some() {
            PackedKind::LanguageModel
        } else if model.metadata(edgefold_runtime::translator::CONFIG_KEY).is_some() {
            PackedKind::Translator
        } else if model.metadata("tokenizer.json").is_some() {
            PackedKind::SentenceEncoder
        } else {
            PackedKind::Graph
        }
    }

    /// Returns the kind of the file at `path`, or `None` when it is no packed file or does not
    /// open as one. The subcommand then reports that with its own message. The weights'
    /// checksum is not verified here, so that a large file is not read twice.
    pub(crate) fn of_file(path: &Path) -> Option<PackedKind> {
        let map = MappedFile::open(path).ok()?;
        let model = Model::open_with(map.bytes(), OpenOptions { verify_weights: false }).ok()?;
        Some(PackedKind::of(&model))
    }

    /// Returns the identifier of the kind in JSON reports.
    pub(crate) fn id(self) -> &'static str {
        match self {
            PackedKind::LanguageModel => "language_model",
            PackedKind::Translator => "translation_model",
            PackedKind::SentenceEncoder => "sentence_encoder",
            PackedKind::Graph => "graph",
        }
    }

    /// Returns the noun phrase that names the kind in messages.
    pub(crate) fn noun(self) -> &'static str {
        match self {
            PackedKind::LanguageModel => "a language model",
            PackedKind::Translator => "a translation model",
            PackedKind::SentenceEncoder => "a sentence encoder (a graph with a tokenizer)",
            PackedKind::Graph => "a graph",
        }
    }

    /// Returns the subcommand that runs the kind, as users type it.
    pub(crate) fn subcommand(self) -> &'static str {
        match self {
            PackedKind::LanguageModel => "edgefold generate",
            PackedKind::Translator => "edgefold translate",
            PackedKind::SentenceEncoder => "edgefold embed",
            PackedKind::Graph => "edgefold run",
        }
    }
}

/// Checks that the packed file at `path` is of a kind in `accepted`, which `expected` names.
/// A file that is not a packed file, or does not open as one, passes, so that the subcommand
/// reports it with its own message.
///
/// # Errors
/// When the file contains another kind of model: the message names the kind and the
/// subcommand that runs it.
pub(crate) fn check_packed_kind(
    path: &Path,
    accepted: &[PackedKind],
    expected: &str,
) -> Result<()> {
    let Some(kind) = PackedKind::of_file(path) else { return Ok(()) };
    check_kind(path, kind, accepted, expected)
}

/// Checks that `model`, opened from `path`, is of a kind in `accepted`, which `expected` names.
///
/// # Errors
/// As [`check_packed_kind`].
pub(crate) fn check_model_kind(
    path: &Path,
    model: &Model<'_>,
    accepted: &[PackedKind],
    expected: &str,
) -> Result<()> {
    check_kind(path, PackedKind::of(model), accepted, expected)
}

fn check_kind(
    path: &Path,
    kind: PackedKind,
    accepted: &[PackedKind],
    expected: &str,
) -> Result<()> {
    if accepted.contains(&kind) {
        return Ok(());
    }
    bail!(
        "{} contains {}, not {expected}; run it with `{}`",
        path.display(),
        kind.noun(),
        kind.subcommand()
    )
}

/// Checks that `path`, given where a model of the kind that `expected` names belongs, is not a
/// GGUF language model or an ONNX graph, which only some subcommands take before packing. Other
/// files pass, so that the subcommand reports them with its own message.
///
/// # Errors
/// When the file starts with the GGUF magic bytes or has the `.onnx` extension: the message
/// names the format and the subcommand that takes it.
pub(crate) fn check_not_source_model(path: &Path, expected: &str) -> Result<()> {
    let mut head = [0u8; 4];
    let is_gguf = std::fs::File::open(path)
        .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut head))
        .is_ok_and(|()| &head == b"GGUF");
    if is_gguf {
        bail!(
            "{} is a GGUF language model, not {expected}; run it with `edgefold generate`",
            path.display()
        );
    }
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx")) {
        bail!(
            "{} is an ONNX graph, not {expected}; pack it with `edgefold compress` and run it \
             with `edgefold run` or `edgefold embed`",
            path.display()
        );
    }
    Ok(())
}
