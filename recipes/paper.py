"""Which recipe command reproduces a condition of the paper, by its name in the paper's table.

    python -m recipes.paper hf_seed_36b_sgtr_syspopped_em_unpop hf_qwen_32b_em
    python -m recipes.paper --all        # every Qwen2.5-32B / Seed-OSS-36B row: command or why none

A name is the condition naming of `recipes.conditions` read backwards (prefix, then stage tags each
with its policy tag), after `evals.report.PAPER_ALIASES` has turned an early name into ours. The
rows of the two models that no recipe produces are in `UNPRODUCIBLE`, with the reason. A run
evaluates after every stage, so one command yields several rows (`point`: after how many stages;
0 is the base model, evaluated with --eval-base).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

from engine.errors import EngineError, report
from recipes.conditions import EM_TAGS, ICTR_RANDOM_TAG, KIND_TAGS, SHIPPED_EM, RecipeError

PRESETS = {"hf_qwen_32b": "qwen2.5-32b", "hf_seed_36b": "seed-oss-36b"}
# The table's rows of the two models: ours, and the early Qwen2.5-32B names (through the aliases).
SCOPE = re.compile(r"^(hf_qwen_32b|hf_seed_36b|qwen_32B|qwen_32b)(_|$)")
UNPRODUCIBLE = {
    **{f"hf_qwen_32b_sgtr_rl_{k}": f"SGTR by reinforcement learning ({k} steps): the engine fine-tunes LoRA "
                                   "adapters by supervised learning only" for k in (100, 200, 300, 400)},
    "hf_seed_36b_em_withsys": "EM trained with a system prompt whose text the release does not record (Seed-OSS's "
                              "template has none of its own): run with --system-prompt em=replace --system-text TEXT "
                              "and compare with --paper-name OURS=hf_seed_36b_em_withsys",
}
POLICY_OPTIONS = {"_nosys": "empty", "_syspopped": "omit", "_qwensys": "replace"}
SCRIPTS = {"ictr": "ictr", "asgtr": "asgtr", "longer": "control"}  # a non-EM kind's recipe (with --order)
_STAGE_TAGS = {tag: kind for kind, tag in KIND_TAGS.items() if kind != "em"}
_STAGE_TAGS.update({ICTR_RANDOM_TAG: "ictr", **{tag: "em" for tag in EM_TAGS.values()}})
_TOKEN = re.compile("_(" + "|".join(sorted(map(re.escape, _STAGE_TAGS), key=len, reverse=True)) + ")"
                    + "(" + "|".join(POLICY_OPTIONS) + ")?(?=_|$)")


@dataclass
class Invocation:
    paper: str  # the paper's row
    condition: str  # our condition name: the row's, or the one its alias names
    recipe: str  # script under recipes/
    order: str | None  # --order of ictr / asgtr / control
    options: list[str]  # everything but --order and --seeds
    point: int  # stages trained at the eval point whose report row it is
    user_file: str | None  # the EM file (stem) the user brings, or None

    def command(self) -> str:
        order = ["--order", self.order] if self.order else []
        return " ".join([f"recipes/{self.recipe}.py", *order, *self.options, "--seeds", "0,1,2,3,4"])


def invocation(paper_name: str) -> Invocation:
    """The recipe, options and eval point whose condition is `paper_name` (RecipeError if none)."""
    from evals.report import PAPER_ALIASES

    if paper_name in UNPRODUCIBLE:
        raise RecipeError(f"{paper_name}: no recipe produces it: {UNPRODUCIBLE[paper_name]}")
    ours = PAPER_ALIASES.get(paper_name, (paper_name, None))[0]
    prefix = next((p for p in PRESETS if ours == p or ours.startswith(p + "_")), None)
    if prefix is None:
        raise RecipeError(f"{paper_name}: not a Qwen2.5-32B or Seed-OSS-36B condition (prefix hf_qwen_32b / hf_seed_36b)")
    rest, stages = ours[len(prefix):], []
    while rest:
        m = _TOKEN.match(rest)
        if m is None:
            raise RecipeError(f"{paper_name}: cannot read {rest!r} as stage tags (em_unpop, sgtr, asgtr_rand, ...)")
        stages.append((m.group(1), POLICY_OPTIONS.get(m.group(2) or "", "default")))
        rest = rest[m.end():]
    options, user_file = ["--model", PRESETS[prefix]], None
    kinds = [_STAGE_TAGS[tag] for tag, _ in stages]
    for tag, policy in stages:
        kind = _STAGE_TAGS[tag]
        if kind == "em":
            stem = next(s for s, t in EM_TAGS.items() if t == tag)
            user_file = None if stem in SHIPPED_EM else stem
            options += ["--em-dataset", stem if stem in SHIPPED_EM else f"PATH/{stem}.jsonl"]
        if tag == ICTR_RANDOM_TAG:
            options += ["--ictr-variant", "random"]
        if policy == "replace" and prefix != "hf_qwen_32b":
            raise RecipeError(f"{paper_name}: 'qwensys' is Qwen's identity prompt; no such preset prompt for {prefix}")
        if policy != "default":
            options += ["--system-prompt", f"{kind}={policy}"]
    if len(kinds) > 2 or len(set(kinds)) < len(kinds) or (len(kinds) == 2 and "em" not in kinds):
        raise RecipeError(f"{paper_name}: no recipe trains the stages {' then '.join(kinds)}")
    other = [k for k in kinds if k != "em"]
    if not kinds:
        return Invocation(paper_name, ours, "em_only", None, options + ["--eval-base"], 0, None)
    if other and other[0] in SCRIPTS:
        order = "after" if kinds[0] == "em" else "before"
        return Invocation(paper_name, ours, SCRIPTS[other[0]], order, options, len(kinds), user_file)
    recipe = {("em",): "em_only", ("sgtr",): "sgtr_only", ("em", "sgtr"): "sgtr_reverse", ("sgtr", "em"): "sgtr_prevent"}
    return Invocation(paper_name, ours, recipe[tuple(kinds)], None, options, len(kinds), user_file)


def recipe_stages(recipe: str, order: str | None):
    """The stages a recipe script runs (with its --order)."""
    from recipes import asgtr, control, em_only, ictr, sgtr_only, sgtr_prevent, sgtr_reverse

    modules = {"em_only": em_only, "sgtr_only": sgtr_only, "sgtr_reverse": sgtr_reverse, "sgtr_prevent": sgtr_prevent,
               "ictr": ictr, "asgtr": asgtr, "control": control}
    module = modules[recipe]
    return module.stages(order) if order else module.STAGES


def table_rows(paper: dict) -> tuple[list[Invocation], dict[str, str]]:
    """Every in-scope row of the paper's table: its invocation, or (name -> reason) when none."""
    found, missing = [], {}
    for name in sorted(paper):
        if SCOPE.match(name):
            try:
                found.append(invocation(name))
            except RecipeError as e:
                missing[name] = UNPRODUCIBLE.get(name, str(e))
    return found, missing


def main(argv: list[str] | None = None) -> int:
    from evals.report import load_paper_means

    p = argparse.ArgumentParser(prog="python -m recipes.paper", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="condition names of the paper's table")
    p.add_argument("--all", action="store_true", help="every Qwen2.5-32B / Seed-OSS-36B row of the table")
    args = p.parse_args(argv)
    try:
        if args.all:
            found, missing = table_rows(load_paper_means())
            print("| paper condition | eval point | command (torchrun --nproc_per_node 8 …) |\n|---|---|---|")
            for inv in found:
                alias = "" if inv.condition == inv.paper else f" (= ours `{inv.condition}`)"
                print(f"| `{inv.paper}`{alias} | {inv.point} | `{inv.command()}` |")
            for name, why in missing.items():
                print(f"| `{name}` | — | not producible: {why} |")
            return 0
        for name in args.names:
            inv = invocation(name)
            print(f"{name}: {inv.command()}  (report row after stage {inv.point}: {inv.condition})")
    except EngineError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
