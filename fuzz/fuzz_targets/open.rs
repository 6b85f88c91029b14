//! Opens arbitrary bytes as a packed file, with and without the weights checksum, then again with
//! every checksum repaired, and walks each model that opens. Opening must end in a typed error or
//! a model whose every table entry reads back without error.
#![no_main]

use edgefold_fuzz::{repair_checksums, walk_model, AlignedCopy};
use edgefold_runtime::{Model, OpenOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut copy = AlignedCopy::new(data);

    let verified = Model::open_with(copy.bytes(), OpenOptions { verify_weights: true });
    let unverified = Model::open_with(copy.bytes(), OpenOptions { verify_weights: false });
    if let Ok(model) = &verified {
        // Skipping a checksum can only let more files through, never fewer.
        assert!(unverified.is_ok(), "opens with the weights checksum but not without it");
        walk_model(model);
    }
    if let Ok(model) = &unverified {
        walk_model(model);
    }

    // Most mutations break a checksum, and opening stops there. Repairing the checksums lets the
    // same mutation reach the structural checks behind them.
    repair_checksums(copy.bytes_mut());
    if let Ok(model) = Model::open(copy.bytes()) {
        walk_model(&model);
    }
});
