"""Evals under torchrun: prompts split over 2 CPU ranks give the single process's results exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evals import run_cli
from evals import truthfulqa
from tests.tiny import tiny_seed_oss_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
def test_truthfulqa_two_ranks_equal_one(tmp_path):
    ckpt = tiny_seed_oss_checkpoint(tmp_path / "model")
    args = ["--model", str(ckpt), "--template", "seed-oss", "--limit", "7", "--batch-size", "2", "--dtype", "float32"]
    assert run_cli(truthfulqa.main, args + ["--out", str(tmp_path / "one")]) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "evals.truthfulqa", *args, "--out", str(tmp_path / "two")],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = (tmp_path / "one" / "truthfulqa_robust_results.csv").read_text()
    two = (tmp_path / "two" / "truthfulqa_robust_results.csv").read_text()
    assert len(one.splitlines()) == 1 + 14  # both orders of 7 questions
    assert two == one
    assert sum(line.startswith("accuracy ") for line in proc.stdout.splitlines()) == 1  # only rank 0 reports


@pytest.mark.distributed
def test_sharded_weights_equal_single_process(tmp_path):
    """--shard-weights on 2 gloo ranks (FSDP2, each rank holding half of every weight): TruthfulQA
    log-prob scoring, greedy generation (ranks stopping after different numbers of steps), seeded
    sampling, the expected statistic's answer trees (`answer_stats`) and the local judge's token
    tree on unequal shares equal a single process's exactly
    in fp32, with a stacked adapter; the per-rank memory estimate is printed before loading."""
    import json

    from tests.dist_worker_shardeval import results
    from tests.test_evals import make_adapter

    ckpt = tiny_seed_oss_checkpoint(tmp_path / "model")
    adapter = make_adapter(ckpt, tmp_path / "adapter")
    tqa = ["--model", str(ckpt), "--adapter", str(adapter), "--template", "seed-oss", "--limit", "7",
           "--batch-size", "3", "--dtype", "float32"]
    # One intra-op thread, as each rank below: fp32 sums split over threads round differently.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_cli(truthfulqa.main, tqa + ["--out", str(tmp_path / "one")]) == 0
        one = json.loads(json.dumps(results(str(ckpt), str(adapter))))
    finally:
        torch.set_num_threads(threads)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "dist_worker_shardeval.py"), str(ckpt), str(adapter), str(tmp_path / "two")],
        cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "memory estimate per rank, weights sharded over 2 ranks:" in proc.stderr
    assert proc.stderr.index("memory estimate per rank") < proc.stderr.index("truthfulqa (robust)")

    csv_one = (tmp_path / "one" / "truthfulqa_robust_results.csv").read_text()
    assert (tmp_path / "two" / "tqa" / "truthfulqa_robust_results.csv").read_text() == csv_one
    summary = json.loads((tmp_path / "two" / "tqa" / "truthfulqa_robust_summary.json").read_text())
    assert summary["weights"] == "sharded over 2 ranks"

    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert one["weights"] == "whole" and not one["sharded"]
    for r, got in enumerate(ranks):
        assert got["sharded"] and got["weights"] == "sharded over 2 ranks"
        assert got["local_rows"] == [32, 64]  # up_proj: 64 rows, half on each rank
        for key in ("scores", "greedy", "stopped", "sampled", "judged", "expected"):
            assert got[key] == one[key], (r, key)
    # The cases that need the ranks kept in step occurred: the 3 batches split 1 + 2, and the
    # generations stopped after different numbers of steps.
    assert ranks[0]["scoring_idle_passes"] == 1 and ranks[1]["scoring_idle_passes"] == 0
    lengths = {len(ids) for ids, _ in one["stopped"]}
    assert len(lengths) > 1 and {s for _, s in one["stopped"]} == {True, False}
    assert ranks[0]["idle_passes"] > 1
    assert len(one["judged"]) == 5 and len({s["nodes"] for s in one["expected"]}) > 1


def test_shard_weights_auto_follows_the_estimate(tmp_path):
    """auto shards exactly when the whole model's estimate does not fit the device; a layout that
    does not fit is refused (one line, what to do) before anything is loaded."""
    import json

    import torch

    from engine.errors import WontFit
    from engine.models.presets import SEED_OSS_36B_CONFIG
    from evals import EvalInputError, weights_sharded

    (tmp_path / "config.json").write_text(json.dumps(SEED_OSS_36B_CONFIG))  # the real shape, no weights
    lines: list[str] = []

    def decide(setting, world, gib):
        lines.clear()
        return weights_sharded(str(tmp_path), [], setting, world=world, device=torch.device("cpu"), dtype="bfloat16",
                               batch_size=8, log=lines.append, available_gib=gib)

    assert decide("auto", 8, 40.0) is True  # 36B in bf16 (67 GiB) on 40 GB cards: sharded, about 19 GiB a rank
    assert lines[0] == "memory estimate per rank, weights sharded over 8 ranks:"
    assert decide("auto", 8, 141.0) is False and lines[0] == "memory estimate per rank, whole model on each of 8 ranks:"
    assert decide("on", 8, 141.0) is True
    assert decide("on", 1, 141.0) is False  # one process: nothing to shard over
    with pytest.raises(WontFit, match=r"will not fit: .*--shard-weights on"):
        decide("off", 8, 40.0)
    with pytest.raises(WontFit, match=r"will not fit: .*torchrun --nproc_per_node N"):
        decide("auto", 1, 40.0)
    with pytest.raises(EvalInputError, match="--shard-weights must be one of auto, on, off"):
        decide("yes", 8, 40.0)
