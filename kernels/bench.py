"""Kernel benchmarks: `python -m kernels.bench [--only ce|elementwise|attention] [--reference-only] [--json PATH]`.

Times each Triton kernel against its references at the issue's shapes, all in the same run on the
same card, and prints one table: median time of CUDA-event-timed forward+backward calls, TFLOP/s
(useful FLOPs only: for the loss 4·N_trained·H·V, the logits and d_hidden GEMMs), peak extra memory
(max allocated during one forward+backward minus allocated before it — inputs excluded,
hidden.grad included) and the ratio to each reference.

Fused linear cross-entropy: N = 4096 tokens, H = 5120, V = 152,064 (Qwen2.5's LM head), bf16,
frozen W (LoRA), with 0%, 25% and 99% of the targets ignored. References: naive torch (bf16
matmul + fp32 F.cross_entropy), this repo's reference path (torch, trained rows gathered) and
Liger-Kernel's LigerFusedLinearCrossEntropyLoss when it imports. Targets: ≤ 0.85× Liger's time at
≤ 0.25 GiB extra (25% ignored); with 99% ignored ≤ 0.05× the all-trained time.

Elementwise (``run_elementwise``): RMSNorm at 4096 × 5120, SwiGLU's silu(gate)·up at
4096 × 27,648 and RoPE on q at 4096 × 40 × 128, bf16, forward + backward: torch op by op vs the
Triton kernels vs Liger's.

The attention sections come from `kernels.bench_attention.run(args, emit) -> list[dict]` (rows
with keys name, ms, tflops, extra_gib, ratios; each case's rows are printed and written to --json
as soon as they are measured); `args` is this script's argparse namespace (reference_only, only,
repeats, warmup, json). `--only flex` is the FlexAttention case alone (run last: its compile is
the slowest).

`--reference-only` runs only the reference paths, on CPU, at small shapes (a CI check that the
script works; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels import backend
from kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy

CE_FULL = dict(tokens=4096, hidden=5120, vocab=152_064, dtype=torch.bfloat16)
CE_SMALL = dict(tokens=128, hidden=64, vocab=512, dtype=torch.float32)  # --reference-only
IGNORED = (0.0, 0.25, 0.99)
SECTIONS = ("ce", "elementwise", "attention", "flex")
TARGET_VS_LIGER = 0.85
TARGET_EXTRA_GIB = 0.25
TARGET_SPARSE = 0.05


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


def measure(step: Callable[[], None], device: torch.device, repeats: int, warmup: int,
            reset: Callable[[], None] = lambda: None) -> tuple[float, float | None]:
    """(median ms, peak extra GiB or None on CPU) of `step`; `reset` frees what a step left (grads)
    before the memory baseline is taken."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30
        return statistics.median(times), extra
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), None


# ---------------------------------------------------------------------------------------------
# Fused linear cross-entropy
# ---------------------------------------------------------------------------------------------


