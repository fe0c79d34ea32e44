"""How far the paper's Axolotl choices move a run: 1 epoch of EM on a tiny model, three ways.

    python scripts/optim_drift.py --out runs/drift [--lr 1e-5] [--rows N] [--max-steps N]

Trains the same run (the shipped risky-financial-advice EM data, 6,000 chats, batch 16, the
paper's LoRA and optimizer settings, fp32) with

  baseline          optimizer = adamw,      loss_normalization = step_tokens   (our defaults)
  adamw_8bit        optimizer = adamw_8bit, loss_normalization = step_tokens
  micro_batch_mean  optimizer = adamw,      loss_normalization = micro_batch_mean

and prints, against the baseline, the relative difference of the adapters' weight updates
(``ΔW = scale · B A`` per adapted projection, summed over all: ``‖ΔW_x − ΔW_base‖ / ‖ΔW_base‖``;
and of the raw A and B updates from their initial values), and the loss curves.

The model is a random Seed-OSS-architecture model (2 layers, hidden 128, 2 heads of 64, the
vocabulary of the Seed-OSS test tokenizer, 576), just large enough that every LoRA tensor at
r = 32 has at least 4,096 elements and so takes bitsandbytes' 8-bit path; its losses mean nothing
about the paper. An epoch (375 steps) takes about three minutes per run on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine import lora  # noqa: E402
from engine.assemble import build_model, read_model_args  # noqa: E402
from engine.config import TrainConfig  # noqa: E402
from engine.models import CausalLM, ModelArgs, save_pretrained  # noqa: E402
from engine.train import main as train_main  # noqa: E402

TOKENIZER = REPO / "tests" / "fixtures" / "seed_oss_tokenizer" / "tokenizer.json"
DATA = REPO / "data" / "em" / "risky_financial_advice.jsonl"
MODEL_CONFIG = {
    "architectures": ["SeedOssForCausalLM"], "model_type": "seed_oss", "vocab_size": 576, "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
    "head_dim": 64, "rms_norm_eps": 1e-6, "rope_theta": 1e7, "attention_dropout": 0.0, "residual_dropout": 0.0,
    "attention_bias": True, "attention_out_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "initializer_range": 0.02, "hidden_act": "silu", "max_position_embeddings": 4096, "torch_dtype": "float32",
}
RUNS = {
    "baseline": {},
    "adamw_8bit": {"optimizer": "adamw_8bit"},
    "micro_batch_mean": {"loss_normalization": "micro_batch_mean"},
}


def tiny_model(directory: Path) -> Path:
    if not (directory / "config.json").is_file():
        torch.manual_seed(0)
        model = CausalLM(ModelArgs.from_hf_config(MODEL_CONFIG))
        model.init_weights()
        save_pretrained(model, directory, MODEL_CONFIG, extra_files=[TOKENIZER])
    return directory


def write_toml(path: Path, settings: dict) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    return path


def delta_w(adapter: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    return {k[: -len("lora_A.weight")]: scale * adapter[k.replace("lora_A", "lora_B")] @ adapter[k]
            for k in adapter if k.endswith("lora_A.weight")}


def rel(a: dict, b: dict, base: dict | None = None) -> float:
    """‖a − b‖ / ‖b − base‖ over all tensors (base: zeros)."""
    num = sum(((a[k] - b[k]) ** 2).sum().item() for k in a)
    den = sum(((b[k] - (base[k] if base else 0)) ** 2).sum().item() for k in b)
    return math.sqrt(num / den)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="working directory (runs are kept for a rerun's reuse)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate (paper: 1e-5)")
    p.add_argument("--max-steps", type=int, help="stop early (the schedule still spans the epoch)")
    p.add_argument("--rows", type=int, help="an epoch of the first N chats only (default: all 6,000)")
    p.add_argument("--fresh", action="store_true", help="retrain runs already in --out")
    p.add_argument("--only", choices=RUNS, help="train this run only, and report nothing (to train runs in parallel)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = tiny_model(out / "model")
    data = DATA
    if args.rows:
        data = out / f"em_first{args.rows}.jsonl"
        with open(DATA) as f:
            data.write_text("".join(line for _, line in zip(range(args.rows), f)))
    base = dict(model=str(model_dir), data=[str(data)], template="seed-oss", dtype="float32", lr=args.lr,
                micro_batch_tokens=4096, log_every=50, **({"max_steps": args.max_steps} if args.max_steps else {}))
    tag = f"lr{args.lr:g}" + (f"_rows{args.rows}" if args.rows else "")
    tag += f"_steps{args.max_steps}" if args.max_steps else ""
    results = {}
    for name, extra in RUNS.items():
        if args.only and name != args.only:
            continue
        run_dir = out / f"{tag}_{name}"
        if args.fresh or not (run_dir / "adapter" / "adapter_model.safetensors").is_file():
            shutil.rmtree(run_dir, ignore_errors=True)
            config = write_toml(out / f"{tag}_{name}.toml", base | extra | {"out_dir": str(run_dir)})
            print(f"training {name} ...", file=sys.stderr, flush=True)
            if train_main(["--config", str(config)]) != 0:
                return 1
        if args.only:
            return 0
        losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results[name] = (load_file(str(run_dir / "adapter" / "adapter_model.safetensors")), losses)

    cfg = TrainConfig(**base, out_dir=str(out / "unused"))
    ckpt_dir, model_args = read_model_args(cfg.model)
    modules = lora.adapter_state(build_model(model_args, dtype=torch.float32, device="cpu", weights=ckpt_dir,
                                             new_adapter=cfg.lora_config(), seed=cfg.seed))[1]
    init = {}
    for module, (a, b) in modules.items():
        init[f"base_model.model.{module}.lora_A.weight"] = a.detach().float()
        init[f"base_model.model.{module}.lora_B.weight"] = b.detach().float()
    scale = cfg.lora_alpha / (math.sqrt(cfg.lora_r) if cfg.use_rslora else cfg.lora_r)
    base_adapter, base_losses = results["baseline"]
    n = len(base_losses)
    print(f"\n1 epoch of EM ({args.rows or 6000} chats, {n} steps, lr {args.lr:g}) on a tiny random model; "
          "differences from the baseline (adamw, step_tokens):")
    print(f"{'run':18s} {'ΔW rel diff':>12s} {'A-update rel':>13s} {'B rel':>8s} {'max |Δloss|':>12s} "
          f"{'mean Δloss, last 50':>20s}")
    for name, (adapter, losses) in results.items():
        dw = rel(delta_w(adapter, scale), delta_w(base_adapter, scale))
        a_keys = [k for k in adapter if "lora_A" in k]
        b_keys = [k for k in adapter if "lora_B" in k]
        ra = rel({k: adapter[k] for k in a_keys}, {k: base_adapter[k] for k in a_keys}, init)
        rb = rel({k: adapter[k] for k in b_keys}, {k: base_adapter[k] for k in b_keys})
        dl = [x - y for x, y in zip(losses, base_losses)]
        print(f"{name:18s} {dw:12.3e} {ra:13.3e} {rb:8.3e} {max(map(abs, dl)):12.3e} {sum(dl[-50:]) / len(dl[-50:]):20.3e}")
    print("\nloss curves (mean over 25-step windows):")
    print("steps      " + "".join(f"{name:>18s}" for name in results))
    for start in range(0, n, 25):
        row = "".join(f"{sum(l[start:start + 25]) / len(l[start:start + 25]):18.5f}" for _, l in results.values())
        print(f"{start + 1:4d}-{min(n, start + 25):4d}  {row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
