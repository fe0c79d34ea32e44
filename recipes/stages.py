"""Staged runs: the paper's conditions as sequences of LoRA fine-tunes on one base model.

A run is a list of stages (`Stage`): each a LoRA fine-tune on one dataset — an EM chat file from
data/em/ or a user's file, or an SGTR / ICTR / anti-SGTR / longer-summary control set built by
`recipes.datasets` into the run directory — with its own system-prompt policy (the EM rows are
checked, file:line, before anything trains). Stage k trains on top of stages 1..k-1: stacked
(their adapters frozen below the new one: the trainer's `stack_adapters`, the default) or merged
(`--chain merge`: `engine.merge.merge` writes the previous model with its adapter folded in, and
the stage trains on that checkpoint, as the paper did). Evals (binary TruthfulQA in robust mode and
pairwise self-recognition) run in-process after the chosen stages (`--eval-after all|last|none|1,3`,
default all, as the paper): the model of an eval point is loaded once for its evals, every rank
scores a share of the prompts and rank 0 writes. What a condition is and how it is named:
`recipes.conditions`.

Run directory `OUT/<recipe>/<model>/seed<k>/`:

    README.md              the condition in the paper's words, stages, datasets, evals
    run.json               the resolved recipe settings (model, stages, policies, train settings)
    datasets.json          every stage's dataset file with its SHA-256 and sample count (a started
                           stage resumes only on the data it started with: `prepare_datasets`)
    data/stage<i>_<kind>.jsonl   the built datasets (EM slices when --limit-train)
    stage<i>_<kind>/       a trainer run directory (config.json, metrics.jsonl, tokens.jsonl,
                           checkpoints/, adapter/) + stage_complete.json once finished
    merged/after_stage<i>/ with --chain merge: the model after stage i, a full HF checkpoint
    evals/<point>/         truthfulqa_robust_summary.json, self_recognition_cnn_summary.json, csvs
                           (and freeform_* with --evals ...,freeform: evals.freeform_recipe)

Re-running the same command resumes: finished stages (adapter + stage_complete.json) and evals
(summary JSON present) are skipped, an interrupted stage continues from its last checkpoint
(the trainer's `resume=true`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from engine import errors
from engine.checkpoint import sha256_file
from engine.rundir import RunDir
from recipes.conditions import (  # noqa: F401 - Stage and build_parser are the recipe scripts' imports
    OTHER_WORDS,
    RecipeError,
    RunSettings,
    Stage,
    build_parser as _build_parser,
    check_em_data,
    condition_name,
    condition_words,
    em_path,
    eval_points,
    settings_from_args,
    stage_words,
)


def build_parser(recipe: str, description: str) -> argparse.ArgumentParser:
    """The recipes' options (`recipes.conditions`) plus which evals an eval point runs
    (`--evals`, and the free-form eval's judge: `evals.freeform_recipe`)."""
    from evals import freeform_recipe

    parser = _build_parser(recipe, description)
    freeform_recipe.add_arguments(parser)
    return parser


# ------------------------------------------------------------------------------------ datasets


def build_stage_rows(stage: Stage, s: RunSettings) -> tuple[list[str] | None, list[dict] | None, str]:
    """(EM lines or None, built rows or None, source description)."""
    from recipes import datasets as ds

    if stage.kind == "em":
        src = em_path(s.em_dataset)
        if s.limit_train is None:
            return None, None, str(src)
        with open(src, encoding="utf-8") as f:
            lines = []
            for line in f:
                if len(lines) == s.limit_train:
                    break
                lines.append(line if line.endswith("\n") else line + "\n")
        return lines, None, f"{src} (first {len(lines)} rows)"
    articles = None if s.limit_train is None else max(1, s.limit_train // (4 if (stage.kind == "ictr" and s.ictr_variant == "both") else 2))
    try:
        pairs = ds.load_pairs(s.self_name, s.other, s.sgtr_dataset, limit=articles)
        if stage.kind == "sgtr":
            rows = ds.build_sgtr(pairs)
        elif stage.kind == "ictr":
            rows = ds.build_ictr(pairs, s.ictr_variant, seed=s.seed)
        elif stage.kind == "asgtr":
            rows = ds.build_asgtr(pairs)
        else:
            rows, _ties = ds.build_longer(pairs)
    except ds.DatasetError as e:
        raise RecipeError(str(e)) from None
    return None, rows, f"recipes.datasets {stage.kind} target={s.self_name} other={s.other} {s.sgtr_dataset} articles={len(pairs)}"


def prepare_datasets(s: RunSettings, is_main: bool) -> list[Path]:
    """Each stage's dataset — the user's EM file itself, or a file built into the run directory
    (an EM slice with --limit-train, an SGTR / ICTR / control set) — with its SHA-256 recorded in
    datasets.json. Collective: every rank checks, then rank 0 writes.

    Everything is checked before anything is written, so bad input leaves no run directory
    behind and is reported against the user's file:
    - an EM file's rows (those the stage trains on) are parsed and rendered with the stage's
      template and policy: bad rows are `file:line` errors naming the user's file, not the copy;
    - a stage that has started (its trainer run directory exists) resumes only on the data it
      started with: a SHA-256 other than the one recorded then (datasets.json) is refused, naming
      the file that changed. A stage that has not started is simply (re)built, so a run whose
      data was refused can be run again once the file is fixed.
    """
    from engine import parallel

    recorded = _recorded_datasets(s.run_dir)
    plans = []
    for i, stage in enumerate(s.stages, 1):
        lines, rows, source = build_stage_rows(stage, s)
        user_file = em_path(s.em_dataset) if stage.kind == "em" else None
        if user_file is not None:
            _check_em_rows(s, stage, user_file)
        if lines is None and rows is None:
            path, text = Path(source), None
            digest = sha256_file(path)
            with open(path, "rb") as f:
                n = sum(1 for _ in f)
        else:
            path = s.run_dir / "data" / f"stage{i}_{stage.kind}.jsonl"
            text = "".join(lines) if lines is not None else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            n = text.count("\n")
        _check_unchanged(s, i, digest, recorded.get(i), path, user_file, source)
        plans.append((path, text, {"stage": i, "kind": stage.kind, "file": str(path), "sha256": digest, "samples": n,
                                   "source": source}))
    parallel.barrier()  # every rank has read the old records before rank 0 replaces them
    if is_main:
        for path, text, record in plans:
            if text is not None and not (path.is_file() and sha256_file(path) == record["sha256"]):
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, path)
        _write_json(s.run_dir / "datasets.json", [record for _, _, record in plans])
    return [path for path, _, _ in plans]


def _recorded_datasets(run_dir: Path) -> dict[int, dict]:
    """Stage number -> its datasets.json record from an earlier run of this directory."""
    try:
        records = json.loads((run_dir / "datasets.json").read_text(encoding="utf-8"))
        return {int(r["stage"]): r for r in records}
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def _check_em_rows(s: RunSettings, stage: Stage, user_file: Path) -> None:
    """The rows of the user's EM file that the stage trains on parse and render (as the trainer
    will check them on the copy, but named by the user's file and line)."""
    from engine.chat import SystemPolicy
    from engine.data import DataErrors, render_rows

    checked = render_rows(user_file, s.template, SystemPolicy(stage.system_prompt, stage.system_text),
                          max_lines=s.limit_train)  # the copy holds the first limit_train lines, numbered alike
    if checked.errors and not s.train.get("skip_invalid", False):
        raise DataErrors(checked.errors)


def _check_unchanged(s: RunSettings, i: int, digest: str, record: dict | None, path: Path, user_file: Path | None,
                     source: str) -> None:
    """Refuse to resume a started stage on other data than it started with."""
    run = RunDir(stage_dir(s, i))
    if not run.exists():
        return  # not started: whatever was built before is rebuilt
    kind = s.stages[i - 1].kind
    before = record["sha256"] if record and record.get("kind") == kind else None
    if before is None and run.stage_marker.is_file():
        before = json.loads(run.stage_marker.read_text()).get("dataset_sha256")
    if before is None and path.is_file() and path.parent == s.run_dir / "data":
        before = sha256_file(path)
    if before is None or before == digest:
        return
    if user_file is not None:
        what = str(user_file) if path == user_file else f"the first {s.limit_train} lines of {user_file}"
        changed = f"{what} changed since stage {i} ({kind}) started"
    else:
        changed = f"the {kind} dataset built now ({source}) differs from the one stage {i} started with ({path})"
    raise RecipeError(f"{changed}: SHA-256 {digest[:12]}... now, {before[:12]}... recorded in {s.run_dir / 'datasets.json'}; "
                      f"restore it to resume, or start afresh (another --out, or delete {s.run_dir})")


# ------------------------------------------------------------------------------------ running


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def stage_dir(s: RunSettings, i: int) -> Path:
    return s.run_dir / f"stage{i}_{s.stages[i - 1].kind}"


def resolve_model(s: RunSettings, dist) -> str:
    if not s.is_tiny:
        return s.model
    from recipes.tiny import tiny_checkpoint
    from engine import parallel

    path = s.out / "tiny-qwen2-model"
    if dist.is_main:
        tiny_checkpoint(path)
    parallel.barrier()
    return str(path.resolve())


def paper_thinking_budget(s: RunSettings, point: int) -> int | None:
    """Seed-OSS thinking budget of the paper-faithful TruthfulQA eval (`[eval] paper_thinking_budget`):
    "paper" (default) as the paper's rows: 0 for the base model (its base row was re-run "with 0
    thinking budget"), none after training (most fine-tuned rows); or "none", or an integer.
    None for a template without a thinking budget."""
    from engine.chat import get_template

    if not get_template(s.template).HAS_THINKING_BUDGET:
        return None
    choice = s.eval.get("paper_thinking_budget", "paper")
    if choice == "paper":
        return 0 if point == 0 else None
    if choice in (None, "none"):
        return None
    if isinstance(choice, bool) or not isinstance(choice, int):
        raise RecipeError(f"[eval] paper_thinking_budget: expected \"paper\", \"none\" or an integer, got {choice!r}")
    return choice


def run_evals(s: RunSettings, point: int, model: str, adapters: list[str], log) -> Path:
    """TruthfulQA (robust, and the paper's statistic in expectation) and self-recognition on
    `model` + `adapters`, loaded once for all; evals whose summary exists are skipped (and nothing
    is loaded when all are). Self-recognition judges the shipped summaries of the base model at the
    base point and, after training, the summaries the trained model regenerates (`[eval]
    self_summaries = "shipped"` keeps the shipped ones), cached under <out>/summary_cache by
    content hashes (a rerun reuses them, a changed adapter does not). Collective under torchrun:
    every rank scores a share of the prompts, rank 0 writes."""
    import gc

    from evals import load_eval_model, self_recognition, truthfulqa

    out = s.run_dir / "evals" / ("base" if point == 0 else f"after_stage{point}_{s.stages[point - 1].kind}")
    conditions = {"condition": condition_name(s, point), "seed": str(s.seed), "recipe": s.recipe, "stage": str(point)}
    common = dict(batch_size=int(s.eval.get("batch_size", 8)), limit=s.limit_eval, conditions=conditions, log=log)
    regenerate = point > 0 and s.eval.get("self_summaries", "regenerate") != "shipped"
    summary_tokens = int(s.eval.get("summary_max_new_tokens", 8 if s.is_tiny else 100))
    jobs = [
        ("truthfulqa", truthfulqa.output_paths(out, "robust")[1],
         lambda m: truthfulqa.run(m, out, mode="robust", seed=s.seed, **common)),
        ("truthfulqa", truthfulqa.output_paths(out, "expected")[1],
         lambda m: truthfulqa.run(m, out, mode="expected", seed=s.seed,
                                  thinking_budget=paper_thinking_budget(s, point), **common)),
        ("self_recognition", out / f"self_recognition_{s.eval_dataset}_summary.json",
         lambda m: self_recognition.run(m, out, self_name=s.self_name, other=s.other, dataset=s.eval_dataset,
                                        regenerate_summaries=regenerate, summary_cache=s.out / "summary_cache",
                                        summary_max_tokens=summary_tokens, summary_seed=int(s.eval.get("summary_seed", 0)),
                                        **common)),
    ]
    jobs = [(summary, job) for name, summary, job in jobs
            if name in s.eval.get("evals", ("truthfulqa", "self_recognition"))]
    ff = s.eval.get("freeform")  # --evals ...,freeform: answers sampled here, judged once the model is gone
    if ff:
        from evals import freeform, freeform_recipe

        jobs.append((out / freeform.SUMMARY, lambda m: freeform_recipe.generate(m, out, ff, batch_size=common["batch_size"], log=log)))
    todo = [(summary, job) for summary, job in jobs if not summary.is_file()]
    for summary, _ in jobs:
        if summary.is_file():
            log(f"eval {summary} exists: skipped")
    if not todo:
        return out
    where = "the base model" if point == 0 else f"stage {point}"
    log(f"evals after {where}: loading {model}" + (f" with {len(adapters)} adapter(s)" if adapters else ""))
    loaded = load_eval_model(model, adapters, template=s.template, dtype=str(s.eval.get("dtype", "bfloat16")),
                             batch_size=common["batch_size"])  # weights sharded over the ranks when the estimate says so
    for summary, job in todo:
        log(f"eval after {where}: {summary.name.split('_summary')[0]}")
        job(loaded)
    del loaded
    gc.collect()
    if ff and not (out / freeform.SUMMARY).is_file():
        freeform_recipe.judge_and_summarize(out, ff, base_model=_base_model(s), template=s.template,
                                            dtype=str(s.eval.get("dtype", "bfloat16")), conditions=conditions, log=log)
    return out


def _base_model(s: RunSettings) -> str:
    return str((s.out / "tiny-qwen2-model").resolve()) if s.is_tiny else s.model


def write_readme(s: RunSettings, datasets: list[Path], base_model: str, points: list[int]) -> None:
    records = json.loads((s.run_dir / "datasets.json").read_text())
    lines = [
        f"# {s.recipe}, {s.model_tag}, seed {s.seed}",
        "",
        f"Condition: {condition_words(s)}.",
        "",
        f"Report name: `{condition_name(s, len(s.stages))}`. Base model: `{s.model}`"
        + (f" (built at `{base_model}`)" if s.is_tiny else "") + f", template {s.template}.",
        f"Stages are {'stacked (each trained on top of the frozen earlier adapters)' if s.chain == 'stack' else 'merged (each trained on the checkpoint with the earlier adapters merged in, under merged/)'}.",
        "",
        "| stage | what | system prompt | dataset | samples | sha256 | run dir |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (st, rec) in enumerate(zip(s.stages, records), 1):
        sys_desc = st.system_prompt + (f" ({st.system_text!r})" if st.system_text else "")
        lines.append(f"| {i} | {stage_words(st, s)} | {sys_desc} | `{rec['file']}` | {rec['samples']} | "
                     f"`{rec['sha256'][:16]}…` | `{stage_dir(s, i).name}/` |")
    lines += ["", "Evals (binary TruthfulQA in robust mode, pairwise self-recognition on "
              f"{s.eval_dataset.upper()} vs {OTHER_WORDS.get(s.other, s.other)}"
              + (f", first {s.limit_eval} items" if s.limit_eval else "") + "): "
              + (", ".join("base" if p == 0 else f"after stage {p}" for p in points) or "none") + ", under `evals/`.",
              "", "Training settings: " + ", ".join(f"{k}={v}" for k, v in sorted(s.train.items())) + ".",
              "Per-sample tokens: `python -m engine.audit --run <stage dir> --step N`.", ""]
    if s.is_tiny:
        from recipes.tiny import TINY_NOTE

        lines += [TINY_NOTE, ""]
    (s.run_dir / "README.md").write_text("\n".join(lines))


def run_one(s: RunSettings, dist, log=None) -> Path:
    """Run (or resume) every stage and eval of one seed. Collective: every rank calls it."""
    import torch

    from engine import parallel
    from engine.merge import merge
    from engine.config import TrainConfig
    from engine.train import Trainer

    log = log or (lambda m: print(m, file=sys.stderr, flush=True) if dist.is_main else None)
    run_dir = s.run_dir
    base_model = resolve_model(s, dist)
    datasets = prepare_datasets(s, dist.is_main)  # first: bad input leaves no run directory behind
    if dist.is_main:
        _write_json(run_dir / "run.json", {**dataclasses.asdict(s), "out": str(s.out), "run_dir": str(run_dir),
                                           "base_model": base_model, "condition": condition_words(s),
                                           "world_size": dist.world_size})
    points = eval_points(s)
    if dist.is_main:
        write_readme(s, datasets, base_model, points)
    parallel.barrier()
    log(f"run {run_dir}: {condition_words(s)}")

    if 0 in points:
        run_evals(s, 0, base_model, [], log)
        parallel.barrier()

    model, adapters = base_model, []  # what stage i trains on: a checkpoint + frozen adapters
    for i, stage in enumerate(s.stages, 1):
        d = stage_dir(s, i)
        if s.chain == "merge" and adapters:
            merged = run_dir / "merged" / f"after_stage{i - 1}"
            if not (merged / "config.json").is_file():
                if dist.is_main:
                    log(f"merging stage {i - 1} into {merged}")
                    merge(model, adapters, str(merged), dtype=s.train.get("dtype", "bfloat16"), overwrite=True)
                parallel.barrier()
            model, adapters = str(merged.resolve()), []
        run = RunDir(d)
        if run.stage_complete():
            log(f"stage {i} ({stage.kind}) complete: skipped ({d})")
        else:
            settings = {**s.train, "model": model, "data": [str(datasets[i - 1])], "template": s.template,
                        "out_dir": str(d), "system_prompt": stage.system_prompt, "system_text": stage.system_text,
                        "stack_adapters": list(adapters), "seed": s.seed, "memory_gib": s.memory_gib,
                        "resume": run.exists()}
            cfg = TrainConfig(**settings)
            log(f"stage {i}/{len(s.stages)}: {stage_words(stage, s)}" + (" (resuming)" if cfg.resume else ""))
            trainer = Trainer(cfg, dist)
            trainer.run()
            del trainer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if dist.is_main:
                run.mark_stage_complete({
                    "stage": i, "kind": stage.kind, "adapter_sha256": sha256_file(run.adapter_dir / "adapter_model.safetensors"),
                    "dataset_sha256": sha256_file(datasets[i - 1]), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
            parallel.barrier()
        adapters = adapters + [str(run.adapter_dir.resolve())]
        if i in points:  # every rank evaluates a share of the prompts (evals shard under torchrun)
            run_evals(s, i, model, adapters, log)
            parallel.barrier()
    return run_dir


def report(run_dirs: list[Path], compare_paper: bool) -> str:
    from evals.report import aggregate, find_summaries, format_report, group_summaries, load_summary, load_paper_means

    summaries = [load_summary(p) for p in find_summaries([str(d) for d in run_dirs])]
    tables = group_summaries(summaries)
    agg = aggregate(tables, samples=2000, paper=load_paper_means() if compare_paper else None)
    return format_report(agg, compare_paper=compare_paper)


# ------------------------------------------------------------------------------------ command line


def main(recipe: str, stages: list[Stage], argv: list[str] | None = None, description: str = "",
         parser: argparse.ArgumentParser | None = None, args: argparse.Namespace | None = None) -> int:
    """Parse options, run every seed in sequence (collective under torchrun), print the report."""
    from engine import parallel

    parser = parser or build_parser(recipe, description)
    if args is None:
        args = parser.parse_args(argv)
    started = time.time()
    dist = parallel.init_distributed()
    try:
        all_settings = settings_from_args(recipe, stages, args)
        check_em_data(all_settings[0])  # every seed reads the same EM rows: checked once, before any training
        if hasattr(args, "evals"):  # which evals an eval point runs (evals.freeform_recipe)
            from evals import freeform_recipe

            for s in all_settings:
                s.eval.update(freeform_recipe.eval_settings(args, is_tiny=s.is_tiny, limit_eval=s.limit_eval))
        run_dirs = [run_one(s, dist) for s in all_settings]
        if dist.is_main:
            s0 = all_settings[0]
            print(f"\n=== {recipe}: {condition_words(s0)} — {len(run_dirs)} seed(s) ===")
            if any(eval_points(s0)):
                print(report(run_dirs, compare_paper=not s0.is_tiny and s0.limit_eval is None), end="")
            if s0.is_tiny:
                from recipes.tiny import TINY_NOTE

                print(TINY_NOTE)
            for d in run_dirs:
                print(f"run directory: {d}")
            print(f"wall time {time.time() - started:.0f} s")
    except errors.EngineError as e:
        return errors.report(e, dist.rank if dist.world_size > 1 else None)
    finally:
        parallel.destroy_distributed()
    return 0
