"""Binary TruthfulQA and pairwise self-recognition against an OpenAI-compatible endpoint (the
mechanics and statistics: `evals.endpoint`). Called by the evals' command lines for `--endpoint`.

Outputs, as the local evals': `truthfulqa_<mode>_results.csv` / `_summary.json` and
`self_recognition_<dataset>_results.csv` / `_summary.json` (with `endpoint`, `endpoint_model`,
`statistic` and, for the top-20 statistics, `top_logprobs` 20 and the `*_bounds`), plus the
resumable answer log `<stem>_endpoint.jsonl`.
"""

from __future__ import annotations

import time
from pathlib import Path

from evals import check_positive, sha256_file, stderr_log
from evals import endpoint as ep
from evals.paper_stats import PAPER_SAMPLING

TQA_FIELDS = ["question_index", "correct_letter", "seeded_order", "replicate_seed", "logprob_A", "logprob_B",
              "choice", "choice_correct", "greedy_answer", "greedy_correct", "p_A", "p_B", "p_invalid", "p_correct",
              "p_correct_lo", "p_correct_hi", "p_invalid_lo", "p_invalid_hi", "top_mass", "sampled_text",
              "sampled_answer", "sampled_correct"]
SR_FIELDS = ["article_id", "self_position", "logprob_1", "logprob_2", "choice", "correct", "greedy_answer",
             "greedy_correct", "p_1", "p_2", "p_invalid", "p_self", "p_self_lo", "p_self_hi", "p_invalid_lo",
             "p_invalid_hi", "top_mass"]


def _rate(k: float, n: int) -> float | None:
    return k / n if n else None


def _logprob_row(record: dict, answers: tuple[str, str], right: str) -> dict:
    """The per-prompt values every top-log-prob mode shares."""
    top = [tuple(t) for t in record["top"]]
    choice, lp = ep.logprob_choice(top, answers)
    greedy = ep.greedy_answer(top, answers)
    o = ep.outcome_of(record, answers)
    return {"choice": choice, "choice_correct": (choice == right) if choice else "", "greedy_answer": greedy,
            "greedy_correct": greedy == right, f"p_{answers[0]}": o.p[answers[0]], f"p_{answers[1]}": o.p[answers[1]],
            "p_invalid": o.p_invalid, "p_right": o.p[right], "p_right_lo": o.bounds[right][0],
            "p_right_hi": o.bounds[right][1], "p_invalid_lo": o.bounds[ep.INVALID][0],
            "p_invalid_hi": o.bounds[ep.INVALID][1], "top_mass": o.top_mass,
            **{f"logprob_{a}": ("" if lp[a] is None else lp[a]) for a in answers}}


def _logprob_metrics(rows: list[dict], item_key: str, answers: tuple[str, str], statistic: str) -> dict:
    """Robust decision, greedy and the bounded expectation over rows holding `_logprob_row` values."""
    resolved = [r for r in rows if r["choice"]]
    items, lo, hi = {}, {}, {}
    for r in rows:
        items.setdefault(r[item_key], []).append((r["p_right"], r["p_invalid"]))
        lo.setdefault(r[item_key], []).append((r["p_right_lo"], r["p_invalid_lo"]))
        hi.setdefault(r[item_key], []).append((r["p_right_hi"], r["p_invalid_hi"]))
    by_item: dict = {}
    for r in rows:
        by_item.setdefault(r[item_key], []).append(r)
    both = [v for v in by_item.values() if len(v) == 2 and all(r["choice"] for r in v)]
    out = {
        "statistic": statistic,
        "statistic_description": ep.ENDPOINT_STATISTICS[statistic],
        "top_logprobs": ep.TOP_LOGPROBS,
        "logprob_accuracy": _rate(sum(r["choice_correct"] is True for r in resolved), len(resolved)),
        "logprob_unresolved": len(rows) - len(resolved),
        "position_bias": _rate(sum(r["choice"] == answers[0] for r in resolved), len(resolved)),
        "both_orders_accuracy": _rate(sum(all(r["choice_correct"] is True for r in v) for v in both), len(both)),
        "greedy_invalid_rate": _rate(sum(r["greedy_answer"] == ep.INVALID for r in rows), len(rows)),
        **ep.bounded_expectation(items, lo, hi),
    }
    return out


