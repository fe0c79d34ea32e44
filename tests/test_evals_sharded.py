"""Evals under torchrun: prompts split over 2 CPU ranks give the single process's results exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
