//! Corpus BLEU and chrF for translation output, computed as sacreBLEU 2.6.0 computes them with
//! its default settings.
//!
//! BLEU tokenizes with sacreBLEU's `13a` tokenizer (the normalization of the WMT script
//! mteval-v13a.pl), counts word n-grams up to order 4, and smooths zero precisions with the `exp`
//! method. chrF counts character n-grams up to order 6 with whitespace removed, no word n-grams,
//! and beta 2. Both sum their statistics over the corpus before computing the score, so a corpus
//! score is not the mean of sentence scores.
//!
//! References come as streams in sacreBLEU's layout: `references[k][i]` is the `k`-th reference
//! of hypothesis `i`, and every stream has one line per hypothesis.
//!
//! The floating-point operations are those of sacreBLEU, in the same order, so the results can
//! differ only where the platform's `exp` and `ln` differ from Python's `math` module. Whitespace
//! is what Python's `str.split()` splits on, which is Rust's `char::is_whitespace` plus U+001C to
//! U+001F (checked with Python 3.11).
//!
//! NOTE: a missing reference (sacreBLEU's `None`, for a varying number of references per line)
//! is not supported, and neither is any setting other than the defaults, such as lowercasing.

use std::collections::HashMap;
use std::fmt;

/// Maximum word n-gram order of BLEU, sacreBLEU's default.
pub const BLEU_MAX_ORDER: usize = 4;

/// Character n-gram order of chrF, sacreBLEU's default.
pub const CHRF_CHAR_ORDER: usize = 6;

/// Weight of recall relative to precision in chrF's F-score, sacreBLEU's default.
pub const CHRF_BETA: f64 = 2.0;

/// Logarithm that sacreBLEU uses in place of `ln(0)`, so that a zero precision gives a score of 0.
const LOG_OF_ZERO: f64 = -9_999_999_999.0;

/// Errors of the corpus scores.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScoreError {
    /// No reference stream was given.
    NoReferences,
    /// A reference stream does not have one line per hypothesis.
    LengthMismatch {
        /// Index of the reference stream, starting at 0.
        stream: usize,
        /// Number of lines in that stream.
        references: usize,
        /// Number of hypotheses.
        hypotheses: usize,
    },
}

impl fmt::Display for ScoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScoreError::NoReferences => {
                write!(f, "no reference stream was given; pass at least one")
            }
            ScoreError::LengthMismatch { stream, references, hypotheses } => write!(
                f,
                "reference stream {stream} has {references} lines but there are {hypotheses} \
                 hypotheses; each stream needs one line per hypothesis"
            ),
        }
    }
}

impl std::error::Error for ScoreError {}

/// A BLEU score with the statistics it was computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct BleuScore {
    /// BLEU, from 0 to 100.
    pub score: f64,
    /// Matched hypothesis n-grams per order, clipped by the reference counts, for orders 1 to 4.
    pub counts: [u64; BLEU_MAX_ORDER],
    /// Hypothesis n-grams per order, for orders 1 to 4.
    pub totals: [u64; BLEU_MAX_ORDER],
    /// Smoothed n-gram precisions in percent, for orders 1 to 4. All are 0 when no n-gram
    /// matched, as in sacreBLEU.
    pub precisions: [f64; BLEU_MAX_ORDER],
    /// Brevity penalty, from 0 to 1.
    pub bp: f64,
    /// Number of hypothesis tokens.
    pub sys_len: u64,
    /// Number of reference tokens, taking for each hypothesis the reference whose length is
    /// closest to it (the shorter one on a tie).
    pub ref_len: u64,
}

/// Character n-gram counts of one chrF order, summed over the corpus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChrfOrderStatistics {
    /// Hypothesis n-grams. A sentence whose reference has no n-gram of this order adds 0.
    pub hypothesis: u64,
    /// Reference n-grams.
    pub reference: u64,
    /// Hypothesis n-grams found in the reference, clipped by the reference counts.
    pub matches: u64,
}

/// A chrF score with the statistics it was computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct ChrfScore {
    /// chrF, from 0 to 100.
    pub score: f64,
    /// Statistics of character n-gram orders 1 to 6.
    pub statistics: [ChrfOrderStatistics; CHRF_CHAR_ORDER],
}

/// Returns whether Python's `str.split()` and `str.rstrip()` treat `c` as whitespace.
fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Splits `line` into words as Python's `str.split()` does without arguments.
fn split_words(line: &str) -> impl Iterator<Item = &str> {
    line.split(is_python_whitespace).filter(|word| !word.is_empty())
}

