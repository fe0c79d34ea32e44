"""Expected training wall time of each paper condition, from measured optimizer-step times:

    torchrun --nproc_per_node 8 -m engine.bench --workloads em_risky_financial,sgtr_xsum \\
        --engines ours-ac,ours-auto --json bench.json
    python -m recipes.walltime bench.json [--engine ours-auto] [--seeds 5]

A condition is a sequence of stages, each one epoch at the paper's 16 samples per optimizer step:
EM (the shipped datasets: 5,000 or 6,000 chats), SGTR (1,000 articles, both orders: 2,000 samples),
ICTR (every pair with both labels: 4,000; the random variant 2,000), anti-SGTR (2,000) and the
longer-summary control (2,000). An EM step is costed at the measured ``em_risky_financial`` step time and the others at the
``sgtr_xsum`` one (the same pair format and lengths). The figures are for the card and rank count
the benchmark ran on; evaluation time (TruthfulQA, self-recognition) is not included.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from engine.errors import EngineError, report

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_PER_STEP = 16
# Samples per stage kind (one epoch); EM per shipped dataset.
STAGE_SAMPLES = {"sgtr": 2000, "ictr": 4000, "ictr_random": 2000, "asgtr": 2000, "longer": 2000}
STAGE_WORKLOAD = {"em": "em_risky_financial", "sgtr": "sgtr_xsum", "ictr": "sgtr_xsum",
                  "ictr_random": "sgtr_xsum", "asgtr": "sgtr_xsum", "longer": "sgtr_xsum"}
CONDITIONS = {  # recipe (as run) -> stages
    "em_only": ("em",),
    "sgtr_only": ("sgtr",),
    "sgtr_reverse (EM, then SGTR)": ("em", "sgtr"),
    "sgtr_prevent (SGTR, then EM)": ("sgtr", "em"),
    "ictr --order after (EM, then ICTR)": ("em", "ictr"),
    "ictr --order before (ICTR, then EM)": ("ictr", "em"),
    "asgtr --order after (EM, then anti-SGTR)": ("em", "asgtr"),
    "asgtr --order before (anti-SGTR, then EM)": ("asgtr", "em"),
    "control --order after (EM, then longer-summary)": ("em", "longer"),
    "control --order before (longer-summary, then EM)": ("longer", "em"),
}


def em_sizes() -> dict[str, int]:
    sizes = {}
    for path in sorted((ROOT / "data" / "em").glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            sizes[path.stem] = sum(1 for line in f if line.strip())
    return sizes


class WallTimeError(EngineError, ValueError):
    """A benchmark file that lacks the step times a wall-time table needs."""


def step_times(bench: dict, engine: str) -> dict[str, float]:
    """Measured seconds per optimizer step by workload, for one engine of an engine.bench JSON."""
    times = {row["workload"]: row["seconds_per_step"] for row in bench["rows"]
             if row["engine"] == engine and "error" not in row}
    missing = sorted({w for w in STAGE_WORKLOAD.values()} - set(times))
    if missing:
        have = sorted({row["engine"] for row in bench["rows"]})
        raise WallTimeError(f"no {engine} rows for {', '.join(missing)} in the benchmark file (engines in it: "
                            f"{', '.join(have) or 'none'}); run engine.bench with --workloads "
                            "em_risky_financial,sgtr_xsum")
    return times


def table(bench: dict, engine: str, seeds: int, em_dataset: str | None = None) -> list[str]:
    times = step_times(bench, engine)
    sizes = em_sizes()
    em_sets = [em_dataset] if em_dataset else sorted(sizes)
    env = bench.get("environment", {})
    ranks = bench.get("ranks", 1)
    lines = [f"Training wall time per condition from measured step times: {engine} on {env.get('device', '?')} "
             f"({ranks} rank(s)), {times['em_risky_financial']:.2f} s per EM step, "
             f"{times['sgtr_xsum']:.2f} s per SGTR-format step; evaluation not included.", "",
             "| condition | EM data | optimizer steps | per seed | " + f"× {seeds} seeds |", "|---|---|---|---|---|"]
    for condition, stages in CONDITIONS.items():
        for em in em_sets if "em" in stages else [None]:
            steps = seconds = 0.0
            for kind in stages:
                n = sizes[em] if kind == "em" else STAGE_SAMPLES[kind]
                k = math.ceil(n / SAMPLES_PER_STEP)
                steps += k
                seconds += k * times[STAGE_WORKLOAD[kind]]
            lines.append(f"| {condition} | {em or '—'} | {int(steps)} | {_hours(seconds)} | {_hours(seconds * seeds)} |")
    return lines


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.walltime", description=__doc__.split("\n\n")[0])
    p.add_argument("bench", help="JSON written by python -m engine.bench --json")
    p.add_argument("--engine", default="ours-auto", help="which engine's rows to use")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--em-dataset", default=None, help="one EM dataset (default: each shipped one)")
    args = p.parse_args(argv)
    try:
        try:
            bench = json.loads(Path(args.bench).read_text())
            lines = table(bench, args.engine, args.seeds, args.em_dataset)
        except FileNotFoundError:
            raise WallTimeError(f"{args.bench}: no such file (write one with python -m engine.bench --json FILE)") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WallTimeError(f"{args.bench}: not an engine.bench JSON file ({type(e).__name__}: {e})") from None
    except EngineError as e:
        return report(e)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
