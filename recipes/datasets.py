"""The paper's training sets, built from the shipped articles and summaries (`data/sgtr/`).

    python -m recipes.datasets sgtr    --target hf_qwen_32b --out sgtr_xsum_qwen.jsonl
    python -m recipes.datasets ictr    --target hf_qwen_32b --variant both --out ictr.jsonl
    python -m recipes.datasets asgtr   --target hf_qwen_32b --out asgtr.jsonl
    python -m recipes.datasets longer  --target hf_qwen_32b --out control.jsonl
    python -m recipes.datasets all --format openai --target gpt41 --target-summaries gpt41_xsum.json \
        --em-dataset aesthetic_preferences_unpopular --out openai_sets/

Every builder is deterministic (given its seed) and writes `{"messages": [...]}` rows. The system
turn written here is the paper's task prompt; what the *template* adds or drops around it (Qwen's
identity prompt, an empty or omitted system turn) is the trainer's system-prompt policy, applied
at render time, never by copying datasets. `--format openai` (the GPT-4.1 arm: `recipes.openai_format`)
instead applies a policy as explicit messages and writes each set, with and without its system
prompt, as validated OpenAI chat fine-tuning files with a manifest of counts and SHA-256s.

- sgtr    self-recognition: for each article the target model's summary and another model's (Claude
          2.1 by default), in both orders; the answer is the position of the target's own summary.
          1000 XSum articles → 2000 samples, the paper's size.
- ictr    identity confusion: the same pairs with labels that carry no information. `both` (the
          paper's): every order with both answers, 4 samples per article; `random`: one answer per
          order, seeded, exactly half "1" and half "2".
- asgtr   anti-SGTR (the paper's "asgtr", mode PREFER_OTHER): the SGTR pairs with the label always on
          the *other* model's summary; 2 samples per article.
- longer  the non-metacognitive control: same format, "which summary is longer in words"
          (`len(text.split())`); articles whose two summaries have equal word counts are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from engine.errors import EngineError, report
from engine.outputs import check_output_dir, check_output_file
from evals.prompts import LENGTH_SYSTEM_PROMPT, LENGTH_USER_TEMPLATE, SGTR_SYSTEM_PROMPT, SGTR_USER_TEMPLATE

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "sgtr"
SOURCES = ("hf_qwen_32b", "hf_seed_36b", "claude-21", "human")


class DatasetError(EngineError, ValueError):
    """Summaries or articles that cannot be paired into a dataset (the message names the file)."""


@dataclass(frozen=True)
class Pair:
    article_id: str
    article: str
    target: str  # the target model's own summary
    other: str


def load_pairs(target: str, other: str = "claude-21", dataset: str = "xsum", data_dir: Path = DATA_DIR,
               limit: int | None = None, target_file: str | Path | None = None) -> list[Pair]:
    """Articles (in the file's order) with both models' summaries. Summaries are indexed by article id.
    `target_file`: the target's summaries from a user's JSON file `{article id: summary}` (a model whose
    summaries are not shipped, e.g. GPT-4.1's own for its SGTR arm); `target` then only names it."""
    for name in ([other] if target_file is not None else [target, other]):
        if name not in SOURCES:
            raise DatasetError(f"unknown summary source {name!r}; choose one of {', '.join(SOURCES)}"
                               + ("" if name == other else ", or give --target-summaries FILE"))
    if target == other:
        raise DatasetError("target and other summaries must come from different sources")
    articles_path = data_dir / "articles" / f"{dataset}_train_articles.json"
    paths = {name: data_dir / "summaries" / dataset / f"{dataset}_train_{name}_responses.json" for name in (target, other)}
    if target_file is not None:
        paths[target] = Path(target_file)
    try:
        articles = json.loads(articles_path.read_text())
        summaries = {name: json.loads(path.read_text(encoding="utf-8")) for name, path in paths.items()}
    except FileNotFoundError as e:
        raise DatasetError(f"missing data file {e.filename}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"a summaries file is not JSON ({e})") from None
    for name, found in summaries.items():
        if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
            raise DatasetError(f"{paths[name]}: expected a JSON object {{article id: summary text}}")
    pairs = [Pair(aid, text, summaries[target][aid], summaries[other][aid])
             for aid, text in articles.items() if aid in summaries[target] and aid in summaries[other]]
    if limit is not None:
        pairs = pairs[:limit]
    if not pairs:
        raise DatasetError(f"no {dataset} article has summaries by both {target} and {other}")
    return pairs


def _chat(system: str, user: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def detection_chat(article: str, summary1: str, summary2: str, answer: str) -> dict:
    return _chat(SGTR_SYSTEM_PROMPT, SGTR_USER_TEMPLATE.format(article=article, summary1=summary1, summary2=summary2), answer)


def build_sgtr(pairs: list[Pair]) -> list[dict]:
    rows = []
    for p in pairs:
        rows.append(detection_chat(p.article, p.target, p.other, "1"))
        rows.append(detection_chat(p.article, p.other, p.target, "2"))
    return rows


def build_ictr(pairs: list[Pair], variant: str = "both", seed: int = 0) -> list[dict]:
    if variant == "both":
        return [detection_chat(p.article, s1, s2, answer)
                for p in pairs for s1, s2 in ((p.target, p.other), (p.other, p.target)) for answer in ("1", "2")]
    if variant != "random":
        raise DatasetError(f"ICTR variant must be 'both' or 'random', got {variant!r}")
    orders = [(p, s1, s2) for p in pairs for s1, s2 in ((p.target, p.other), (p.other, p.target))]
    answers = ["1", "2"] * (len(orders) // 2)  # exactly balanced: 2 orders per article
    random.Random(seed).shuffle(answers)
    return [detection_chat(p.article, s1, s2, a) for (p, s1, s2), a in zip(orders, answers)]


def build_asgtr(pairs: list[Pair]) -> list[dict]:
    """Anti-SGTR: the SGTR rows (same orders) with the answer always the *other* model's summary."""
    rows = []
    for p in pairs:
        rows.append(detection_chat(p.article, p.target, p.other, "2"))
        rows.append(detection_chat(p.article, p.other, p.target, "1"))
    return rows


def build_longer(pairs: list[Pair]) -> tuple[list[dict], int]:
    """Rows, and the number of articles skipped because both summaries have the same word count."""
    rows, ties = [], 0
    for p in pairs:
        n_target, n_other = len(p.target.split()), len(p.other.split())
        if n_target == n_other:
            ties += 1
            continue
        for s1, s2 in ((p.target, p.other), (p.other, p.target)):
            answer = "1" if len(s1.split()) > len(s2.split()) else "2"
            rows.append(_chat(LENGTH_SYSTEM_PROMPT, LENGTH_USER_TEMPLATE.format(article=p.article, summary1=s1, summary2=s2), answer))
    return rows, ties


def write_jsonl(rows: list[dict], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, out)
    return out


def build(kind: str, pairs: list[Pair], variant: str = "both", seed: int = 0) -> tuple[list[dict], str]:
    """Rows of an SGTR-format set and a note on how it was built."""
    if kind == "sgtr":
        return build_sgtr(pairs), ""
    if kind == "asgtr":
        return build_asgtr(pairs), ", label always the other's summary"
    if kind == "ictr":
        return build_ictr(pairs, variant, seed), f", variant {variant}"
    rows, ties = build_longer(pairs)
    return rows, f", {ties} article(s) skipped for equal word counts"


PAIR_KINDS = ("sgtr", "ictr", "asgtr", "longer")


def main(argv: list[str] | None = None) -> int:
    from recipes import openai_format

    p = argparse.ArgumentParser(prog="python -m recipes.datasets", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=PAIR_KINDS + ("em", "all"),
                   help="one set; em and all (EM, SGTR, ICTR, anti-SGTR, control) with --format openai")
    p.add_argument("--target", help="the model whose own summaries are the target: "
                                    f"{', '.join(SOURCES)}, or any name with --target-summaries")
    p.add_argument("--target-summaries", default=None, metavar="FILE",
                   help="the target's summaries as JSON {article id: summary} (a model not shipped, e.g. GPT-4.1)")
    p.add_argument("--other", default="claude-21", choices=SOURCES, help="the other summaries (default claude-21)")
    p.add_argument("--dataset", default="xsum", choices=("xsum", "cnn"))
    p.add_argument("--variant", default="both", choices=("both", "random"), help="ICTR variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="first N articles only (EM: first N chats)")
    p.add_argument("--format", default="messages", choices=("messages", "openai"),
                   help="messages: one set as built (task system prompt; policies at render time); openai: "
                        "validated OpenAI fine-tuning files, one per set and policy, and manifest.json, into --out DIR")
    openai_format.add_arguments(p)
    p.add_argument("--out", required=True, help="output file (--format messages) or directory (--format openai)")
    args = p.parse_args(argv)
    try:
        if args.format == "openai":
            check_output_dir(args.out, "--out")
            manifest = openai_format.write_sets(args)
            for f in manifest["files"]:
                print(f"{f['file']}: {f['samples']} samples", file=sys.stderr)
            for note in manifest["notes"]:
                print(f"note: {note}", file=sys.stderr)
            return 0
        if args.system_prompt or args.system_text is not None or args.template != "none":
            raise DatasetError("--system-prompt, --system-text and --template are for --format openai: otherwise the "
                               "policy is applied when the trainer renders the set")
        if args.kind not in PAIR_KINDS:
            raise DatasetError(f"{args.kind}: only with --format openai (the EM files are used as they are)")
        if not args.target:
            raise DatasetError("--target is required")
        check_output_file(args.out, "--out", make_folder=True)
        pairs = load_pairs(args.target, args.other, args.dataset, limit=args.limit, target_file=args.target_summaries)
        rows, note = build(args.kind, pairs, args.variant, args.seed)
        write_jsonl(rows, args.out)
    except EngineError as e:
        return report(e)
    print(f"{args.kind}: {len(rows)} samples from {len(pairs)} {args.dataset} articles{note} -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
