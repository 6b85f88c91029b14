//! `edgefold analyze`: singular spectra of a model's linear weights and, with calibration data,
//! whitened spectra, block influence and block similarity, printed or written as a report with
//! plots. The `llm` module analyzes GGUF models.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value as Json};

use edgefold_compressor::onnx::ImportOptions;
use edgefold_compressor::pipeline::load_graph;
use edgefold_compressor::spectrum::summarize;
use edgefold_compressor::tensor::HostTensor;
use edgefold_compressor::text::TextEncoder;

use crate::llm;
use crate::output::write_output;
use crate::report::{json_float_rows, json_floats, parse_at_least_one, print_json};

#[derive(clap::Args)]
pub(crate) struct AnalyzeArgs {
    /// The model: ONNX, or GGUF for a language model.
    model: PathBuf,
    /// Calibration data (.csv STS pairs, .txt sentences, .npz inputs): adds whitened spectra,
    /// block influence and block similarity. For GGUF models a text file (required), whose
    /// first 16 × --samples tokens are run in windows of 512.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Tokenizer for text calibration data (default: tokenizer.json beside the model).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Calibration samples used.
    #[arg(long, default_value_t = 256)]
    samples: usize,
    /// Largest sequence length of the calibration inputs.
    #[arg(long, default_value_t = 128, value_parser = parse_at_least_one)]
    max_seq: u32,
    /// Write report.json and plots (PNG and SVG) into this directory.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn cmd_analyze(args: AnalyzeArgs) -> Result<()> {
    if llm::is_gguf(&args.model)? {
        let Some(calibration) = &args.calibration else {
            bail!("analyzing a GGUF model needs --calibration TEXT, a text file to run it on");
        };
        let options = llm::AnalyzeOptions {
            calibration: calibration.clone(),
            tokens: args.samples.max(1) * 16,
            report: args.report.clone(),
            json: args.json,
        };
        return llm::cmd_analyze_gguf(&args.model, options);
    }
    use edgefold_compressor::calibrate::calibrate;
    use edgefold_compressor::datasets::{self, Dataset};
    use edgefold_compressor::spectrum::{elbow_rank, energy_rank};
    use edgefold_compressor::whiten::Whitening;

