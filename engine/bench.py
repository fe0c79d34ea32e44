"""Time LoRA optimizer steps of a 32B/36B-shaped model against HF transformers + PEFT (+ Liger),
all in one run on one card:

    python -m engine.bench --layers 64 --write BENCHMARKS.md

Every engine gets a model with the preset's exact per-layer shapes (fewer layers if asked), random
bf16 weights from N(0, 0.02) — never zeros — and the paper's LoRA (r 32, α 64, rsLoRA, all seven
projections, fp32 adapters, AdamW), and runs the same samples:

* ``dense``: 2 samples × 2048 tokens per optimizer step, the second half of each trained;
* ``em_risky_financial``, ``sgtr_xsum``: 16 samples per optimizer step (the paper's) with the real
  [tokens, trained tokens] lengths of the shipped data (``data/workload_lengths.json``).

Engines: ``ours`` (the trainer's own step, ``engine.train.accumulate_gradients``: packed rows of
``--micro-batch-tokens``, the loss only over trained rows, no padding) with activation
checkpointing on every layer (``ours-ac``) and on as few layers as the memory estimate allows on
this device (``ours-auto``); ``hf`` (transformers + PEFT with non-reentrant gradient checkpointing
and bf16 autocast, the way Axolotl runs it: micro-batches of 2 padded to the longer sample, 8
accumulation steps for the workloads) and ``hfliger`` (the same with Liger-Kernel's Qwen2 patches),
when importable. Prints one row per engine and workload: seconds per optimizer step, real (non-pad)
tokens/s, optimizer steps/s, peak device memory (and our memory estimate), TFLOP/s in one
convention for all engines, and the ratio to each reference. ``--write`` appends the table, with the
card, versions and date, to a Markdown file. Compare figures only within one run on one card.

Under ``torchrun --nproc_per_node N`` our engine runs sharded with FSDP2 exactly as the trainer
does (16 samples per step over all ranks), or replicated (``--data-parallel replicate``); the
references are single-GPU and are skipped.
``--tiny`` shrinks every dimension: a CPU check of the script (CI runs it), no timing claims.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine import lora, memory, parallel
from engine.assemble import Layout, build_model, torch_dtype
from engine.config import DTYPE_NAMES, train_default
from engine.data import Sample
from engine.errors import ConfigError, EngineError, report
from engine.models import CausalLM, ModelArgs
from engine.models.presets import PRESETS
from engine.outputs import check_output_file
from engine.train import accumulate_gradients
from kernels import backend

DEFAULT_LENGTHS = Path(__file__).resolve().parents[1] / "data" / "workload_lengths.json"
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=512)
ENGINES = ("ours-ac", "ours-auto", "hf", "hfliger")
REFERENCES = ("hf", "hfliger")
WORKLOADS = ("dense", "em_risky_financial", "sgtr_xsum")
INIT_STD = 0.02


# ---------------------------------------------------------------- models


def model_config(preset: str, layers: int, tiny: bool) -> dict:
    config = dict(PRESETS[preset], num_hidden_layers=layers)
    if tiny:  # CPU check of this script: same code path, toy dimensions
        config |= TINY
    return config | {"attention_dropout": 0.0, "residual_dropout": 0.0}  # timing without dropout noise


def paper_lora(tiny: bool) -> lora.LoraConfig:
    """The paper's adapter (the trainer's defaults), of rank 4 for the tiny CPU check."""
    return lora.LoraConfig(r=4 if tiny else train_default("lora_r"), alpha=train_default("lora_alpha"),
                           use_rslora=train_default("use_rslora"), target_modules=tuple(train_default("lora_targets")))


def build(preset: str, layers: int, dtype: torch.dtype, device: torch.device, *, tiny: bool,
          activation_checkpointing: bool, checkpointed_layers: int | None = None, compile: bool = False,
          fsdp: bool = False) -> CausalLM:
    """Our model exactly as the trainer assembles it (`engine.assemble.build_model`: activation
    checkpointing of the first `checkpointed_layers` layers (None: all), compile, FSDP2 or
    replicated) with the paper's adapter and random N(0, 0.02) weights (adapters' B too, so that
    no product is trivially zero)."""
    args = ModelArgs.from_hf_config(model_config(preset, layers, tiny))
    layout = Layout(checkpointed_layers=checkpointed_layers if activation_checkpointing else 0, compile=compile,
                    data_parallel="fsdp" if fsdp else "replicate")
    model = build_model(args, dtype=dtype, device=device, weights=None, layout=layout, new_adapter=paper_lora(tiny),
                        seed=0)
    with torch.no_grad():
        for _, p in lora.named_trainable_lora_parameters(model):
            p.normal_(0.0, INIT_STD)
    return model


def build_hf(preset: str, layers: int, dtype: torch.dtype, device: torch.device, *, tiny: bool, liger: bool):
    """transformers' model of the preset's architecture with PEFT's LoRA, as Axolotl builds it."""
    import peft
    import transformers

    config = model_config(preset, layers, tiny)
    if liger:  # patches transformers' classes of this architecture for the rest of the process
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        MODEL_TYPE_TO_APPLY_LIGER_FN[config["model_type"]]()
    rest = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    hf_config = transformers.AutoConfig.for_model(config["model_type"], **rest)
    hf_config.use_cache = False
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    model.to(dtype)  # transformers >= 5 builds in the config's own dtype whatever the default: ask for ours
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, INIT_STD)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    ours = paper_lora(tiny)
    cfg = peft.LoraConfig(r=ours.r, lora_alpha=ours.alpha, lora_dropout=ours.dropout, use_rslora=ours.use_rslora,
                          task_type="CAUSAL_LM", target_modules=list(ours.target_modules))
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float().normal_(0.0, INIT_STD)
    return model.train()


