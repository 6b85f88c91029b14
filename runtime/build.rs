//! Sets `cfg(edgefold_dsp)` on Armv7E-M targets (Cortex-M4 and M7), whose DSP extension the
//! integer kernels use. Stable Rust does not expose that extension as a target feature.

fn main() {
    println!("cargo:rustc-check-cfg=cfg(edgefold_dsp)");
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.starts_with("thumbv7em-") {
        println!("cargo:rustc-cfg=edgefold_dsp");
    }
}
