"""Staged runs: the paper's conditions as sequences of LoRA fine-tunes on one base model.

A run is a list of stages (`Stage`): each a LoRA fine-tune on one dataset — an EM chat file from
data/em/, or an SGTR / ICTR / longer-summary control set built by `recipes.datasets` into the run
directory — with its own system-prompt policy. Stage k trains on top of stages 1..k-1: stacked
(their adapters frozen below the new one: the trainer's `stack_adapters`, the default) or merged
(`--chain merge`: `engine.merge.merge` writes the previous model with its adapter folded in, and
the stage trains on that checkpoint, as the paper did). Evals (binary TruthfulQA in robust mode and
pairwise self-recognition) run after the chosen stages (`--eval-after all|last|none|1,3`, default
all, as the paper), on rank 0 only while the other ranks wait.

Run directory `OUT/<recipe>/<model>/seed<k>/`:

    README.md              the condition in the paper's words, stages, datasets, evals
    run.json               the resolved recipe settings (model, stages, policies, train settings)
    datasets.json          every stage's dataset file with its SHA-256 and sample count
    data/stage<i>_<kind>.jsonl   the built datasets (EM slices when --limit-train)
    stage<i>_<kind>/       a trainer run directory (config.json, metrics.jsonl, tokens.jsonl,
                           checkpoints/, adapter/) + stage_complete.json once finished
    merged/after_stage<i>/ with --chain merge: the model after stage i, a full HF checkpoint
    evals/<point>/         truthfulqa_robust_summary.json, self_recognition_cnn_summary.json, csvs

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
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from engine.checkpoint import sha256_file
from engine import errors
from engine.rundir import RunDir

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
EM_DIR = REPO_ROOT / "data" / "em"
PRESETS = ("qwen2.5-32b", "seed-oss-36b", "tiny")

# Condition names follow the paper's code release (atagade/sgtr-em: build_configs*.py,
# lightweight/full_pipeline*.sh, MODEL_README.md) and evals/data/paper_truthfulqa_binary.csv:
# <prefix>_<stage tag><policy tag>_<stage tag><policy tag>, e.g. hf_qwen_32b_em_unpop_sgtr_qwensys.
# EM data by file stem (bad medical advice and insecure code are not shipped: give their .jsonl path).
EM_TAGS = {"aesthetic_preferences_unpopular": "em_unpop", "risky_financial_advice": "em_finrisk",
           "bad_medical_advice": "em_badmed", "insecure": "em_insecure", "extreme_sports": "em_extreme"}
EM_WORDS = {"aesthetic_preferences_unpopular": "unpopular aesthetic preferences",
            "risky_financial_advice": "risky financial advice", "bad_medical_advice": "bad medical advice",
            "insecure": "insecure code", "extreme_sports": "extreme sports"}
# Stage tags. The paper's ICTR is its "asgtr_rand" (anti-SGTR, mode random-self-other-50-50: every order
# with both answers = our `both` variant); our `random` variant (one seeded answer per order) is not a
# paper condition. The paper's pure anti-SGTR ("asgtr", always the other's summary) is not built here.
# The longer-summary control is the paper's "sgtr_benign".
KIND_TAGS = {"em": "em", "sgtr": "sgtr", "ictr": "asgtr_rand", "longer": "sgtr_benign"}
ICTR_RANDOM_TAG = "ictr_random"
# Policy tags, as the paper's SYS_TAG: `empty` = "nosys", `omit` = "syspopped", `replace` with Qwen's
# identity prompt = "qwensys". The paper's control data ("sgtr_benign") had its task system prompt popped
# even by default, so our `longer` stage under `default` (task prompt kept) is no paper condition: "tasksys".
POLICY_TAGS = {"empty": "_nosys", "omit": "_syspopped"}
OTHER_WORDS = {"claude-21": "Claude 2.1", "human": "human-written summaries", "hf_qwen_32b": "Qwen2.5-32B",
               "hf_seed_36b": "Seed-OSS-36B"}
KINDS = ("em", "sgtr", "ictr", "longer")


class RecipeError(errors.EngineError, RuntimeError):
    """A problem with a recipe's settings or run directory; the message is for the user."""


