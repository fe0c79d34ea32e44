"""Tiles per GPU generation, the attention launch order, and the offline compile report
(kernels/compile_report.py): the real host functions recorded on meta tensors, compiled for sm_80
and sm_90 with triton's bundled ptxas, no GPU. CI compiles a subset on both architectures (the
forward, dQ and dK/dV attention kernels of Seed-OSS with dropout and of Qwen without, the kernels
closest to the register limit, and one RMSNorm kernel: ~40 CPU-seconds, two processes); the full
report (every production kernel, both architectures: minutes) is marked slow."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import kernels.attention as ka
from kernels import backend
from kernels import compile_report as cr

pytest.importorskip("triton")

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_attn_fwd_kernel' for 'sm_80'
ptxas info    : Function properties for _attn_fwd_kernel
    40 bytes stack frame, 44 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 504 bytes cmem[0]
ptxas info    : Compile time = 3162.116 ms
"""


# --- tiles and the target architecture -------------------------------------------------------------


def test_tiles_are_chosen_per_architecture_and_valid():
    for dropout in (False, True):
        a100, h100 = (ka.tiles_for(cc, 128, dtype=torch.bfloat16, dropout=dropout) for cc in (80, 90))
        assert a100 != h100
        for cfg in (a100, h100):
            cfg.check()
        assert ka.tiles_for(86, 128, dropout=dropout) == a100 and ka.tiles_for(100, 128, dropout=dropout) == h100
    # fp32's exact dots: the one tile size that compiles without spills, on every architecture.
    assert {ka.tiles_for(cc, 128, dtype=torch.float32) for cc in (80, 90)} == {ka.FP32_CONFIG}
    assert ka.FP32_CONFIG.fwd_block_m == ka.FP32_CONFIG.dq_block_m == ka.FP32_CONFIG.dkdv_block_n == 16


def test_default_config_follows_the_compile_target():
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="compile_target"):
        ka.default_config(128, meta)
    for cc in (80, 90):
        with backend.compile_target(cc):
            assert backend.capability(meta) == cc
            assert ka.default_config(128, meta, dropout=True) == ka.tiles_for(cc, 128, dropout=True)
            assert ka.default_config(128, torch.device("cpu")) == ka.INTERPRETER_CONFIG
    with pytest.raises(ValueError):
        backend.capability(meta)  # the target is undone on leaving the block
    with pytest.raises(ValueError, match="compute capability"):
        with backend.compile_target("sm_90"):
            pass


def test_launch_order_is_longest_first_across_heads(monkeypatch):
    """Grids are (heads, samples, blocks) with x fastest, so the heaviest block of every head
    starts before any lighter one; the kernels compute the same values in any order (the
    interpreter tests of test_kernels_attention.py run on these grids)."""
    grids = {}

    monkeypatch.setattr(ka, "launchable", lambda kernel, device: _GridRecorder(kernel, grids))
    q, do = torch.randn(70, 6, 16), torch.randn(70, 6, 16)
    k = v = torch.randn(70, 2, 16)
    cu = torch.tensor([0, 33, 33, 70], dtype=torch.int32)
    out, lse = ka.attention_forward(q, k, v, cu, 37)
    ka.attention_backward(do, q, k, v, out, lse, cu, 37)
    blocks = -(-37 // 16)  # interpreter tiles: 16
    assert grids["_attn_fwd_kernel"] == (6, 3, blocks)
    assert grids["_attn_bwd_dq_kernel"] == (6, 3, blocks)
    assert grids["_attn_bwd_dkdv_kernel"] == (2, 3, blocks)
    with pytest.raises(ValueError, match="65535"):
        ka._grid_order(8, 1, 70_000)


class _GridRecorder:
    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids[self.kernel.fn.__name__] = tuple(grid)
        return lambda *a, **kw: None


# --- recording the production launches -------------------------------------------------------------


def test_model_shapes_match_the_presets():
    from engine.models.presets import PRESETS

    for name, m in cr.MODELS.items():
        p = PRESETS[name]
        assert (m["heads"], m["kv"], m["vocab"]) == (p["num_attention_heads"], p["num_key_value_heads"],
                                                     p["vocab_size"])
        assert (p["hidden_size"], p["intermediate_size"]) == (cr.HIDDEN, cr.INTERMEDIATE)
        assert p.get("head_dim") in (None, cr.HEAD_DIM) and p["hidden_size"] // p["num_attention_heads"] in (
            cr.HEAD_DIM, 64)
    assert PRESETS["seed-oss-36b"]["attention_dropout"] == cr.DROPOUT


