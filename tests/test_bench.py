"""The step benchmark (engine.bench) runs its real code paths — ours and transformers + PEFT —
with tiny dimensions on CPU and reports what it measured; no timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.bench import DEFAULT_LENGTHS, build, main, padded_micro_batches, step_flops, workload_steps
from engine.data import Sample
from engine.models import ModelArgs
from engine.models.presets import QWEN25_32B_CONFIG


def test_bench_runs_ours_and_the_reference_and_writes_the_table(tmp_path, capsys):
    out, md = tmp_path / "bench.json", tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n")
    assert main(["--tiny", "--layers", "1", "--seq-len", "64", "--steps", "1", "--dtype", "float32",
                 "--workloads", "dense,em_risky_financial", "--engines", "ours-ac,hf,hfliger",
                 "--json", str(out), "--write", str(md)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["engine"], r["workload"]): r for r in result["rows"]}
    assert set(rows) == {(e, w) for e in ("ours-ac", "hf") for w in ("dense", "em_risky_financial")}
    for row in rows.values():
        assert row["real_tokens_per_s"] > 0 and row["steps_per_s"] > 0
    assert rows["ours-ac", "dense"]["recomputed_layers"] == 1 and rows["ours-ac", "dense"]["estimate_gib"] > 0
    assert result["skipped"] == {"hfliger": "Liger's kernels need CUDA"}
    printed = capsys.readouterr().out
    assert "| ours-ac | dense | 1 |" in printed and "× hf" in printed and "hfliger: not run" in printed
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\n### cpu, ") and "torch " in text and "| hf | em_risky_financial |" in text


def test_bench_model_weights_are_random_and_adapted():
    from engine.parallel import is_activation_checkpointed

    model = build("qwen2.5-32b", 2, torch.float32, torch.device("cpu"), tiny=True, activation_checkpointing=True,
                  checkpointed_layers=1)  # the trainer's assembly
    assert [is_activation_checkpointed(layer) for layer in model.model.layers] == [True, False]
    q = model.model.layers[0].self_attn.q_proj
    assert 0.015 < q.weight.std().item() < 0.025  # N(0, 0.02), never zeros
    adapters = [p for n, p in model.named_parameters() if n.endswith((".A", ".B"))]
    assert len(adapters) == 2 * 7 * 2 and all(p.requires_grad and p.abs().sum() > 0 for p in adapters)


def test_workload_steps_use_the_real_lengths():
    table = json.loads(DEFAULT_LENGTHS.read_text())
    steps = workload_steps(DEFAULT_LENGTHS, "sgtr_xsum", 16, 2, vocab=512)
    assert len(steps) == 2 and all(len(batch) == 16 for batch in steps)
    pairs = {tuple(x) for x in table["sgtr_xsum"]}
    for s in steps[0]:
        assert (len(s.input_ids), s.num_trained) in pairs
        assert s.labels[-1] != -100 and s.num_trained == 2  # SGTR: the answer digit and <|im_end|>


def test_reference_batches_are_padded_like_axolotl():
    samples = [Sample([5] * n, [-100] * (n - 2) + [5, 5], f"s{n}", None) for n in (3, 7, 4)]
    batches = list(padded_micro_batches(samples, 2, torch.device("cpu")))
    assert [b[0].shape for b in batches] == [(2, 7), (1, 4)]
    ids, mask, labels = batches[0]
    assert mask.sum().item() == 10 and (labels != -100).sum().item() == 4
    assert labels[0, 3:].eq(-100).all()  # padding is never trained


def test_step_flops_convention():
    args = ModelArgs.from_hf_config(QWEN25_32B_CONFIG)
    one = step_flops(args, [Sample([0] * 2048, [0] * 2048, "a", None)])
    # 4 FLOPs per token and frozen weight: 64 layers of projections (31.3B) + the LM head (0.78B)
    weights = 64 * (5120 * (2 * 5120 + 2 * 1024) + 3 * 5120 * 27648) + 5120 * 152064
    attention = 3.5 * 4 * 2048**2 / 2 * 5120 * 64
    assert one == 4 * weights * 2048 + attention
    assert 31e9 < weights - 5120 * 152064 < 32e9


def test_shipped_em_lengths_match_the_audit(qwen25_tokenizer):
    """data/workload_lengths.json is what the renderer and tokenizer give for the shipped EM data."""
    from engine.data import load_samples

    em = json.loads(DEFAULT_LENGTHS.read_text())["em_risky_financial"]
    path = Path(__file__).resolve().parents[1] / "data" / "em" / "risky_financial_advice.jsonl"
    samples = load_samples(path, qwen25_tokenizer, "qwen2.5", limit=50).samples
    assert em[:50] == [[len(s.input_ids), s.num_targets] for s in samples]


@pytest.mark.distributed
@pytest.mark.parametrize("data_parallel", ["fsdp", "replicate"])
def test_bench_under_torchrun_runs_our_engine_on_every_rank(tmp_path, data_parallel):
    """Under torchrun the benchmark runs our step sharded with FSDP2 or replicated (2 CPU ranks,
    gloo) and says why the single-GPU references were not run."""
    import os
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "engine.bench",
         "--tiny", "--layers", "2", "--steps", "1", "--dtype", "float32", "--engines", "ours-ac,hf", "--data-parallel", data_parallel,
         "--workloads", "em_risky_financial", "--json", str(out)],
        cwd=Path(__file__).resolve().parents[1], env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["ranks"] == 2 and [r["engine"] for r in result["rows"]] == ["ours-ac"]
    assert result["skipped"] == {"hf": "single-GPU reference, not run under torchrun"}
    assert proc.stdout.count("| ours-ac | em_risky_financial |") == 1  # printed by rank 0 only


def test_a_row_that_runs_out_of_memory_is_reported_and_the_run_goes_on(capsys):
    from engine.bench import _measure, format_table

    class Optimizer:
        zeroed = False

        def zero_grad(self, set_to_none=True):
            Optimizer.zeroed = True

    def step(batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    row = _measure(step, [[], []], torch.device("cpu"), print, flops=1.0, optimizer=Optimizer(), engine="ours-auto",
                   workload="dense", recomputed_layers=0, estimate_gib=1.0)
    assert row["error"].startswith("out of memory: CUDA out of memory.") and Optimizer.zeroed
    table = format_table([row], None)
    assert table[2].startswith("| ours-auto | dense | 0 | out of memory") and table[2].count("|") == table[0].count("|")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_engines_hold_their_weights_in_the_dtype_asked_for(dtype):
    """transformers >= 5 builds a model in its config's dtype (bf16 for the presets) whatever the
    default dtype is: the reference must still be built in the dtype the benchmark compares."""
    from engine.bench import build_hf

    ours = build("qwen2.5-32b", 1, dtype, torch.device("cpu"), tiny=True, activation_checkpointing=False)
    hf = build_hf("qwen2.5-32b", 1, dtype, torch.device("cpu"), tiny=True, liger=False)
    for model in (ours, hf):
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
        assert frozen == {dtype}, (type(model).__name__, frozen)