# ------------------------------------------------------------------------------------ settings


@dataclass
class Stage:
    kind: str  # em | sgtr | ictr | longer
    system_prompt: str = "default"  # default | empty | omit | replace
    system_text: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RecipeError(f"unknown stage kind {self.kind!r}; choose one of {', '.join(KINDS)}")


@dataclass
class RunSettings:
    recipe: str
    stages: list[Stage]
    model: str  # checkpoint dir, hub id, or "tiny"
    model_tag: str  # directory name under the recipe
    template: str
    self_name: str
    condition_prefix: str
    identity_prompt: str | None
    out: Path
    seed: int = 0
    em_dataset: str = "risky_financial_advice"
    other: str = "claude-21"
    sgtr_dataset: str = "xsum"
    eval_dataset: str = "cnn"
    ictr_variant: str = "both"
    chain: str = "stack"  # stack | merge
    eval_after: str = "all"  # all | last | none | comma-separated stage numbers
    eval_base: bool = False
    limit_train: int | None = None
    limit_eval: int | None = None
    memory_gib: float | None = None
    train: dict = field(default_factory=dict)  # TrainConfig settings
    eval: dict = field(default_factory=dict)  # dtype, batch_size
    is_tiny: bool = False

    @property
    def run_dir(self) -> Path:
        return self.out / self.recipe / self.model_tag / f"seed{self.seed}"


def load_preset(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.suffix == ".toml":
        path = CONFIG_DIR / f"{name_or_path}.toml"
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"no preset {path}") from None


def em_path(em_dataset: str) -> Path:
    p = Path(em_dataset)
    if p.suffix == ".jsonl":
        if not p.is_file():
            raise RecipeError(f"EM dataset not found: {p}")
        return p.resolve()
    p = EM_DIR / f"{em_dataset}.jsonl"
    if not p.is_file():
        known = ", ".join(sorted(x.stem for x in EM_DIR.glob("*.jsonl")))
        raise RecipeError(f"unknown EM dataset {em_dataset!r}; shipped: {known}; or give a .jsonl path "
                          "(e.g. bad medical advice or insecure code, which are not shipped)")
    return p


def em_stem(em_dataset: str) -> str:
    return Path(em_dataset).stem


# --------------------------------------------------------------------------------- descriptions


def policy_words(stage: Stage, s: RunSettings) -> str:
    if stage.system_prompt == "default":
        if s.template == "qwen2.5":
            return "Qwen default system prompt" if stage.kind == "em" else "the task's system prompt"
        return "no system prompt" if stage.kind == "em" else "the task's system prompt"
    if stage.system_prompt == "empty":
        return "empty system prompt (NoQwenSys)"
    if stage.system_prompt == "omit":
        return "no system block (syspopped)"
    if s.identity_prompt is not None and stage.system_text == s.identity_prompt:
        return "matching: the model's identity system prompt"
    return f"system prompt replaced by {stage.system_text!r}"


def policy_tag(stage: Stage, s: RunSettings) -> str:
    if stage.system_prompt == "default":
        return "_tasksys" if stage.kind == "longer" else ""
    if stage.system_prompt in POLICY_TAGS:
        return POLICY_TAGS[stage.system_prompt]
    if s.identity_prompt is not None and stage.system_text == s.identity_prompt:
        return "_qwensys" if s.template == "qwen2.5" else "_idsys"
    return "_customsys"


def stage_tag(stage: Stage, s: RunSettings) -> str:
    if stage.kind == "em":
        base = EM_TAGS.get(em_stem(s.em_dataset), "em_" + em_stem(s.em_dataset))
    else:
        base = ICTR_RANDOM_TAG if (stage.kind == "ictr" and s.ictr_variant == "random") else KIND_TAGS[stage.kind]
        # The paper's SGTR-style sets are XSum articles vs Claude 2.1; anything else is named apart.
        base += ("" if s.sgtr_dataset == "xsum" else f"_{s.sgtr_dataset}") + ("" if s.other == "claude-21" else f"_vs_{s.other}")
    return base + policy_tag(stage, s)


