//! Opens the bytes up to the header's `file_len` as a packed file (checksums repaired first), and
//! if it opens, runs it in a 1 MiB arena with inputs read from the bytes past `file_len`, with
//! f32 and then with int8 activations. Running must end in a typed error or outputs whose
//! lengths match their shapes. A file that
//! carries a self-test record then runs it too, in the same arena. A file that contains a
//! language model runs a few tokens through the decoder, and one that contains a translation
//! model translates a few tokens by greedy search.
#![no_main]

use edgefold_fuzz::{read_outputs, repair_checksums, set_inputs, AlignedCopy, InputFeed};
use edgefold_runtime::decoder::{Decoder, Logits};
use edgefold_runtime::translator::Translator;
use edgefold_runtime::{Model, Session};
use libfuzzer_sys::fuzz_target;

/// Arena given to every session. Models whose plan needs more fail with `ArenaTooSmall`.
const ARENA_BYTES: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let mut copy = AlignedCopy::new(data);
    repair_checksums(copy.bytes_mut());
    let Ok(model) = Model::open(copy.bytes()) else {
        return;
    };
    // `open` succeeded, so `file_len` is at most the buffer's length.
    let file_len = model.header().file_len as usize;
    let mut feed = InputFeed::new(&data[file_len..]);

    let mut arena = vec![0u8; ARENA_BYTES];
    {
        let Ok(mut session) = Session::new(&model, &mut arena) else {
            return;
        };
        set_inputs(&mut session, &mut feed);
        if session.run().is_ok() {
            read_outputs(&session);
            // Again with the integer kernels, which take other paths through the same geometry.
            session.set_int8_activations(true);
            if session.run().is_ok() {
                read_outputs(&session);
            }
        }
    }
    // Any outcome is fine; only a panic, hang or bad access is a failure.
    let _ = edgefold_runtime::selftest::run(&model, &mut arena);
    if let Ok(mut decoder) = Decoder::new(&model, &mut arena) {
        let tokens = feed.tokens::<3>();
        if let Ok(logits) = decoder.forward(&tokens, Logits::All) {
            assert!(logits.len() <= 3 * decoder.config().vocab as usize);
        }
        let _ = decoder.forward(&tokens[..1], Logits::Last);
    }
    if let Ok(mut translator) = Translator::new(&model, &mut arena) {
        let source = feed.tokens::<3>();
        let candidates = feed.tokens::<2>();
        let mut target = [0u32; 4];
        if let Ok(written) = translator.translate_greedy(&source, Some(&candidates), &mut target) {
            assert!(written <= target.len());
        }
        let _ = translator.translate_greedy(&source[..1], None, &mut target[..1]);
    }
});
