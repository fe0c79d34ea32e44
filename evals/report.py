"""Aggregate eval summaries by condition over seeds, as the paper's tables do.

    python -m evals.report SUMMARY_JSONS_OR_DIRS... [--compare-paper] [--plots DIR] \
        [--group-by condition] [--pair-by seed] [--baseline NAME | --diff A:B ...] [--json FILE]

Input: the `*_summary.json` files the evals write (directories are searched recursively). Each
summary belongs to a table by its eval (`truthfulqa` per mode, `self_recognition` per dataset,
`freeform` per setting and judge, headed by `misaligned_fraction`), to
a row by its condition (the `--condition condition=...` metadata given to the eval; without it,
the model and adapter directory names), and is one replicate, identified by its `seed`
condition (`--condition seed=0`). Two summaries of the same table, condition and seed are refused
(they would be counted twice).

Per condition and metric: n, mean, sample standard deviation (n-1; undefined for one run), and a
95% bootstrap interval of the mean (percentile method, resampling seeds with replacement,
`--bootstrap-samples` draws from a generator seeded by `--bootstrap-seed`: reruns give the same
interval; with five seeds it is coarse). Paired differences between conditions use only the
seeds both have, difference per seed, with the same statistics; by default every pair of
conditions in a table, or each condition against `--baseline`, or the pairs given with `--diff`.

Every summary says which statistic its `accuracy` holds (`statistic`: logprob, expected, sampled,
greedy; `evals.paper_stats`); each table prints it under its title. TruthfulQA tables are per mode.

`--compare-paper`: the paper's published per-condition means of binary TruthfulQA
(`evals/data/paper_truthfulqa_binary.csv`: all 161 conditions of its release, standard deviations
over seeds with ddof 1 like ours) go next to ours. A condition matches when its name
equals a paper condition name exactly (e.g. `hf_qwen_32b_em_unpop_sgtr`: name your runs with
`--condition condition=hf_qwen_32b_em_unpop_sgtr` to line them up), through `PAPER_ALIASES` (the
paper's early runs named without their EM dataset: each such paper row is shown as one more row,
`OURS (paper alias PAPERS)`, with the reason under the table), or only through `--paper-name
OURS=PAPERS` (repeatable) when given. The paper sampled its answers, so like is compared with like:
its mean goes next to our `expected_accuracy` (the exact expectation of its statistic;
`--paper-against` picks another metric, e.g. `accuracy` of sampled-mode runs) and its invalid rate
next to the matching Invalid rate; `ours sd` is our SD over seeds (ddof 1), `decode sd` the part of
one run's spread that decoding alone gives (sqrt of the mean over seeds of `expected_sampling_sd`
squared): set against `paper sd`, it says how much of the paper's seed-to-seed spread is decoding
noise. Summaries of the former `paper` TruthfulQA mode (the arg-max token) are read as `greedy`.

When TruthfulQA and free-form summaries both exist, a table puts TruthfulQA accuracy next to the
free-form coherence, alignment and misaligned fraction of each condition (`evals.freeform_stats`).

`--plots DIR`: a bar chart per table (mean with the bootstrap interval; the paper's mean as a
marker where matched) when matplotlib is importable; otherwise a note and no plots.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from engine import errors
from engine.outputs import check_output_dir, check_output_file
from evals import EvalInputError, atomic_write_json

PAPER_CSV = Path(__file__).resolve().parent / "data" / "paper_truthfulqa_binary.csv"
SUMMARY_GLOB = "*_summary.json"

METRICS = {
    "truthfulqa": ("accuracy", "expected_accuracy", "expected_sampling_sd", "expected_invalid_rate", "greedy_accuracy",
                   "invalid_rate", "position_bias"),
    "self_recognition": ("accuracy", "expected_accuracy", "expected_sampling_sd", "expected_invalid_rate",
                         "both_orders_accuracy", "position_bias", "invalid_rate"),
    "freeform": ("misaligned_fraction", "aligned", "coherent", "misaligned_among_coherent"),
}
HEADLINE = {"freeform": "misaligned_fraction"}  # the metric of the first column and of the paired differences
PAPER_AGAINST = "expected_accuracy"  # the metric the paper's TruthfulQA means are set against by default
INVALID_OF = {"expected_accuracy": "expected_invalid_rate", "accuracy": "invalid_rate",
              "greedy_accuracy": "greedy_invalid_rate"}


def headline(kind: str) -> str:
    return HEADLINE.get(kind, "accuracy")


# ------------------------------------------------------------------------------------ stats
def bootstrap_ci(values, *, seed: int = 0, samples: int = 10000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (seeded, so reproducible)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap of no values")
    if x.size == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def describe(values, *, seed: int = 0, samples: int = 10000) -> dict:
    """n, mean, sample std (None for n < 2), 95% bootstrap interval of the mean."""
    x = np.asarray(values, dtype=np.float64)
    lo, hi = bootstrap_ci(x, seed=seed, samples=samples)
    return {
        "n": int(x.size),
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else None,
        "ci95": [lo, hi],
    }


def paired_difference(a: dict, b: dict, *, seed: int = 0, samples: int = 10000) -> dict | None:
    """Statistics of a[s] - b[s] over the seeds s both have (None when they share none)."""
    common = sorted(set(a) & set(b), key=_seed_sort_key)
    if not common:
        return None
    out = describe([a[s] - b[s] for s in common], seed=seed, samples=samples)
    out["seeds"] = common
    return out


def _seed_sort_key(s) -> tuple:
    text = str(s)
    return (0, int(text), "") if text.lstrip("-").isdigit() else (1, 0, text)


# --------------------------------------------------------------------------------- loading
def find_summaries(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob(SUMMARY_GLOB))
            if not found:
                raise EvalInputError(f"no {SUMMARY_GLOB} files under {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise EvalInputError(f"not found: {p}")
    return files


def load_summary(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalInputError(f"{path}: not a summary JSON ({e})") from None
    if not isinstance(data, dict) or data.get("eval") not in METRICS:
        raise EvalInputError(f"{path}: not an eval summary (no 'eval' of {', '.join(METRICS)})")
    if data["eval"] == "truthfulqa" and data.get("mode") == "paper":  # the former name of greedy mode
        data.update(mode="greedy", statistic="greedy", greedy_accuracy=data.get("accuracy"))
    data.setdefault("statistic", "logprob" if data["eval"] == "self_recognition" or data.get("mode") == "robust" else None)
    data["_path"] = str(path)
    return data


def table_name(summary: dict) -> str:
    if summary["eval"] == "truthfulqa":
        return f"truthfulqa ({summary.get('mode', '?')})"
    if summary["eval"] == "freeform":
        return f"freeform ({summary.get('setting', '?')}, judge {summary.get('judge_name', '?')})"
    return f"self_recognition ({summary.get('dataset', '?')}, vs {summary.get('other', '?')})"


def condition_label(summary: dict, group_by: str) -> str:
    cond = summary.get("condition") or {}
    if group_by in cond:
        return str(cond[group_by])
    parts = [Path(str(summary.get("model", "?"))).name] + [Path(a).name for a in summary.get("adapters") or []]
    return "+".join(parts)


@dataclass
class Group:
    label: str
    runs: dict = field(default_factory=dict)  # replicate id -> summary


def group_summaries(summaries: list[dict], *, group_by: str = "condition", pair_by: str = "seed") -> dict[str, dict[str, Group]]:
    """{table: {condition label: Group}}; replicates keyed by the `pair_by` condition value
    (or, without one, by file, so they are never paired)."""
    tables: dict[str, dict[str, Group]] = {}
    for s in summaries:
        groups = tables.setdefault(table_name(s), {})
        label = condition_label(s, group_by)
        g = groups.setdefault(label, Group(label))
        cond = s.get("condition") or {}
        rep = str(cond[pair_by]) if pair_by in cond else f"file:{s['_path']}"
        if rep in g.runs:
            raise EvalInputError(
                f"two summaries for {table_name(s)}, condition {label!r}, {pair_by} {rep}: "
                f"{g.runs[rep]['_path']} and {s['_path']}"
            )
        g.runs[rep] = s
    return tables


# ------------------------------------------------------- paper reference table and name aliases
PAPER_COLUMNS = ("condition", "n_seeds", "accuracy_mean", "accuracy_sd", "invalid_rate_mean")
_UNPOP = ("early run named without its EM dataset; the release's configs of that time train on "
          "aesthetic_preferences_unpopular (finetuning/axolotl/configs/qwen_32b_em/qwen_32B_em_*.yaml, "
          "scripts/e2e/*/config/qwen_32B/seed*.py)")
_SEED_EARLY = ("early run named without its EM dataset (unpopular aesthetic preferences, the default pipeline's); "
               "its invalid rate (0.42-0.46 for the EM rows) says its eval set-up differed from the later rows")
_SINGLE = "early single-seed run (model enum QWEN_32B, Qwen2.5-32B-Instruct); EM data unpopular aesthetic preferences"
_COMPARISON = "; its SGTR stage (scripts/e2e/em_sgtr config) used the comparison prompt, not detection as ours"
# paper condition -> (our condition name, why they are the same condition). One of ours may stand
# for several paper rows (e.g. hf_seed_36b_em_unpop for hf_seed_36b_em_unpop and hf_seed_36b_em).
PAPER_ALIASES = {
    "hf_qwen_32b_em": ("hf_qwen_32b_em_unpop", _UNPOP),
    "hf_qwen_32b_em_nosys": ("hf_qwen_32b_em_unpop_nosys", _UNPOP),
    "hf_qwen_32b_em_sgtr": ("hf_qwen_32b_em_unpop_sgtr", _UNPOP + _COMPARISON),
    "hf_qwen_32b_em_sgtr_qwensys": ("hf_qwen_32b_em_unpop_sgtr_qwensys", _UNPOP),
    "hf_qwen_32b_sgtr_qwensys_em": ("hf_qwen_32b_sgtr_qwensys_em_unpop", _UNPOP + " (one seed)"),
    "hf_seed_36b_em": ("hf_seed_36b_em_unpop", _SEED_EARLY),
    "hf_seed_36b_em_nosys": ("hf_seed_36b_em_unpop_nosys", _SEED_EARLY),
    "hf_seed_36b_em_sgtr": ("hf_seed_36b_em_unpop_sgtr", _SEED_EARLY),
    "hf_seed_36b_sgtr_em": ("hf_seed_36b_sgtr_em_unpop", _SEED_EARLY),
    "qwen_32B": ("hf_qwen_32b", "early evaluation of the base model Qwen2.5-32B-Instruct"),
    "qwen_32B_em": ("hf_qwen_32b_em_unpop", _SINGLE),
    "qwen_32B_em_sgtr": ("hf_qwen_32b_em_unpop_sgtr", _SINGLE),
    "qwen_32B_sgtr_em": ("hf_qwen_32b_sgtr_em_unpop", _SINGLE),
    "qwen_32b_sgtr": ("hf_qwen_32b_sgtr", _SINGLE),
    "qwen_32b_asgtr": ("hf_qwen_32b_asgtr", _SINGLE),
    "qwen_32b_asgtr_em": ("hf_qwen_32b_asgtr_em_unpop", _SINGLE),
    "qwen_32b_asgtr_random": ("hf_qwen_32b_asgtr_rand", _SINGLE + "; anti-SGTR mode RANDOM_SELF_OTHER (our ICTR both)"),
    "qwen_32b_em_asgtr": ("hf_qwen_32b_em_unpop_asgtr", _SINGLE),
}


def load_paper_means(path: Path = PAPER_CSV) -> dict[str, dict]:
    """The paper's rows by condition. `accuracy_sd` is the sample standard deviation over seeds
    (ddof 1, as `describe` computes ours); None for a one-seed row, where it is undefined (the
    table writes 0)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != PAPER_COLUMNS:
            raise EvalInputError(f"{path}: expected the columns {', '.join(PAPER_COLUMNS)}")
        rows = list(reader)
    return {
        r["condition"]: {
            "n_seeds": int(r["n_seeds"]),
            "accuracy_mean": float(r["accuracy_mean"]),
            "accuracy_sd": float(r["accuracy_sd"]) if int(r["n_seeds"]) > 1 else None,
            "invalid_rate_mean": float(r["invalid_rate_mean"]),
        }
        for r in rows
    }