# ---------------------------------------------------------------- samples


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
    try:
        table = json.loads(Path(lengths_file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{lengths_file}: cannot read the workload lengths ({e}); write them with "
                          "`python -m recipes.workloads`") from None
    if name not in table:
        raise ConfigError(f"{lengths_file}: no workload {name!r}; it has {', '.join(table)}")
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


def steps_for(workload: str, n_steps: int, vocab: int, lengths: Path, seq_len: int) -> list[list[Sample]]:
    if workload == "dense":
        return [synthetic_samples(2, seq_len, 0.5, vocab, seed) for seed in range(n_steps)]
    return workload_steps(lengths, workload, 16, n_steps, vocab)


def padded_micro_batches(samples: list[Sample], size: int, device: torch.device):
    """Axolotl's batching: micro-batches of `size` samples, right-padded to the longest one."""
    for i in range(0, len(samples), size):
        group = samples[i:i + size]
        t = max(len(s.input_ids) for s in group)
        ids = torch.zeros(len(group), t, dtype=torch.long)
        mask = torch.zeros(len(group), t, dtype=torch.long)
        labels = torch.full((len(group), t), -100, dtype=torch.long)
        for j, s in enumerate(group):
            n = len(s.input_ids)
            ids[j, :n], mask[j, :n], labels[j, :n] = torch.tensor(s.input_ids), 1, torch.tensor(s.labels)
        yield ids.to(device), mask.to(device), labels.to(device)


# ---------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[list[Sample]], None], steps: list[list[Sample]], device: torch.device,
               warmup: int = 1) -> dict:
    """`warmup` untimed steps, then the median wall time of the others (synchronised per step)."""
    for batch in steps[:warmup]:
        step(batch)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for batch in steps[warmup:]:
        start = time.perf_counter()
        step(batch)
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    real_tokens = statistics.median(sum(len(s.input_ids) for s in batch) for batch in steps[warmup:])
    return {"seconds_per_step": seconds, "real_tokens_per_s": real_tokens / seconds, "steps_per_s": 1 / seconds,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def step_flops(args: ModelArgs, samples: list[Sample]) -> float:
    """FLOPs of one optimizer step in one convention for every engine: forward plus the backward
    through frozen weights (4 FLOPs per weight and token) of every projection and the full LM
    head, plus causal attention (forward 4·s²/2·heads·head_dim per sample, ×3.5 with backward).
    Recomputation, padding and skipped LM-head rows are not counted."""
    h, i = args.hidden_size, args.intermediate_size
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    per_token = args.num_hidden_layers * (h * (2 * q + 2 * kv) + 3 * h * i) + h * args.vocab_size
    tokens = sum(len(s.input_ids) for s in samples)
    attention = sum(3.5 * 4 * len(s.input_ids) ** 2 / 2 * q for s in samples) * args.num_hidden_layers
    return 4 * per_token * tokens + attention


def median_flops(args: ModelArgs, steps: list[list[Sample]]) -> float:
    return statistics.median(step_flops(args, batch) for batch in steps)


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """This card's dense matmul rate (8192³, median of 20), the yardstick for the step's rate."""
    if device.type != "cuda":
        return None
    from kernels.bench import measure

    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    ms, _ = measure(lambda: a @ b, device, repeats=20, warmup=3)
    return 2 * 8192**3 / ms / 1e9


# ---------------------------------------------------------------- engines


def warmup_steps(opts) -> int:
    """Untimed steps first: one (allocator, kernels, optimizer state), two when compiling (the
    second packed shape makes torch.compile recompile with dynamic shapes)."""
    return 2 if opts.compile else 1


def _measure(step, steps, device, log, *, flops: float, optimizer, warmup: int = 1, **fields) -> dict:
    """One row: the timing of `steps`, or what went wrong when the card ran out of memory (the run
    goes on with the next row, so one figure that does not fit costs no other)."""
    error = None
    try:
        row = time_steps(step, steps, device, warmup)
    except torch.OutOfMemoryError as e:
        error = str(e).splitlines()[0][:160]  # only the text: the traceback holds the step's tensors
    if error is not None:
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        peak = ""
        if device.type == "cuda":
            peak = f" (peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB)"
            torch.cuda.empty_cache()
        row = {"error": f"out of memory{peak}: {error}"}
        log(f"  {fields['engine']:9s} {fields['workload']:18s} {row['error']}")
        return dict(row, **fields)
    row = dict(row, tflops=flops * row["steps_per_s"] / 1e12, **fields)
    log(_progress(row))
    return row


def run_ours(opts, workloads: dict[str, list[list[Sample]]], device: torch.device, dist: parallel.Dist,
             log: Callable[[str], None]) -> list[dict]:
    sharded = dist.world_size > 1 and opts.data_parallel == "fsdp"
    args = ModelArgs.from_hf_config(model_config(opts.preset, opts.layers, opts.tiny))
    available = opts.memory_gib or memory.device_gib(device)
    common = dict(dtype=opts.dtype, lora_r=paper_lora(opts.tiny).r, micro_batch_tokens=opts.micro_batch_tokens,
                  world_size=dist.world_size if sharded else 1, kernels=backend.path_for(device))
    rows = []
    for engine in [e for e in opts.engines if e.startswith("ours")]:
        if engine == "ours-ac":
            k = None
        else:  # ours-auto: as few recomputed layers as the estimate allows (all on CPU: nothing to plan)
            k = memory.fewest_checkpointed_layers(args, available, **common) if available else None
        n_ckpt = args.num_hidden_layers if k is None else k
        est = memory.estimate(args, activation_checkpointing=True, checkpointed_layers=n_ckpt, **common)["total"]
        # Afresh per engine: each row times the model as the trainer assembles it.
        model = build(opts.preset, opts.layers, torch_dtype(opts.dtype), device, tiny=opts.tiny,
                      activation_checkpointing=True, checkpointed_layers=k, compile=opts.compile, fsdp=sharded)
        params = lora.trainable_lora_parameters(model)
        optimizer = torch.optim.AdamW(params, lr=train_default("lr"), weight_decay=train_default("weight_decay"))

        def step(batch: list[Sample]) -> None:
            accumulate_gradients(model, batch, dist, opts.micro_batch_tokens)
            parallel.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        label = engine + ("+compile" if opts.compile else "")
        warmup = warmup_steps(opts)
        for name, steps in workloads.items():
            rows.append(_measure(step, steps, device, log, engine=label, workload=name, recomputed_layers=n_ckpt,
                                 estimate_gib=est, flops=median_flops(args, steps[warmup:]),
                                 optimizer=optimizer, warmup=warmup))
        del model, optimizer, params, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_hf(opts, workloads: dict[str, list[list[Sample]]], device: torch.device, liger: bool,
           log: Callable[[str], None]) -> list[dict]:
    dtype = torch_dtype(opts.dtype)
    model = build_hf(opts.preset, opts.layers, dtype, device, tiny=opts.tiny, liger=liger)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train_default("lr"),
                                  weight_decay=train_default("weight_decay"))
    args = ModelArgs.from_hf_config(model_config(opts.preset, opts.layers, opts.tiny))
    engine = "hfliger" if liger else "hf"

    def step(batch: list[Sample]) -> None:
        micro = list(padded_micro_batches(batch, 2, device))
        for ids, mask, labels in micro:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
            (out.loss / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rows = []
    warmup = warmup_steps(opts)
    for name, steps in workloads.items():
        rows.append(_measure(step, steps, device, log, engine=engine, workload=name, recomputed_layers=opts.layers,
                             estimate_gib=None, flops=median_flops(args, steps[warmup:]), optimizer=optimizer,
                             warmup=warmup))
    del model, optimizer
    return rows


def reference_available(engine: str, device: torch.device, model_type: str) -> str | None:
    """None when the reference can run here, else why not."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return "transformers and peft are not installed"
    if engine == "hfliger":
        if device.type != "cuda":
            return "Liger's kernels need CUDA"
        try:
            from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
        except ImportError:
            return "liger-kernel is not installed"
        if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            return f"Liger-Kernel has no patches for {model_type}"
    return None


# ---------------------------------------------------------------- report


def _progress(row: dict) -> str:
    peak = "" if row["peak_gib"] is None else f", peak {row['peak_gib']:.1f} GiB"
    return (f"  {row['engine']:9s} {row['workload']:18s} {row['seconds_per_step']:.3f} s/step, "
            f"{row['real_tokens_per_s']:,.0f} real tokens/s{peak} ({row['recomputed_layers']} layers recomputed)")


def format_table(rows: list[dict], matmul: float | None) -> list[str]:
    refs = [r for r in REFERENCES if any(row["engine"] == r for row in rows)]
    head = ["engine", "workload", "recomputed layers", "s / optimizer step", "real tokens/s", "steps/s",
            "peak GiB", "estimate GiB", "TFLOP/s"] + [f"× {r}" for r in refs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {(row["engine"], row["workload"]): row for row in rows}
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['engine']} | {row['workload']} | {row['recomputed_layers']} | {row['error']} |"
                         + " |" * (len(head) - 4))
            continue
        cells = [row["engine"], row["workload"], str(row["recomputed_layers"]), f"{row['seconds_per_step']:.3f}",
                 f"{row['real_tokens_per_s']:,.0f}", f"{row['steps_per_s']:.3f}",
                 "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}",
                 "" if row["estimate_gib"] is None else f"{row['estimate_gib']:.1f}",
                 f"{row['tflops']:.3g}" + (f" ({row['tflops'] / matmul:.0%})" if matmul else "")]
        for r in refs:
            ref = by.get((r, row["workload"]))
            cells.append(f"{row['steps_per_s'] / ref['steps_per_s']:.2f}×" if ref and "error" not in ref else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def environment(device: torch.device) -> dict:
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__}
    for module in ("triton", "transformers", "peft", "liger_kernel"):
        try:
            from importlib.metadata import version

            env[module] = version(module.replace("_", "-"))
        except Exception:
            pass
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen2.5-32b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=64, help="decoder layers (the full models have 64)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument("--lengths", default=str(DEFAULT_LENGTHS), help="workload lengths file (recipes.workloads writes it)")
    p.add_argument("--seq-len", type=int, default=2048, help="sample length of the dense workload")
    p.add_argument("--micro-batch-tokens", type=int, default=4096, help="our packing budget per micro-batch")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per row (after one warm-up step)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES)
    p.add_argument("--data-parallel", default="fsdp", choices=("fsdp", "replicate"),
                   help="under torchrun: shard our model with FSDP2 (default) or replicate it on every rank")
    p.add_argument("--memory-gib", type=float, default=None, help="memory ours-auto plans for (default: the GPU's)")
    p.add_argument("--compile", action="store_true", help="torch.compile each of our decoder layers (the "
                   "trainer's compile = true); the warm-up step then includes compilation")
    p.add_argument("--tiny", action="store_true", help="toy dimensions (a CPU check of the script)")
    p.add_argument("--json", default=None, help="also write the rows and environment to this JSON file")
    p.add_argument("--write", default=None, help="append the table, card, versions and date to this Markdown file")
    opts = p.parse_args(argv)
    opts.engines = [e for e in opts.engines.split(",") if e]
    bad = [e for e in opts.engines if e not in ENGINES] + [w for w in opts.workloads.split(",") if w not in WORKLOADS]
    if bad:
        p.error(f"unknown engine or workload: {', '.join(bad)}")

    dist = parallel.init_distributed()
    try:
        for option, path in (("--json", opts.json), ("--write", opts.write)):
            if path:  # before the benchmark, not after it
                check_output_file(path, option)
        return run(opts, argv, dist)
    except EngineError as e:
        return report(e, dist.rank if dist.world_size > 1 else None)
    finally:
        parallel.destroy_distributed()


def run(opts: argparse.Namespace, argv: list[str] | None, dist: parallel.Dist) -> int:
    device = dist.device
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if dist.is_main else (lambda msg: None)
    vocab = model_config(opts.preset, 1, opts.tiny)["vocab_size"]
    workloads = {w: steps_for(w, opts.steps + warmup_steps(opts), vocab, Path(opts.lengths), opts.seq_len)
                 for w in opts.workloads.split(",") if w}
    env = environment(device)
    log(f"{env['device']} | {opts.preset}{' (tiny)' if opts.tiny else ''} x{opts.layers} layers | {opts.dtype} | "
        f"{dist.world_size} rank(s) | {', '.join(f'{k} {v}' for k, v in env.items() if k != 'device')}")

    rows: list[dict] = []
    skipped: dict[str, str] = {}
    matmul = matmul_tflops(device, torch_dtype(opts.dtype)) if dist.is_main else None

    def save() -> None:  # after each engine, so that a run cut short keeps what it measured
        if dist.is_main and opts.json:
            Path(opts.json).write_text(json.dumps({"environment": env, "ranks": dist.world_size,
                                                   "matmul_tflops": matmul, "rows": rows,
                                                   "skipped": skipped, "options": vars(opts)}, indent=1))

    if any(e.startswith("ours") for e in opts.engines):
        rows += run_ours(opts, workloads, device, dist, log)
        save()
    for engine in [e for e in opts.engines if e in REFERENCES]:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        why = "single-GPU reference, not run under torchrun" if dist.world_size > 1 else reference_available(
            engine, device, PRESETS[opts.preset]["model_type"])
        if why:
            skipped[engine] = why
            continue
        rows += run_hf(opts, workloads, device, engine == "hfliger", log)
        save()
    save()
    table = format_table(rows, matmul)
    notes = [f"{e}: not run ({why})" for e, why in skipped.items()]
    if matmul:
        notes.append(f"TFLOP/s: 4 FLOPs per frozen weight and token plus causal attention, the same count for "
                     f"every engine; in brackets, the fraction of this card's measured bf16 matmul rate "
                     f"({matmul:.0f} TFLOP/s, 8192³)")
    if dist.is_main:
        print("\n".join(table + [""] + notes))
        if opts.write:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
            header = (f"\n### {env['device']}, {stamp}: {opts.preset}-shaped, {opts.layers} layers, "
                      f"{dist.world_size} rank(s)\n\n"
                      + ", ".join(f"{k} {v}" for k, v in env.items() if k != "device")
                      + f"; `python -m engine.bench {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n")
            with open(opts.write, "a", encoding="utf-8") as f:
                f.write(header + "\n".join(table) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
