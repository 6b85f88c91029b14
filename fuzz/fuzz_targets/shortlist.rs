//! Parses arbitrary bytes as a Marian lexical shortlist, and on success selects the candidate
//! target ids of a few source sentences. Each selection must end in a typed error or in sorted
//! ids inside the vocabulary that include `</s>`, the source ids and the `first` most frequent
//! ids.
#![no_main]

use std::path::Path;

use edgefold_compressor::marian::Shortlist;
use libfuzzer_sys::fuzz_target;

/// Target vocabulary size given to every selection.
const VOCAB: usize = 4096;

/// Id of `</s>` given to every selection.
const EOS: u32 = VOCAB as u32 - 1;

/// Source sentences, as token ids. Ids without a list give a typed error.
const SOURCES: [&[u32]; 4] = [&[0], &[1, 2, 3], &[7, 7, 0], &[40, 300, 4095]];

fuzz_target!(|data: &[u8]| {
    let Ok(shortlist) = Shortlist::from_bytes(Path::new("fuzz.s2t.bin"), data) else {
        return;
    };
    for source in SOURCES {
        let Ok(ids) = shortlist.candidates(source, EOS, VOCAB) else {
            continue;
        };
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "the ids are not sorted: {ids:?}");
        assert!(ids.last().is_some_and(|&id| (id as usize) < VOCAB), "an id is outside");
        assert!(ids.binary_search(&EOS).is_ok(), "</s> is missing");
        for id in source {
            assert!(ids.binary_search(id).is_ok(), "source id {id} is missing");
        }
        let first = shortlist.first().min(VOCAB);
        assert!(ids.len() >= first, "fewer ids than the {first} most frequent");
        assert!(ids[..first].iter().enumerate().all(|(i, &id)| id as usize == i));
    }
});