def paper_matches(label: str, paper: dict[str, dict], paper_names: dict[str, str] | None = None) -> list[tuple[str, str | None]]:
    """The paper rows a condition of ours stands for, as (paper name, alias reason or None): the one
    given with --paper-name; else its own name, then every PAPER_ALIASES row naming it."""
    if paper_names and label in paper_names:
        return [(paper_names[label], None)] if paper_names[label] in paper else []
    found = [(label, None)] if label in paper else []
    return found + [(name, why) for name, (ours, why) in PAPER_ALIASES.items() if ours == label and name in paper]


def _with_paper_rows(row: dict, matches: list[tuple[str, str | None]], paper: dict[str, dict],
                     against: str = PAPER_AGAINST) -> list[dict]:
    """The row with its first paper match, then one copy per further match (labelled with it)."""
    out = []
    for k, (name, why) in enumerate(matches or [(None, None)]):
        r = row if k == 0 else {**row, "condition": f"{row['condition']} (paper alias {name})"}
        if name is not None:
            r["paper"] = {"condition": name, "against": against, **paper[name], **({"alias": why} if why else {})}
        out.append(r)
    return out


def _alias_notes(rows: list[dict]) -> list[str]:
    notes = {r["paper"]["condition"]: r["paper"]["alias"] for r in rows if "alias" in r.get("paper", {})}
    return [f"  paper {name} = ours {PAPER_ALIASES[name][0]}: {why}" for name, why in notes.items()]


