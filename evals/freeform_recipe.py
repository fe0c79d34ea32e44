"""The free-form eval at the eval points of a recipe (`recipes.stages`).

    python recipes/sgtr_reverse.py --evals truthfulqa,self_recognition,freeform \
        --judge-url https://api.openai.com/v1 --judge-model gpt-4o-2024-08-06     # or --judge-local DIR

`--evals` chooses what every eval point runs (default `truthfulqa,self_recognition`: the free-form
eval is off unless asked for). With `freeform`, the model of the eval point samples the answers
(`evals.freeform.generate_answers`, with the other evals, on the model loaded once); that model
then leaves memory and the judge scores them: a local checkpoint (`--judge-local DIR`, or `base`:
the run's base model, the default of the tiny demo, where it only shows that the path runs) or an
OpenAI-compatible endpoint. `--freeform-preset` (paper or betley), `--freeform-samples` and
`--freeform-max-new-tokens` change the sampling; `--limit-eval N` keeps the first N questions.
The tiny demo samples 2 answers of 8 tokens per question.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from evals import EvalInputError
from evals import freeform

EVALS = ("truthfulqa", "self_recognition", "freeform")
DEFAULT_EVALS = "truthfulqa,self_recognition"
TINY = {"samples": 2, "max_new_tokens": 8}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("evals at each eval point")
    g.add_argument("--evals", default=DEFAULT_EVALS,
                   help=f"comma-separated, of {', '.join(EVALS)} (default {DEFAULT_EVALS}; freeform needs a judge)")
    g.add_argument("--freeform-preset", default="paper", choices=tuple(freeform.PRESETS))
    g.add_argument("--freeform-samples", type=int, default=None, help="answers per question (default: the preset's)")
    g.add_argument("--freeform-max-new-tokens", type=int, default=None)
    g.add_argument("--judge-local", default=None, metavar="DIR|base", help="free-form judge checkpoint ('base': the run's base model)")
    g.add_argument("--judge-template", default=None, choices=("qwen2.5", "seed-oss"), help="its template (default: the run's)")
    g.add_argument("--judge-url", default=None, help="OpenAI-compatible API root of the free-form judge")
    g.add_argument("--judge-model", default=None, help="model name at --judge-url")
    g.add_argument("--judge-key-env", default="OPENAI_API_KEY")
    g.add_argument("--judge-concurrency", type=int, default=8)
    g.add_argument("--judge-rpm", type=float, default=None)


def eval_settings(args: argparse.Namespace, *, is_tiny: bool, limit_eval: int | None) -> dict:
    """{"evals": [...], "freeform": {...} or None}, stored in the run's settings (`RunSettings.eval`)."""
    evals = [e.strip() for e in str(args.evals).split(",") if e.strip()]
    unknown = [e for e in evals if e not in EVALS]
    if unknown or not evals:
        raise EvalInputError(f"--evals: unknown eval(s) {', '.join(unknown) or repr(args.evals)}; choose from {', '.join(EVALS)}")
    if "freeform" not in evals:
        return {"evals": evals, "freeform": None}
    tiny = TINY if is_tiny else {}
    settings = freeform.make_settings(
        args.freeform_preset, samples=args.freeform_samples or tiny.get("samples"),
        max_new_tokens=args.freeform_max_new_tokens or tiny.get("max_new_tokens"),
        questions=f"first{limit_eval}" if limit_eval else None)
    if args.judge_local and args.judge_url:
        raise EvalInputError("--judge-local and --judge-url exclude each other")
    if args.judge_url:
        if not args.judge_model:
            raise EvalInputError("--judge-url needs --judge-model")
        judge = {"kind": "endpoint", "url": args.judge_url, "model": args.judge_model, "key_env": args.judge_key_env,
                 "concurrency": args.judge_concurrency, "rpm": args.judge_rpm}
    elif args.judge_local or is_tiny:
        judge = {"kind": "local", "model": args.judge_local or "base", "template": args.judge_template}
    else:
        raise EvalInputError("--evals ...,freeform needs a judge: --judge-local DIR (or base) or --judge-url URL --judge-model NAME")
    return {"evals": evals, "freeform": {"settings": asdict(settings), "judge": judge}}


def generate(model, out: Path, ff: dict, *, batch_size: int, log) -> bool:
    """Sample the answers of an eval point with its loaded model."""
    return freeform.generate_answers(model, out, freeform.Settings(**ff["settings"]), batch_size=batch_size, log=log)


def judge_and_summarize(out: Path, ff: dict, *, base_model: str, template: str, dtype: str, conditions: dict,
                        log) -> dict | None:
    """Judge the answers of an eval point (its model already out of memory) and write the summary
    (rank 0); collective under torchrun."""
    from evals import is_main_process

    j = ff["judge"]
    if j["kind"] == "endpoint":
        judge = freeform.endpoint_judge(j["url"], j["model"], key_env=j["key_env"], concurrency=j["concurrency"],
                                        requests_per_minute=j["rpm"])
    else:
        path = base_model if j["model"] == "base" else j["model"]
        judge = freeform.local_judge(path, template=j["template"] or template, dtype=dtype)
    if not freeform.judge_answers(judge, out, log=log):
        return None
    del judge
    return freeform.write_summary(out, conditions=conditions, log=log) if is_main_process() else None
