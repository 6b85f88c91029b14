//! Skipping tests whose data files are absent.
//!
//! Tests that need the evaluation data beside the repository (`../shared/data`) or a fetched model
//! (`models/`) call [`skip`] when the file is missing. On a user's fresh clone they skip with a
//! printed reason; CI sets `EDGEFOLD_REQUIRE_DATA=1`, which turns every skip into a failure.

/// Reports a skipped test, or panics when `EDGEFOLD_REQUIRE_DATA=1` makes data mandatory.
///
/// # Panics
/// When the environment variable `EDGEFOLD_REQUIRE_DATA` is `1`.
pub fn skip(reason: &str) {
    if std::env::var("EDGEFOLD_REQUIRE_DATA").as_deref() == Ok("1") {
        panic!("required test data is missing: {reason}");
    }
    eprintln!("skipping: {reason}");
}