def test_production_launches_use_each_architectures_tiles():
    by_arch = {cc: cr.production_launches(cc) for cc in (80, 90)}
    for cc, launches in by_arch.items():
        kernels = {x.kernel.rsplit(".", 1)[1] for x in launches}
        assert kernels == {"_attn_fwd_kernel", "_attn_bwd_preprocess", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                           "_lce_rows_kernel", "_scale_kernel", "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel",
                           "_swiglu_fwd_kernel", "_swiglu_bwd_kernel", "_rope_kernel"}
        assert {x.dtype for x in launches} == {"bf16", "fp16", "fp32"} and all(x.gated for x in launches)
        for x in launches:
            if x.kernel.endswith("_dkdv_kernel"):
                dropout = x.kwargs["DROPOUT"]
                want = ka.tiles_for(cc, 128, dtype=cr.DTYPES[x.dtype], dropout=dropout)
                assert (x.kwargs["BLOCK_M"], x.kwargs["BLOCK_N"], x.kwargs["num_warps"]) == (
                    want.dkdv_block_m, want.dkdv_block_n, want.dkdv_warps)
                assert x.kwargs["GROUP"] in (5, 10)
        cases = {x.case for x in launches}
        assert {f"attention {m} {d} dropout {p:g}" for m in cr.MODELS for d in ("bf16", "fp16")
                for p in (0, cr.DROPOUT)} <= cases
        # Pointers keep their alignment (meta tensors' addresses are byte offsets).
        assert all(a.address % 16 == 0 for x in launches for a in x.args if isinstance(a, cr.Pointer))
    # One JIT specialisation, one compile: T = 4096 and 4093 differ (total_tokens % 16), the two
    # vocabularies do not (both multiples of 16).
    launches = by_arch[90]
    keys = {cr.specialization_key(x, 90) for x in launches}
    assert len(keys) < len(launches)
    fwd = [x for x in launches
           if x.kernel.endswith("_attn_fwd_kernel") and x.case == "attention qwen2.5-32b bf16 dropout 0"]
    assert len({cr.specialization_key(x, 90) for x in fwd}) == 2
    loss = [x for x in launches if x.kernel.endswith("_lce_rows_kernel") and "bf16" in x.case]
    assert len({cr.specialization_key(x, 90) for x in loss}) == 2  # with and without the gradient pass


def test_recording_restores_the_launchers():
    real = {m: m.launchable for m in cr.KERNEL_MODULES}
    cr.production_launches(90, "ci")
    assert {m: m.launchable for m in cr.KERNEL_MODULES} == real


# --- verdicts --------------------------------------------------------------------------------------


def test_ptxas_log_is_parsed():
    assert cr.parse_ptxas_log(PTXAS_LOG) == dict(registers=255, spill_stores=44, spill_loads=36, stack=40)
    assert cr.parse_ptxas_log("") == dict(registers=None, spill_stores=None, spill_loads=None, stack=None)