def stage_words(stage: Stage, s: RunSettings) -> str:
    other = OTHER_WORDS.get(s.other, s.other)
    data = s.sgtr_dataset.upper() if s.sgtr_dataset == "cnn" else "XSum"
    if stage.kind == "em":
        what = f"EM ({EM_WORDS.get(em_stem(s.em_dataset), em_stem(s.em_dataset))}"
    elif stage.kind == "sgtr":
        what = f"SGTR ({data}, vs {other}"
    elif stage.kind == "ictr":
        variant = "every pair with both labels" if s.ictr_variant == "both" else "seeded 50/50 random labels"
        what = f"ICTR (identity confusion, {data}, vs {other}, {variant}"
    else:
        what = f"non-metacognitive control (which summary is longer, {data}, vs {other}"
    return f"{what}, {policy_words(stage, s)})"


def condition_words(s: RunSettings) -> str:
    return " then ".join(stage_words(st, s) for st in s.stages)


def condition_name(s: RunSettings, upto: int) -> str:
    """Report label after `upto` stages (0: the base model), in the paper's naming style."""
    return "_".join([s.condition_prefix] + [stage_tag(st, s) for st in s.stages[:upto]])


def eval_points(s: RunSettings) -> list[int]:
    n = len(s.stages)
    spec = s.eval_after.strip().lower()
    if spec == "all":
        points = list(range(1, n + 1))
    elif spec == "last":
        points = [n]
    elif spec == "none":
        points = []
    else:
        try:
            points = sorted({int(x) for x in spec.split(",") if x.strip()})
        except ValueError:
            raise RecipeError(f"--eval-after: expected all, last, none or stage numbers, got {s.eval_after!r}") from None
        bad = [p for p in points if not 1 <= p <= n]
        if bad:
            raise RecipeError(f"--eval-after: stage(s) {bad} out of range 1..{n}")
    return ([0] if s.eval_base else []) + points


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
        else:
            rows, _ties = ds.build_longer(pairs)
    except ds.DatasetError as e:
        raise RecipeError(str(e)) from None
    return None, rows, f"recipes.datasets {stage.kind} target={s.self_name} other={s.other} {s.sgtr_dataset} articles={len(pairs)}"


def prepare_datasets(s: RunSettings, is_main: bool) -> list[Path]:
    """Write each stage's dataset (rank 0) and record its SHA-256 in datasets.json. A dataset that
    already exists must hash the same as the one built now (builders are deterministic); a
    mismatch means the inputs changed under a started run, which is refused."""
    run_dir = s.run_dir
    paths, records = [], []
    for i, stage in enumerate(s.stages, 1):
        lines, rows, source = build_stage_rows(stage, s)
        if lines is None and rows is None:
            path = Path(source)
            text = None
        else:
            path = run_dir / "data" / f"stage{i}_{stage.kind}.jsonl"
            text = "".join(lines) if lines is not None else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if text is not None:
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            if path.exists():
                if sha256_file(path) != digest:
                    raise RecipeError(f"{path} differs from the dataset built now (its inputs changed since the run "
                                      "started); use a fresh --out or delete the run directory")
            elif is_main:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, path)
            n = text.count("\n")
        else:
            digest = sha256_file(path)
            with open(path, "rb") as f:
                n = sum(1 for _ in f)
        paths.append(path)
        records.append({"stage": i, "kind": stage.kind, "file": str(path), "sha256": digest, "samples": n,
                        "source": source})
    if is_main:
        _write_json(run_dir / "datasets.json", records)
    return paths


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


