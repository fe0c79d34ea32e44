"""Time LoRA optimizer steps of a 32B/36B-shaped model with random weights on one device:
`python -m engine.bench --preset qwen2.5-32b --layers 8 --steps 3`.

The model has the preset's exact per-layer shapes (fewer layers if asked), random bf16 weights from
N(0, 0.02) — never zeros — and the paper's LoRA (r 32, α 64, rsLoRA, all seven projections). A step
is `--samples` sequences of `--seq-len` tokens, the last `--trained-fraction` of each trained,
packed and run exactly as the trainer runs it (`engine.train.accumulate_gradients`, AdamW step).
`--workload em_risky_financial|sgtr_xsum` instead draws 16 samples per step with the real lengths
of the paper's data (`data/workload_lengths.json`). Prints real tokens/s (no padding is ever run),
optimizer steps/s and peak device memory. Compare figures only within one
run on one card.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from engine import lora, parallel
from engine.data import Sample
from engine.models import CausalLM, ModelArgs
from engine.models.presets import PRESETS
from engine.train import DTYPES, PAPER_TARGETS, accumulate_gradients

DEFAULT_LENGTHS = Path(__file__).resolve().parents[1] / "data" / "workload_lengths.json"
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=512)


def build(preset: str, layers: int, dtype: torch.dtype, device: torch.device, *, tiny: bool,
          activation_checkpointing: bool) -> CausalLM:
    config = dict(PRESETS[preset], num_hidden_layers=layers)
    if tiny:  # CPU smoke test of this script: same code path, toy dimensions
        config |= TINY
    config |= {"attention_dropout": 0.0, "residual_dropout": 0.0}  # timing without dropout noise
    with torch.device("meta"):
        model = CausalLM(ModelArgs.from_hf_config(config))
    model.to(dtype=dtype)
    lora.apply_lora(model, lora.LoraConfig(r=32 if not tiny else 4, alpha=64.0, use_rslora=True,
                                           target_modules=tuple(PAPER_TARGETS)))
    if activation_checkpointing:
        parallel.apply_activation_checkpointing(model)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()  # HF's scheme: N(0, initializer_range) weights
    lora.init_lora_(model, seed=0)
    with torch.no_grad():  # B = 0 at init; random B makes the benchmark's arithmetic generic
        for name, p in lora.named_trainable_lora_parameters(model):
            if name.endswith(".B"):
                p.normal_(0.0, 0.02)
    return model.train()


def synthetic_samples(n: int, seq_len: int, trained_fraction: float, vocab: int, seed: int) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    first_trained = int(seq_len * (1 - trained_fraction))
    for i in range(n):
        ids = torch.randint(0, vocab, (seq_len,), generator=g).tolist()
        labels = [-100] * first_trained + ids[first_trained:]
        samples.append(Sample(ids, labels, f"synthetic:{i}", None))
    return samples


def workload_steps(lengths_file: Path, name: str, samples: int, steps: int, vocab: int, seed: int = 0) -> list[list[Sample]]:
    """Optimizer steps of `samples` samples each, drawn (seeded) from a workload's real
    [tokens, trained tokens] lengths; random ids, the last `trained` tokens of each sample trained."""
    table = json.loads(Path(lengths_file).read_text())
    if name not in table:
        raise SystemExit(f"error: no workload {name!r} in {lengths_file}; it has {', '.join(table)}")
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        batch = []
        for i in range(samples):
            n, trained = rng.choice(table[name])
            ids = torch.randint(0, vocab, (n,), generator=g).tolist()
            batch.append(Sample(ids, [-100] * (n - trained) + ids[n - trained:], f"{name}:{step}:{i}", None))
        out.append(batch)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen2.5-32b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=4, help="decoder layers (the full models have 64)")
    p.add_argument("--workload", default="dense",
                   help="dense (synthetic --samples x --seq-len), or a workload of --lengths: real sample "
                        "lengths of the paper's data (em_risky_financial, sgtr_xsum)")
    p.add_argument("--lengths", default=str(DEFAULT_LENGTHS), help="workload lengths file (recipes.workloads writes it)")
    p.add_argument("--samples", type=int, default=None, help="samples per optimizer step (default: 2 dense, 16 workloads)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--trained-fraction", type=float, default=0.5)
    p.add_argument("--micro-batch-tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--tiny", action="store_true", help="toy dimensions (a CPU check of the script)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist = parallel.Dist(0, 1, 0, device)
    model = build(args.preset, args.layers, DTYPES[args.dtype], device, tiny=args.tiny,
                  activation_checkpointing=args.activation_checkpointing)
    params = lora.trainable_lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    vocab = model.args.vocab_size
    if args.workload == "dense":
        samples = args.samples or 2
        steps = [synthetic_samples(samples, args.seq_len, args.trained_fraction, vocab, 0)] * (args.steps + 1)
    else:
        samples = args.samples or 16  # the paper's samples per optimizer step
        steps = workload_steps(Path(args.lengths), args.workload, samples, args.steps + 1, vocab)

    def step(batch: list[Sample]) -> int:
        accumulate_gradients(model, batch, dist, args.micro_batch_tokens)
        parallel.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(len(s.input_ids) for s in batch)

    step(steps[0])  # warm-up: allocator, kernels, optimizer state
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    tokens = sum(step(batch) for batch in steps[1:])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "preset": args.preset + (" (tiny)" if args.tiny else ""),
        "layers": args.layers, "workload": args.workload, "samples": samples,
        "seq_len": args.seq_len if args.workload == "dense" else None, "dtype": args.dtype,
        "activation_checkpointing": args.activation_checkpointing, "micro_batch_tokens": args.micro_batch_tokens,
        "tokens_per_s": tokens / args.steps / seconds, "steps_per_s": 1.0 / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    if args.json:
        print(json.dumps(result))
    else:
        mem = f"{result['peak_memory_gib']:.1f} GiB" if result["peak_memory_gib"] is not None else "n/a (cpu)"
        shape = f"{samples} x {args.seq_len} tokens" if args.workload == "dense" else f"{args.workload}, {samples} samples/step"
        print(f"{result['device']} | {result['preset']} x{args.layers} layers | {shape}, "
              f"{args.dtype}, AC {'on' if args.activation_checkpointing else 'off'} | "
              f"{result['tokens_per_s']:,.0f} tokens/s | {result['steps_per_s']:.3f} steps/s | peak {mem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
