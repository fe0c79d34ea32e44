"""Pairwise self-recognition: shown an article and two summaries, does the model pick its own?

    python -m evals.self_recognition --model DIR [--adapter DIR ...] --template {qwen2.5,seed-oss} \
        --self-name {hf_qwen_32b,hf_seed_36b} [--other claude-21] [--dataset cnn|xsum] --out DIR \
        [--limit N] [--regenerate-summaries [--summary-cache DIR] [--summary-max-tokens 100]] \
        [--system-prompt ...] [--thinking-budget N] [--batch-size N] [--condition key=value ...]

The paper's prompts verbatim (`evals.prompts`): the system prompt with its 'news-articler' typo
and the user template with Article / Summary1 / Summary2, ending `Please answer with only "1" or
"2" and no other text.` The paper evaluates on CNN/DailyMail against Claude 2.1 (`claude-21`).
Articles come from `data/sgtr/articles/<dataset>_train_articles.json`, summaries from
`data/sgtr/summaries/<dataset>/<dataset>_train_<name>_responses.json`, indexed by article id (the
Qwen CNN file also holds 1,000 XSum ids, which are simply never looked up).

Every article is scored in both orders (own summary first, then second). Each prompt is decided by
log P("1") vs log P("2") at the answer position. Reported:

- `accuracy`: self-choice accuracy, the fraction of prompts on which the model picks its own summary;
- `both_orders_accuracy`: fraction of articles where it picks its own summary in both orders;
- `consistency`: fraction of articles where it picks the same summary in both orders;
- `position_bias`: fraction of prompts on which it picks position 1, whoever wrote it (0.5 = none);
- `invalid_rate`: fraction of prompts whose free arg-max token is not "1"/"2" (read as the paper's
  script read generated text: decoded without special tokens, stripped);
- `greedy_accuracy`: accuracy of that free greedy answer, Invalid counting as wrong.

`--regenerate-summaries`: the fine-tuned model judges its *own current* summaries. They are
generated greedily with the paper's summary prompts (the dataset's system prompt + `Article:
...Provide only the summary with NO other text.`; at most `--summary-max-tokens`, default 100 as
the paper's generation) and cached in `<summary-cache>/<dataset>_summaries_<hash>.json`, the hash
covering model, adapters (their file contents), dataset, prompts, template, policy, thinking
budget and token limit; a later run with the same key reuses them (and generates only missing
articles).

Outputs in --out: `self_recognition_<dataset>_results.csv` (one row per prompt) and
`self_recognition_<dataset>_summary.json`, written atomically. Bad input (empty article set,
unknown summary source, missing files, an adapter that does not fit) → one line, exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.chat import get_template
from evals import (
    EvalInputError,
    EvalModel,
    add_model_arguments,
    atomic_write_csv,
    atomic_write_json,
    check_positive,
    is_main_process,
    load_from_args,
    parse_conditions,
    run_cli,
    scored_answer,
    sha256_file,
    stderr_log,
    token_piece,
    utc_now,
)
from evals.prompts import (
    SGTR_SYSTEM_PROMPT,
    SGTR_USER_TEMPLATE,
    SUMMARY_RESPONSE_TYPE,
    SUMMARY_SYSTEM_PROMPTS,
    SUMMARY_USER_TEMPLATE,
    sgtr_messages,
    summary_messages,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "sgtr"
DATASETS = ("cnn", "xsum")
CHOICES = ("1", "2")
REGENERATED = "self-regenerated"  # the self label when --self-name is not given with --regenerate-summaries

RESULT_FIELDS = [
    "article_id", "self_position", "logprob_1", "logprob_2", "choice", "correct",
    "free_token_id", "free_token", "free_answer", "free_correct",
]


@dataclass(frozen=True)
class Pair:
    article_id: str
    article: str
    own: str  # the judged model's summary
    other: str


# ------------------------------------------------------------------------------------- data
def _read_json_dict(path: Path, what: str) -> dict[str, str]:
    if not path.is_file():
        raise EvalInputError(f"{what} file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalInputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise EvalInputError(f"{path}: expected a JSON object of id -> text, got {type(data).__name__}")
    bad = [k for k, v in data.items() if not isinstance(v, str)]
    if bad:
        raise EvalInputError(f"{path}: {len(bad)} entr(ies) are not strings, e.g. {bad[0]!r}")
    return data


def articles_path(data_dir: Path, dataset: str) -> Path:
    return Path(data_dir) / "articles" / f"{dataset}_train_articles.json"


def summaries_path(data_dir: Path, dataset: str, name: str) -> Path:
    return Path(data_dir) / "summaries" / dataset / f"{dataset}_train_{name}_responses.json"


def available_sources(data_dir: Path, dataset: str) -> list[str]:
    """Summary sources present for `dataset` (the <name> of every *_responses.json file)."""
    folder = Path(data_dir) / "summaries" / dataset
    prefix, suffix = f"{dataset}_train_", "_responses.json"
    return sorted(p.name[len(prefix):-len(suffix)] for p in folder.glob(f"{prefix}*{suffix}"))


def load_articles(data_dir: Path, dataset: str) -> dict[str, str]:
    if dataset not in DATASETS:
        raise EvalInputError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return _read_json_dict(articles_path(data_dir, dataset), f"{dataset} articles")


def load_summaries(data_dir: Path, dataset: str, name: str) -> dict[str, str]:
    path = summaries_path(data_dir, dataset, name)
    if not path.is_file():
        known = available_sources(data_dir, dataset)
        raise EvalInputError(
            f"unknown summary source {name!r} for {dataset}: no {path}; available: {', '.join(known) or 'none'}"
        )
    return _read_json_dict(path, f"{name} summaries")


def build_pairs(articles: dict[str, str], own: dict[str, str], other: dict[str, str],
                limit: int | None = None) -> tuple[list[Pair], int]:
    """Pairs in the articles file's order, for articles both sources summarised (non-blank).
    Returns (pairs, number of articles skipped for lack of a summary). Raises EvalInputError when
    nothing is left to evaluate."""
    pairs: list[Pair] = []
    skipped = 0
    for aid, text in articles.items():
        a, b = own.get(aid), other.get(aid)
        if not text.strip() or not a or not a.strip() or not b or not b.strip():
            skipped += 1
            continue
        pairs.append(Pair(aid, text, a, b))
    if limit is not None:
        pairs = pairs[:limit]
    if not pairs:
        raise EvalInputError(
            f"no articles to evaluate: {len(articles)} article(s), {skipped} without both summaries"
            + (f", limit {limit}" if limit is not None else "")
        )
    return pairs, skipped


# --------------------------------------------------------------------------------- scoring
def build_prompts(pairs: list[Pair]) -> tuple[list[list[dict]], list[tuple[str, int]]]:
    """Both orders per article: (conversations, [(article_id, position of the own summary)])."""
    convs, meta = [], []
    for p in pairs:
        convs.append(sgtr_messages(p.article, p.own, p.other))
        meta.append((p.article_id, 1))
        convs.append(sgtr_messages(p.article, p.other, p.own))
        meta.append((p.article_id, 2))
    return convs, meta


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


def account(records: list[dict]) -> dict:
    """Self-recognition metrics from per-prompt records, independent of any model.

    Each record: `article_id`, `self_position` (1 or 2: where the own summary was shown),
    `choice` ("1"/"2", the log-prob decision), `free_answer` ("1", "2" or "Invalid").
    """
    n = len(records)
    correct = sum(r["choice"] == str(r["self_position"]) for r in records)
    pick1 = sum(r["choice"] == "1" for r in records)
    invalid = sum(r["free_answer"] not in CHOICES for r in records)
    free_correct = sum(r["free_answer"] == str(r["self_position"]) for r in records)
    free1 = sum(r["free_answer"] == "1" for r in records)
    by_article: dict[str, dict[int, bool]] = {}  # article -> {self_position: picked own}
    for r in records:
        by_article.setdefault(r["article_id"], {})[int(r["self_position"])] = r["choice"] == str(r["self_position"])
    complete = {a: v for a, v in by_article.items() if set(v) == {1, 2}}
    both = sum(v[1] and v[2] for v in complete.values())
    # Same summary in both orders: own both times, or other both times.
    consistent = sum(v[1] == v[2] for v in complete.values())
    counts = {
        "articles": len(by_article),
        "articles_both_orders": len(complete),
        "prompts": n,
        "picked_own": correct,
        "picked_position_1": pick1,
        "picked_position_2": n - pick1,
        "own_in_both_orders": both,
        "consistent_articles": consistent,
        "free_invalid": invalid,
        "free_correct": free_correct,
        "free_1": free1,
        "free_2": n - free1 - invalid,
    }
    return {
        "n": len(by_article),
        "n_prompts": n,
        "accuracy": _rate(correct, n),
        "both_orders_accuracy": _rate(both, len(complete)),
        "consistency": _rate(consistent, len(complete)),
        "position_bias": _rate(pick1, n),
        "invalid_rate": _rate(invalid, n),
        "greedy_accuracy": _rate(free_correct, n),
        "counts": counts,
    }


def score_pairs(gen, tokenizer, pairs: list[Pair], batch_size: int = 8) -> list[dict]:
    convs, meta = build_prompts(pairs)
    scores = gen.score_choices(convs, choices=list(CHOICES), batch_size=batch_size)
    if len(scores) != len(convs):
        raise RuntimeError(f"score_choices returned {len(scores)} scores for {len(convs)} prompts")
    rows = []
    for (aid, pos), s in zip(meta, scores):
        lp1, lp2 = float(s.logprobs["1"]), float(s.logprobs["2"])
        choice = "1" if lp1 >= lp2 else "2"  # an exact tie goes to position 1, as arg-max would
        free = scored_answer(tokenizer, s.argmax_id, CHOICES)
        rows.append({
            "article_id": aid,
            "self_position": pos,
            "logprob_1": lp1,
            "logprob_2": lp2,
            "choice": choice,
            "correct": choice == str(pos),
            "free_token_id": int(s.argmax_id),
            "free_token": token_piece(tokenizer, s.argmax_id),
            "free_answer": free,
            "free_correct": free == str(pos),
        })
    return rows


# ---------------------------------------------------------------------- own summaries, again
def _fingerprint_model(model: str) -> dict:
    path = Path(model).expanduser()
    if not path.is_dir():
        return {"hub_id": model}
    out: dict = {"path": str(path.resolve())}
    if (path / "config.json").is_file():
        out["config_sha256"] = sha256_file(path / "config.json")
    # Weights by name and size: hashing tens of GB of weights per run would cost minutes.
    out["weights"] = sorted((p.name, p.stat().st_size) for p in path.glob("*.safetensors"))
    return out


def _fingerprint_adapter(adapter: str) -> dict:
    path = Path(adapter)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith("adapter_")) if path.is_dir() else []
    return {"path": str(path.resolve()), "files": {p.name: sha256_file(p) for p in files}}


def summary_cache_key(*, model: str, adapters: list[str], dataset: str, template: str, policy: str,
                      thinking_budget: int | None, max_new_tokens: int, answer_prefix: str = "",
                      response_type: str = SUMMARY_RESPONSE_TYPE) -> tuple[str, dict]:
    """(sha256 hex digest, the key it hashes) for regenerated summaries."""
    key = {
        "model": _fingerprint_model(model),
        "adapters": [_fingerprint_adapter(a) for a in adapters],
        "dataset": dataset,
        "system_prompt": SUMMARY_SYSTEM_PROMPTS[dataset],
        "user_template": SUMMARY_USER_TEMPLATE,
        "response_type": response_type,
        "template": template,
        "policy": policy,
        "thinking_budget": thinking_budget,
        "answer_prefix": answer_prefix,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
    }
    text = json.dumps(key, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest(), json.loads(text)  # as stored (tuples -> lists)


def completion_text(tokenizer, token_ids: list[int], template: str) -> str:
    """A generated answer's text: its answer part by the template (for Seed-OSS, what follows the
    last `</seed:think>`: the no-thinking note is not the answer); special tokens dropped; stripped."""
    ids = get_template(template).strip_thinking(tokenizer, [int(t) for t in token_ids])
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def regenerate_summaries_for(gen, model: EvalModel, articles: dict[str, str], *, dataset: str, cache_file: Path,
                             key: dict, max_new_tokens: int = 100, batch_size: int = 8,
                             log=lambda msg: None) -> dict[str, str]:
    """Summaries of `articles` by the loaded model, read from / added to `cache_file`."""
    cached: dict[str, str] = {}
    if cache_file.is_file():
        try:
            stored = json.loads(cache_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EvalInputError(f"summary cache {cache_file} is unreadable ({e}); delete it to regenerate") from None
        if stored.get("key") != key:
            raise EvalInputError(f"summary cache {cache_file} was made for different settings (hash collision?); delete it")
        cached = dict(stored.get("summaries", {}))
    todo = [aid for aid in articles if aid not in cached]
    log(f"summaries: {len(articles) - len(todo)} cached, {len(todo)} to generate -> {cache_file}")
    if todo:
        convs = [summary_messages(articles[aid], dataset) for aid in todo]
        completions = gen.generate(convs, max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
        for aid, c in zip(todo, completions):
            cached[aid] = completion_text(model.tokenizer, c.token_ids, model.template)
        atomic_write_json(cache_file, {"key": key, "summaries": cached})
    return {aid: cached[aid] for aid in articles}


# -------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evals.self_recognition",
        description="Pairwise self-recognition (own summary vs another source's), both orders, log-prob decisions.",
    )
    add_model_arguments(p)
    p.add_argument("--self-name", default=None,
                   help="summary source of the judged model (hf_qwen_32b, hf_seed_36b); optional with --regenerate-summaries")
    p.add_argument("--other", default="claude-21", help="the other summary source (default: claude-21, as the paper)")
    p.add_argument("--dataset", default="cnn", choices=DATASETS, help="articles (default: cnn, as the paper)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--limit", type=int, default=None, help="only the first N articles")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="folder with articles/ and summaries/ (default: data/sgtr)")
    p.add_argument("--regenerate-summaries", action="store_true",
                   help="judge summaries the loaded model (with its adapters) writes now, instead of the shipped ones")
    p.add_argument("--summary-cache", default=None, help="cache folder for regenerated summaries (default: OUT/summary_cache)")
    p.add_argument("--summary-max-tokens", type=int, default=100, help="token limit of a regenerated summary (default 100)")
    return p


def select_articles(data_dir: Path, dataset: str, other: str, self_name: str | None, regenerate: bool,
                    limit: int | None) -> tuple[dict[str, str], dict[str, str], dict[str, str] | None]:
    """(articles to judge, the other source's summaries, the shipped own summaries or None when
    they are regenerated). Every input problem is raised here, before a model is loaded."""
    check_positive("--limit", limit)
    if self_name is None and not regenerate:
        raise EvalInputError("--self-name is required (the judged model's summary source, e.g. hf_qwen_32b) unless "
                             "--regenerate-summaries")
    articles = load_articles(data_dir, dataset)
    other_summaries = load_summaries(data_dir, dataset, other)
    if not regenerate:
        own = load_summaries(data_dir, dataset, self_name)
        build_pairs(articles, own, other_summaries, limit)  # nothing to evaluate fails now
        return articles, other_summaries, own
    # Which articles: those the other source summarised, first `limit` of them.
    subset = {a: text for a, text in articles.items() if other_summaries.get(a, "").strip() and text.strip()}
    subset = dict(list(subset.items())[:limit]) if limit is not None else subset
    if not subset:
        raise EvalInputError(f"no articles to evaluate: none of {len(articles)} {dataset} article(s) has a {other} summary")
    if self_name is not None:
        load_summaries(data_dir, dataset, self_name)  # a typo'd name still fails clearly
    return subset, other_summaries, None


def run(model: EvalModel, out_dir: str | Path, *, self_name: str | None, other: str = "claude-21",
        dataset: str = "cnn", limit: int | None = None, data_dir: str | Path = DEFAULT_DATA_DIR,
        regenerate_summaries: bool = False, summary_cache: str | Path | None = None, summary_max_tokens: int = 100,
        thinking_budget: int | None = None, answer_prefix: str | None = None, batch_size: int = 8,
        conditions: dict | None = None, log=stderr_log) -> dict:
    """Judge `model` on pairwise self-recognition and write `self_recognition_<dataset>_results.csv`
    and `..._summary.json` into `out_dir` (rank 0); returns the summary. Seed-OSS is judged with
    thinking budget 0 unless `thinking_budget` says otherwise."""
    started = time.time()
    check_positive("--summary-max-tokens", summary_max_tokens)
    data_dir = Path(data_dir)
    articles, other_summaries, own = select_articles(data_dir, dataset, other, self_name, regenerate_summaries, limit)
    if thinking_budget is None and model.template == "seed-oss":
        thinking_budget = 0
    gen, meta = model.generator(thinking_budget, answer_prefix)
    cache_file = None
    if regenerate_summaries:
        digest, key = summary_cache_key(model=meta["model"], adapters=meta["adapters"], dataset=dataset,
                                        template=model.template, policy=meta["policy"], thinking_budget=thinking_budget,
                                        max_new_tokens=summary_max_tokens, answer_prefix=meta["answer_prefix"])
        cache_dir = Path(summary_cache) if summary_cache else Path(out_dir) / "summary_cache"
        cache_file = cache_dir / f"{dataset}_summaries_{digest[:16]}.json"
        own = regenerate_summaries_for(gen, model, articles, dataset=dataset, cache_file=cache_file, key=key,
                                       max_new_tokens=summary_max_tokens, batch_size=batch_size, log=log)
        pairs, skipped = build_pairs(articles, own, other_summaries)
    else:
        pairs, skipped = build_pairs(articles, own, other_summaries, limit)
    judged = self_name or REGENERATED
    log(f"self-recognition ({dataset}): {len(pairs)} article(s) x 2 orders, own={judged}, other={other}, "
        f"model {meta['model']}, adapters {meta['adapters'] or 'none'}, template {meta['template']}")
    rows = score_pairs(gen, model.tokenizer, pairs, batch_size=batch_size)
    metrics = account(rows)
    out = Path(out_dir)
    csv_path = out / f"self_recognition_{dataset}_results.csv"
    json_path = out / f"self_recognition_{dataset}_summary.json"
    atomic_write_csv(csv_path, RESULT_FIELDS, rows)
    summary = {
        "eval": "self_recognition",
        "dataset": dataset,
        "self_name": judged,
        "other": other,
        "regenerated_summaries": bool(regenerate_summaries),
        "summary_cache": str(cache_file) if cache_file else None,
        **meta,
        "limit": limit,
        "skipped_articles": skipped,
        "system_prompt": SGTR_SYSTEM_PROMPT,
        "user_template_sha256": hashlib.sha256(SGTR_USER_TEMPLATE.encode()).hexdigest(),
        **metrics,
        "condition": dict(conditions or {}),
        "results_csv": csv_path.name,
        "created": utc_now(),
        "elapsed_s": round(time.time() - started, 3),
    }
    atomic_write_json(json_path, summary)
    log(f"wrote {csv_path} and {json_path}")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    conditions = parse_conditions(args.condition)
    check_positive("--summary-max-tokens", args.summary_max_tokens)
    select_articles(Path(args.data_dir), args.dataset, args.other, args.self_name, args.regenerate_summaries,
                    args.limit)  # bad input fails before the model is loaded
    model = load_from_args(args)
    summary = run(model, args.out, self_name=args.self_name, other=args.other, dataset=args.dataset, limit=args.limit,
                  data_dir=args.data_dir, regenerate_summaries=args.regenerate_summaries,
                  summary_cache=args.summary_cache, summary_max_tokens=args.summary_max_tokens,
                  thinking_budget=args.thinking_budget, answer_prefix=args.answer_prefix,
                  batch_size=args.batch_size, conditions=conditions)
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    if is_main_process():
        print(f"accuracy {fmt(summary['accuracy'])}  both_orders {fmt(summary['both_orders_accuracy'])}  "
              f"position_bias(1) {fmt(summary['position_bias'])}  invalid_rate {fmt(summary['invalid_rate'])}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