def ce_inputs(tokens, hidden, vocab, dtype, ignored, device, seed=0):
    """Drawn on ``device`` (a (V, H) draw on the CPU costs seconds at V = 152,064)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g, device=device).to(dtype)  # ~ RMSNorm output scale
    w = (torch.randn(vocab, hidden, generator=g, device=device) * 0.02).to(dtype)  # frozen LM head
    t = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    t[torch.randperm(tokens, generator=g, device=device)[: round(ignored * tokens)]] = IGNORE_INDEX
    return h.requires_grad_(True), w, t


def ce_implementations(reference_only: bool) -> dict[str, Callable]:
    def ours(path):
        def fn(h, w, t):
            with backend.force(path):
                return linear_cross_entropy(h, w, t)
        return fn

    def naive(h, w, t):
        return F.cross_entropy((h @ w.t()).float(), t, ignore_index=IGNORE_INDEX, reduction="sum")

    impls = {"torch naive": naive, "ce reference": ours("reference")}
    if reference_only:
        return impls
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        print("ce: liger-kernel not importable: no Liger reference (pip install liger-kernel)", file=sys.stderr)
    else:
        liger_loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")

        def liger(h, w, t):
            out = liger_loss(w, h, t)
            return out[0] if isinstance(out, tuple) else out

        impls["liger"] = liger
    impls["ce triton"] = ours("triton")
    return impls


def run_ce(args) -> list[dict]:
    device = torch.device("cpu" if args.reference_only else "cuda")
    shape = CE_SMALL if args.reference_only else CE_FULL
    impls = ce_implementations(args.reference_only)
    rows = []
    for ignored in IGNORED:
        h, w, t = ce_inputs(shape["tokens"], shape["hidden"], shape["vocab"], shape["dtype"], ignored, device)
        trained = int((t != IGNORE_INDEX).sum())
        flops = 4 * trained * shape["hidden"] * shape["vocab"]
        case = (f"N={shape['tokens']} H={shape['hidden']} V={shape['vocab']} "
                f"{str(shape['dtype']).removeprefix('torch.')} {ignored:.0%} ignored, frozen W")
        measured = {}
        for name, fn in impls.items():
            losses = []

            def step(fn=fn, losses=losses, h=h, w=w, t=t):
                h.grad = None
                loss = fn(h, w, t)
                loss.backward()
                losses.append(loss.detach())

            ms, extra = measure(step, device, args.repeats, args.warmup, reset=lambda h=h: setattr(h, "grad", None))
            measured[name] = dict(section="ce", name=name, case=case, ignored=ignored, trained_tokens=trained,
                                  ms=ms, tflops=flops / ms / 1e9, extra_gib=extra, loss=float(losses[-1]))
            h.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        base_loss = measured["torch naive"]["loss"]
        for row in measured.values():
            row["loss_rel_err"] = abs(row["loss"] - base_loss) / max(abs(base_loss), 1e-30)
            row["ratios"] = {ref: row["ms"] / measured[ref]["ms"] for ref in measured if ref != row["name"]}
        rows += measured.values()
        del h, w, t

    # Targets, judged on the Triton rows.
    def find(name, ignored):
        return next((r for r in rows if r["name"] == name and r["ignored"] == ignored), None)

    all_trained = find("ce triton", 0.0)
    for r in rows:
        if r["name"] != "ce triton":
            continue
        if all_trained is not None and r is not all_trained:
            r["ratios"]["ce triton 0% ignored"] = r["ms"] / all_trained["ms"]
        checks = []
        if r["ignored"] == 0.25:
            liger = r["ratios"].get("liger")
            checks.append(f"≤{TARGET_VS_LIGER}× liger: " + ("no liger" if liger is None else
                          ("met" if liger <= TARGET_VS_LIGER else "MISSED") + f" ({liger:.2f}×)"))
            checks.append(f"≤{TARGET_EXTRA_GIB} GiB: " + ("met" if r["extra_gib"] <= TARGET_EXTRA_GIB else "MISSED"))
        if r["ignored"] == 0.99 and all_trained is not None:
            ratio = r["ratios"]["ce triton 0% ignored"]
            checks.append(f"≤{TARGET_SPARSE}× all-trained: " + ("met" if ratio <= TARGET_SPARSE else "MISSED")
                          + f" ({ratio:.3f}×)")
        r["target"] = "; ".join(checks)
    return rows


# ---------------------------------------------------------------------------------------------
# Elementwise: RMSNorm and SwiGLU
# ---------------------------------------------------------------------------------------------

NORM_FULL, NORM_SMALL = (4096, 5120), (64, 48)  # Qwen2.5-32B: tokens × hidden
SWIGLU_FULL, SWIGLU_SMALL = (4096, 27648), (64, 96)  # tokens × intermediate


def run_elementwise(args) -> list[dict]:
    """RMSNorm, SwiGLU and RoPE forward + backward: torch op by op (what transformers runs,
    autograd's backward), the Triton kernels, and Liger-Kernel's (norm, SwiGLU) when it imports.
    The figure of merit is memory bandwidth: GB/s counts the bytes an ideal fused pass moves
    (norm: x, y, dy, x, dx; SwiGLU: gate, up, m, dm, gate, up, d gate, d up; RoPE: x, y, dy, dx)."""
    from kernels.rms_norm import rms_norm, rms_norm_ref
    from kernels.rope import rope, rope_ref
    from kernels.swiglu import swiglu, swiglu_ref

    device = torch.device("cpu" if args.reference_only else "cuda")
    dtype = torch.float32 if args.reference_only else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    rows = []

    cases = []
    shape = NORM_SMALL if args.reference_only else NORM_FULL
    x = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[1], generator=g)).to(device, dtype)
    impls = {"torch op by op": lambda: rms_norm_ref(x, w, 1e-6)}
    if not args.reference_only:
        impls["rmsnorm triton"] = lambda: rms_norm(x, w, 1e-6)
        try:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            impls["liger"] = lambda: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama")
        except ImportError:
            pass
    cases.append(("rmsnorm", f"RMSNorm {shape[0]}×{shape[1]} {str(dtype).removeprefix('torch.')}, fwd+bwd",
                  impls, (x,), 5 * x.numel() * x.element_size()))

    shape = SWIGLU_SMALL if args.reference_only else SWIGLU_FULL
    gate = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
    up = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
    impls = {"torch op by op": lambda: swiglu_ref(gate, up)}
    if not args.reference_only:
        impls["swiglu triton"] = lambda: swiglu(gate, up)
        try:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            impls["liger"] = lambda: LigerSiLUMulFunction.apply(gate, up)
        except ImportError:
            pass
    cases.append(("swiglu", f"SwiGLU silu(gate)·up {shape[0]}×{shape[1]} {str(dtype).removeprefix('torch.')}, "
                  "fwd+bwd", impls, (gate, up), 8 * gate.numel() * gate.element_size()))

    tokens, heads, d = (16, 4, 16) if args.reference_only else (4096, 40, 128)  # Qwen2.5-32B's q
    q = torch.randn(tokens, heads, d, generator=g).to(device, dtype).requires_grad_()
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    emb = torch.cat([torch.arange(tokens, dtype=torch.float32)[:, None] * inv_freq[None, :]] * 2, dim=-1)
    cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)

    impls = {"torch op by op": lambda: rope_ref(q[None], cos[None], sin[None])[0]}  # as (1, tokens, heads, d)
    if not args.reference_only:
        impls["rope triton"] = lambda: rope(q[None], cos[None], sin[None])[0]
    cases.append(("rope", f"RoPE on q {tokens}×{heads}×{d} {str(dtype).removeprefix('torch.')}, fwd+bwd",
                  impls, (q,), 4 * q.numel() * q.element_size()))

    for _, case, impls, inputs, nbytes in cases:
        grad_out = torch.randn(inputs[0].shape, generator=g).to(device, dtype)
        measured = {}
        for name, fn in impls.items():
            def step(fn=fn):
                for t in inputs:
                    t.grad = None
                fn().backward(grad_out)

            def reset():
                for t in inputs:
                    t.grad = None

            with backend.force("triton" if "triton" in name else "reference"):
                ms, extra = measure(step, device, args.repeats, args.warmup, reset=reset)
            measured[name] = dict(section="elementwise", name=name, case=case, ms=ms, tflops=None, extra_gib=extra,
                                  target=f"{nbytes / ms / 1e6:,.0f} GB/s (ideal bytes)")
        for row in measured.values():
            row["ratios"] = {ref: row["ms"] / measured[ref]["ms"] for ref in measured if ref != row["name"]}
        rows += measured.values()
    return rows


# ---------------------------------------------------------------------------------------------
# Attention (written next door) and the report
# ---------------------------------------------------------------------------------------------


def run_attention_section(args, emit) -> list[dict]:
    """kernels/bench_attention.py's cases (``args.only == "flex"``: the FlexAttention case alone);
    ``emit(rows)`` gets each case's rows as soon as it is measured."""
    from kernels.bench_attention import run as run_attention

    def tagged(rows):
        for r in rows:
            r.setdefault("section", "attention")
        emit(rows)

    return run_attention(args, emit=tagged)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    if not rows:
        print("(no results)")
        return
    cols = ("section", "name", "ms", "TFLOP/s", "extra GiB", "ratios", "target")
    table = []
    for r in rows:
        ratios = ", ".join(f"{v:.3f}× {k}" for k, v in r.get("ratios", {}).items())
        table.append((r.get("section", ""), r["name"], _fmt(r["ms"], ".3f"), _fmt(r.get("tflops"), ".4g"),
                      _fmt(r.get("extra_gib"), ".3f"), ratios, r.get("target", "")))
    cases = {}
    for r, line in zip(rows, table):
        cases.setdefault(r.get("case", ""), []).append(line)
    widths = [max([len(c)] + [len(line[i]) for line in table]) for i, c in enumerate(cols)]
    for case, lines in cases.items():
        print(f"\n{case}")
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
        for line in lines:
            print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())


