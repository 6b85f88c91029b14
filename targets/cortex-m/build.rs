//! Selects the board's memory map from the target, validates the packed model that
//! `generate.sh` wrote into `src/generated/`, and writes the model's constants for the firmware,
//! among them the arena size from the file's header.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use edgefold_runtime::{DType, Model};

/// Class names of the keyword spotting model, in output order (MLPerf Tiny's DS-CNN trained on
/// Speech Commands); the first ten are keywords.
const KWS_LABELS: [&str; 12] =
    ["down", "go", "left", "no", "off", "on", "right", "stop", "up", "yes", "silence", "unknown"];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    let target = env::var("TARGET").expect("set by cargo");
    let board = match target.as_str() {
        "thumbv7em-none-eabihf" => "mps2_an386",
        "thumbv7m-none-eabi" => "lm3s6965evb",
        other => panic!(
            "no board for target {other}: build for thumbv7em-none-eabihf (mps2-an386) or \
             thumbv7m-none-eabi (lm3s6965evb)"
        ),
    };
    let memory = manifest.join("memory").join(format!("{}.x", board.replace('_', "-")));
    let map = fs::read_to_string(&memory).expect("memory map reads");
    fs::write(out.join("memory.x"), map + &stack_reserve()).expect("memory map writes");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory");
    println!("cargo:rustc-check-cfg=cfg(board, values(\"mps2_an386\", \"lm3s6965evb\"))");
    println!("cargo:rustc-cfg=board=\"{board}\"");

    let kws = env::var_os("CARGO_FEATURE_KWS").is_some();
    let wake_word = env::var_os("CARGO_FEATURE_WAKE_WORD").is_some();
    let (model, labels, keywords): (&str, Vec<String>, &str) = match (kws, wake_word) {
        (true, false) => ("kws", KWS_LABELS.iter().map(|l| l.to_string()).collect(), "0..10"),
        // NOTE: the wake word model's class order is not documented beside the model, so its
        // classes print as numbers and no class raises the detection pin.
        (false, true) => ("wake_word", (0..3).map(|c| format!("class {c}")).collect(), "0..0"),
        _ => panic!("enable exactly one of the features kws and wake-word"),
    };
    let dir = manifest.join("src/generated").join(model);
    println!("cargo:rerun-if-changed={}", dir.display());
    let constants = model_constants(&dir, &labels, keywords);
    fs::write(out.join("model.rs"), constants).expect("model.rs writes");
}

/// RAM kept free for the stack above the statics, in bytes. Keyword spotting's measured stack
/// high-water mark is under 12 KiB on both boards with the self-test, 9 KiB without it.
const STACK_RESERVE: u32 = 16 * 1024;

/// Linker script lines that fail the link when the statics (`.data`, and `.bss` with the arena)
/// leave less than the stack reserve below the top of RAM. `EDGEFOLD_STACK_RESERVE` (bytes)
/// overrides the reserve, which `run.sh` uses to check that the link does fail.
fn stack_reserve() -> String {
    println!("cargo:rerun-if-env-changed=EDGEFOLD_STACK_RESERVE");
    let reserve = match env::var("EDGEFOLD_STACK_RESERVE") {
        Ok(v) => v
            .parse::<u32>()
            .unwrap_or_else(|e| panic!("EDGEFOLD_STACK_RESERVE={v} is not a byte count: {e}")),
        Err(_) => STACK_RESERVE,
    };
    format!(
        "\n_stack_reserve = {reserve};\n\
         ASSERT(ORIGIN(RAM) + LENGTH(RAM) - __sheap >= _stack_reserve, \"\n\
         ERROR(edgefold-firmware): the statics leave less RAM than the stack reserve \
         ({reserve} bytes)\");\n"
    )
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| {
        panic!("{}: {e}; run targets/cortex-m/generate.sh first", path.display())
    })
}