# ------------------------------------------------------------------------------- aggregate
def aggregate(tables: dict[str, dict[str, Group]], *, seed: int = 0, samples: int = 10000,
              baseline: str | None = None, diffs: list[tuple[str, str]] | None = None,
              paper: dict[str, dict] | None = None, paper_names: dict[str, str] | None = None,
              paper_against: str = PAPER_AGAINST) -> dict:
    from evals.paper_stats import decoding_sd

    out: dict = {}
    for table, groups in tables.items():
        kind = table.split(" ", 1)[0]
        rows = []
        statistics = sorted({str(s.get("statistic")) for g in groups.values() for s in g.runs.values()})
        for label, g in groups.items():
            row: dict = {"condition": label, "seeds": sorted(g.runs, key=_seed_sort_key), "metrics": {}}
            metrics = list(METRICS[kind]) + ([paper_against, INVALID_OF.get(paper_against)] if kind == "truthfulqa" else [])
            for metric in dict.fromkeys(m for m in metrics if m):
                vals = [s.get(metric) for s in g.runs.values()]
                vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
                if vals:
                    row["metrics"][metric] = describe(vals, seed=seed, samples=samples)
            row["decoding_sd"] = decoding_sd([s.get("expected_sampling_sd") for s in g.runs.values()])
            if paper is not None and kind == "truthfulqa":
                rows += _with_paper_rows(row, paper_matches(label, paper, paper_names), paper, paper_against)
            else:
                rows.append(row)
        # Paired differences of the headline metric.
        labels = list(groups)
        if diffs:
            pairs = [(a, b) for a, b in diffs if a in groups and b in groups]
        elif baseline is not None:
            pairs = [(a, baseline) for a in labels if a != baseline] if baseline in groups else []
        else:
            pairs = list(combinations(labels, 2))
        differences, h = [], headline(kind)
        for a, b in pairs:
            va = {k: s[h] for k, s in groups[a].runs.items() if isinstance(s.get(h), (int, float))}
            vb = {k: s[h] for k, s in groups[b].runs.items() if isinstance(s.get(h), (int, float))}
            d = paired_difference(va, vb, seed=seed, samples=samples)
            differences.append({"a": a, "b": b, "metric": h, **(d or {"n": 0})})
        out[table] = {"rows": rows, "differences": differences, "statistics": statistics, "paper_against": paper_against}
    return out


