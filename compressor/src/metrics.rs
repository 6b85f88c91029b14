//! Quality metrics on model outputs, shared by `edgefold eval` and the planner: top-1 accuracy
//! against labels, and the agreement of autoencoder reconstruction errors with the original's.

use crate::tensor::HostTensor;
use crate::text::pearson;

/// Returns the index of the largest value: the first one on ties, 0 for an empty slice. NaN never
/// wins.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] || values[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best
}

/// Returns the fraction of samples whose top class (the argmax over `scores[i]`) equals
/// `labels[i]`. Samples beyond the shorter of the two lists are ignored, and an empty list scores 0.
pub fn top1_accuracy(scores: &[&[f32]], labels: &[i64]) -> f64 {
    let n = scores.len().min(labels.len());
    if n == 0 {
        return 0.0;
    }
    let right = scores.iter().zip(labels).filter(|(s, &l)| argmax(s) as i64 == l).count();
    right as f64 / n as f64
}

/// Returns the mean squared difference between an autoencoder's input and its reconstruction, the
/// anomaly score of the MLPerf Tiny autoencoder. `None` when the lengths differ or are 0.
pub fn reconstruction_error(input: &[f32], output: &[f32]) -> Option<f64> {
    if input.len() != output.len() || input.is_empty() {
        return None;
    }
    let sum: f64 = input.iter().zip(output).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    Some(sum / input.len() as f64)
}

/// Returns the Pearson correlation of a compressed model's reconstruction errors with the
/// original's on the same samples: 1 when the compressed model ranks and spaces anomalies as the
/// original does. A single sample or constant errors give NaN, but identical lists give 1.
pub fn error_correlation(original: &[f64], compressed: &[f64]) -> f64 {
    if original == compressed {
        return 1.0;
    }
    pearson(original, compressed)
}

/// Returns the reconstruction error of each sample: its first input against its first output.
///
/// # Errors
/// A message naming the sample whose output size differs from its input.
pub fn reconstruction_errors(
    inputs: &[Vec<HostTensor>],
    outputs: &[Vec<HostTensor>],
) -> Result<Vec<f64>, String> {
    inputs
        .iter()
        .zip(outputs)
        .enumerate()
        .map(|(i, (x, y))| {
            let x = x.first().and_then(HostTensor::as_f32);
            let y = y.first().and_then(HostTensor::as_f32);
            match (x, y) {
                (Some(x), Some(y)) => reconstruction_error(x, y).ok_or_else(|| {
                    format!(
                        "sample {i}: the output has {} values and the input {}; an anomaly \
                         score needs an autoencoder whose first output matches its first input",
                        y.len(),
                        x.len()
                    )
                }),
                _ => Err(format!("sample {i}: the first input or output is not f32")),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_ties_and_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, -2.0]), 1);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn accuracy_counts_top_classes() {
        let a = [0.1f32, 0.9, 0.0];
        let b = [0.8f32, 0.1, 0.1];
        let c = [0.0f32, 0.2, 0.7];
        let scores: Vec<&[f32]> = vec![&a, &b, &c];
        assert_eq!(top1_accuracy(&scores, &[1, 0, 1]), 2.0 / 3.0);
        assert_eq!(top1_accuracy(&scores, &[]), 0.0);
    }

    #[test]
    fn reconstruction_error_mean_squared() {
        assert_eq!(reconstruction_error(&[1.0, 2.0], &[1.0, 4.0]), Some(2.0));
        assert_eq!(reconstruction_error(&[1.0], &[1.0, 2.0]), None);
    }

    #[test]
    fn error_correlation_scaled_and_shuffled() {
        let original = [0.5, 1.0, 4.0, 2.5];
        let scaled: Vec<f64> = original.iter().map(|e| 3.0 * e + 1.0).collect();
        assert!((error_correlation(&original, &scaled) - 1.0).abs() < 1e-12);
        let shuffled = [4.0, 0.5, 1.0, 2.5];
        assert!(error_correlation(&original, &shuffled) < 0.5);
        assert_eq!(error_correlation(&[2.0], &[2.0]), 1.0);
    }
}
