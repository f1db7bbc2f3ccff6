#!/usr/bin/env bash
# Issue #17's GPU work as one prepared plan for a lent GPU (the `device` tool: 15 minutes in all, one call at most
# 10 minutes, 64 MiB carried a call, files back at most 8 of 16 MiB each). The repository (about 40 MB) and the
# target's GGUF (97 MB) do not fit one call, so the GGUF travels in parts that wait in /tmp/lease on the warm machine
# (it is given back after 30 s idle: make the calls back to back).
#
#   here:    scripts/gpu_lease.sh prepare          .lease/ (git-excluded): GGUF parts, the gguf wheel, the training
#                                                  prompts and the responses so far; prints the calls to make
#   device:  scripts/gpu_lease.sh stash PART       one call per part but the last (carry: [PART])
#   device:  scripts/gpu_lease.sh run              the last call (carry: [LAST_PART, .lease/kit]): gen-data on the
#                                                  GPU for GEN_SECONDS, then train-draft from the shipped drafter
#                                                  for TRAIN_STEPS on every response; results under $OUT
#   here:    scripts/gpu_lease.sh collect FILES_AT DEST   the drafter (bfloat16, shipped form) and the data back
#
# run's knobs (environment): DEVICE (cuda), GEN_SECONDS (180; 0 skips gen-data), CONCURRENCY (256), TRAIN_STEPS
# (300; 0 skips training), TRAIN_SECONDS (240, a hard stop; the last checkpoint is kept), BATCH (32), ANCHORS
# (128), LR (6e-4), CHECKS (0; 1 runs the Triton kernel's and the CUDA tests first, up to 120 s). The defaults
# keep the call under its 600 s with about a minute for installing and loading.
set -euo pipefail
cd "$(dirname "$0")/.."

LEASE=.lease
KIT=$LEASE/kit
WAIT=/tmp/lease
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
MIB=$((1024 * 1024))