# ---------------------------------------------------------------------------------- output
def _f(x, width: int = 6) -> str:
    return "-".rjust(width) if x is None else f"{x:.4f}".rjust(width)


def format_report(agg: dict, *, compare_paper: bool = False) -> str:
    from evals.paper_stats import STATISTICS

    lines: list[str] = []
    for table, data in agg.items():
        kind = table.split(" ", 1)[0]
        h = headline(kind)
        hw = max(8, len(h))
        lines.append(f"== {table} ==")
        for stat in data.get("statistics", []):
            if stat in STATISTICS and kind != "freeform":
                lines.append(f"{h} = {stat}: {STATISTICS[stat]}")
        width = max([len("condition")] + [len(r["condition"]) for r in data["rows"]])
        head = f"{'condition'.ljust(width)}  {'n':>2}  {h:>{hw}}  {'sd':>6}  {'95% CI':>17}"
        extra = [m for m in METRICS[kind] if m != h]
        head += "".join(f"  {m:>{max(8, len(m))}}" for m in extra)
        against = data.get("paper_against", PAPER_AGAINST)
        paper_cols = compare_paper and kind == "truthfulqa"
        if paper_cols:
            head += (f"  {'paper acc':>9}  {'paper sd':>8}  {'paper inv':>9}  {'ours (' + against + ')':>{len(against) + 7}}"
                     f"  {'ours sd':>7}  {'decode sd':>9}  {'ours inv':>8}  {'ours-paper':>10}")
        lines.append(head)
        for r in data["rows"]:
            acc = r["metrics"].get(h)
            line = f"{r['condition'].ljust(width)}  {len(r['seeds']):>2}  "
            if acc:
                line += f"{_f(acc['mean'], hw)}  {_f(acc['std'])}  [{acc['ci95'][0]:.4f}, {acc['ci95'][1]:.4f}]"
            else:
                line += f"{'-':>{hw}}  {'-':>6}  {'-':>17}"
            for m in extra:
                d = r["metrics"].get(m)
                line += f"  {_f(d['mean'] if d else None, max(8, len(m)))}"
            if paper_cols:
                p = r.get("paper")
                ours = r["metrics"].get(against)
                inv = r["metrics"].get(INVALID_OF.get(against, ""))
                if p:
                    delta = ours["mean"] - p["accuracy_mean"] if ours else None
                    line += (f"  {_f(p['accuracy_mean'], 9)}  {_f(p['accuracy_sd'], 8)}  {_f(p['invalid_rate_mean'], 9)}"
                             f"  {_f(ours['mean'] if ours else None, len(against) + 7)}  {_f(ours['std'] if ours else None, 7)}"
                             f"  {_f(r.get('decoding_sd'), 9)}  {_f(inv['mean'] if inv else None, 8)}  {_f(delta, 10)}")
                else:
                    line += f"  {'(no match)':>9}"
            lines.append(line)
        if compare_paper and kind == "truthfulqa" and _alias_notes(data["rows"]):
            lines += ["paper aliases (the same condition under an earlier name):"] + _alias_notes(data["rows"])
        if data["differences"]:
            lines.append(f"paired differences of {h} (a - b, same seeds):")
            for d in data["differences"]:
                if not d.get("n"):
                    lines.append(f"  {d['a']} - {d['b']}: no common seeds")
                    continue
                sd = "-" if d["std"] is None else f"{d['std']:.4f}"
                lines.append(
                    f"  {d['a']} - {d['b']}: {d['mean']:+.4f} (sd {sd}, 95% CI [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}], "
                    f"{d['n']} seed(s): {', '.join(map(str, d['seeds']))})"
                )
        lines.append("")
    from evals.freeform_stats import side_by_side  # TruthfulQA next to free-form coherence, when both exist

    lines += side_by_side(agg)
    return "\n".join(lines)


