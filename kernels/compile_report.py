"""Offline compile report: every production Triton kernel, compiled for sm_80 and sm_90 without a GPU.

    python -m kernels.compile_report                      # all of them, sm_80 (A100) and sm_90 (H100/H200)
    python -m kernels.compile_report --arch 90 --subset ci --jobs 2
    python -m kernels.compile_report --markdown           # the table of kernels/BENCHMARKS.md

Prints registers per thread, spill stores/loads (bytes) and shared memory per block of each
kernel, and exits 1 when a gated kernel — every bf16/fp16 production specialisation, and the fp32
attention tiles — spills registers or needs more shared memory than the architecture allows per
block (A100: 163 KiB, H100/H200: 227 KiB); 2 when a kernel fails to compile.

What is compiled is what the runtime would launch on that GPU, not a hand-written list: the host
functions of every kernel module run on ``meta`` tensors (shapes, dtypes and strides, no memory,
no device) under ``kernels.backend.compile_target(cc)`` — so the tiles are the ones
``tiles_for(cc, ...)`` picks on that architecture — with each module's ``launchable`` replaced by
a recorder. Each recorded launch is then bound and specialised exactly as ``JITFunction.run`` does
on a GPU (``create_function_from_signature`` + ``JITFunction._pack_args`` for
``GPUTarget("cuda", cc, 32)``: the same divisibility-by-16 attributes of pointers and integers,
the same options), compiled with ``triton.compile`` and triton's bundled ``ptxas``, and the
registers and spills read from ptxas's own ``-v`` log (``TRITON_DUMP_PTXAS_LOG``); shared memory
is triton's ``metadata.shared``, the dynamic shared memory it launches with. These are triton
internals (checked with triton 3.6 and 3.9).

Production shapes: Qwen2.5-32B (40 query / 8 KV heads) and Seed-OSS-36B (80 / 8, attention
dropout 0.1), head dim 128, hidden 5120, intermediate 27,648, vocabularies 152,064 and 155,136,
4,096-token rows (one sample, and a packed row of 4,093 tokens: the JIT specialises a total that
is not a multiple of 16 separately), bf16 and fp16, forward and backward, attention dropout on and
off, the loss with and without gradients (training, evaluation).

``precompile(cc, jobs)`` compiles the same set into Triton's on-disk cache for the GPU at hand
(``kernels.probe`` runs it before anything else on a lent GPU), so no later process waits on a
cold compile of a production kernel.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
import warnings

import torch

from kernels import attention, backend, cross_entropy, rms_norm, rope, swiglu

ARCHS = (80, 90)
# Largest dynamic shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MODELS = {  # the shapes the kernels see (engine/models/presets.py; a test checks they agree)
    "qwen2.5-32b": dict(heads=40, kv=8, vocab=152_064),
    "seed-oss-36b": dict(heads=80, kv=8, vocab=155_136),
}
HEAD_DIM, HIDDEN, INTERMEDIATE = 128, 5120, 27_648
DROPOUT = 0.1  # Seed-OSS-36B's attention dropout
ROWS = {"1x4096": [4096], "packed 4093": [1100, 1000, 1000, 993]}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNEL_MODULES = (attention, cross_entropy, rms_norm, rope, swiglu)


# --------------------------------------------------------------------------- recording launches


@dataclasses.dataclass(frozen=True)
class Pointer:
    """A tensor argument as the JIT's specialisation sees it: its dtype and address (a meta
    tensor's address is its byte offset, so slices keep their alignment)."""

    dtype: torch.dtype
    address: int

    def data_ptr(self) -> int:
        return self.address


@dataclasses.dataclass
class Launch:
    kernel: str  # "kernels.attention._attn_fwd_kernel"
    args: tuple
    kwargs: dict
    case: str  # what runs it: "attention qwen2.5-32b bf16 dropout 0.1"
    rows: str  # "1x4096", "packed 4093" or ""
    dtype: str  # the activations' dtype: bf16, fp16 or fp32
    gated: bool  # a spill or too much shared memory here fails the report


