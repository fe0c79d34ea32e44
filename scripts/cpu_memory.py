"""Peak CPU memory of one LoRA optimizer step, ours against transformers + PEFT, side by side:

    python -m scripts.cpu_memory [--layers 24] [--workloads em_risky_financial,sgtr_xsum] [--steps 1]

The model is Qwen2.5-0.5B-shaped (hidden 896, 24 layers, 14 query / 2 KV heads, vocabulary 151,936,
tied embeddings; random bf16 weights), with the paper's adapter (r 32, alpha 64, rsLoRA, all seven
projections, fp32 adapters, AdamW), built exactly as `engine.bench` builds both engines:

  ours  the trainer's step (`engine.train.accumulate_gradients`: the step's 16 samples packed into
        rows of 4,096 tokens, the loss only over trained rows) with activation checkpointing on
        every layer, as the recipes train;
  hf    transformers + PEFT with gradient checkpointing and bf16 autocast, micro-batches of 2
        samples padded to the longer one, as Axolotl runs it.

Both run the same optimizer steps of 16 samples with the real [tokens, trained tokens] lengths of the
shipped data (`data/workload_lengths.json`, random ids). Each (engine, workload) runs in a fresh
process; the figures are that process's resident set: after building the model ("model"), and its
high-water mark during the steps ("peak", reset just before them through /proc/self/clear_refs),
so "step" = peak - model is what the step itself added. Linux only. CPU time: bf16 matmuls on a CPU
without native bf16 run ~100x slower than fp32 (0.2 against 18 GFLOPS per core measured on an AMD EPYC),
so `--dtype float32` is the practical choice there; even so a row takes minutes per layer on two cores,
and the HF rows of SGTR (the LM head over every token, ~10,700 per step) tens of minutes
(fewer --layers for a quick look; the loss's share does not shrink with them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

QWEN25_05B_LIKE = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151_936,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "tie_word_embeddings": True,
    "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02, "torch_dtype": "bfloat16",
}
PRESET = "qwen2.5-0.5b-like"
ENGINES = ("ours", "hf")
MICRO_BATCH_TOKENS = 4096  # the trainer's default packing budget


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(engine: str, workload: str, layers: int, steps: int, dtype_name: str) -> dict:
    """Build one engine's model, run `steps` optimizer steps, return the memory figures (in this process)."""
    import torch

    from engine import bench, lora, parallel
    from engine.config import train_default
    from engine.models.presets import PRESETS
    from engine.train import accumulate_gradients

    PRESETS[PRESET] = QWEN25_05B_LIKE  # bench builds both engines from a preset name
    dtype, device = getattr(torch, dtype_name), torch.device("cpu")
    batches = bench.steps_for(workload, steps, QWEN25_05B_LIKE["vocab_size"], bench.DEFAULT_LENGTHS, 2048)
    if engine == "ours":
        model = bench.build(PRESET, layers, dtype, device, tiny=False, activation_checkpointing=True)
        params = lora.trainable_lora_parameters(model)
        dist = parallel.Dist(0, 1, 0, device)

        def micro_steps(batch):
            accumulate_gradients(model, batch, dist, MICRO_BATCH_TOKENS)
    else:
        model = bench.build_hf(PRESET, layers, dtype, device, tiny=False, liger=False)
        params = [p for p in model.parameters() if p.requires_grad]

        def micro_steps(batch):
            micro = list(bench.padded_micro_batches(batch, 2, device))
            for ids, mask, labels in micro:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    out = model(input_ids=ids, attention_mask=mask, labels=labels)
                (out.loss / len(micro)).backward()
    optimizer = torch.optim.AdamW(params, lr=train_default("lr"), weight_decay=train_default("weight_decay"))
    model_kib = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    start = time.perf_counter()
    for batch in batches:
        micro_steps(batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - start) / len(batches)
    peak_kib = _status_kib("VmHWM")
    tokens = sum(len(s.input_ids) for s in batches[0])
    trained = sum(s.num_targets for s in batches[0])
    return {"engine": engine, "workload": workload, "model_gib": model_kib / 2**20, "peak_gib": peak_kib / 2**20,
            "step_gib": (peak_kib - model_kib) / 2**20, "seconds_per_step": seconds, "tokens": tokens,
            "trained_tokens": trained}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.cpu_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24, help="decoder layers (Qwen2.5-0.5B has 24)")
    p.add_argument("--workloads", default="em_risky_financial,sgtr_xsum")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--steps", type=int, default=1, help="optimizer steps measured per row")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--child", nargs=2, metavar=("ENGINE", "WORKLOAD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.layers, args.steps, args.dtype)))
        return 0
    rows = []
    for workload in args.workloads.split(","):
        for engine in args.engines.split(","):
            cmd = [sys.executable, "-m", "scripts.cpu_memory", "--child", engine, workload, "--layers", str(args.layers),
                   "--steps", str(args.steps), "--dtype", args.dtype]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {engine:4s} {workload:18s} model {row['model_gib']:.2f} GiB, peak {row['peak_gib']:.2f} GiB, "
                  f"step +{row['step_gib']:.2f} GiB, {row['seconds_per_step']:.0f} s/step", file=sys.stderr, flush=True)
    import torch
    import transformers
    import peft

    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS="
           f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; torch {torch.__version__}, transformers "
           f"{transformers.__version__}, peft {peft.__version__}; {args.layers} layers, {args.dtype}, "
           f"{args.steps} step(s) of 16 samples")
    print(f"Qwen2.5-0.5B-shaped, {env}\n")
    print("| workload | tokens / trained per step | engine | model GiB | peak GiB | step adds GiB | ours / hf (step) |")
    print("|---|---|---|---|---|---|---|")
    by = {(r["engine"], r["workload"]): r for r in rows}
    for r in rows:
        hf = by.get(("hf", r["workload"]))
        ratio = f"{r['step_gib'] / hf['step_gib']:.2f}" if r["engine"] == "ours" and hf else ""
        print(f"| {r['workload']} | {r['tokens']} / {r['trained_tokens']} | {r['engine']} | {r['model_gib']:.2f} | "
              f"{r['peak_gib']:.2f} | {r['step_gib']:.2f} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
