#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run of at most 8 minutes on one H100/H200, so that a
# 15-minute device loan (machine start included) leaves room to rerun it. Steps run most
# important first; each has its own SIGINT time limit (`timeout -s INT`: Python stops as on
# Ctrl-C, pytest still prints its summary), writes into OUTDIR as it goes, and a step that fails
# or runs out of time never stops the next. OUTDIR/steps.tsv: step, exit status (124: out of
# time), seconds, limit.
#
#   step           limit (s)  what                                               measured (s)
#   liger                 10  install a Liger-Kernel wheel carried beside the checkout  -
#   env                   15  GPU, driver, versions, capability, shared memory, pkgs    -
#   probe                 90  precompile every production kernel in parallel, then run  -
#                             each once at production shape in bf16 against its
#                             reference, CUDA-event timings, the driver's registers and
#                             spills per kernel (kernels/probe.py: probe.json, probe.md)
#   tests                 95  the CUDA tests (-m gpu), cheap files first, -n with        -
#                             pytest-xdist and --timeout with pytest-timeout when
#                             installed; the fp32 attention test apart, at the end
#   step                 115  engine.bench --layers 16 --steps 2: ours vs HF+PEFT        -
#                             (+Liger), dense, SGTR and EM workloads (read the ratios)
#   kernels-ce            30  kernels.bench, one process per section: fused CE vs       -
#   kernels-elementwise   15  naive torch / Liger; RMSNorm, SwiGLU, RoPE; attention vs   -
#   kernels-attention     40  SDPA flash / cuDNN, rows written as each case finishes;    -
#   kernels-flex          30  FlexAttention last (its compile is the slowest)           -
#   tests-fp32            40  the fp32 attention test (16 x 16 tiles: 7 cold compiles)  -
#   total                480  (limits; the budget of each step is an estimate until a GPU run measures it)
#   Each limit is an estimated budget on an H200, not a measurement (kernels/BENCHMARKS.md says how
#   each was estimated); fill in the last column from OUTDIR/steps.tsv after a GPU run.
#
#   bash scripts/gpu_check.sh OUTDIR
#   bash scripts/gpu_check.sh --dry-run OUTDIR   # no GPU: every step in its CPU form (CI runs this)
#
# The dry run: the probe on tiny shapes through the Triton interpreter, the tests collected
# (--collect-only) by the same selection, engine.bench --tiny, kernels.bench --reference-only per
# section; its limits are the ones above times DRY_RUN_LIMIT_SCALE (default 4): other work, on a
# slower machine.
#
# Liger: the GPU image has none and cannot download it; put liger_kernel-*.whl (`pip download
# --no-deps liger-kernel`) beside the checkout (its parent folder), in the repository root, or in
# the repository's .whl/ folder (ignored by git: copy it along with the working tree), or name a
# wheel or a folder holding one in LIGER_WHEEL. PYTHON picks the interpreter (default python3).
set -uo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
fi
[[ $# -eq 1 ]] || { echo "usage: bash scripts/gpu_check.sh [--dry-run] OUTDIR" >&2; exit 2; }
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-python3}
limit_scale=1
(( dry_run )) && limit_scale=${DRY_RUN_LIMIT_SCALE:-4}  # CPU forms of the steps, on a slower machine
export PYTHONUNBUFFERED=1
: > "$out/steps.tsv"
started=$SECONDS

# step NAME LIMIT COMMAND...: run COMMAND with a SIGINT after LIMIT seconds (SIGKILL 10 s later),
# its output in OUTDIR/NAME.log, its status in OUTDIR/steps.tsv; never fails.
step() {
    local name=$1 limit=$(( $2 * limit_scale ))
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit} s, $((SECONDS - started)) s in): $*"
    timeout -s INT -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >> "$out/steps.tsv"
    tail -n 12 "$out/$name.log"
    echo "-- $name: exit $rc after $((SECONDS - t0)) s"
    return 0
}

find_liger_wheel() {
    local where
    for where in "${LIGER_WHEEL:-}" .whl . ..; do
        [[ -n "$where" ]] || continue
        if [[ -f "$where" ]]; then echo "$where"; return; fi
        compgen -G "$where/liger_kernel-*.whl" > /dev/null && { ls "$where"/liger_kernel-*.whl | tail -n 1; return; }
    done
}

install_liger() {
    if "$py" -c "import liger_kernel" 2> /dev/null; then echo "liger-kernel already importable"; return 0; fi
    local wheel
    wheel=$(find_liger_wheel)
    if [[ -z "$wheel" ]]; then echo "no liger_kernel-*.whl found (LIGER_WHEEL, .whl, ., ..): no Liger rows"; return 0; fi
    if (( dry_run )); then echo "would install $wheel"; return 0; fi
    "$py" -m pip install --no-index --no-deps "$wheel"
}

# The tests: CUDA-only tests carry @pytest.mark.gpu. Cheap files first; attention (largest
# compile) last; the fp32 attention test apart.
test_files=(tests/test_kernels_rope.py tests/test_kernels_swiglu.py tests/test_kernels_rms_norm.py
            tests/test_kernels_cross_entropy.py tests/test_saved_tensors.py tests/test_kernels_attention.py)
pytest_opts=(-m gpu -v -rfEs -p no:cacheprovider)
if (( dry_run )); then
    pytest_opts+=(--collect-only -q)
else
    "$py" -c "import xdist" 2> /dev/null && pytest_opts+=(-n "$(( $(nproc) < 8 ? $(nproc) : 8 ))")
    "$py" -c "import pytest_timeout" 2> /dev/null && pytest_opts+=(--timeout 90)
fi

export -f install_liger find_liger_wheel
export py dry_run
step liger 10 bash -c install_liger
step env 15 bash -c "command -v nvidia-smi > /dev/null && nvidia-smi; $py -m kernels.probe env --out '$out'"
if (( dry_run )); then
    step probe 90 "$py" -m kernels.probe run --dry-run --out "$out"
else
    step probe 90 "$py" -m kernels.probe run --out "$out" --jobs "$(nproc)"
fi
step tests 95 "$py" -m pytest "${pytest_opts[@]}" -k "not test_cuda_fp32" "${test_files[@]}"
if (( dry_run )); then
    step step 115 "$py" -m engine.bench --tiny --layers 1 --steps 1 --seq-len 32 --dtype float32 \
        --workloads dense --engines ours-ac,hf --json "$out/step.json" --write "$out/BENCH.md"
else
    step step 115 "$py" -m engine.bench --layers 16 --steps 2 --json "$out/step.json" --write "$out/BENCH.md"
fi
kernel_opts=(--repeats 10 --warmup 2)
(( dry_run )) && kernel_opts=(--reference-only --repeats 1 --warmup 0)
step kernels-ce 30 "$py" -m kernels.bench --only ce "${kernel_opts[@]}" --json "$out/kernels_ce.json"
step kernels-elementwise 15 "$py" -m kernels.bench --only elementwise "${kernel_opts[@]}" \
    --json "$out/kernels_elementwise.json"
step kernels-attention 40 "$py" -m kernels.bench --only attention "${kernel_opts[@]}" \
    --json "$out/kernels_attention.json"
step kernels-flex 30 "$py" -m kernels.bench --only flex "${kernel_opts[@]}" --json "$out/kernels_flex.json"
step tests-fp32 40 "$py" -m pytest "${pytest_opts[@]}" -k "test_cuda_fp32" tests/test_kernels_attention.py

echo "== done in $((SECONDS - started)) s; per step (name, exit, seconds, limit):"
cat "$out/steps.tsv"
