"""The paper's training workloads as sample lengths, for benchmarks: `python -m recipes.workloads --tokenizer T`.

Writes `data/workload_lengths.json`: for each workload, `[tokens, trained tokens]` per sample, as
the trainer would see them (Qwen2.5 template, default system-prompt policy, the shipped data):

    em_risky_financial   data/em/risky_financial_advice.jsonl (6000 chats)
    sgtr_xsum            SGTR on XSum: Qwen2.5-32B's summaries vs Claude 2.1's, both orders (2000)

`python -m engine.bench --workloads em_risky_financial,sgtr_xsum` times optimizer steps of 16 such samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from engine.chat import SystemPolicy, special_ids
from engine.data import load_samples
from engine.errors import EngineError, report
from engine.tokenizer import Tokenizer
from recipes.datasets import build_sgtr, load_pairs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "data" / "workload_lengths.json"


def lengths(path: Path, tokenizer: Tokenizer) -> list[list[int]]:
    ds = load_samples(path, tokenizer, "qwen2.5", SystemPolicy("default"))
    return [[len(s.input_ids), s.num_targets] for s in ds.samples]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.workloads", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="a Qwen2.5 tokenizer.json or model directory")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    try:
        tokenizer = Tokenizer.from_file(args.tokenizer)
        special_ids(tokenizer, "qwen2.5")
        with tempfile.TemporaryDirectory() as tmp:
            sgtr = write_jsonl(build_sgtr(load_pairs("hf_qwen_32b", "claude-21", "xsum")), Path(tmp) / "sgtr.jsonl")
            result = {
                "em_risky_financial": lengths(ROOT / "data" / "em" / "risky_financial_advice.jsonl", tokenizer),
                "sgtr_xsum": lengths(sgtr, tokenizer),
            }
    except EngineError as e:
        return report(e)
    Path(args.out).write_text(json.dumps(result, separators=(",", ":")) + "\n")
    for name, rows in result.items():
        mean = sum(n for n, _ in rows) / len(rows)
        print(f"{name}: {len(rows)} samples, mean {mean:.0f} tokens, "
              f"{sum(t for _, t in rows) / len(rows):.1f} trained", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