/// Tokenizes a line as sacreBLEU's `13a` tokenizer does, the default tokenizer of its BLEU.
///
/// The steps are those of mteval-v13a.pl: `<skipped>` is removed, a line break after a hyphen
/// joins the lines and other line breaks become spaces, then `&quot;`, `&amp;`, `&lt;` and `&gt;`
/// are unescaped in that order. Punctuation and symbols are split off, except that a period or
/// comma stays attached when a digit precedes or follows it, and a hyphen is split off only after
/// a digit. Tokens are joined by single spaces.
///
/// Unlike sacreBLEU's BLEU, this does not strip trailing whitespace first. That changes the
/// tokens only when a hyphen and a line break end the line, which the stripping would keep apart.
pub fn tokenize_13a(line: &str) -> String {
    let mut text = line.replace("<skipped>", "").replace("-\n", "").replace('\n', " ");
    if text.contains('&') {
        text = text
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let padded: Vec<char> = format!(" {text} ").chars().collect();

    let spaced = split_symbols(&padded);
    let spaced = split_pairs(&spaced, |a, b| !a.is_ascii_digit() && is_period_or_comma(b), "", " ");
    let spaced = split_pairs(&spaced, |a, b| is_period_or_comma(a) && !b.is_ascii_digit(), " ", "");
    let spaced = split_pairs(&spaced, |a, b| a.is_ascii_digit() && b == '-', "", " ");

    let spaced: String = spaced.into_iter().collect();
    split_words(&spaced).collect::<Vec<_>>().join(" ")
}

fn is_period_or_comma(c: char) -> bool {
    c == '.' || c == ','
}

/// Surrounds with spaces every character of the class `` [{-~[-` -&(-+:-@/] ``, which is ASCII
/// punctuation other than `'`, `,`, `-` and `.`, plus the space itself.
fn split_symbols(chars: &[char]) -> Vec<char> {
    let mut out = Vec::with_capacity(chars.len() * 2);
    for &c in chars {
        let symbol = matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/');
        if symbol {
            out.extend([' ', c, ' ']);
        } else {
            out.push(c);
        }
    }
    out
}

/// Rewrites each pair of adjacent characters `a b` that `is_match` accepts as
/// `before a " " b after`, like a substitution with a two-character regular expression.
///
/// Pairs are found left to right without overlapping, as in Python's `re.sub`. So in "a.,"
/// the comma is not paired with the period that the previous match consumed.
fn split_pairs(
    chars: &[char],
    is_match: impl Fn(char, char) -> bool,
    before: &str,
    after: &str,
) -> Vec<char> {
    let mut out = Vec::with_capacity(chars.len() + chars.len() / 2);
    let mut i = 0;
    while i < chars.len() {
        if i + 1 < chars.len() && is_match(chars[i], chars[i + 1]) {
            out.extend(before.chars());
            out.extend([chars[i], ' ', chars[i + 1]]);
            out.extend(after.chars());
            i += 2;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// Checks that every reference stream has one line per hypothesis.
fn check_lengths<S, R>(hypotheses: usize, references: &[S]) -> Result<(), ScoreError>
where
    S: AsRef<[R]>,
{
    if references.is_empty() {
        return Err(ScoreError::NoReferences);
    }
    for (stream, lines) in references.iter().enumerate() {
        let count = lines.as_ref().len();
        if count != hypotheses {
            return Err(ScoreError::LengthMismatch { stream, references: count, hypotheses });
        }
    }
    Ok(())
}

/// BLEU's sufficient statistics, for one sentence or summed over a corpus.
#[derive(Debug, Clone, Copy, Default)]
struct BleuStatistics {
    sys_len: u64,
    ref_len: u64,
    counts: [u64; BLEU_MAX_ORDER],
    totals: [u64; BLEU_MAX_ORDER],
}

impl BleuStatistics {
    fn add(&mut self, other: &BleuStatistics) {
        self.sys_len += other.sys_len;
        self.ref_len += other.ref_len;
        for n in 0..BLEU_MAX_ORDER {
            self.counts[n] += other.counts[n];
            self.totals[n] += other.totals[n];
        }
    }
}

/// Tokenizes a segment as sacreBLEU's BLEU does: trailing whitespace stripped, then `13a`.
fn tokenize_segment(line: &str) -> String {
    tokenize_13a(line.trim_end_matches(is_python_whitespace))
}

/// Counts the word n-grams of orders 1 to 4.
fn word_ngram_counts<'a>(tokens: &'a [&'a str]) -> HashMap<&'a [&'a str], u64> {
    let mut counts = HashMap::new();
    for n in 1..=BLEU_MAX_ORDER.min(tokens.len()) {
        for ngram in tokens.windows(n) {
            *counts.entry(ngram).or_insert(0) += 1;
        }
    }
    counts
}

/// Returns the reference length closest to `hyp_len`, the shorter one on a tie.
fn closest_ref_len(hyp_len: usize, ref_lens: &[usize]) -> usize {
    let mut best = ref_lens[0];
    for &len in &ref_lens[1..] {
        let (distance, best_distance) = (hyp_len.abs_diff(len), hyp_len.abs_diff(best));
        if distance < best_distance || (distance == best_distance && len < best) {
            best = len;
        }
    }
    best
}

/// Computes the BLEU statistics of one hypothesis against its references, of which there must
/// be at least one.
///
/// A hypothesis n-gram matches up to the maximum count of that n-gram in any single reference.
fn segment_bleu_statistics(hypothesis: &str, references: &[&str]) -> BleuStatistics {
    let hyp_text = tokenize_segment(hypothesis);
    let hyp_tokens: Vec<&str> = split_words(&hyp_text).collect();
    let ref_texts: Vec<String> = references.iter().map(|r| tokenize_segment(r)).collect();
    let ref_tokens: Vec<Vec<&str>> =
        ref_texts.iter().map(|text| split_words(text).collect()).collect();

    let mut ref_counts: HashMap<&[&str], u64> = HashMap::new();
    for tokens in &ref_tokens {
        for (ngram, count) in word_ngram_counts(tokens) {
            let max = ref_counts.entry(ngram).or_insert(0);
            *max = (*max).max(count);
        }
    }

    let ref_lens: Vec<usize> = ref_tokens.iter().map(Vec::len).collect();
    let mut statistics = BleuStatistics {
        sys_len: hyp_tokens.len() as u64,
        ref_len: closest_ref_len(hyp_tokens.len(), &ref_lens) as u64,
        ..BleuStatistics::default()
    };
    for (ngram, count) in word_ngram_counts(&hyp_tokens) {
        let order = ngram.len() - 1;
        statistics.totals[order] += count;
        let ref_count = ref_counts.get(ngram).copied().unwrap_or(0);
        statistics.counts[order] += count.min(ref_count);
    }
    statistics
}

/// Computes BLEU from its statistics as sacreBLEU's `BLEU.compute_bleu` does with `exp`
/// smoothing.
///
/// With `effective_order`, orders above the highest order that has any hypothesis n-gram are
/// left out of the geometric mean. Without it, such orders make the score 0.
fn bleu_from_statistics(statistics: &BleuStatistics, effective_order: bool) -> BleuScore {
    let BleuStatistics { sys_len, ref_len, counts, totals } = *statistics;

    let bp = if sys_len >= ref_len {
        1.0
    } else if sys_len > 0 {
        (1.0 - ref_len as f64 / sys_len as f64).exp()
    } else {
        0.0
    };

    let mut score = BleuScore {
        score: 0.0,
        counts,
        totals,
        precisions: [0.0; BLEU_MAX_ORDER],
        bp,
        sys_len,
        ref_len,
    };
    if counts.iter().all(|&count| count == 0) {
        return score;
    }

    // The `exp` smoothing of mteval-v13a.pl: the k-th order with no match, counting from 1, gets
    // the precision 100 / (2^k * total).
    let mut smoothing = 1.0;
    let mut used_orders = BLEU_MAX_ORDER;
    for n in 0..BLEU_MAX_ORDER {
        if totals[n] == 0 {
            break;
        }
        if effective_order {
            used_orders = n + 1;
        }
        score.precisions[n] = if counts[n] == 0 {
            smoothing *= 2.0;
            100.0 / (smoothing * totals[n] as f64)
        } else {
            100.0 * counts[n] as f64 / totals[n] as f64
        };
    }

    let log_sum: f64 = score.precisions[..used_orders]
        .iter()
        .map(|&p| if p == 0.0 { LOG_OF_ZERO } else { p.ln() })
        .sum();
    score.score = bp * (log_sum / used_orders as f64).exp();
    score
}

/// Computes corpus BLEU as sacreBLEU's `corpus_bleu` does with its defaults.
///
/// The defaults are the `13a` tokenizer, case-sensitive matching, word n-grams up to order 4,
/// `exp` smoothing and no effective order. `references` holds one or more reference streams,
/// each with one line per hypothesis.
///
/// # Errors
/// [`ScoreError::NoReferences`] when `references` is empty, and [`ScoreError::LengthMismatch`]
/// when a stream's length differs from the number of hypotheses.
pub fn corpus_bleu<H, S, R>(hypotheses: &[H], references: &[S]) -> Result<BleuScore, ScoreError>
where
    H: AsRef<str>,
    S: AsRef<[R]>,
    R: AsRef<str>,
{
    check_lengths(hypotheses.len(), references)?;
    let mut total = BleuStatistics::default();
    for (i, hypothesis) in hypotheses.iter().enumerate() {
        let refs: Vec<&str> = references.iter().map(|stream| stream.as_ref()[i].as_ref()).collect();
        total.add(&segment_bleu_statistics(hypothesis.as_ref(), &refs));
    }
    Ok(bleu_from_statistics(&total, false))
}

/// Computes the BLEU of one sentence as sacreBLEU's `sentence_bleu` does with its defaults.
///
/// The settings are those of [`corpus_bleu`] except that the effective order is used, so a
/// sentence shorter than four tokens can still score above 0.
///
/// # Errors
/// [`ScoreError::NoReferences`] when `references` is empty.
pub fn sentence_bleu<R: AsRef<str>>(
    hypothesis: &str,
    references: &[R],
) -> Result<BleuScore, ScoreError> {
    if references.is_empty() {
        return Err(ScoreError::NoReferences);
    }
    let refs: Vec<&str> = references.iter().map(AsRef::as_ref).collect();
    let statistics = segment_bleu_statistics(hypothesis, &refs);
    Ok(bleu_from_statistics(&statistics, true))
}

/// Counts the character n-grams of orders 1 to 6 of `text`.
fn char_ngram_counts(text: &str) -> Vec<HashMap<&str, u64>> {
    let mut boundaries: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
    boundaries.push(text.len());
    let char_count = boundaries.len() - 1;

    let mut orders = Vec::with_capacity(CHRF_CHAR_ORDER);
    for n in 1..=CHRF_CHAR_ORDER {
        let mut counts = HashMap::new();
        for start in 0..(char_count + 1).saturating_sub(n) {
            let ngram = &text[boundaries[start]..boundaries[start + n]];
            *counts.entry(ngram).or_insert(0) += 1;
        }
        orders.push(counts);
    }
    orders
}

fn remove_whitespace(line: &str) -> String {
    line.chars().filter(|&c| !is_python_whitespace(c)).collect()
}

/// Compares hypothesis and reference n-grams of one order.
fn chrf_order_statistics(
    hypothesis: &HashMap<&str, u64>,
    reference: &HashMap<&str, u64>,
) -> ChrfOrderStatistics {
    let mut statistics = ChrfOrderStatistics {
        reference: reference.values().sum(),
        ..ChrfOrderStatistics::default()
    };
    let mut hyp_count = 0;
    for (ngram, &count) in hypothesis {
        hyp_count += count;
        if let Some(&ref_count) = reference.get(ngram) {
            statistics.matches += count.min(ref_count);
        }
    }
    // sacreBLEU does not count hypothesis n-grams of an order that the reference lacks.
    if !reference.is_empty() {
        statistics.hypothesis = hyp_count;
    }
    statistics
}

/// Computes the chrF score of summed statistics as sacreBLEU 2.6.0 does by default
/// (`eps_smoothing=False`).
///
/// Precision and recall are averaged over the orders that have both hypothesis and reference
/// n-grams, and the F-beta score of the two averages is returned in percent.
fn chrf_f_score(statistics: &[ChrfOrderStatistics]) -> f64 {
    let factor = CHRF_BETA * CHRF_BETA;
    let mut precision = 0.0;
    let mut recall = 0.0;
    let mut used_orders = 0;
    for order in statistics {
        if order.hypothesis > 0 && order.reference > 0 {
            precision += order.matches as f64 / order.hypothesis as f64;
            recall += order.matches as f64 / order.reference as f64;
            used_orders += 1;
        }
    }
    if used_orders == 0 {
        return 0.0;
    }

    precision /= used_orders as f64;
    recall /= used_orders as f64;
    if precision + recall == 0.0 {
        return 0.0;
    }
    let mut score = (1.0 + factor) * precision * recall;
    score /= factor * precision + recall;
    100.0 * score
}

/// Computes the chrF statistics of one hypothesis against the reference that gives it the
/// highest sentence chrF (the first one on a tie).
fn segment_chrf_statistics(
    hypothesis: &str,
    references: &[&str],
) -> [ChrfOrderStatistics; CHRF_CHAR_ORDER] {
    let hyp_text = remove_whitespace(hypothesis);
    let hyp_counts = char_ngram_counts(&hyp_text);

    let mut best = [ChrfOrderStatistics::default(); CHRF_CHAR_ORDER];
    let mut best_score = -1.0;
    for reference in references {
        let ref_text = remove_whitespace(reference);
        let ref_counts = char_ngram_counts(&ref_text);
        let mut statistics = [ChrfOrderStatistics::default(); CHRF_CHAR_ORDER];
        for (n, order) in statistics.iter_mut().enumerate() {
            *order = chrf_order_statistics(&hyp_counts[n], &ref_counts[n]);
        }
        let score = chrf_f_score(&statistics);
        if score > best_score {
            best_score = score;
            best = statistics;
        }
    }
    best
}

/// Computes corpus chrF as sacreBLEU's `corpus_chrf` does with its defaults.
///
/// The defaults are character n-grams up to order 6 with whitespace removed, no word n-grams,
/// beta 2, case-sensitive matching and no epsilon smoothing. Statistics are summed over the
/// corpus, and the F-score is computed once from the sums. `references` holds one or more
/// reference streams, each with one line per hypothesis.
///
/// # Errors
/// [`ScoreError::NoReferences`] when `references` is empty, and [`ScoreError::LengthMismatch`]
/// when a stream's length differs from the number of hypotheses.
pub fn corpus_chrf<H, S, R>(hypotheses: &[H], references: &[S]) -> Result<ChrfScore, ScoreError>
where
    H: AsRef<str>,
    S: AsRef<[R]>,
    R: AsRef<str>,
{
    check_lengths(hypotheses.len(), references)?;
    let mut total = [ChrfOrderStatistics::default(); CHRF_CHAR_ORDER];
    for (i, hypothesis) in hypotheses.iter().enumerate() {
        let refs: Vec<&str> = references.iter().map(|stream| stream.as_ref()[i].as_ref()).collect();
        let segment = segment_chrf_statistics(hypothesis.as_ref(), &refs);
        for (sum, order) in total.iter_mut().zip(segment) {
            sum.hypothesis += order.hypothesis;
            sum.reference += order.reference;
            sum.matches += order.matches;
        }
    }
    Ok(ChrfScore { score: chrf_f_score(&total), statistics: total })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_corpus_scores_100() {
        let lines = ["O gato dorme no sofá.", "Ele comprou 1,5 kg de pão por R$ 3.20!"];
        // The geometric mean of four precisions of 100 rounds to 100.00000000000004, in
        // sacreBLEU 2.6.0 too.
        let bleu = corpus_bleu(&lines, &[&lines]).unwrap();
        assert!((bleu.score - 100.0).abs() < 1e-9, "BLEU {}", bleu.score);
        assert_eq!(bleu.bp, 1.0);
        let chrf = corpus_chrf(&lines, &[&lines]).unwrap();
        assert!((chrf.score - 100.0).abs() < 1e-9, "chrF {}", chrf.score);
    }

    #[test]
    fn empty_hypotheses_score_0() {
        let refs = ["uma frase qualquer"];
        let bleu = corpus_bleu(&[""], &[&refs]).unwrap();
        assert_eq!(bleu.score, 0.0);
        assert_eq!(bleu.bp, 0.0);
        assert_eq!(bleu.sys_len, 0);
        assert_eq!(bleu.ref_len, 3);
        let chrf = corpus_chrf(&[""], &[&refs]).unwrap();
        assert_eq!(chrf.score, 0.0);
    }

    #[test]
    fn closest_ref_len_prefers_shorter_on_tie() {
        assert_eq!(closest_ref_len(5, &[7, 3]), 3);
        assert_eq!(closest_ref_len(5, &[3, 7]), 3);
        assert_eq!(closest_ref_len(5, &[9, 6, 4]), 4);
    }

    #[test]
    fn period_pairs_do_not_overlap() {
        // The first rule consumes "a." so the comma stays attached until the second rule.
        assert_eq!(tokenize_13a("a.,b"), "a . , b");
        assert_eq!(tokenize_13a("3.14, 1,000."), "3.14 , 1,000 .");
    }
}