    let import = ImportOptions { max_batch: 1, max_seq: args.max_seq };
    let (graph, _) = load_graph(&args.model, &import)?;
    let calibration = match &args.calibration {
        None => None,
        Some(path) => {
            let data = datasets::load(path)?;
            let names: Vec<String> =
                graph.inputs.iter().map(|&v| graph.values[v].name.clone()).collect();
            let samples: Vec<Vec<HostTensor>> = match &data {
                Dataset::Tensors { inputs, .. } => {
                    inputs.iter().take(args.samples).map(|t| vec![t.clone()]).collect()
                }
                text => {
                    let tok = args
                        .tokenizer
                        .clone()
                        .or_else(|| {
                            args.model
                                .parent()
                                .map(|d| d.join("tokenizer.json"))
                                .filter(|p| p.exists())
                        })
                        .context("text calibration data needs --tokenizer")?;
                    let encoder = TextEncoder::from_file(&tok, args.max_seq as usize)?;
                    let mut sentences = datasets::sentences(text);
                    sentences.dedup();
                    sentences.truncate(args.samples);
                    datasets::text_samples(&encoder, &names, &sentences)
                        .map_err(anyhow::Error::msg)?
                }
            };
            let bar = ProgressBar::new(samples.len() as u64).with_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {eta}")
                    .expect("valid template"),
            );
            bar.set_message("calibrating");
            let c = calibrate(&graph, &samples, |i| bar.set_position(i as u64))?;
            bar.finish_and_clear();
            Some(c)
        }
    };
    let weights: Vec<(String, String, usize, usize, Vec<f32>)> = graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, edgefold_runtime::ops::Op::Linear { .. }))
        .filter_map(|n| {
            let v = &graph.values[n.inputs[1]?];
            let data = v.data.as_ref()?.as_f32()?.to_vec();
            let input = graph.values[n.inputs[0]?].name.clone();
            Some((
                v.name.clone(),
                input,
                v.shape[0].factor as usize,
                v.shape[1].factor as usize,
                data,
            ))
        })
        .collect();
    let bar = ProgressBar::new(weights.len() as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}").expect("valid template"),
    );
    bar.set_message("singular spectra");
    let mut matrices = Vec::new();
    for (name, input, n, k, data) in &weights {
        let s = summarize(data, *n, *k).with_context(|| format!("spectrum of {name}"))?;
        let whitened = match calibration.as_ref().and_then(|c| c.inputs.get(input)) {
            Some(stats) if stats.k == *k => {
                Some(Whitening::new(&stats.gram, *k)?.singular_values(data, *n)?)
            }
            _ => None,
        };
        matrices.push((name.clone(), s, whitened));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let matrix_json: Vec<Json> = matrices
        .iter()
        .map(|(name, s, w)| {
            let mut j = json!({
                "name": name, "rows": s.rows, "cols": s.cols, "elbow": s.elbow,
                "energy_90": s.energy_90, "energy_99": s.energy_99, "break_even": s.break_even,
                "singular_values": json_floats(&s.singular_values),
            });
            if let Some(w) = w {
                j["whitened"] = json!({
                    "elbow": elbow_rank(w), "energy_90": energy_rank(w, 0.9), "energy_99": energy_rank(w, 0.99),
                    "singular_values": json_floats(w),
                });
            }
            j
        })
        .collect();
    let blocks_json = calibration.as_ref().and_then(|c| c.blocks.as_ref()).map(|b| {
        json!({
            "blocks": b.blocks.iter().map(|x| x.index).collect::<Vec<_>>(),
            "influence": json_floats(&b.influence),
            "angular_distance": json_floats(&b.angular),
            "cosine": json_float_rows(&b.cosine),
            "cka": json_float_rows(&b.cka),
        })
    });
    let report = json!({
        "model": args.model,
        "calibration_samples": calibration.as_ref().map(|c| c.samples),
        "matrices": matrix_json,
        "blocks": blocks_json,
    });
    if let Some(dir) = &args.report {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("report.json");
        write_output(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        write_analysis_plots(dir, &matrices, calibration.as_ref())?;
        eprintln!("report written to {}", dir.display());
    }
    if args.json {
        print_json(&report);
        return Ok(());
    }
    println!(
        "{:<48} {:>11} {:>6} {:>6} {:>6} {:>10} {:>8} {:>8}",
        "linear weight", "shape", "elbow", "90%", "99%", "break-even", "w.elbow", "w.99%"
    );
    for (name, s, w) in &matrices {
        let (we, w99) = match w {
            Some(w) => (elbow_rank(w).to_string(), energy_rank(w, 0.99).to_string()),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<48} {:>11} {:>6} {:>6} {:>6} {:>10} {:>8} {:>8}",
            name,
            format!("{}x{}", s.rows, s.cols),
            s.elbow,
            s.energy_90,
            s.energy_99,
            s.break_even,
            we,
            w99
        );
    }
    let below = matrices.iter().filter(|(_, s, _)| s.energy_99 < s.break_even).count();
    println!(
        "{} matrices; {below} keep 99 % of their energy below the break-even rank",
        matrices.len()
    );
    if let Some(b) = calibration.as_ref().and_then(|c| c.blocks.as_ref()) {
        println!("block  influence (1 - cos)  angular distance");
        for (i, blk) in b.blocks.iter().enumerate() {
            println!("{:>5}  {:>19.5}  {:>16.5}", blk.index, b.influence[i], b.angular[i]);
        }
    } else if calibration.is_some() {
        println!("no repeated blocks found; block-level measurements skipped");
    }
    Ok(())
}

/// Writes the analysis plots (PNG and SVG): spectra, block influence and block similarity.
fn write_analysis_plots(
    dir: &Path,
    matrices: &[(String, edgefold_compressor::spectrum::SpectrumSummary, Option<Vec<f64>>)],
    calibration: Option<&edgefold_compressor::calibrate::Calibration>,
) -> Result<()> {
    use edgefold_compressor::plots::{
        plot_block_influence, plot_similarity, plot_spectra, SpectrumPlot,
    };
    // One plot per distinct weight shape, with up to six matrices each, keeps lines readable.
    let mut shapes: Vec<(usize, usize)> =
        matrices.iter().map(|(_, s, _)| (s.rows, s.cols)).collect();
    shapes.sort_unstable();
    shapes.dedup();
    for (rows, cols) in shapes {
        let spectra: Vec<SpectrumPlot> = matrices
            .iter()
            .filter(|(_, s, _)| (s.rows, s.cols) == (rows, cols))
            .take(6)
            .map(|(name, s, w)| SpectrumPlot {
                name,
                singular_values: &s.singular_values,
                whitened: w.as_deref(),
                elbow: s.elbow,
                energy_90: s.energy_90,
                energy_99: s.energy_99,
                break_even: s.break_even,
            })
            .collect();
        let title =
            format!("Singular spectra of {rows}x{cols} weights (solid raw, dashed whitened)");
        plot_spectra(dir, &format!("spectra_{rows}x{cols}"), &title, &spectra)?;
    }
    if let Some(b) = calibration.and_then(|c| c.blocks.as_ref()) {
        plot_block_influence(
            dir,
            "block_influence",
            "Block influence: 1 - cos(h_in, h_out) per block",
            &b.influence,
            &b.angular,
        )?;
        plot_similarity(
            dir,
            "similarity_cosine",
            "Mean token cosine similarity between block outputs",
            &b.cosine,
        )?;
        plot_similarity(dir, "similarity_cka", "Linear CKA between block outputs", &b.cka)?;
    }
    Ok(())
}