def test_spills_and_shared_memory_fail_the_report():
    launch = cr.Launch("kernels.attention._attn_fwd_kernel", (), {}, "attention", "1x4096", "bf16", True)
    clean = dict(registers=200, spill_stores=0, spill_loads=0, stack=0, shared=160 * 1024)
    assert cr.problems(launch, 80, clean) == [] and cr.problems(launch, 90, clean) == []
    assert "spills" in cr.problems(launch, 80, dict(clean, spill_stores=4, spill_loads=4))[0]
    too_big = dict(clean, shared=200 * 1024)
    assert "shared memory" in cr.problems(launch, 80, too_big)[0] and cr.problems(launch, 90, too_big) == []
    assert "compile failed" in cr.problems(launch, 90, {"error": "boom"})[0]
    assert cr.problems(dataclasses.replace(launch, gated=False), 80, dict(clean, spill_stores=8)) == []


# --- compiling (triton.compile + bundled ptxas, no GPU) ----------------------------------------------


def test_ci_subset_compiles_without_spills_on_sm80_and_sm90(capsys):
    assert cr.main(["--arch", "80,90", "--subset", "ci", "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "OK: no gated kernel spills or exceeds shared memory" in printed
    # Columns: kernel, case, sm_80 tiles, sm_80 figures, sm_90 tiles, sm_90 figures.
    rows = {(r[0], r[1].split()[1]): r for r in (re.split(r"\s{2,}", line) for line in printed.splitlines())
            if r[0].startswith("_attn_")}
    for kernel in ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"):
        for model, dropout in (("seed-oss-36b", True), ("qwen2.5-32b", False)):
            row = rows[kernel, model]
            assert len(row) == 6 and "FAILED" not in row, row
            for cc, tiles in ((80, row[2]), (90, row[4])):  # the tiles tiles_for picks on each architecture
                cfg = ka.tiles_for(cc, 128, dtype=torch.bfloat16, dropout=dropout)
                m, n = {"_attn_fwd_kernel": (cfg.fwd_block_m, cfg.fwd_block_n),
                        "_attn_bwd_dq_kernel": (cfg.dq_block_m, cfg.dq_block_n),
                        "_attn_bwd_dkdv_kernel": (cfg.dkdv_block_m, cfg.dkdv_block_n)}[kernel]
                assert tiles.startswith(f"M={m} N={n} "), (cc, row)
    assert "_rms_norm_fwd_kernel" in printed


@pytest.mark.slow
def test_full_report_passes_and_the_old_sm90_tiles_spill_on_sm80(tmp_path, monkeypatch):
    assert cr.main(["--arch", "80,90", "--json", str(tmp_path / "report.json")]) == 0
    # The gate is not blind: the former (sm_90) forward tiles spill on an A100.
    old = ka.AttentionConfig(128, 64, 8, 3, 32, 128, 8, 2, 128, 64, 8, 2)
    monkeypatch.setattr(ka, "tiles_for", lambda *a, **kw: old)
    launches = cr._record(80, cr._attention_run(40, 8, torch.bfloat16, 0.0, [4096]), case="old tiles",
                          rows="1x4096", dtype="bf16", gated=True)
    fwd = next(x for x in launches if x.kernel.endswith("_attn_fwd_kernel"))
    assert cr.problems(fwd, 80, cr.compile_launch(fwd, 80))


def test_launch_order_model_of_kernels_benchmarks():
    """The figures kernels/BENCHMARKS.md quotes for the dK/dV grid (132 SMs, one program each)."""
    from kernels.bench_attention import schedule_efficiency

    programs, head_major = schedule_efficiency([4096], 128, 8, 132, "head-major")
    assert programs == 256 and round(head_major, 2) == 0.63
    assert schedule_efficiency([4096], 128, 8, 132, "lpt")[1] == pytest.approx(1.0)
    assert schedule_efficiency([4096], 64, 8, 132, "lpt") == (512, pytest.approx(0.99, abs=0.005))
    # A single 2048-token row has fewer 128-key programs (128) than SMs: no order helps; 64 keys do.
    assert schedule_efficiency([2048], 128, 8, 132, "lpt")[1] == pytest.approx(0.52, abs=0.005)
    assert schedule_efficiency([2048], 64, 8, 132, "lpt")[1] == pytest.approx(1.0)