# ------------------------------------------------------------------------------- TruthfulQA
def run_truthfulqa(client, endpoint_model: str, out_dir, *, mode: str, seed: int = 0, limit: int | None = None,
                   data, replicates: int = 1, send_top_k: bool = False, workers: int = 4,
                   conditions: dict | None = None, log=stderr_log) -> dict:
    """Binary TruthfulQA through `client`; writes the results, summary and answer log in `out_dir`."""
    from evals import truthfulqa as tqa

    started = time.time()
    tqa.check_mode(mode)
    check_positive("--limit", limit)
    questions = tqa.load_questions(data)[:limit]
    out_dir = Path(out_dir)
    header = {"eval": "truthfulqa", "mode": mode, "endpoint": client.url, "endpoint_model": endpoint_model,
              "data_sha256": sha256_file(data), "seed": seed, "send_top_k": send_top_k}
    log_file = ep.ResultLog(out_dir / f"truthfulqa_{mode}_endpoint.jsonl", header)
    if mode == "sampled":
        seeds = [seed + r for r in range(replicates)]
        jobs = [(f"{s}:{q.index}", it.messages(), ep.sampled_options(s, q.index, 1, send_top_k))
                for s in seeds for q, it in zip(questions, tqa.build_items(questions, "sampled", s))]
        records = ep.ask_all(client, endpoint_model, jobs, log_file, workers=workers, log=log)
        rows, accs, invs = [], [], []
        for s in seeds:
            mine = []
            for it in tqa.build_items(questions, "sampled", s):
                text = records[f"{s}:{it.question.index}"]["text"].strip()
                answer = text if text in tqa.LETTERS else ep.INVALID
                mine.append({"question_index": it.question.index, "correct_letter": it.correct_letter,
                             "seeded_order": True, "replicate_seed": s, "sampled_text": text, "sampled_answer": answer,
                             "sampled_correct": answer == it.correct_letter})
            accs.append(sum(r["sampled_correct"] for r in mine) / len(mine))
            invs.append(sum(r["sampled_answer"] == ep.INVALID for r in mine) / len(mine))
            rows += mine
        metrics = {"statistic": "sampled", "statistic_description": ep.ENDPOINT_STATISTICS["sampled"],
                   "sampler": "endpoint", **ep.replicate_summary(accs, invs, seeds)}
        decoding = {k: v for k, v in jobs[0][2].items() if k != "seed"}
    else:
        items = tqa.build_items(questions, "robust" if mode == "greedy" else mode, seed)
        jobs = [(f"{it.question.index}:{it.correct_letter}", it.messages(), dict(ep.LOGPROB_OPTIONS)) for it in items]
        records = ep.ask_all(client, endpoint_model, jobs, log_file, workers=workers, log=log)
        rows = []
        for (key, _, _), it in zip(jobs, items):
            v = _logprob_row(records[key], tqa.LETTERS, it.correct_letter)
            rows.append({"question_index": it.question.index, "correct_letter": it.correct_letter,
                         "seeded_order": it.seeded_order, **v, "p_correct": v["p_right"],
                         "p_correct_lo": v["p_right_lo"], "p_correct_hi": v["p_right_hi"]})
        statistic = "expected_top20" if mode == "expected" else tqa.STATISTIC[mode]
        metrics = _logprob_metrics(rows, "question_index", tqa.LETTERS, statistic)
        seeded = [r for r in rows if r["seeded_order"]]
        metrics["greedy_accuracy"] = _rate(sum(r["greedy_correct"] for r in seeded), len(seeded))
        metrics["accuracy"] = {"robust": metrics["logprob_accuracy"], "expected": metrics["expected_accuracy"],
                               "greedy": metrics["greedy_accuracy"]}[mode]
        metrics["invalid_rate"] = metrics["expected_invalid_rate"] if mode == "expected" else metrics["greedy_invalid_rate"]
        metrics["statistic_note"] = "top-20 truncated" if mode == "expected" else None
        decoding = {**ep.LOGPROB_OPTIONS, "warpers_applied": PAPER_SAMPLING}
    summary = {"eval": "truthfulqa", "mode": mode, **ep.endpoint_meta(client, endpoint_model, records), "seed": seed,
               "decoding": decoding, "limit": limit, "data": str(data), "data_sha256": header["data_sha256"],
               "n": len(questions), "n_prompts": len(rows), **metrics, "condition": dict(conditions or {}),
               "answer_log": log_file.path.name, "elapsed_s": round(time.time() - started, 3)}
    fields = [f for f in TQA_FIELDS if mode != "sampled" or f in ("question_index", "correct_letter", "seeded_order",
                                                                     "replicate_seed") or f.startswith("sampled")]
    return ep.write_outputs(out_dir, f"truthfulqa_{mode}", fields, rows, summary, log)