/// Rust source with the model's sizes and shapes and the generated files included as bytes.
fn model_constants(dir: &Path, labels: &[String], keywords: &str) -> String {
    let file = read(&dir.join("model.fold"));
    // The runtime requires a 16-byte aligned buffer; a Vec<u128> provides one.
    let mut words = vec![0u128; file.len().div_ceil(16)];
    for (word, chunk) in words.iter_mut().zip(file.chunks(16)) {
        let mut bytes = [0u8; 16];
        bytes[..chunk.len()].copy_from_slice(chunk);
        *word = u128::from_le_bytes(bytes);
    }
    // SAFETY: u128 has no padding, so the Vec's memory is 16 * words.len() >= file.len()
    // initialized bytes, borrowed for as long as `words` lives.
    let aligned = unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, file.len()) };
    let model = Model::open(aligned).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    // Without the feature the board's runtime links no int4 code and would reject the model
    // only when it opens it there.
    let int4 =
        (0..model.tensor_count()).any(|i| model.tensor(i).is_ok_and(|t| t.dtype == DType::I4));
    if int4 && env::var_os("CARGO_FEATURE_WEIGHTS_INT4").is_none() {
        panic!(
            "{}: the model has int4 weights, which this firmware's runtime is built without; \
             build with --features weights-int4, or pack the model with --quantize int8",
            dir.join("model.fold").display()
        );
    }
    assert!(
        model.input_count() == 1 && model.output_count() == 1,
        "the firmware runs models with one input and one output"
    );
    let shape_of = |tensor: u32| -> Vec<usize> {
        let entry = model.tensor(tensor).expect("validated tensor");
        let dims = entry.shape().iter().map(|d| d.as_constant().map(|c| c as usize));
        dims.collect::<Option<_>>().expect("the firmware needs constant shapes")
    };
    let input_shape = shape_of(model.input_tensor(0).expect("one input"));
    let output_shape = shape_of(model.output_tensor(0).expect("one output"));
    let (input_len, output_len): (usize, usize) =
        (input_shape.iter().product(), output_shape.iter().product());
    let input = dir.join("input.bin");
    let expected = dir.join("expected.bin");
    let expected_int8 = dir.join("expected-int8.bin");
    let int8 = env::var_os("CARGO_FEATURE_INT8_ACTIVATIONS").is_some();
    assert_eq!(read(&input).len(), 4 * input_len, "{} is not f32 {input_shape:?}", input.display());
    assert_eq!(read(&expected).len(), 4 * output_len, "{} length", expected.display());
    if int8 {
        let bytes = fs::read(&expected_int8).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; generate.sh records it only on a host with AVX-512 VNNI or the aarch64 \
                 dot-product extension, so build the int8-activations feature on one",
                expected_int8.display()
            )
        });
        assert_eq!(bytes.len(), 4 * output_len, "{} length", expected_int8.display());
    }
    assert_eq!(output_len, labels.len(), "one label per output class");

    let mut s = String::new();
    let path = |p: &Path| format!("{:?}", p.display().to_string());
    writeln!(s, "/// Arena bytes stated by the model's header.").unwrap();
    writeln!(s, "pub const ARENA_BYTES: usize = {};", model.arena_bytes()).unwrap();
    writeln!(s, "/// Shape of the model's input.").unwrap();
    writeln!(s, "pub const INPUT_SHAPE: [usize; {}] = {input_shape:?};", input_shape.len())
        .unwrap();
    writeln!(s, "/// Elements of the model's input and output.").unwrap();
    writeln!(s, "pub const INPUT_LEN: usize = {input_len};").unwrap();
    writeln!(s, "pub const OUTPUT_LEN: usize = {output_len};").unwrap();
    writeln!(s, "/// The packed model, in flash at a 64-byte aligned address.").unwrap();
    let fold = path(&dir.join("model.fold"));
    writeln!(
        s,
        "pub static MODEL: &crate::Aligned<[u8]> = &crate::Aligned(*include_bytes!({fold}));"
    )
    .unwrap();
    writeln!(s, "/// Reference input, f32 little-endian.").unwrap();
    writeln!(s, "pub static INPUT: &[u8] = include_bytes!({});", path(&input)).unwrap();
    writeln!(s, "/// The host runtime's output for the reference input, f32 little-endian.")
        .unwrap();
    writeln!(s, "pub static EXPECTED: &[u8] = include_bytes!({});", path(&expected)).unwrap();
    if int8 {
        writeln!(s, "/// The host runtime's output with int8 activations, f32 little-endian.")
            .unwrap();
        let int8_path = path(&expected_int8);
        writeln!(s, "pub static EXPECTED_INT8: &[u8] = include_bytes!({int8_path});").unwrap();
    }
    writeln!(s, "/// Class names, in output order.").unwrap();
    writeln!(s, "pub const LABELS: [&str; {}] = {labels:?};", labels.len()).unwrap();
    writeln!(s, "/// Classes that raise the detection pin.").unwrap();
    writeln!(s, "pub const KEYWORDS: core::ops::Range<usize> = {keywords};").unwrap();
    s
}
