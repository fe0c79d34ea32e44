"""What a condition is: the stages of a run, their system-prompt policies, the settings of one
seed, and the names the paper gives them.

Condition names follow the paper's code release (atagade/sgtr-em: build_configs*.py,
lightweight/full_pipeline*.sh, MODEL_README.md) and evals/data/paper_truthfulqa_binary.csv, so
`python -m evals.report --compare-paper` finds the paper's row: `<prefix>_<stage tag><policy
tag>_<stage tag><policy tag>`, e.g. `hf_qwen_32b_em_unpop_sgtr_qwensys` (the paper's early names
without their EM dataset match through `evals.report.PAPER_ALIASES`; `python -m recipes.paper NAME`
prints the command of a paper row). The command-line options of every recipe and how they resolve
into `RunSettings` live here too; `recipes.stages` runs them.
"""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from engine import errors

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
SHIPPED_EM = ("aesthetic_preferences_unpopular", "risky_financial_advice", "extreme_sports")
# Stage tags. The paper's anti-SGTR detection data comes in two modes (its
# generate_sgtr_pair_wise_dataset_utils ASGTR_MODE): PREFER_OTHER, "asgtr", the label always on the
# other model's summary (our `asgtr` kind); RANDOM_SELF_OTHER, "asgtr_rand", every order with both
# answers (our ICTR `both` variant, the default). Our ICTR `random` variant (one seeded answer per
# order) is no paper condition: "ictr_random". The longer-summary control is the paper's "sgtr_benign".
KIND_TAGS = {"em": "em", "sgtr": "sgtr", "ictr": "asgtr_rand", "asgtr": "asgtr", "longer": "sgtr_benign"}
ICTR_RANDOM_TAG = "ictr_random"
# Policy tags, as the paper's SYS_TAG: `default` = none, `empty` = "nosys", `omit` = "syspopped",
# `replace` with Qwen's identity prompt = "qwensys".
#
# The control's plain name. The paper's `..._sgtr_benign` rows (trained 2026-01) used the files its
# generator writes, which keep the task system prompt: utils/generate_benign_sgtr_pair_wise_dataset_util.py
# writes `pick-longer_finetune-target_<model>_other-models__claude-21__finetuningdata.jsonl` with
# system_prompt=COMPARISON_SYSTEM_PROMPT (our LENGTH_SYSTEM_PROMPT), exactly as the SGTR/anti-SGTR
# generators write the files build_configs.py / build_configs_asgtr.py train on by default. The
# `..._finetuningdata_syspopped.jsonl` default of build_configs_benign.py (commit 8303210) was written
# later and names files that no script of the release writes and that never existed for Qwen. So our
# `longer` stage under `default` (task prompt kept) *is* the paper's "sgtr_benign" (it was named
# "sgtr_benign_tasksys" here before); `replace` with Qwen's prompt is "sgtr_benign_qwensys", `empty`
# is "sgtr_benign_nosys", `omit` is "sgtr_benign_syspopped" (Seed-OSS's rows of that name).
POLICY_TAGS = {"empty": "_nosys", "omit": "_syspopped"}
OTHER_WORDS = {"claude-21": "Claude 2.1", "human": "human-written summaries", "hf_qwen_32b": "Qwen2.5-32B",
               "hf_seed_36b": "Seed-OSS-36B"}
KINDS = ("em", "sgtr", "ictr", "asgtr", "longer")


class RecipeError(errors.EngineError, RuntimeError):
    """A problem with a recipe's settings or run directory; the message is for the user."""


# ------------------------------------------------------------------------------------ settings


@dataclass
class Stage:
    kind: str  # em | sgtr | ictr | asgtr | longer
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
    """The EM chat file: a shipped name (data/em/<name>.jsonl) or a path to a user-supplied file
    (e.g. bad medical advice or insecure code, published elsewhere: data/README.md); its stem
    names the condition."""
    if em_dataset in SHIPPED_EM:
        return EM_DIR / f"{em_dataset}.jsonl"
    p = Path(em_dataset)
    if p.is_file():
        return p.resolve()
    if p.suffix == ".jsonl" or "/" in em_dataset or p.parent != Path("."):
        raise RecipeError(f"EM dataset not found: {p}")
    hint = (" (not shipped: give the path of your copy; data/README.md says where it is published)"
            if em_dataset in EM_TAGS else "")
    raise RecipeError(f"unknown EM dataset {em_dataset!r}{hint}; shipped: {', '.join(SHIPPED_EM)}; or give a "
                      "path to a chat JSONL file")


def check_em_data(s: RunSettings) -> None:
    """Validate the EM file of every EM stage the way the trainer will read it (its template and that
    stage's system-prompt policy, the rows the stage uses), before anything trains: every bad row is
    reported as file:line (engine.data's DataErrors). Shipped and user-supplied files alike."""
    from engine.chat import ChatFormatError, SystemPolicy, get_template
    from engine.data import read_rows
    from engine.errors import DataError, DataErrors

    policies = list(dict.fromkeys((st.system_prompt, st.system_text) for st in s.stages if st.kind == "em"))
    if not policies:
        return
    path = em_path(s.em_dataset)
    module = get_template(s.template)
    rows, parse_errors = read_rows(path, s.limit_train)
    for policy in policies:
        errors = list(parse_errors)
        for line_no, messages in rows:
            try:
                chat = module.render(messages, SystemPolicy(*policy))
            except ChatFormatError as e:
                errors.append(DataError(path, line_no, str(e)))
                continue
            if not any(seg.trained and seg.text for seg in chat.segments):
                errors.append(DataError(path, line_no, "assistant turns are blank: nothing would be trained"))
        if errors:
            raise DataErrors(sorted(errors, key=lambda e: e.line or 0))


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
        return ""
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
    elif stage.kind == "asgtr":
        what = f"anti-SGTR ({data}, vs {other}, the label always on the other's summary"
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
                   help="EM data: a shipped name (risky_financial_advice, the default; aesthetic_preferences_unpopular, "
                        "the paper's default pipeline; extreme_sports) or the path of a chat JSONL file (bad medical "
                        "advice, insecure code: data/README.md); its stem names the condition")
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
    p.add_argument("--ictr-variant", default="both", choices=("both", "random"),
                   help="ICTR labels: both (every order with both answers, the paper's asgtr_rand) or random")
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