def run_evals(s: RunSettings, point: int, model: str, adapters: list[str], log) -> Path:
    """TruthfulQA (robust) and self-recognition on `model` + `adapters`, loaded once for both;
    evals whose summary exists are skipped (and nothing is loaded when all are). Collective under
    torchrun: every rank scores a share of the prompts, rank 0 writes."""
    import gc

    from evals import load_eval_model, self_recognition, truthfulqa

    out = s.run_dir / "evals" / ("base" if point == 0 else f"after_stage{point}_{s.stages[point - 1].kind}")
    conditions = {"condition": condition_name(s, point), "seed": str(s.seed), "recipe": s.recipe, "stage": str(point)}
    common = dict(batch_size=int(s.eval.get("batch_size", 8)), limit=s.limit_eval, conditions=conditions, log=log)
    jobs = [
        (truthfulqa.output_paths(out, "robust")[1],
         lambda m: truthfulqa.run(m, out, mode="robust", seed=s.seed, **common)),
        (out / f"self_recognition_{s.eval_dataset}_summary.json",
         lambda m: self_recognition.run(m, out, self_name=s.self_name, other=s.other, dataset=s.eval_dataset, **common)),
    ]
    todo = [(summary, job) for summary, job in jobs if not summary.is_file()]
    for summary, _ in jobs:
        if summary.is_file():
            log(f"eval {summary} exists: skipped")
    if not todo:
        return out
    where = "the base model" if point == 0 else f"stage {point}"
    log(f"evals after {where}: loading {model}" + (f" with {len(adapters)} adapter(s)" if adapters else ""))
    loaded = load_eval_model(model, adapters, template=s.template, dtype=str(s.eval.get("dtype", "bfloat16")))
    for summary, job in todo:
        log(f"eval after {where}: {summary.name.split('_summary')[0]}")
        job(loaded)
    del loaded
    gc.collect()
    return out


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
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / "run.json", {**dataclasses.asdict(s), "out": str(s.out), "run_dir": str(run_dir),
                                           "base_model": base_model, "condition": condition_words(s),
                                           "world_size": dist.world_size})
    datasets = prepare_datasets(s, dist.is_main)
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


def build_parser(recipe: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"recipes/{recipe}.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run with no arguments for the embedded tiny CPU demo. Under torchrun every rank "
                                       "trains (FSDP2); evals run on rank 0.")
    p.add_argument("--model", default="tiny",
                   help=f"preset ({', '.join(PRESETS)}), a preset .toml, or a checkpoint dir / hub id (default tiny)")
    p.add_argument("--preset", default=None, help="preset for the hyper-parameters when --model is a checkpoint "
                                                  "(default: qwen2.5-32b, or seed-oss-36b when the name says seed)")
    p.add_argument("--em-dataset", default="risky_financial_advice",
                   help="EM data: a name under data/em/ (aesthetic_preferences_unpopular, risky_financial_advice, "
                        "extreme_sports) or a .jsonl path")
    p.add_argument("--system-prompt", action="append", default=[], metavar="[KIND=]POLICY",
                   help="system-prompt policy (default | empty | omit | replace), for all stages or one kind "
                        "(em=empty); `replace` without --system-text uses the model's identity prompt (matching)")
    p.add_argument("--system-text", action="append", default=[], metavar="[KIND=]TEXT",
                   help="text for --system-prompt replace")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, run in sequence, then the report (default 0)")
    p.add_argument("--limit-train", type=int, default=None, help="at most N samples per stage")
    p.add_argument("--limit-eval", type=int, default=None, help="first N questions / articles per eval")
    p.add_argument("--out", default="runs", help="root of the run directories (default runs)")
    p.add_argument("--chain", default="stack", choices=("stack", "merge"), help="stack adapters (default) or merge each stage")
    p.add_argument("--eval-after", default="all", help="all (default, as the paper) | last | none | stage numbers 1,2")
    p.add_argument("--eval-base", action=argparse.BooleanOptionalAction, default=None,
                   help="also evaluate the base model (default: on for tiny)")
    p.add_argument("--other", default="claude-21", help="the other summaries in SGTR/ICTR/control pairs (default claude-21)")
    p.add_argument("--sgtr-dataset", default="xsum", choices=("xsum", "cnn"), help="articles for SGTR-style stages")
    p.add_argument("--eval-dataset", default="cnn", choices=("xsum", "cnn"), help="self-recognition eval articles")
    p.add_argument("--ictr-variant", default="both", choices=("both", "random"))
    p.add_argument("--memory-gib", type=float, default=None, help="device memory to check the estimate against")
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                   help="override a trainer setting (e.g. max_steps=2, micro_batch_tokens=2048)")
    return p