def write_plots(agg: dict, out_dir: Path) -> list[Path] | None:
    """One bar chart per table; None (and nothing written) when matplotlib is not importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for table, data in agg.items():
        h = headline(table.split(" ", 1)[0])
        rows = [r for r in data["rows"] if h in r["metrics"]]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) + 2), 4))
        xs = np.arange(len(rows))
        means = [r["metrics"][h]["mean"] for r in rows]
        lo = [m - r["metrics"][h]["ci95"][0] for m, r in zip(means, rows)]
        hi = [r["metrics"][h]["ci95"][1] - m for m, r in zip(means, rows)]
        ax.bar(xs, means, yerr=[lo, hi], capsize=3, color="tab:blue", label="ours (mean, 95% CI)")
        # The paper's mean only where the bars are the statistic it is compared with.
        marked = data.get("statistics") == ["expected"] or data.get("paper_against") == h
        paper_x = [x for x, r in zip(xs, rows) if "paper" in r] if marked else []
        if paper_x:
            ax.scatter(paper_x, [r["paper"]["accuracy_mean"] for r in rows if "paper" in r], color="tab:red",
                       marker="D", zorder=3, label="paper (published mean)")
        ax.set_xticks(xs, [r["condition"] for r in rows], rotation=45, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel(h)
        ax.set_title(table)
        ax.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in table).strip("_")
        path = out_dir / f"{safe}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evals.report", description="Aggregate eval summaries by condition over seeds.")
    p.add_argument("paths", nargs="+", help="summary JSON files or directories holding them")
    p.add_argument("--group-by", default="condition", help="condition key naming a row (default: condition)")
    p.add_argument("--pair-by", default="seed", help="condition key identifying a replicate (default: seed)")
    p.add_argument("--baseline", default=None, help="paired differences of every condition against this one")
    p.add_argument("--diff", action="append", default=[], metavar="A:B", help="a paired difference A - B to report (repeatable)")
    p.add_argument("--compare-paper", action="store_true", help="put the paper's published TruthfulQA means next to ours")
    p.add_argument("--paper-name", action="append", default=[], metavar="OURS=PAPERS", help="map a condition to a paper condition name")
    p.add_argument("--paper-against", default=PAPER_AGAINST, metavar="METRIC",
                   help=f"our metric set against the paper's TruthfulQA means (default {PAPER_AGAINST}, the exact "
                        "expectation of its sampled statistic; 'accuracy' compares each table's own statistic)")
    p.add_argument("--plots", default=None, metavar="DIR", help="write bar charts here (needs matplotlib)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the aggregate as JSON")
    p.add_argument("--bootstrap-samples", type=int, default=10000)
    p.add_argument("--bootstrap-seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.bootstrap_samples < 1:
        raise EvalInputError("--bootstrap-samples must be positive")
    diffs = []
    for d in args.diff:
        a, sep, b = d.partition(":")
        if not sep or not a or not b:
            raise EvalInputError(f"--diff expects A:B, got {d!r}")
        diffs.append((a, b))
    paper_names = {}
    for item in args.paper_name:
        ours, sep, theirs = item.partition("=")
        if not sep or not ours or not theirs:
            raise EvalInputError(f"--paper-name expects OURS=PAPERS, got {item!r}")
        paper_names[ours] = theirs
    if args.json:
        check_output_file(args.json, "--json", make_folder=True)
    if args.plots:
        check_output_dir(args.plots, "--plots")
    summaries = [load_summary(p) for p in find_summaries(args.paths)]
    tables = group_summaries(summaries, group_by=args.group_by, pair_by=args.pair_by)
    paper = load_paper_means() if args.compare_paper else None
    if paper is not None:
        unknown = sorted(set(paper_names.values()) - set(paper))
        if unknown:
            raise EvalInputError(f"--paper-name: no paper condition(s) {', '.join(unknown)} in {PAPER_CSV.name}")
    agg = aggregate(tables, seed=args.bootstrap_seed, samples=args.bootstrap_samples, baseline=args.baseline,
                    diffs=diffs, paper=paper, paper_names=paper_names, paper_against=args.paper_against)
    print(format_report(agg, compare_paper=args.compare_paper), end="")
    if args.json:
        atomic_write_json(args.json, agg)
    if args.plots:
        written = write_plots(agg, Path(args.plots))
        if written is None:
            print("note: matplotlib is not importable; no plots written", file=sys.stderr)
        else:
            print(f"plots: {', '.join(map(str, written)) or 'none'}", file=sys.stderr)
    return 0


def _run(argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except errors.EngineError as e:
        return errors.report(e)


if __name__ == "__main__":
    sys.exit(_run())
