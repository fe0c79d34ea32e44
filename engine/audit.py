"""Show the exact tokens a chat dataset trains on: `python -m engine.audit`.

    python -m engine.audit --tokenizer MODEL_DIR --template qwen2.5 --system-prompt default \
        --data data/em/risky_financial_advice.jsonl --limit 2

Formats:
  text   every sample's tokens (position, id, trained mark, printable piece), then a summary per file;
  jsonl  one line per kept sample, exactly {"input_ids": [...], "labels": [...]} (-100 = masked);
         this format is a contract other tools read; the summary goes to stderr;
  html   a readable page with trained tokens highlighted.
`--diff POLICY` compares the token streams of two system-prompt policies sample by sample.
`--run RUN_DIR [--step N ...]` shows the tokens a training run trained on, step by step, and checks
each sample against the SHA-256 in the run's token manifest (exit status 1 on a mismatch).
Exit status: 0 on success, 2 on bad input (nothing is written then).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import html
import io
import json
import os
import sys
import tempfile
from pathlib import Path

from engine.chat import IGNORE_INDEX as IGNORE, POLICIES, TEMPLATES, SystemPolicy, check_tokenizer
from engine.chat.encode import BOUNDARY_POLICIES
from engine.data import DEFAULT_MAX_LEN, Dataset, Sample, load_samples
from engine.errors import ConfigError, EngineError, RunDirError, report
from engine.hub import resolve_checkpoint_dir
from engine.outputs import check_output_file
from engine.rundir import RunDir
from engine.tokenizer import Tokenizer


# ---------------------------------------------------------------- text


def _system_label(system: str | None) -> str:
    return "no system block" if system is None else f"system {system!r}"


def write_text_sample(out, tokenizer: Tokenizer, s: Sample, header: str | None = None) -> None:
    flags = " truncated" if s.truncated else ""
    out.write(header or f"=== {s.source}  {len(s.input_ids)} tokens, {s.num_trained} trained, {_system_label(s.system)}{flags}\n")
    for pos, (tid, label) in enumerate(zip(s.input_ids, s.labels)):
        mark = "T" if label != IGNORE else "."
        out.write(f"{pos:6d} {tid:7d} {mark} {tokenizer.piece(tid)}\n")


def summary_lines(ds: Dataset) -> list[str]:
    st = ds.stats
    lengths = [len(s.input_ids) for s in ds.samples]
    mean = sum(lengths) / len(lengths) if lengths else 0.0
    share = 100.0 * st.trained_tokens / st.tokens if st.tokens else 0.0
    lines = [
        f"--- {ds.path}  template {ds.template}, system prompt {ds.policy.describe()}",
        f"rows {st.rows}  kept {st.kept}  invalid {st.invalid}  dropped over-length {st.dropped_overlong}  "
        f"truncated {st.truncated}  dropped untrained after truncation {st.dropped_untrained_after_truncation}",
        f"tokens {st.tokens} (mean {mean:.1f}, max {max(lengths, default=0)})  "
        f"trained {st.trained_tokens} ({share:.1f}%)  boundary tokens masked {st.boundary_tokens}"
        + (f", trained {st.boundary_trained}" if st.boundary_trained else ""),
    ]
    for system, n in st.system_texts.most_common():
        lines.append(f"  {n} sample(s): {_system_label(system)}")
    for e in ds.skipped:
        lines.append(f"  skipped {e}")
    return lines


# ---------------------------------------------------------------- jsonl


def write_jsonl_sample(out, s: Sample) -> None:
    out.write(s.jsonl_line() + "\n")


# ---------------------------------------------------------------- html

_CSS = """
body { font-family: sans-serif; margin: 2em; }
.sample { margin-bottom: 2em; }
.tokens { font-family: monospace; white-space: pre-wrap; line-height: 1.9; border: 1px solid #ccc; padding: .5em; }
.tok { border-right: 1px dotted #bbb; }
.trained { background: #ffe08a; }
.special { color: #0645ad; font-weight: bold; }
pre.summary { background: #f4f4f4; padding: .5em; }
"""


def write_html(out, tokenizer: Tokenizer, datasets: list[Dataset]) -> None:
    out.write(f"<!doctype html><html><head><meta charset='utf-8'><title>token audit</title><style>{_CSS}</style></head><body>\n")
    out.write("<h1>Token audit</h1><p>Highlighted tokens carry labels (are trained); hover a token for its id.</p>\n")
    for ds in datasets:
        out.write(f"<h2>{html.escape(ds.path)}</h2><pre class='summary'>{html.escape(chr(10).join(summary_lines(ds)))}</pre>\n")
        for s in ds.samples:
            out.write(f"<div class='sample'><b>{html.escape(s.source)}</b> {len(s.input_ids)} tokens, {s.num_trained} trained<div class='tokens'>")
            for tid, label in zip(s.input_ids, s.labels):
                classes = ["tok"] + (["trained"] if label != IGNORE else []) + (["special"] if tokenizer.is_special(tid) else [])
                out.write(f"<span class='{' '.join(classes)}' title='{tid}'>{html.escape(tokenizer.piece(tid))}</span>")
            out.write("</div></div>\n")
    out.write("</body></html>\n")


# ---------------------------------------------------------------- diff


def write_diff(out, tokenizer: Tokenizer, a: Dataset, b: Dataset) -> None:
    """Per sample, the token ranges where policy a and policy b differ."""
    by_source = {s.source: s for s in b.samples}
    differing = added = removed = trained_changed = 0
    for sa in a.samples:
        sb = by_source.get(sa.source)
        if sb is None:
            out.write(f"=== {sa.source}: kept under {a.policy.describe()} only (dropped under {b.policy.describe()})\n")
            continue
        if sa.input_ids == sb.input_ids and sa.labels == sb.labels:
            continue
        differing += 1
        trained_a = [t for t in sa.labels if t != IGNORE]
        trained_b = [t for t in sb.labels if t != IGNORE]
        trained_changed += trained_a != trained_b
        out.write(f"=== {sa.source}  {len(sa.input_ids)} → {len(sb.input_ids)} tokens"
                  f"{'' if trained_a == trained_b else '  TRAINED TOKENS DIFFER'}\n")
        matcher = difflib.SequenceMatcher(None, sa.input_ids, sb.input_ids, autojunk=False)
        for op, i1, i2, j1, j2 in matcher.get_opcodes():
            if op == "equal":
                continue
            out.write(f"  @@ {a.policy.describe()} [{i1}:{i2}]  {b.policy.describe()} [{j1}:{j2}]\n")
            for i in range(i1, i2):
                out.write(f"  - {sa.input_ids[i]:7d} {'T' if sa.labels[i] != IGNORE else '.'} {tokenizer.piece(sa.input_ids[i])}\n")
            for j in range(j1, j2):
                out.write(f"  + {sb.input_ids[j]:7d} {'T' if sb.labels[j] != IGNORE else '.'} {tokenizer.piece(sb.input_ids[j])}\n")
            removed += i2 - i1
            added += j2 - j1
    only_b = sorted(set(by_source) - {s.source for s in a.samples})
    for source in only_b:
        out.write(f"=== {source}: kept under {b.policy.describe()} only (dropped under {a.policy.describe()})\n")
    out.write(
        f"--- diff {a.path}: {a.policy.describe()} vs {b.policy.describe()}: {differing} of {len(a.samples)} samples differ, "
        f"{removed} tokens removed, {added} added, trained tokens differ in {trained_changed} sample(s)\n"
    )


# ---------------------------------------------------------------- a training run's token manifest


def audit_run(args: argparse.Namespace, out, err) -> int:
    """Show the tokens a training run recorded, and check them against its manifest.

    Each sample's tokens come from the run's recorded streams (`record_tokens`), or else from
    re-rendering its source row with the run's own template, policy and tokenizer; either way
    the SHA-256 of the sample's jsonl line must equal the manifest's. Returns 1 on any mismatch.
    """
    run = RunDir(args.run)
    cfg = run.read_config()
    manifest = run.read_manifest()
    steps = [m for m in manifest if not args.step or m["step"] in args.step]
    if args.step and len(steps) != len(set(args.step)):
        raise RunDirError(f"{run.path}: no step(s) {sorted(set(args.step) - {m['step'] for m in steps})} in the manifest")
    tokenizer = Tokenizer.from_file(args.tokenizer or cfg.tokenizer or resolve_checkpoint_dir(cfg.model))
    check_tokenizer(tokenizer, cfg.template)

    # The run's data as it renders today, for samples whose stream was not recorded.
    rendered: dict[str, Sample] = {}
    for path in cfg.data:
        if Path(path).is_file():
            ds = load_samples(path, tokenizer, cfg.template, cfg.policy(), max_len=cfg.max_len,
                              overlong="truncate" if cfg.truncate else "drop", skip_invalid=cfg.skip_invalid,
                              boundary_tokens=cfg.boundary_tokens)
            rendered.update((sample.source, sample) for sample in ds.samples)

    counts = {"match": 0, "MISMATCH": 0, "not found": 0}
    for step in steps:
        stream = run.stream_path(step["step"])
        lines = stream.read_text().splitlines() if stream.is_file() else None
        for i, entry in enumerate(step["samples"]):
            source = entry["source"]
            line = lines[i] if lines is not None else (rendered[source].jsonl_line() if source in rendered else None)
            if line is None:
                status = "not found"
            else:
                status = "match" if hashlib.sha256(line.encode()).hexdigest() == entry["sha256"] else "MISMATCH"
            counts[status] += 1
            if line is None:
                out.write(f"=== step {step['step']} sample {i + 1}: {source}: not recorded and not in the run's data\n")
                continue
            row = json.loads(line)
            system = rendered[source].system if source in rendered else None
            sample = Sample(row["input_ids"], row["labels"], source, system)
            if args.format == "jsonl":
                out.write(line + "\n")
            else:
                origin = "recorded" if lines is not None else "re-rendered"
                write_text_sample(out, tokenizer, sample, header=(
                    f"=== step {step['step']} (epoch {step['epoch']}) sample {i + 1}/{len(step['samples'])}: {source}  "
                    f"{len(sample.input_ids)} tokens, {sample.num_trained} trained, {origin}, sha256 {status}\n"))
    summary = (f"--- run {run.path}: {len(steps)} step(s), {sum(counts.values())} sample(s): {counts['match']} match "
               f"the manifest's SHA-256, {counts['MISMATCH']} do not, {counts['not found']} not found\n")
    (err if args.format == "jsonl" else out).write(summary)
    return 0 if counts["match"] == sum(counts.values()) else 1


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.audit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="tokenizer.json, or a checkpoint directory holding one (with --run: "
                   "defaults to the run's)")
    p.add_argument("--template", choices=sorted(TEMPLATES), help="chat template to render with")
    p.add_argument("--system-prompt", default="default", choices=POLICIES,
                   help="system-prompt policy: default (what the official template does), empty, omit, replace")
    p.add_argument("--system-text", help="the system text for --system-prompt replace")
    p.add_argument("--data", nargs="+", help="JSONL chat file(s) of {\"messages\": [...]} rows")
    p.add_argument("--run", help="instead of --data: a training run directory; show the tokens its manifest records "
                   "and check their SHA-256")
    p.add_argument("--step", type=int, nargs="+", help="with --run: only these optimizer steps")
    p.add_argument("--format", default="text", choices=("text", "jsonl", "html"), help="output format (default text)")
    p.add_argument("--limit", type=int, help="read only the first N rows of each file")
    p.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN, help=f"longest sample in tokens (default {DEFAULT_MAX_LEN})")
    p.add_argument("--truncate", action="store_true", help="truncate over-length samples instead of dropping them")
    p.add_argument("--skip-invalid", action="store_true", help="drop and count invalid rows instead of failing")
    p.add_argument("--boundary-tokens", choices=BOUNDARY_POLICIES,
                   help="a token straddling the start of an assistant reply (one starting with a newline, merged "
                   "with the header's): train it, as Axolotl does (default), or mask it")
    p.add_argument("--diff", metavar="POLICY", choices=POLICIES,
                   help="compare against this second system-prompt policy (text output)")
    p.add_argument("--diff-system-text", help="the system text for --diff replace")
    p.add_argument("--output", "-o", help="write here instead of stdout (written only when complete)")
    return p


def run(args: argparse.Namespace, out, err) -> int:
    if args.run:
        if args.data or args.diff or args.format == "html" or args.boundary_tokens:
            raise ConfigError("--run reads the run's own data and settings; it takes --tokenizer, --step, "
                             "--format text|jsonl and --output")
        return audit_run(args, out, err)
    missing = [flag for flag, value in (("--tokenizer", args.tokenizer), ("--template", args.template),
                                        ("--data", args.data)) if not value]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (or give --run RUN_DIR)")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be positive, got {args.limit}")
    if args.diff and args.format != "text":
        raise ConfigError("--diff writes text; drop --format or use --format text")
    policy = SystemPolicy(args.system_prompt, args.system_text)
    tokenizer = Tokenizer.from_file(args.tokenizer)
    check_tokenizer(tokenizer, args.template)  # refuse another family's tokenizer (template names are family names)

    def load(path: str, pol: SystemPolicy) -> Dataset:
        return load_samples(path, tokenizer, args.template, pol, max_len=args.max_len,
                            overlong="truncate" if args.truncate else "drop",
                            skip_invalid=args.skip_invalid, limit=args.limit,
                            boundary_tokens=args.boundary_tokens or "train")

    if args.diff:
        other = SystemPolicy(args.diff, args.diff_system_text)
        for path in args.data:
            write_diff(out, tokenizer, load(path, policy), load(path, other))
        return 0
    datasets = [load(path, policy) for path in args.data]  # all inputs validated before any output
    if args.format == "html":
        write_html(out, tokenizer, datasets)
        return 0
    for ds in datasets:
        for s in ds.samples:
            if args.format == "jsonl":
                write_jsonl_sample(out, s)
            else:
                write_text_sample(out, tokenizer, s)
        summary_out = err if args.format == "jsonl" else out
        summary_out.write("\n".join(summary_lines(ds)) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Render into memory first, so a failure leaves no half-written output behind.
    buffer = io.StringIO()
    try:
        if args.output:
            check_output_file(args.output, "--output")
        code = run(args, buffer, sys.stderr)
    except EngineError as e:
        return report(e)
    if args.output:
        target = Path(args.output)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, target)
    else:
        sys.stdout.write(buffer.getvalue())
    return code


if __name__ == "__main__":
    sys.exit(main())