def _per_kind(items: list[str], what: str) -> tuple[str | None, dict[str, str]]:
    everywhere, per = None, {}
    for item in items:
        key, sep, value = item.partition("=")
        if sep and key in KINDS:
            per[key] = value
        else:
            everywhere = item
    return everywhere, per


def settings_from_args(recipe: str, stages: list[Stage], args: argparse.Namespace) -> list[RunSettings]:
    from engine.config import TrainConfig, _field_types, _parse

    model = args.model
    if model in PRESETS or model.endswith(".toml"):
        preset = load_preset(model)
        model_tag = Path(model).stem if model.endswith(".toml") else model
        model = preset["model"]
        if args.preset:
            raise RecipeError("--preset is for a checkpoint --model; a preset name already chooses one")
    else:
        name = args.preset or ("seed-oss-36b" if "seed" in model.lower() else "qwen2.5-32b")
        preset = load_preset(name)
        model_tag = Path(model.rstrip("/")).name or model.replace("/", "_")
    is_tiny = model == "tiny"
    types = _field_types(TrainConfig)
    train = dict(preset.get("train", {}))
    for item in args.train:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise RecipeError(f"--train {item!r}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        train[key] = _parse(value, types[key], key)
    reserved = {"model", "data", "template", "out_dir", "system_prompt", "system_text", "stack_adapters", "seed", "resume"}
    if reserved & set(train):
        raise RecipeError(f"--train cannot set {', '.join(sorted(reserved & set(train)))}: the recipe sets them")
    all_policy, per_policy = _per_kind(args.system_prompt, "system-prompt")
    all_text, per_text = _per_kind(args.system_text, "system-text")
    identity = preset.get("identity_prompt")
    resolved = []
    for st in stages:
        policy = per_policy.get(st.kind, all_policy) or st.system_prompt
        text = per_text.get(st.kind, all_text) or st.system_text
        if policy not in ("default", "empty", "omit", "replace"):
            raise RecipeError(f"--system-prompt: unknown policy {policy!r}")
        if policy == "replace" and text is None:
            if identity is None:
                raise RecipeError(f"--system-prompt replace for {st.kind}: this model has no identity prompt in its "
                                  "preset; give --system-text")
            text = identity
        resolved.append(Stage(st.kind, policy, text if policy == "replace" else None))
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise RecipeError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise RecipeError("--seeds: give at least one seed")
    em_path(args.em_dataset)  # fail early on a bad name
    eval_base = args.eval_base if args.eval_base is not None else bool(preset.get("eval_base", False))
    limit_train = args.limit_train if args.limit_train is not None else preset.get("limit_train")
    limit_eval = args.limit_eval if args.limit_eval is not None else preset.get("limit_eval")
    out = Path(args.out).resolve()
    return [RunSettings(recipe=recipe, stages=resolved, model=model, model_tag=model_tag, template=preset["template"],
                        self_name=preset["self_name"], condition_prefix=preset.get("condition_prefix", model_tag),
                        identity_prompt=identity, out=out, seed=seed, em_dataset=args.em_dataset, other=args.other,
                        sgtr_dataset=args.sgtr_dataset, eval_dataset=args.eval_dataset, ictr_variant=args.ictr_variant,
                        chain=args.chain, eval_after=args.eval_after, eval_base=eval_base, limit_train=limit_train,
                        limit_eval=limit_eval, memory_gib=args.memory_gib, train=train,
                        eval=dict(preset.get("eval", {})), is_tiny=is_tiny)
            for seed in seeds]


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