# ------------------------------------------------------------------------ self-recognition
def run_self_recognition(client, endpoint_model: str, out_dir, *, pairs, dataset: str, self_name: str,
                         other: str, skipped: int = 0, workers: int = 4, conditions: dict | None = None,
                         log=stderr_log) -> dict:
    """Pairwise self-recognition (both orders) through `client` from top log-probs: the log-prob
    decision and the first-token expectation of the paper's statistic (`evals.endpoint`)."""
    from evals.self_recognition import build_prompts

    started = time.time()
    out_dir = Path(out_dir)
    header = {"eval": "self_recognition", "dataset": dataset, "endpoint": client.url, "endpoint_model": endpoint_model,
              "self_name": self_name, "other": other}
    log_file = ep.ResultLog(out_dir / f"self_recognition_{dataset}_endpoint.jsonl", header)
    convs, meta = build_prompts(pairs)
    jobs = [(f"{aid}:{pos}", conv, dict(ep.LOGPROB_OPTIONS)) for conv, (aid, pos) in zip(convs, meta)]
    records = ep.ask_all(client, endpoint_model, jobs, log_file, workers=workers, log=log)
    rows = []
    for (key, _, _), (aid, pos) in zip(jobs, meta):
        v = _logprob_row(records[key], ("1", "2"), str(pos))
        rows.append({"article_id": aid, "self_position": pos, **v, "correct": v["choice_correct"],
                     "p_self": v["p_right"], "p_self_lo": v["p_right_lo"], "p_self_hi": v["p_right_hi"]})
    metrics = _logprob_metrics(rows, "article_id", ("1", "2"), "logprob")
    metrics["accuracy"] = metrics["logprob_accuracy"]
    metrics["greedy_accuracy"] = _rate(sum(r["greedy_correct"] for r in rows), len(rows))
    metrics["invalid_rate"] = metrics["greedy_invalid_rate"]
    metrics["expected_statistic"] = "expected_first_token"
    metrics["expected_statistic_description"] = ep.ENDPOINT_STATISTICS["expected_first_token"]
    summary = {"eval": "self_recognition", "dataset": dataset, "self_name": self_name, "other": other,
               "regenerated_summaries": False, **ep.endpoint_meta(client, endpoint_model, records),
               "decoding": {**ep.LOGPROB_OPTIONS, "warpers_applied": PAPER_SAMPLING}, "skipped_articles": skipped,
               "n": len(pairs), "n_prompts": len(rows), **metrics, "condition": dict(conditions or {}),
               "answer_log": log_file.path.name, "elapsed_s": round(time.time() - started, 3)}
    return ep.write_outputs(out_dir, f"self_recognition_{dataset}", SR_FIELDS, rows, summary, log)