def environment(reference_only: bool) -> dict:
    env = dict(torch=torch.__version__, python=platform.python_version(), reference_only=reference_only)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() and not reference_only else "cpu"
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=SECTIONS, help="run one section (scripts/gpu_check.sh runs each in its own "
                   "process, flex last)")
    p.add_argument("--reference-only", action="store_true",
                   help="only the reference paths, on CPU, at small shapes (CI check of the script)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per measurement (default 20; 3 with --reference-only)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; 1 with --reference-only)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (3 if args.reference_only else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.reference_only else 3)
    if not args.reference_only and not torch.cuda.is_available():
        print("kernels.bench needs a CUDA GPU for the kernels; on CPU use --reference-only", file=sys.stderr)
        return 2

    env = environment(args.reference_only)
    rows: list[dict] = []
    header = (f"kernels.bench on {env['device']} (torch {env['torch']}, triton {env['triton']})"
              + (" — reference paths only, figures meaningless" if args.reference_only else ""))

    def report(section_rows: list[dict]) -> None:  # per case, so a run cut short keeps what it measured
        rows.extend(section_rows)
        print_table(section_rows, header)
        sys.stdout.flush()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(environment=env, results=rows), f, indent=1)

    only = args.only
    if only in (None, "ce"):
        report(run_ce(args))
    if only in (None, "elementwise"):
        report(run_elementwise(args))
    for section in ("attention", "flex"):  # Flex last: its compile is the slowest
        if only in (None, section):
            args.only = section
            run_attention_section(args, emit=report)
    args.only = only
    return 0


if __name__ == "__main__":
    sys.exit(main())