@contextlib.contextmanager
def _recording(into: list):
    def launchable(kernel, device):
        def launch(*args, **kwargs):
            into.append((kernel, args, kwargs))

        return _Grid(launch)

    saved = {m: m.launchable for m in KERNEL_MODULES}
    for m in KERNEL_MODULES:
        m.launchable = launchable
    try:
        yield
    finally:
        for m, f in saved.items():
            m.launchable = f


class _Grid:
    def __init__(self, launch):
        self.launch = launch

    def __getitem__(self, grid):
        return self.launch


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _record(cc: int, run, **fields) -> list[Launch]:
    """The launches run() makes when the kernels target compute capability cc."""
    calls: list = []
    with backend.compile_target(cc), _recording(calls), torch.no_grad():
        run()
    out = []
    for kernel, args, kwargs in calls:
        args = tuple(Pointer(a.dtype, a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)
        out.append(Launch(f"{kernel.fn.__module__}.{kernel.fn.__name__}", args, dict(kwargs), **fields))
    return out


def _attention_run(heads, kv, dtype, dropout_p, lengths):
    def run():
        total = sum(lengths)
        q, do = _meta(total, heads, HEAD_DIM, dtype=dtype), _meta(total, heads, HEAD_DIM, dtype=dtype)
        k, v = _meta(total, kv, HEAD_DIM, dtype=dtype), _meta(total, kv, HEAD_DIM, dtype=dtype)
        cu = _meta(len(lengths) + 1, dtype=torch.int32)
        out, lse = attention.attention_forward(q, k, v, cu, max(lengths), dropout_p=dropout_p, seed=1)
        attention.attention_backward(do, q, k, v, out, lse, cu, max(lengths), dropout_p=dropout_p, seed=1)

    return run


def _loss_run(vocab, dtype, train, tokens=4096):
    def run():
        h, w = _meta(tokens, HIDDEN, dtype=dtype), _meta(vocab, HIDDEN, dtype=dtype)
        t = _meta(tokens, dtype=torch.long)
        _, d_hidden, _ = cross_entropy.linear_cross_entropy_forward(h, w, t, grad_hidden=train)
        if train:
            cross_entropy.linear_cross_entropy_backward(_meta((), dtype=torch.float32), d_hidden, None, dtype)

    return run


def _elementwise_runs(dtype, tokens=4096) -> dict:
    """{case: run} for RMSNorm, SwiGLU and RoPE (q and k of both models) at production shape."""
    def norm():
        x, w = _meta(tokens, HIDDEN, dtype=dtype), _meta(HIDDEN, dtype=dtype)
        y, rstd = rms_norm.rms_norm_forward(x, w, 1e-6)
        rms_norm.rms_norm_backward(y, x, w, rstd)

    def glu():
        gate, up = _meta(tokens, INTERMEDIATE, dtype=dtype), _meta(tokens, INTERMEDIATE, dtype=dtype)
        swiglu.swiglu_backward(swiglu.swiglu_forward(gate, up), gate, up)

    def rotary(heads):
        def run():
            cos, sin = _meta(tokens, HEAD_DIM, dtype=dtype), _meta(tokens, HEAD_DIM, dtype=dtype)
            rope.rope_backward(rope.rope_forward(_meta(tokens, heads, HEAD_DIM, dtype=dtype), cos, sin), cos, sin)

        return run

    runs = {f"rmsnorm {tokens}×{HIDDEN}": norm, f"swiglu {tokens}×{INTERMEDIATE}": glu}
    for heads in sorted({m[k] for m in MODELS.values() for k in ("heads", "kv")}):
        runs[f"rope {tokens}×{heads}×{HEAD_DIM}"] = rotary(heads)
    return runs


def production_launches(cc: int, subset: str = "full") -> list[Launch]:
    """Every launch of the production shapes when the kernels target compute capability cc
    (``subset="ci"``: the three attention kernels of Seed-OSS with dropout and of Qwen without —
    the kernels closest to the register limit, on each architecture's own tiles — and one RMSNorm
    kernel)."""
    launches: list[Launch] = []
    if subset == "ci":
        for name, p in (("seed-oss-36b", DROPOUT), ("qwen2.5-32b", 0.0)):
            m = MODELS[name]
            found = _record(cc, _attention_run(m["heads"], m["kv"], torch.bfloat16, p, ROWS["1x4096"]),
                            case=f"attention {name} bf16 dropout {p:g}", rows="1x4096", dtype="bf16", gated=True)
            launches += [x for x in found if not x.kernel.endswith("_preprocess")]
        case, run = next(iter(_elementwise_runs(torch.bfloat16).items()))
        found = _record(cc, run, case=f"{case} bf16", rows="", dtype="bf16", gated=True)
        return launches + [x for x in found if x.kernel.endswith("_rms_norm_fwd_kernel")]
    if subset != "full":
        raise ValueError(f"subset must be 'full' or 'ci', got {subset!r}")
    for dtype_name in ("bf16", "fp16"):
        dtype = DTYPES[dtype_name]
        for name, m in MODELS.items():
            for p in (0.0, DROPOUT):
                for rows, lengths in ROWS.items():
                    launches += _record(cc, _attention_run(m["heads"], m["kv"], dtype, p, lengths),
                                        case=f"attention {name} {dtype_name} dropout {p:g}", rows=rows,
                                        dtype=dtype_name, gated=True)
            for train in (True, False):
                launches += _record(cc, _loss_run(m["vocab"], dtype, train), rows="", dtype=dtype_name, gated=True,
                                    case=f"loss V={m['vocab']} {dtype_name} {'train' if train else 'eval'}")
        for case, run in _elementwise_runs(dtype).items():
            launches += _record(cc, run, case=f"{case} {dtype_name}", rows="", dtype=dtype_name, gated=True)
    for p in (0.0, DROPOUT):  # fp32 attention: tests only, but it must not spill either
        m = MODELS["qwen2.5-32b"]
        launches += _record(cc, _attention_run(m["heads"], m["kv"], torch.float32, p, ROWS["1x4096"]),
                            case=f"attention qwen2.5-32b fp32 dropout {p:g}", rows="1x4096", dtype="fp32",
                            gated=True)
    return launches


# --------------------------------------------------------------------------- compiling one launch


def _kernel_object(qualname: str):
    module, name = qualname.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _bind(kernel, launch: Launch, backend_):
    """(options, signature, constexprs, attrs) as JITFunction.run derives them at a launch."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    _quiet()
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for option in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what run() adds (3.6: the first)
        if hasattr(knobs.compilation, option):
            kwargs[option] = getattr(knobs.compilation, option)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend_)
    bound, specialization, options = binder(*launch.args, **kwargs)
    return kernel._pack_args(backend_, kwargs, bound, specialization, options)


def specialization_key(launch: Launch, cc: int) -> str:
    """Launches with one key compile to one binary."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    kernel = _kernel_object(launch.kernel)
    options, signature, constexprs, attrs = _bind(kernel, launch, make_backend(GPUTarget("cuda", cc, 32)))
    return repr((launch.kernel, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()),
                 sorted(options.__dict__.items())))


