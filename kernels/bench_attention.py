"""Attention section of `python -m kernels.bench` (also `python -m kernels.bench_attention`).

`run(args, emit) -> list[dict]` times the Triton varlen flash attention (kernels/attention.py) against
its references at the issue's shapes, in one run on one card; rows carry name, case, ms (median
of CUDA-event-timed calls), tflops (useful FLOPs only: causal 4·S²·H·D/2 per sample forward, ×3.5
for forward+backward), extra_gib (peak allocation during one call minus what was allocated before
it: inputs excluded, outputs and gradients included), ratios (our time / their time for each
reference: below 1 is faster) and, on our rows, target.

Cases (bf16, head_dim 128, Qwen2.5-32B's 40 query / 8 KV heads), in this order, each case's rows
handed to ``emit`` (printed, written) as soon as it is measured:
1. causal, one 4096-token sample, forward+backward: vs SDPA's flash backend and its cuDNN backend
   (torch.nn.attention.sdpa_kernel). Target: ≤ 1/1.3 of SDPA-flash's time (stretch: ≤ cuDNN's).
2. packed 4096 tokens of SGTR-length samples (1100 + 1000 + 1000 + 996), forward+backward: vs
   dense causal cuDNN over the same 4096 tokens (what a kernel without varlen pays).
3. Seed-OSS-36B heads (80 / 8) with attention dropout 0.1, causal 4096, forward+backward: vs
   SDPA-flash with the same dropout.
4. case 1's forward alone.
``--only flex`` (run last, in its own process, by ``kernels.bench`` and scripts/gpu_check.sh: its
compile is the slowest): the packed case against FlexAttention with a document-causal block mask.
Target: ≤ 0.5× FlexAttention's time.
GQA: references get enable_gqa=True; where a backend refuses it, K/V are expanded to the query
heads once, outside the timed region (the row name says "KV expanded").

Registers, spills and shared memory of every kernel without a GPU: `python -m kernels.compile_report`.
`--attn-sweep` adds rows for alternative tile configurations of our kernels on case 1 (each kernel
of each compiles without register spills on the card's generation, triton 3.6 and 3.9), to pick
`kernels.attention.tiles_for` on a real card.
`--reference-only` runs the reference paths only, on CPU, at small shapes (a CI check).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from kernels.bench import measure

N_HEADS, N_KV, HEAD_DIM = 40, 8, 128
SEQ = 4096
PACKED = (1100, 1000, 1000, 996)
SEED_HEADS, SEED_DROPOUT = 80, 0.1
SMALL = dict(seq=256, packed=(100, 60, 60, 36), n_heads=4, n_kv=2, head_dim=32, dtype=torch.float32)
TARGET_VS_FLASH = 1 / 1.3
TARGET_VS_FLEX = 0.5
SWEEP = {  # per GPU generation: (fwd m, n, warps, stages, dkdv m, n, warps, stages, dq m, n, warps, stages)
    90: [
        (128, 64, 8, 3, 32, 64, 8, 2, 128, 64, 8, 2),  # tiles_for(90, 128): the default
        (128, 64, 8, 3, 32, 128, 8, 2, 128, 64, 8, 2),  # the former default: dK/dV over 128 keys
        (128, 64, 8, 3, 16, 64, 8, 2, 128, 32, 8, 2),
        (128, 32, 8, 3, 32, 64, 8, 2, 128, 32, 8, 2),
    ],
    80: [
        (128, 32, 8, 3, 64, 64, 8, 2, 64, 64, 8, 2),  # tiles_for(80, 128): the default
        (128, 32, 8, 3, 32, 64, 8, 2, 64, 64, 8, 2),
        (64, 32, 4, 3, 64, 64, 8, 2, 64, 32, 4, 2),
        (128, 32, 8, 3, 64, 64, 8, 2, 128, 32, 8, 2),
    ],
}


def schedule_efficiency(lengths, block_n: int, kv_heads: int, sms: int, order: str) -> tuple[int, float]:
    """(programs, modelled SM efficiency) of the dK/dV grid: greedy list scheduling in launch
    order, one resident program per SM (its registers allow no second), each program's work
    proportional to the query rows at or after its key block (the diagonal's extra cost and the
    fixed per-program cost ignored). order: "head-major" (the former grid, key blocks fastest) or
    "lpt" (``_grid_order``: heads fastest, so every head's heaviest block starts first)."""
    import heapq

    blocks = max(-(-n // block_n) for n in lengths)
    index = [(h, s, i) for h in range(kv_heads) for s in range(len(lengths)) for i in range(blocks)]
    if order == "lpt":
        index = [(h, s, i) for i in range(blocks) for s in range(len(lengths)) for h in range(kv_heads)]
    elif order != "head-major":
        raise ValueError(f"order must be 'head-major' or 'lpt', got {order!r}")
    jobs = [lengths[s] - i * block_n for _, s, i in index if i * block_n < lengths[s]]
    free = [0] * sms
    end = 0
    for work in jobs:
        t = heapq.heappop(free) + work
        end = max(end, t)
        heapq.heappush(free, t)
    return len(jobs), sum(jobs) / sms / end


def print_schedule() -> None:
    """The dK/dV launch-order arithmetic of kernels/BENCHMARKS.md."""
    print("gpu   SMs  rows                   BLOCK_N  programs  head-major  lpt")
    for gpu, sms in (("H100", 132), ("A100", 108)):
        for lengths in ([4096], list(PACKED), [2048, 2048], [2048]):
            for block_n in (128, 64):
                programs, old = schedule_efficiency(lengths, block_n, N_KV, sms, "head-major")
                _, new = schedule_efficiency(lengths, block_n, N_KV, sms, "lpt")
                print(f"{gpu}  {sms:4d}  {'+'.join(map(str, lengths)):21s}  {block_n:7d}  {programs:8d}  "
                      f"{old:10.2f}  {new:.2f}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attn-sweep", action="store_true",
                        help="also time alternative tile configurations of the attention kernels")


def _causal_flops(lengths, n_heads, head_dim, backward: bool) -> float:
    fwd = sum(4 * n * n * n_heads * head_dim / 2 for n in lengths)
    return fwd * 3.5 if backward else fwd


# --- implementations: each maps (q, k, v) in (total, heads, d) layout to the output ----------


def _ours(lengths, config=None, dropout_p=0.0):
    from kernels.attention import flash_attention_varlen

    cache = {}  # cu_seqlens built once, outside the timed calls, as the trainer does per step

    def fn(q, k, v):
        if q.device not in cache:
            cache[q.device] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                                           device=q.device)
        return flash_attention_varlen(q, k, v, cache[q.device], max(lengths), dropout_p=dropout_p, config=config)

    return fn


def _sdpa(backend, dropout_p=0.0):
    """SDPA on the (1, heads, total, d) view of our layout, causal over all tokens; None if the
    backend (or GQA on it) is unavailable."""
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(
                *(t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)), is_causal=True, dropout_p=dropout_p,
                enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2).squeeze(0)

    return fn


def _flex(lengths, device):
    """FlexAttention with a document-causal block mask, compiled; None when not importable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    total = int(sum(lengths))

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(document_causal, B=None, H=None, Q_LEN=total, KV_LEN=total, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v):
        out = compiled(*(t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)), block_mask=block_mask,
                       enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2).squeeze(0)

    return fn


def _reference(lengths, dropout_p=0.0):
    from kernels.attention import attention_ref

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

    def fn(q, k, v):
        return attention_ref(q, k, v, cu, dropout_p=dropout_p, upcast=False)

    return fn


# --- timing ----------------------------------------------------------------------------------


def _inputs(total, n_heads, n_kv, head_dim, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn(total, h, head_dim, generator=g, device=device, dtype=dtype)
                   for h in (n_heads, n_kv, n_kv, n_heads))
    return q, k, v, do


def _time_case(args, device, case, lengths, n_heads, n_kv, head_dim, dtype, impls, backward=True) -> list[dict]:
    total = sum(lengths)
    q, k, v, do = _inputs(total, n_heads, n_kv, head_dim, dtype, device)
    flops = _causal_flops(lengths, n_heads, head_dim, backward)
    rows = {}
    for name, fn in impls.items():
        if fn is None:
            continue
        leaves = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
        if name.endswith("(KV expanded)"):
            rep = n_heads // n_kv
            leaves = [leaves[0]] + [t.detach().repeat_interleave(rep, 1).requires_grad_(backward) for t in leaves[1:]]

        def reset(leaves=leaves):
            for t in leaves:
                t.grad = None

        def step(fn=fn, leaves=leaves, reset=reset):
            reset()
            if backward:
                fn(*leaves).backward(do)
            else:
                with torch.no_grad():
                    fn(*leaves)

        try:
            ms, extra = measure(step, device, args.repeats, args.warmup, reset)
        except RuntimeError as e:  # a backend that refuses the shape/dtype/GQA on this card
            print(f"attention: {name} unavailable for {case}: {str(e).splitlines()[0]}", file=sys.stderr)
            continue
        finally:
            reset()
        rows[name] = dict(section="attention", name=name, case=case, ms=ms, tflops=flops / ms / 1e9, extra_gib=extra)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows.values():
        row["ratios"] = {ref: row["ms"] / other["ms"] for ref, other in rows.items() if ref != row["name"]}
    return list(rows.values())


def _with_gqa_fallback(name, fn, device, n_heads, n_kv, head_dim, dtype):
    """{name: fn}, or {name + " (KV expanded)": fn} when the backend refuses enable_gqa."""
    if fn is None or n_heads == n_kv:
        return {name: fn}
    q, k, v, _ = _inputs(128, n_heads, n_kv, head_dim, dtype, device)
    try:
        fn(q, k, v)
        return {name: fn}
    except RuntimeError:
        return {name + " (KV expanded)": fn}


def _target(rows, ours, ref, limit, label):
    row = next((r for r in rows if r["name"] == ours), None)
    if row is None:
        return
    ratio = row["ratios"].get(ref)
    verdict = f"no {ref}" if ratio is None else ("met" if ratio <= limit else "MISSED") + f" ({ratio:.2f}×)"
    row["target"] = "; ".join(filter(None, [row.get("target"), f"≤{limit:.2f}× {label}: {verdict}"]))


def run(args, emit=None) -> list[dict]:
    """The attention cases, most important first; ``emit(rows)`` (if given) gets each case's rows
    as soon as it is measured, so a run cut short keeps what it measured. ``args.only == "flex"``
    runs the FlexAttention case alone; ``"attention"`` every case but it (``kernels.bench`` runs
    Flex last, in its own process: its compile takes the longest)."""
    reference_only = getattr(args, "reference_only", False)
    args.repeats = getattr(args, "repeats", None) or (3 if reference_only else 20)
    args.warmup = getattr(args, "warmup", None) if getattr(args, "warmup", None) is not None else (
        1 if reference_only else 3)
    emit = emit or (lambda rows: None)
    only = getattr(args, "only", None)
    if reference_only:
        rows = [] if only == "flex" else _run_reference_only(args)
        emit(rows)
        return rows

    from torch.nn.attention import SDPBackend

    device = torch.device(getattr(args, "attn_device", "cuda"))  # another device: smoke tests only
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows: list[dict] = []
    ours = "triton varlen"

    def refs(n_heads, dropout_p=0.0, cudnn=True):
        out = {}
        out |= _with_gqa_fallback("sdpa flash", _sdpa(SDPBackend.FLASH_ATTENTION, dropout_p), device, n_heads, N_KV,
                                  HEAD_DIM, dtype)
        if cudnn:
            out |= _with_gqa_fallback("sdpa cudnn", _sdpa(SDPBackend.CUDNN_ATTENTION), device, n_heads, N_KV,
                                      HEAD_DIM, dtype)
        return out

    def done(case_rows):
        rows.extend(case_rows)
        emit(case_rows)

    packed_case = f"packed {SEQ} = {'+'.join(map(str, PACKED))}, {N_HEADS}/{N_KV} heads, d={HEAD_DIM}, bf16, fwd+bwd"
    if only == "flex":
        impls = {ours: _ours(list(PACKED)), "flex document-causal": _flex(list(PACKED), device)}
        if impls["flex document-causal"] is None:
            print("attention: FlexAttention not importable: no flex reference", file=sys.stderr)
        case_rows = _time_case(args, device, packed_case, list(PACKED), N_HEADS, N_KV, HEAD_DIM, dtype, impls)
        _target(case_rows, ours, "flex document-causal", TARGET_VS_FLEX, "FlexAttention")
        done(case_rows)
        return rows

    def causal(backward):
        case = f"causal 1×{SEQ}, {N_HEADS}/{N_KV} heads, d={HEAD_DIM}, bf16, {'fwd+bwd' if backward else 'fwd'}"
        impls = {ours: _ours([SEQ])} | refs(N_HEADS)
        if backward and getattr(args, "attn_sweep", False):
            from kernels.attention import AttentionConfig

            from kernels.backend import capability

            sweep = SWEEP[90 if capability(device) >= 90 else 80]
            impls |= {f"triton cfg {c}": _ours([SEQ], config=AttentionConfig(*c)) for c in sweep}
        case_rows = _time_case(args, device, case, [SEQ], N_HEADS, N_KV, HEAD_DIM, dtype, impls, backward)
        flash = next((n for n in impls if n.startswith("sdpa flash")), "sdpa flash")
        cudnn = next((n for n in impls if n.startswith("sdpa cudnn")), "sdpa cudnn")
        _target(case_rows, ours, flash, TARGET_VS_FLASH, "SDPA-flash (1.3× faster)")
        _target(case_rows, ours, cudnn, 1.0, "cuDNN (stretch)")
        done(case_rows)

    # 1. causal, one 4096-token sample, forward + backward.
    causal(backward=True)
    # 2. packed SGTR-length samples against dense causal cuDNN over the same tokens (Flex: its own section).
    impls = {ours: _ours(list(PACKED))}
    impls |= _with_gqa_fallback("dense causal cudnn", _sdpa(SDPBackend.CUDNN_ATTENTION), device, N_HEADS, N_KV,
                                HEAD_DIM, dtype)
    done(_time_case(args, device, packed_case, list(PACKED), N_HEADS, N_KV, HEAD_DIM, dtype, impls))
    # 3. Seed-OSS heads with attention dropout.
    case = f"causal 1×{SEQ}, {SEED_HEADS}/{N_KV} heads, d={HEAD_DIM}, bf16, dropout {SEED_DROPOUT}, fwd+bwd"
    impls = {ours: _ours([SEQ], dropout_p=SEED_DROPOUT)} | refs(SEED_HEADS, SEED_DROPOUT, cudnn=False)
    done(_time_case(args, device, case, [SEQ], SEED_HEADS, N_KV, HEAD_DIM, dtype, impls))
    # 4. forward alone.
    causal(backward=False)
    return rows


def _run_reference_only(args) -> list[dict]:
    from torch.nn.attention import SDPBackend

    device = torch.device("cpu")
    s = SMALL
    rows = []
    packed_label = "packed " + "+".join(map(str, s["packed"]))
    for lengths, label in (([s["seq"]], f"causal 1×{s['seq']}"), (list(s["packed"]), packed_label)):
        case = f"{label}, {s['n_heads']}/{s['n_kv']} heads, d={s['head_dim']}, fp32, fwd+bwd (reference only)"
        impls = {"attention_ref": _reference(lengths), "sdpa math (dense causal)": _sdpa(SDPBackend.MATH)}
        rows += _time_case(args, device, case, lengths, s["n_heads"], s["n_kv"], s["head_dim"], s["dtype"], impls)
    return rows


def main(argv: list[str] | None = None) -> int:
    from kernels.bench import print_table

    p = argparse.ArgumentParser(prog="python -m kernels.bench_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-only", action="store_true", help="reference paths only, on CPU, small shapes")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--schedule", action="store_true",
                   help="no GPU needed: print the modelled SM efficiency of the dK/dV grid's launch orders")
    add_arguments(p)
    args = p.parse_args(argv)
    if args.schedule:
        print_schedule()
        return 0
    if not args.reference_only and not torch.cuda.is_available():
        print("kernels.bench_attention needs a CUDA GPU; on CPU use --reference-only", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name() if not args.reference_only else "cpu"
    run(args, emit=lambda rows: print_table(rows, f"attention on {device} (torch {torch.__version__})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
