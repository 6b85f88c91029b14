//! The planner on the MLPerf Tiny models, against the size of their int8 TFLite files: the
//! streaming wake word model scored by top-1 accuracy on its 45 labelled samples, and the anomaly
//! detection autoencoder scored by how well its reconstruction errors follow the original's.

mod common;

use std::path::Path;

use common::{mlperf_tiny_file, pack_graph};
use edgefold_compressor::calibrate::calibrate;
use edgefold_compressor::datasets::{self, Dataset};
use edgefold_compressor::exec::PackedGraph;
use edgefold_compressor::metrics::top1_accuracy;
use edgefold_compressor::npy::read_npz;
use edgefold_compressor::onnx::ImportOptions;
use edgefold_compressor::pipeline::load_graph;
use edgefold_compressor::planner::{plan, Evaluator, Goal, Task};
use edgefold_compressor::tensor::HostTensor;

/// The paths of MLPerf Tiny files, or `None` (after reporting the skip) when one is absent.
fn data_files<const N: usize>(names: [&str; N]) -> Option<[String; N]> {
    // Stops at the first missing file, so that one skip is reported.
    let paths: Vec<String> = names.iter().map_while(|name| mlperf_tiny_file(name)).collect();
    paths.try_into().ok()
}

/// Half the size of a file: the budget for "at least 50 % smaller".
fn half_of(path: &str) -> u64 {
    std::fs::metadata(path).expect("file exists").len() / 2
}

#[test]
fn wake_word_half_tflite_size() {
    let Some([onnx, tflite, samples]) = data_files([
        "str_ww_ref_model.onnx",
        "str_ww_ref_model.tflite",
        "str_ww_calibration_samples.npz",
    ]) else {
        return;
    };
    let budget = half_of(&tflite);
    let Dataset::Tensors { inputs, labels: Some(labels) } =
        datasets::load(Path::new(&samples)).expect("samples load")
    else {
        panic!("the wake word samples have inputs and labels");
    };
    assert_eq!(inputs.len(), 45);
    let samples: Vec<Vec<HostTensor>> = inputs.into_iter().map(|t| vec![t]).collect();

    let (graph, _) = load_graph(Path::new(&onnx), &ImportOptions::default()).expect("imports");
    let calibration = calibrate(&graph, &samples, |_| {}).expect("calibrates");
    let task = Task::Accuracy { samples: samples.clone(), labels: labels.clone() };
    let evaluator = Evaluator::new(&graph, task).expect("original runs");
    assert!((evaluator.baseline() - 41.0 / 45.0).abs() < 1e-9, "the original gets 41 right");
    let outcome = plan(&graph, &calibration, &evaluator, Goal::TargetSize(budget), 0, |_| {})
        .expect("a candidate fits");

    let packed_file = pack_graph(&outcome.graph);
    let file = packed_file.bytes();
    assert!(file.len() as u64 <= budget, "{} bytes, budget {budget}", file.len());
    let mut packed = PackedGraph::from_bytes(file).expect("opens");
    let outputs: Vec<Vec<HostTensor>> =
        samples.iter().map(|s| packed.run(s).expect("runs")).collect();
    let scores: Vec<&[f32]> = outputs.iter().map(|o| o[0].as_f32().expect("f32 scores")).collect();
    let right = (top1_accuracy(&scores, &labels) * 45.0).round() as usize;
    eprintln!("wake word: {} bytes (budget {budget}), {right} of 45 right", file.len());
    assert!(right >= 40, "only {right} of 45 right");
}

/// Deterministic standard normal values (xorshift and Box-Muller).
fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        })
        .collect()
}

/// The reference input and copies moved part of the way towards its reconstruction, with noise
/// of a tenth of the reference's spread: `(1 - t) * input + t * output + noise`.
fn towards_reconstruction(
    input: &[f32],
    output: &[f32],
    steps: &[f32],
    seed: u64,
) -> Vec<Vec<HostTensor>> {
    let mean = input.iter().sum::<f32>() / input.len() as f32;
    let spread =
        (input.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / input.len() as f32).sqrt();
    let mut samples = vec![vec![HostTensor::f32(vec![1, input.len()], input.to_vec())]];
    for (i, &t) in steps.iter().enumerate() {
        let noise = normal(input.len(), seed * 1000 + i as u64);
        let values = input
            .iter()
            .zip(output)
            .zip(noise)
            .map(|((&x, &y), e)| (1.0 - t) * x + t * y + 0.1 * spread * e)
            .collect();
        samples.push(vec![HostTensor::f32(vec![1, input.len()], values)]);
    }
    samples
}

#[test]
fn anomaly_half_tflite_size() {
    let Some([onnx, tflite, reference]) =
        data_files(["ad01_fp32.onnx", "ad01_int8.tflite", "ad01_fp32.npz"])
    else {
        return;
    };
    let budget = half_of(&tflite);
    let arrays = read_npz(Path::new(&reference)).expect("npz reads");
    let array = |name: &str| {
        let t = &arrays.iter().find(|(n, _)| n == name).expect("array present").1;
        t.as_f32().expect("f32").to_vec()
    };
    let (input, output) = (array("in0"), array("out0"));
    let calibration_steps: Vec<f32> = (0..63).map(|i| (i as f32 * 0.618_034).fract()).collect();
    let eval_steps: Vec<f32> = (1..=20).map(|i| i as f32 / 20.0).collect();
    let calibration_samples = towards_reconstruction(&input, &output, &calibration_steps, 1);
    let eval_samples = towards_reconstruction(&input, &output, &eval_steps, 2);

    let (graph, _) = load_graph(Path::new(&onnx), &ImportOptions::default()).expect("imports");
    let calibration = calibrate(&graph, &calibration_samples, |_| {}).expect("calibrates");
    let evaluator =
        Evaluator::new(&graph, Task::Anomaly { samples: eval_samples }).expect("original runs");
    let outcome = plan(&graph, &calibration, &evaluator, Goal::TargetSize(budget), 0, |_| {})
        .expect("a candidate fits");
    let packed_file = pack_graph(&outcome.graph);
    let file = packed_file.bytes();
    eprintln!(
        "anomaly autoencoder: {} bytes (budget {budget}), error correlation {:.5}, {}",
        file.len(),
        outcome.quality,
        outcome.scheme
    );
    assert!(file.len() as u64 <= budget, "{} bytes, budget {budget}", file.len());
    assert!(outcome.quality >= 0.99, "error correlation {}", outcome.quality);
}