PTXAS_FIELDS = {
    "registers": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack": r"(\d+) bytes stack frame",
}


def parse_ptxas_log(log: str) -> dict:
    """Registers per thread (the largest entry function's), spill stores/loads and stack frame
    (bytes) from ``ptxas -v`` output; None where the log has no such line."""
    out = {}
    for field, pattern in PTXAS_FIELDS.items():
        values = [int(x) for x in re.findall(pattern, log)]
        out[field] = (max(values) if field == "registers" else sum(values)) if values else None
    return out


def compile_launch(launch: Launch, cc: int, *, always: bool = True) -> dict:
    """Compile one launch for sm_{cc}: registers, spills, shared memory, compile seconds.
    ``always=False`` reuses (and fills) Triton's cache: a cached kernel reports no ptxas figures."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", cc, 32)
    kernel = _kernel_object(launch.kernel)
    options, signature, constexprs, attrs = _bind(kernel, launch, make_backend(target))
    log = io.StringIO()
    start = time.perf_counter()
    with _knobs(knobs.nvidia, dump_ptxas_log=True), _knobs(knobs.compilation, always_compile=always), \
            contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    result = parse_ptxas_log(log.getvalue())
    names = {kernel.arg_names[path[0]]: v for path, v in constexprs.items()}
    blocks = " ".join(f"{name.removeprefix('BLOCK_') or 'BLOCK'}={v}" for name, v in names.items()
                      if name.startswith("BLOCK") and name != "BLOCK_D")
    result.update(shared=compiled.metadata.shared, seconds=time.perf_counter() - start,
                  tiles=f"{blocks} w{options.num_warps} s{options.num_stages}")
    return result


@contextlib.contextmanager
def _knobs(scope, **values):
    saved = {k: getattr(scope, k) for k in values}
    for k, v in values.items():
        setattr(scope, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(scope, k, v)


def _quiet() -> None:
    # triton 3.9 warns that TRITON_DEFAULT_FP_FUSION is unset; the runtime runs with that default too.
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def _worker_init(cache_dir: str | None) -> None:
    _quiet()
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir


def _compile_task(args):
    launch, cc, always = args
    try:
        return compile_launch(launch, cc, always=always)
    except Exception as e:  # reported, and the exit status says so
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}


def compile_all(launches: list[tuple[Launch, int]], jobs: int, *, always: bool = True,
                cache_dir: str | None = None, on_result=None) -> list[dict]:
    """Compile each (launch, cc) once per distinct specialisation, in ``jobs`` processes; one
    result dict per input, in order."""
    _quiet()
    keys = [specialization_key(launch, cc) + f"@{cc}" for launch, cc in launches]
    unique = {k: i for i, k in reversed(list(enumerate(keys)))}  # first index of each key
    tasks = {k: (launches[i][0], launches[i][1], always) for k, i in unique.items()}
    done: dict[str, dict] = {}
    if jobs <= 1:
        saved = os.environ.get("TRITON_CACHE_DIR")
        _worker_init(cache_dir)
        try:
            for k, task in tasks.items():
                done[k] = _compile_task(task)
                if on_result:
                    on_result(task[0], task[1], done[k])
        finally:
            if cache_dir:
                os.environ.pop("TRITON_CACHE_DIR") if saved is None else os.environ.update(TRITON_CACHE_DIR=saved)
    else:
        context = multiprocessing.get_context("spawn")  # no fork of a process that imported torch
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                                                    initargs=(cache_dir,)) as pool:
            futures = {pool.submit(_compile_task, task): k for k, task in tasks.items()}
            for future in concurrent.futures.as_completed(futures):
                k = futures[future]
                done[k] = future.result()
                if on_result:
                    on_result(tasks[k][0], tasks[k][1], done[k])
    return [dict(done[k], shared_by=i != unique[k]) for i, k in enumerate(keys)]


def precompile(cc: int, jobs: int, on_result=None) -> list[dict]:
    """Compile every production specialisation for compute capability cc into Triton's cache
    (the default cache directory, as the runtime will look it up)."""
    launches = production_launches(cc)
    return compile_all([(x, cc) for x in launches], jobs, always=False, on_result=on_result)


# --------------------------------------------------------------------------- verdicts and tables


def problems(launch: Launch, cc: int, result: dict) -> list[str]:
    if "error" in result:
        return [f"compile failed: {result['error']}"]
    found = []
    if launch.gated and ((result["spill_stores"] or 0) > 0 or (result["spill_loads"] or 0) > 0):
        found.append(f"spills {result['spill_stores']} B stores / {result['spill_loads']} B loads")
    limit = SHARED_LIMIT.get(cc)
    if launch.gated and limit is not None and result["shared"] > limit:
        found.append(f"shared memory {result['shared'] / 1024:.1f} KiB > {limit // 1024} KiB")
    if launch.gated and result["registers"] is None:
        found.append("no ptxas figures (compiled from cache?)")
    return found


def _cell(result: dict) -> str:
    if "error" in result:
        return "FAILED"
    regs = "?" if result["registers"] is None else str(result["registers"])
    return f"{regs} / {result['spill_stores'] or 0} / {result['shared'] / 1024:.3g}"


def table_rows(records: list[dict], archs) -> list[list[str]]:
    """One row per (kernel, case); cells 'registers / spill-store bytes / shared KiB' per arch,
    the worse of the row variants (1x4096 and packed 4093) where they differ."""
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r["kernel"].rsplit(".", 1)[1], r["case"])
        row = rows.setdefault(key, {})
        prev = row.get(r["cc"])
        if prev is None or _worse(r["result"], prev["result"]):
            row[r["cc"]] = r
    out = []
    for (kernel, case), row in rows.items():
        cells = [kernel, case]
        for cc in archs:
            r = row.get(cc)
            cells += ["–", "–"] if r is None else [r["result"].get("tiles", "?"), _cell(r["result"])]
        out.append(cells)
    return out


def _worse(a: dict, b: dict) -> bool:
    if "error" in a or "error" in b:
        return "error" in a
    key = lambda r: ((r["spill_stores"] or 0), r["registers"] or 0, r["shared"])  # noqa: E731
    return key(a) > key(b)


def print_table(records: list[dict], archs, markdown: bool) -> None:
    header = ["kernel", "case"]
    for cc in archs:
        header += [f"sm_{cc} tiles", f"sm_{cc} regs / spill B / smem KiB"]
    rows = table_rows(records, archs)
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    for r in [header, *rows]:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.compile_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    p.add_argument("--subset", choices=("full", "ci"), default="full",
                   help="ci: forward, dQ and dK/dV attention kernels (Seed-OSS bf16 with dropout, Qwen bf16 without) and one RMSNorm kernel")
    p.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8), help="compile processes")
    p.add_argument("--json", metavar="PATH", help="also write every record as JSON")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = p.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",") if a]
    except ValueError:
        p.error(f"--arch takes compute capabilities such as 80,90, got {args.arch!r}")
    import triton

    _quiet()
    start = time.perf_counter()
    launches = [(x, cc) for cc in archs for x in production_launches(cc, args.subset)]
    print(f"compile report: {len(launches)} launches, triton {triton.__version__}, torch {torch.__version__}, "
          f"sm_{', sm_'.join(map(str, archs))}, {args.jobs} process(es)", file=sys.stderr, flush=True)
    done = []

    def progress(launch, cc, result):
        done.append(1)
        figures = result.get("error") or f"{result['registers']} registers, {result['spill_stores']} B spilled"
        print(f"[{len(done)}] sm_{cc} {launch.kernel.rsplit('.', 1)[1]} ({launch.case}): {figures}",
              file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache:  # CI's own cache stays clean
        results = compile_all(launches, args.jobs, always=True, cache_dir=cache, on_result=progress)
    records, failures, status = [], [], 0
    for (launch, cc), result in zip(launches, results):
        records.append(dict(kernel=launch.kernel, case=launch.case, rows=launch.rows, dtype=launch.dtype,
                            gated=launch.gated, cc=cc, result=result))
        for problem in problems(launch, cc, result):
            failures.append(f"sm_{cc} {launch.kernel.rsplit('.', 1)[1]} [{launch.case}, {launch.rows or '-'}]: "
                            f"{problem}")
            status = max(status, 2 if "error" in result else 1)
    print_table(records, archs, args.markdown)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, archs=archs, records=records), f, indent=1)
    limits = ", ".join(f"sm_{cc} {SHARED_LIMIT[cc] // 1024} KiB" for cc in archs if cc in SHARED_LIMIT)
    print(f"\n{len(records)} launches, {len({r['kernel'] + r['case'] + str(r['cc']) for r in records})} rows, "
          f"{time.perf_counter() - start:.0f} s; shared-memory limits per block: {limits}")
    for line in dict.fromkeys(failures):
        print(f"FAIL {line}")
    print("OK: no gated kernel spills or exceeds shared memory" if not status else f"FAILED ({len(failures)})")
    return status


if __name__ == "__main__":
    sys.exit(main())