prepare() {
    local python=${PYTHON:-.venv/bin/python}
    grep -qxF "/$LEASE/" .git/info/exclude || echo "/$LEASE/" >> .git/info/exclude
    rm -rf "$LEASE" && mkdir -p "$KIT/prompts"
    local gguf
    gguf=$("$python" -c "from dspark_trt.models.sources import resolve_model; print(resolve_model('smollm2').path)")
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d "$KIT" "gguf==$("$python" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
    cp ../shared/data/prompts/*.jsonl "$KIT/prompts/"
    xz -T1 -c "${RESPONSES:-$HOME/.cache/dspark-trt/data/responses.jsonl}" > "$KIT/responses.jsonl.xz"
    sha256sum < "$gguf" | cut -d' ' -f1 > "$KIT/gguf.sha256"
    # what travels anyway: tracked files and untracked ones git does not ignore
    local tree kit room
    tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb | tail -1 | cut -f1)
    kit=$(du -sb "$KIT" | cut -f1)
    room=$((64 * MIB - tree - 2 * MIB))
    [ "$room" -gt "$kit" ] || { echo "the tree ($tree bytes) leaves no room for the kit" >&2; exit 1; }
    split -b "$room" -d "$gguf" "$LEASE/gguf."
    local parts=("$LEASE"/gguf.*) stashed with_run=()
    stashed=("${parts[@]}")
    if [ $(($(stat -c %s "${parts[-1]}") + kit)) -le "$room" ]; then  # the last part rides with the kit
        with_run=("${parts[-1]}")
        stashed=("${parts[@]:0:${#parts[@]}-1}")
    fi
    echo "tree $((tree / MIB)) MiB, ${#parts[@]} GGUF parts of at most $((room / MIB)) MiB, kit $((kit / MIB)) MiB"
    echo "calls, back to back (the machine goes back after 30 s idle):"
    for p in "${stashed[@]}"; do
        echo "  run carry=[\"$p\"] command=\"scripts/gpu_lease.sh stash $p\""
    done
    local carry="\"$KIT\""
    [ ${#with_run[@]} -eq 0 ] || carry="\"${with_run[0]}\", $carry"
    echo "  run carry=[$carry] timeout_s=600 command=\"scripts/gpu_lease.sh run\""
}

stash() {
    mkdir -p "$WAIT" && cp "$1" "$WAIT/" && ls -la "$WAIT"
}

run() {
    : "${OUT:?run on the device machine, where \$OUT is set}"
    local device=${DEVICE:-cuda} gen_seconds=${GEN_SECONDS:-180} steps=${TRAIN_STEPS:-300}
    mkdir -p "$WAIT"
    exec > >(tee "$OUT/lease.log") 2>&1
    shopt -s nullglob
    for p in "$LEASE"/gguf.*; do cp "$p" "$WAIT/"; done
    cat "$WAIT"/gguf.* > "$WAIT/$GGUF_NAME"
    [ "$(sha256sum < "$WAIT/$GGUF_NAME" | cut -d' ' -f1)" = "$(cat "$KIT/gguf.sha256")" ] ||
        { echo "the GGUF's parts are incomplete: $(ls "$WAIT") (stash each part first, back to back)"; exit 1; }
    local site=$WAIT/site
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$KIT"/*.whl
    local source=$WAIT/source  # a copy to install from: setuptools stages its build in the source tree
    rm -rf "$source" && mkdir -p "$source" && cp -r pyproject.toml setup.py README.md dspark_trt plugins "$source/"
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" "$source"
    export PYTHONPATH=$site PYTHONUNBUFFERED=1 DSPARK_TRT_CACHE=$WAIT/cache
    local dspark=(python3 -m dspark_trt) target=$WAIT/$GGUF_NAME
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    if [ "${CHECKS:-0}" = 1 ]; then
        DSPARK_TRITON_DEVICE=$device timeout 120 python3 -m pytest -q -p no:cacheprovider \
            tests/test_verify_triton.py tests/test_device.py || echo "checks failed or timed out (continuing)"
    fi
    xz -dc "$KIT/responses.jsonl.xz" > "$WAIT/responses.jsonl"
    local before
    before=$(wc -l < "$WAIT/responses.jsonl")
    if [ "$gen_seconds" -gt 0 ]; then
        # interrupted at the deadline: every finished response is on disk already
        timeout -s INT "$gen_seconds" "${dspark[@]}" gen-data --target "$target" --device "$device" \
            --concurrency "${CONCURRENCY:-256}" --prompts "$KIT"/prompts/*.jsonl --out "$WAIT/responses.jsonl" || true
    fi
    echo "responses: $before -> $(wc -l < "$WAIT/responses.jsonl")"
    xz -T0 -c "$WAIT/responses.jsonl" > "$OUT/responses.jsonl.xz"
    if [ "$steps" -gt 0 ]; then
        timeout -s INT "${TRAIN_SECONDS:-240}" "${dspark[@]}" train-draft --target "$target" \
            --responses "$WAIT/responses.jsonl" --out "$WAIT/run" --init default --draft-vocab 8192 \
            --precision bf16 --device "$device" --batch-size "${BATCH:-32}" --num-anchors "${ANCHORS:-128}" \
            --lr "${LR:-6e-4}" --feature-cache none --steps "$steps" --checkpoint-every 20 || true
        [ -f "$WAIT/run/config.json" ] || { echo "no checkpoint written: nothing to bring back"; exit 1; }
        python3 -c "import sys, torch; from dspark_trt.models.drafter_checkpoint import load_drafter, save_drafter; \
save_drafter(load_drafter(sys.argv[1]), sys.argv[2], dtype=torch.bfloat16, share_target_embeddings=True)" \
            "$WAIT/run" "$WAIT/drafter"
        cp "$WAIT/drafter/config.json" "$OUT/"
        cp "$WAIT/run/train_log.jsonl" "$OUT/" 2>/dev/null || true
        split -b $((15 * MIB)) -d "$WAIT/drafter/model.safetensors" "$OUT/model.safetensors.part"
    fi
    ls -la "$OUT"
}

collect() {
    local files_at=$1 dest=$2
    mkdir -p "$dest/drafter"
    if [ -f "$files_at/config.json" ]; then
        cp "$files_at/config.json" "$dest/drafter/"
        cat "$files_at"/model.safetensors.part* > "$dest/drafter/model.safetensors"
        [ -f "$files_at/train_log.jsonl" ] && cp "$files_at/train_log.jsonl" "$dest/"
    fi
    [ -f "$files_at/responses.jsonl.xz" ] && xz -dc "$files_at/responses.jsonl.xz" > "$dest/responses.jsonl"
    cp "$files_at/lease.log" "$dest/" 2>/dev/null || true
    ls -la "$dest" "$dest/drafter"
}

case "${1:-}" in
    prepare) prepare ;;
    stash) stash "$2" ;;
    run) run ;;
    collect) collect "$2" "$3" ;;
    *) sed -n '2,19p' "$0" >&2; exit 2 ;;
esac
