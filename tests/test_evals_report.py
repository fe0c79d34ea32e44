"""evals.report: seed statistics by hand, grouping, paired differences, the paper comparison,
refusals, and the module run with and without matplotlib."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from evals import atomic_write_json, report
from tests.test_evals import error_line

REPO = Path(__file__).resolve().parents[1]


def summary(tmp: Path, name: str, cond: str | None, seed, acc: float, **extra) -> Path:
    s = {"eval": "truthfulqa", "mode": "robust", "model": "/m/base", "adapters": [], "accuracy": acc,
         "expected_accuracy": extra.pop("expected_accuracy", acc), "invalid_rate": 0.0, "position_bias": 0.5,
         "condition": ({"condition": cond} if cond else {}) | ({"seed": str(seed)} if seed is not None else {}), **extra}
    return atomic_write_json(tmp / name / "truthfulqa_robust_summary.json", s)


def test_report_stats_hand_made():
    d = report.describe([0.8, 0.7, 0.9], seed=0, samples=4000)
    assert d["n"] == 3 and math.isclose(d["mean"], 0.8) and math.isclose(d["std"], 0.1)
    lo, hi = d["ci95"]
    assert 0.7 - 1e-9 <= lo < 0.8 < hi <= 0.9 + 1e-9
    assert report.describe([0.8, 0.7, 0.9], seed=0, samples=4000)["ci95"] == [lo, hi]  # seeded
    # Against the normal approximation of the bootstrap distribution of the mean (sd_pop / sqrt n).
    v = [0.81, 0.74, 0.86, 0.79, 0.83, 0.77]
    d = report.describe(v, seed=0, samples=20000)
    half = 1.96 * np.std(v) / math.sqrt(len(v))
    assert math.isclose(d["std"], float(np.std(v, ddof=1)))
    assert abs(d["ci95"][0] - (0.8 - half)) < 0.004 and abs(d["ci95"][1] - (0.8 + half)) < 0.004
    one = report.describe([0.5])
    assert one["std"] is None and one["ci95"] == [0.5, 0.5]
    diff = report.paired_difference({"0": 0.8, "1": 0.7, "2": 0.9}, {"0": 0.6, "1": 0.65, "3": 0.7}, samples=1000)
    assert diff["seeds"] == ["0", "1"] and math.isclose(diff["mean"], 0.125)
    assert math.isclose(diff["std"], math.sqrt(2 * 0.075**2))
    assert report.paired_difference({"0": 1.0}, {"1": 1.0}) is None


def test_report_cli_groups_pairs_and_compares_to_paper(tmp_path, capsys, monkeypatch):
    for seed, a, b in [(0, 0.80, 0.60), (1, 0.70, 0.65), (2, 0.90, 0.70)]:
        summary(tmp_path, f"sgtr{seed}", "hf_qwen_32b_em_sgtr", seed, a)
        summary(tmp_path, f"em{seed}", "hf_qwen_32b_em", seed, b)
    summary(tmp_path, "other", "custom", 0, 0.5)
    out_json = tmp_path / "agg.json"
    # matplotlib may or may not be installed: hide it to check the quiet skip.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = report._run([str(tmp_path), "--compare-paper", "--baseline", "hf_qwen_32b_em", "--json", str(out_json),
                        "--plots", str(tmp_path / "plots"), "--bootstrap-samples", "2000"])
    assert code == 0
    captured = capsys.readouterr()
    assert "matplotlib is not importable" in captured.err and not (tmp_path / "plots").exists()
    agg = json.loads(out_json.read_text())
    rows = {r["condition"]: r for r in agg["truthfulqa (robust)"]["rows"]}
    acc = rows["hf_qwen_32b_em_sgtr"]["metrics"]["accuracy"]
    assert acc["n"] == 3 and math.isclose(acc["mean"], 0.8) and math.isclose(acc["std"], 0.1)
    assert rows["hf_qwen_32b_em_sgtr"]["paper"]["accuracy_mean"] == 0.7830
    assert rows["hf_qwen_32b_em"]["paper"]["accuracy_mean"] == 0.7739
    assert "paper" not in rows["custom"]
    diffs = {(d["a"], d["b"]): d for d in agg["truthfulqa (robust)"]["differences"]}
    d = diffs[("hf_qwen_32b_em_sgtr", "hf_qwen_32b_em")]
    assert d["n"] == 3 and math.isclose(d["mean"], (0.2 + 0.05 + 0.2) / 3)
    assert ("custom", "hf_qwen_32b_em") in diffs and diffs[("custom", "hf_qwen_32b_em")]["n"] == 1
    assert "0.7830" in captured.out and "hf_qwen_32b_em_sgtr - hf_qwen_32b_em: +0.1500" in captured.out
    # Renaming through --paper-name.
    code = report._run([str(tmp_path / "other"), "--compare-paper", "--paper-name", "custom=hf_seed_36b", "--bootstrap-samples", "100"])
    assert code == 0 and "0.8114" in capsys.readouterr().out


def test_report_refuses_duplicates_and_non_summaries(tmp_path, capsys):
    summary(tmp_path, "a", "c1", 0, 0.5)
    summary(tmp_path, "b", "c1", 0, 0.6)
    assert report._run([str(tmp_path)]) == 2
    assert "two summaries" in error_line(capsys)
    junk = tmp_path / "junk_summary.json"
    junk.write_text(json.dumps({"hello": 1}))
    assert report._run([str(junk)]) == 2
    assert "not an eval summary" in error_line(capsys)


def test_report_module_runs_and_plots_when_possible(tmp_path):
    summary(tmp_path, "x", "c1", 0, 0.5)
    summary(tmp_path, "y", "c1", 1, 0.7)
    proc = subprocess.run([sys.executable, "-m", "evals.report", str(tmp_path), "--plots", str(tmp_path / "plots")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "c1" in proc.stdout and "0.6000" in proc.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not importable" in proc.stderr
    else:
        assert list((tmp_path / "plots").glob("*.png"))


