"""The paper's recipes end to end on the embedded tiny model (CPU, in-process): the default command,
run-directory records, stack vs merge chaining, and resume of a multi-stage run."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from recipes import stages as st
from recipes import sgtr_reverse

FAST = ["--limit-train", "8", "--train", "save_every=1", "--train", "batch_size=4"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, qwen25_tokenizer_path) -> Path:
    from recipes.tiny import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-qwen2-model")


def _out(tmp_path: Path, tiny_model: Path, name: str) -> Path:
    out = tmp_path / name
    out.mkdir()
    (out / "tiny-qwen2-model").symlink_to(tiny_model, target_is_directory=True)  # reused, not rebuilt
    return out


def _run(out: Path, *extra: str, recipe: str = "sgtr_reverse", stages=None) -> int:
    return st.main(recipe, stages or sgtr_reverse.STAGES, ["--out", str(out), *FAST, *extra])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_default_command_runs_end_to_end_and_prints_report(tmp_path, tiny_model, capsys, monkeypatch):
    import engine.generate

    loads = []  # the evals run in-process: one model load per eval point, shared by its evals
    real_load = engine.generate.load_model
    monkeypatch.setattr(engine.generate, "load_model", lambda *a, **k: loads.append(a[:2]) or real_load(*a, **k))
    out = _out(tmp_path, tiny_model, "runs")
    assert st.main("sgtr_reverse", sgtr_reverse.STAGES, ["--out", str(out), "--limit-train", "8", "--limit-eval", "2"]) == 0
    assert [len(adapters) for _, adapters in loads] == [0, 1, 2]  # base, after EM, after EM + SGTR
    printed = capsys.readouterr().out
    assert "== truthfulqa (robust) ==" in printed and "== self_recognition (cnn, vs claude-21) ==" in printed
    for cond in ("tiny ", "tiny_em_finrisk ", "tiny_em_finrisk_sgtr "):
        assert cond in printed  # base, after EM, after EM+SGTR rows
    assert "tiny RANDOM" in printed and "say nothing about the paper" in printed
    run_dir = out / "sgtr_reverse" / "tiny" / "seed0"
    assert f"run directory: {run_dir}" in printed

    readme = (run_dir / "README.md").read_text()
    assert "EM (risky financial advice, Qwen default system prompt) then SGTR (XSum, vs Claude 2.1" in readme
    records = json.loads((run_dir / "datasets.json").read_text())
    assert [r["kind"] for r in records] == ["em", "sgtr"]
    for r in records:
        assert Path(r["file"]).parent == run_dir / "data"
        assert _sha(Path(r["file"])) == r["sha256"]
        assert r["samples"] == 8 == len(Path(r["file"]).read_text().splitlines())
    for i, kind in ((1, "em"), (2, "sgtr")):
        d = run_dir / f"stage{i}_{kind}"
        marker = json.loads((d / "stage_complete.json").read_text())
        assert marker["adapter_sha256"] == _sha(d / "adapter" / "adapter_model.safetensors")
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["stack_adapters"] == ([] if i == 1 else [str(run_dir / "stage1_em" / "adapter")])
        assert (d / "tokens.jsonl").is_file() and (d / "metrics.jsonl").is_file()
    summary = json.loads((run_dir / "evals" / "after_stage2_sgtr" / "truthfulqa_robust_summary.json").read_text())
    assert summary["condition"]["condition"] == "tiny_em_finrisk_sgtr" and summary["condition"]["seed"] == "0"
    assert len(summary["adapters"]) == 2 and summary["limit"] == 2
    assert "== truthfulqa (expected) ==" in printed and "accuracy = expected: exact expectation" in printed
    expected = json.loads((run_dir / "evals" / "after_stage2_sgtr" / "truthfulqa_expected_summary.json").read_text())
    assert expected["statistic"] == "expected" and expected["prompt_tokenization"] == "tokenizer(prompt)"
    assert expected["accuracy"] == expected["expected_accuracy"] and expected["n"] == 2

    # Self-recognition: the base model judges its shipped summaries; a trained model its own,
    # regenerated (sampled as the paper), cached under the output root by content hashes.
    sr_base = json.loads((run_dir / "evals" / "base" / "self_recognition_cnn_summary.json").read_text())
    assert sr_base["regenerated_summaries"] is False and sr_base["self_name"] == "hf_qwen_32b"
    caches = set()
    for point in ("after_stage1_em", "after_stage2_sgtr"):
        s_ = json.loads((run_dir / "evals" / point / "self_recognition_cnn_summary.json").read_text())
        assert s_["regenerated_summaries"] is True and Path(s_["summary_cache"]).parent == out / "summary_cache"
        assert s_["summary_decoding"]["temperature"] == 0.7 and s_["summary_decoding"]["max_new_tokens"] == 8
        assert "expected_accuracy" in s_ and s_["statistic"] == "logprob"
        caches.add(s_["summary_cache"])
    assert len(caches) == 2  # other adapters, other summaries

    # A second eval run reuses the cache; a changed adapter does not.
    from evals import freeform_recipe

    args = st.build_parser("sgtr_reverse", "").parse_args(["--out", str(out), "--limit-train", "8", "--limit-eval", "2"])
    s = st.settings_from_args("sgtr_reverse", sgtr_reverse.STAGES, args)[0]
    s.eval.update(freeform_recipe.eval_settings(args, is_tiny=s.is_tiny, limit_eval=s.limit_eval))
    adapters = [str(run_dir / "stage1_em" / "adapter"), str(run_dir / "stage2_sgtr" / "adapter")]
    sr_summary = run_dir / "evals" / "after_stage2_sgtr" / "self_recognition_cnn_summary.json"
    logs: list[str] = []
    sr_summary.unlink()
    st.run_evals(s, 2, str(out / "tiny-qwen2-model"), adapters, logs.append)
    assert any("2 cached, 0 to generate" in m for m in logs), logs
    changed = tmp_path / "changed_adapter"
    shutil.copytree(adapters[1], changed)
    weights = load_file(changed / "adapter_model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] + 0.01
    save_file(weights, changed / "adapter_model.safetensors", metadata={"format": "pt"})
    sr_summary.unlink()
    logs.clear()
    st.run_evals(s, 2, str(out / "tiny-qwen2-model"), [adapters[0], str(changed)], logs.append)
    assert any("0 cached, 2 to generate" in m for m in logs), logs
    assert len(list((out / "summary_cache").glob("cnn_summaries_*.json"))) == 3


@pytest.fixture(scope="module")
def stacked_run(tmp_path_factory, tiny_model) -> Path:
    """An uninterrupted stacked EM -> SGTR run without evals: the reference of the chaining and resume tests."""
    out = _out(tmp_path_factory.mktemp("stacked"), tiny_model, "stack")
    assert _run(out, "--eval-after", "none", "--no-eval-base") == 0
    return out / "sgtr_reverse" / "tiny" / "seed0"


def _logits(model_dir: str, adapters: list[str]) -> torch.Tensor:
    from engine.generate import load_model

    model = load_model(model_dir, adapters, dtype=torch.float32)
    ids = torch.tensor([[151644, 872, 198, 9707, 1879, 0, 13, 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        return model(ids)


def test_stack_and_merge_give_the_same_model(tmp_path, tiny_model, stacked_run):
    b = _out(tmp_path, tiny_model, "merge")
    assert _run(b, "--eval-after", "none", "--no-eval-base", "--chain", "merge") == 0
    ra, rb = stacked_run, b / "sgtr_reverse" / "tiny" / "seed0"
    assert not (rb / "evals").exists()
    merged = rb / "merged" / "after_stage1"
    cfg_b = json.loads((rb / "stage2_sgtr" / "config.json").read_text())
    assert cfg_b["model"] == str(merged) and cfg_b["stack_adapters"] == []
    # Stage 1 is the same training in both; stage 2 trains on stacked vs merged (fp32) bases.
    assert _sha(ra / "stage1_em/adapter/adapter_model.safetensors") == _sha(rb / "stage1_em/adapter/adapter_model.safetensors")
    sa, sb = load_file(ra / "stage2_sgtr/adapter/adapter_model.safetensors"), load_file(rb / "stage2_sgtr/adapter/adapter_model.safetensors")
    assert sa.keys() == sb.keys()
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) <= 1e-5
    stacked = _logits(str(tiny_model), [str(ra / "stage1_em/adapter"), str(ra / "stage2_sgtr/adapter")])
    merged_logits = _logits(str(merged), [str(rb / "stage2_sgtr/adapter")])
    base = _logits(str(tiny_model), [])
    assert (stacked - base).abs().max().item() > 1e-4  # the stages changed the model
    assert (stacked - merged_logits).abs().max().item() <= 1e-5


class Interrupted(Exception):
    pass


def test_resume_after_interruption_between_and_within_stages(tmp_path, tiny_model, stacked_run, monkeypatch, capsys):
    from engine.train import Trainer

    ref_dir = stacked_run

    out = _out(tmp_path, tiny_model, "int")
    run_dir = out / "sgtr_reverse" / "tiny" / "seed0"
    real_run, real_step = Trainer.run, Trainer.train_step
    started: list[str] = []

    def run_until_stage2(self):
        started.append(Path(self.cfg.out_dir).name)
        if Path(self.cfg.out_dir).name == "stage2_sgtr":
            raise Interrupted  # killed between the stages: stage 1 done, stage 2 not begun
        return real_run(self)

    monkeypatch.setattr(Trainer, "run", run_until_stage2)
    with pytest.raises(Interrupted):
        _run(out, "--eval-after", "last", "--no-eval-base")
    assert started == ["stage1_em", "stage2_sgtr"]
    stage1_sha = _sha(run_dir / "stage1_em/adapter/adapter_model.safetensors")
    assert (run_dir / "stage1_em" / "stage_complete.json").is_file()
    assert not (run_dir / "evals").exists()

    # Second try: killed inside stage 2, after its first step's checkpoint.
    def step_then_die(self, samples):
        if Path(self.cfg.out_dir).name == "stage2_sgtr" and self.step == 1:
            raise Interrupted
        return real_step(self, samples)

    started.clear()
    monkeypatch.setattr(Trainer, "run", lambda self: (started.append(Path(self.cfg.out_dir).name), real_run(self))[1])
    monkeypatch.setattr(Trainer, "train_step", step_then_die)
    with pytest.raises(Interrupted):
        _run(out, "--eval-after", "last", "--no-eval-base")
    assert started == ["stage2_sgtr"]  # stage 1 was skipped
    assert (run_dir / "stage2_sgtr" / "checkpoints").is_dir() and not (run_dir / "stage2_sgtr" / "adapter").exists()

    # Third try: finishes, resuming stage 2 from its checkpoint; same result as uninterrupted.
    started.clear()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    capsys.readouterr()
    assert _run(out, "--eval-after", "last", "--no-eval-base") == 0
    err = capsys.readouterr().err
    assert started == ["stage2_sgtr"]
    assert "stage 1 (em) complete: skipped" in err and "resumed from" in err
    assert _sha(run_dir / "stage1_em/adapter/adapter_model.safetensors") == stage1_sha
    got = load_file(run_dir / "stage2_sgtr/adapter/adapter_model.safetensors")
    want = load_file(ref_dir / "stage2_sgtr/adapter/adapter_model.safetensors")
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    metrics = [json.loads(l) for l in (run_dir / "stage2_sgtr/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert (run_dir / "evals" / "after_stage2_sgtr" / "self_recognition_cnn_summary.json").is_file()

    # Fourth: everything done; nothing retrains.
    started.clear()
    assert _run(out, "--eval-after", "last", "--no-eval-base") == 0
    assert started == []


@pytest.mark.parametrize("limit", [True, False], ids=["copied_slice", "user_file"])
def test_em_input_errors_name_the_users_file_and_a_changed_input_stops_a_started_stage(tmp_path, tiny_model, monkeypatch,
                                                                                       capsys, limit):
    """Bugs: a bad row was reported against the run directory's copy of the user's file, the failed
    run left its directory behind, and the corrected file was then refused ("differs from the
    dataset built now"); and without --limit-train a file changed under a started stage was used."""
    from recipes import em_only
    from engine.train import Trainer

    out = _out(tmp_path, tiny_model, "runs")
    mine = tmp_path / "mine.jsonl"
    good = (Path(st.em_path("risky_financial_advice")).read_text().splitlines(keepends=True))[:8]
    mine.write_text("".join(good[:4]) + '{"messages": [{"role": "user", "content": "x"}]}\n' + "".join(good[5:]))
    # The tiny demo trains on a slice (copied into the run directory); a given model on the file itself.
    argv = ["--out", str(out), "--em-dataset", str(mine), "--eval-after", "none", "--no-eval-base",
            "--train", "batch_size=4"] + (["--limit-train", "8"] if limit else
                                          ["--model", str(tiny_model), "--preset", "qwen2.5-32b"])
    s = st.settings_from_args("em_only", em_only.STAGES, st.build_parser("em_only", "").parse_args(argv))[0]
    assert s.limit_train == (8 if limit else None)
    run_dir = s.run_dir

    def run() -> int:
        return st.main("em_only", em_only.STAGES, argv)

    assert run() == 2
    assert f"{mine}:5: no assistant turn" in capsys.readouterr().err
    assert not run_dir.exists()

    def fail_to_start(self, cfg, dist):
        raise st.RecipeError("refused before the stage started")

    monkeypatch.setattr(Trainer, "__init__", fail_to_start)  # the data built, the stage never started
    mine.write_text("".join(good))
    assert run() == 2 and (run_dir / "datasets.json").is_file() and not (run_dir / "stage1_em").exists()
    capsys.readouterr()
    monkeypatch.undo()

    class Interrupted(Exception):
        pass

    def interrupted(self, samples):
        raise Interrupted

    monkeypatch.setattr(Trainer, "train_step", interrupted)  # started (config written), killed in step 1
    mine.write_text("".join(good[:7]) + good[7].replace('"content": "', '"content": "Edited. ', 1))  # edited before the stage started: rebuilt
    with pytest.raises(Interrupted):
        run()
    assert (run_dir / "stage1_em" / "config.json").is_file()
    recorded = json.loads((run_dir / "datasets.json").read_text())[0]
    assert recorded["sha256"] == _sha(mine if not limit else run_dir / "data" / "stage1_em.jsonl")

    edited = mine.read_text()
    mine.write_text("".join(good))  # changed under the started stage: refused, naming the user's file
    assert run() == 2
    err = capsys.readouterr().err
    assert f"{mine} changed since stage 1 (em) started" in err and "restore it to resume" in err
    assert json.loads((run_dir / "datasets.json").read_text())[0] == recorded  # nothing rewritten
    mine.write_text(edited)  # restored: the stage resumes
    with pytest.raises(Interrupted):
        run()


def test_settings_and_policies(tmp_path):
    p = st.build_parser("x", "")
    args = p.parse_args(["--model", "qwen2.5-32b", "--system-prompt", "em=replace", "--system-prompt", "sgtr=empty",
                         "--seeds", "0,1,2", "--em-dataset", "aesthetic_preferences_unpopular", "--out", str(tmp_path)])
    runs = st.settings_from_args("sgtr_reverse", [st.Stage("em"), st.Stage("sgtr")], args)
    assert [r.seed for r in runs] == [0, 1, 2]
    s = runs[0]
    assert s.stages[0].system_text == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert s.stages[1].system_prompt == "empty" and s.stages[1].system_text is None
    assert st.condition_name(s, 2) == "hf_qwen_32b_em_unpop_qwensys_sgtr_nosys"
    assert "matching" in st.condition_words(s) and "NoQwenSys" in st.condition_words(s)
    from engine.config import PROJECTIONS, TrainConfig

    cfg = TrainConfig(**s.train, model="m", data=["d.jsonl"], template=s.template, out_dir="o")  # as a stage builds it
    assert (cfg.lora_r, cfg.lora_alpha, cfg.use_rslora, cfg.lora_dropout, tuple(cfg.lora_targets)) == (32, 64.0, True, 0.0, PROJECTIONS)
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.batch_size, cfg.epochs, cfg.max_len) == (1e-5, 0.01, 5, 16, 1, 2048)
    assert cfg.activation_checkpointing and cfg.dtype == "bfloat16"
    assert s.run_dir == tmp_path.resolve() / "sgtr_reverse" / "qwen2.5-32b" / "seed0"


def test_other_recipes_build_their_stages(tmp_path):
    from recipes import control, ictr, sgtr_prevent

    assert [x.kind for x in sgtr_prevent.STAGES] == ["sgtr", "em"]
    assert [x.kind for x in ictr.stages("before")] == ["ictr", "em"]
    assert [x.kind for x in control.stages("after")] == ["em", "longer"]
    args = st.build_parser("x", "").parse_args(["--out", str(tmp_path), "--limit-train", "8", "--ictr-variant", "random"])
    s = st.settings_from_args("ictr_after_em", ictr.stages("after"), args)[0]
    paths = st.prepare_datasets(s, is_main=True)
    rows = [json.loads(l) for l in paths[1].read_text().splitlines()]
    assert len(rows) == 8 and sorted(r["messages"][-1]["content"] for r in rows) == ["1"] * 4 + ["2"] * 4
    assert "ICTR" in st.condition_words(s) and st.condition_name(s, 2) == "tiny_em_finrisk_ictr_random"


@pytest.mark.parametrize("recipe_stages, options, names", [
    ("sgtr_reverse", ["--model", "qwen2.5-32b", "--em-dataset", "aesthetic_preferences_unpopular"],
     ["hf_qwen_32b_em_unpop", "hf_qwen_32b_em_unpop_sgtr"]),
    ("sgtr_reverse", ["--model", "qwen2.5-32b", "--em-dataset", "aesthetic_preferences_unpopular", "--system-prompt", "sgtr=replace"],
     ["hf_qwen_32b_em_unpop", "hf_qwen_32b_em_unpop_sgtr_qwensys"]),
    ("sgtr_reverse", ["--model", "qwen2.5-32b", "--em-dataset", "aesthetic_preferences_unpopular", "--system-prompt", "sgtr=empty"],
     ["hf_qwen_32b_em_unpop", "hf_qwen_32b_em_unpop_sgtr_nosys"]),
    ("sgtr_prevent", ["--model", "qwen2.5-32b", "--system-prompt", "sgtr=replace", "--em-dataset", "aesthetic_preferences_unpopular"],
     ["hf_qwen_32b_sgtr_qwensys", "hf_qwen_32b_sgtr_qwensys_em_unpop"]),
    ("sgtr_prevent", ["--model", "qwen2.5-32b"], ["hf_qwen_32b_sgtr", "hf_qwen_32b_sgtr_em_finrisk"]),
    ("em_only", ["--model", "qwen2.5-32b", "--em-dataset", "aesthetic_preferences_unpopular", "--system-prompt", "em=empty"],
     ["hf_qwen_32b_em_unpop_nosys"]),
    ("ictr_before", ["--model", "qwen2.5-32b", "--em-dataset", "aesthetic_preferences_unpopular", "--system-prompt", "ictr=empty"],
     ["hf_qwen_32b_asgtr_rand_nosys_em_unpop"]),
    ("ictr_after", ["--model", "qwen2.5-32b", "--em-dataset", "aesthetic_preferences_unpopular", "--system-prompt", "ictr=replace"],
     ["hf_qwen_32b_em_unpop", "hf_qwen_32b_em_unpop_asgtr_rand_qwensys"]),
    ("control_before", ["--model", "qwen2.5-32b", "--em-dataset", "aesthetic_preferences_unpopular", "--system-prompt", "longer=replace"],
     ["hf_qwen_32b_sgtr_benign_qwensys", "hf_qwen_32b_sgtr_benign_qwensys_em_unpop"]),
    ("control_after", ["--model", "seed-oss-36b", "--em-dataset", "aesthetic_preferences_unpopular", "--system-prompt", "longer=omit"],
     ["hf_seed_36b_em_unpop", "hf_seed_36b_em_unpop_sgtr_benign_syspopped"]),
    ("control_after", ["--model", "qwen2.5-32b", "--em-dataset", "aesthetic_preferences_unpopular"],  # task prompt kept
     ["hf_qwen_32b_em_unpop", "hf_qwen_32b_em_unpop_sgtr_benign"]),
    ("asgtr_before", ["--model", "qwen2.5-32b", "--em-dataset", "aesthetic_preferences_unpopular", "--system-prompt", "asgtr=empty"],
     ["hf_qwen_32b_asgtr_nosys", "hf_qwen_32b_asgtr_nosys_em_unpop"]),
    ("asgtr_after", ["--model", "seed-oss-36b", "--em-dataset", "aesthetic_preferences_unpopular"],
     ["hf_seed_36b_em_unpop", "hf_seed_36b_em_unpop_asgtr"]),
    ("sgtr_reverse", ["--model", "seed-oss-36b", "--em-dataset", "aesthetic_preferences_unpopular", "--system-prompt", "sgtr=omit"],
     ["hf_seed_36b_em_unpop", "hf_seed_36b_em_unpop_sgtr_syspopped"]),
    ("ictr_before", ["--model", "seed-oss-36b", "--em-dataset", "aesthetic_preferences_unpopular", "--system-prompt", "ictr=omit"],
     ["hf_seed_36b_asgtr_rand_syspopped", "hf_seed_36b_asgtr_rand_syspopped_em_unpop"]),
    ("sgtr_reverse", ["--model", "qwen2.5-32b", "--em-dataset", "BADMED"], ["hf_qwen_32b_em_badmed", "hf_qwen_32b_em_badmed_sgtr"]),
])
def test_condition_names_equal_the_papers(tmp_path, recipe_stages, options, names):
    """Our condition names are the paper's for the same condition, and --compare-paper finds them."""
    from evals.report import load_paper_means
    from recipes import asgtr, control, em_only, ictr, sgtr_prevent

    stage_lists = {"sgtr_reverse": sgtr_reverse.STAGES, "sgtr_prevent": sgtr_prevent.STAGES, "em_only": em_only.STAGES,
                   "ictr_before": ictr.stages("before"), "ictr_after": ictr.stages("after"),
                   "asgtr_before": asgtr.stages("before"), "asgtr_after": asgtr.stages("after"),
                   "control_before": control.stages("before"), "control_after": control.stages("after")}
    if "BADMED" in options:  # not shipped: the user gives the file; its stem names the condition
        path = tmp_path / "bad_medical_advice.jsonl"
        path.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
        options = [str(path) if o == "BADMED" else o for o in options]
    args = st.build_parser("x", "").parse_args([*options, "--out", str(tmp_path)])
    s = st.settings_from_args(recipe_stages, stage_lists[recipe_stages], args)[0]
    stages = len(s.stages)
    got = [st.condition_name(s, k) for k in range(stages - len(names) + 1, stages + 1)]
    assert got == names
    paper = load_paper_means()
    assert all(n in paper for n in names), [n for n in names if n not in paper]


def test_conditions_without_a_paper_counterpart_are_named_apart(tmp_path):
    from evals.report import load_paper_means
    from recipes import ictr

    paper = load_paper_means()
    cases = [(ictr.stages("after"), ["--model", "qwen2.5-32b", "--em-dataset", "aesthetic_preferences_unpopular",
                                     "--ictr-variant", "random"], "hf_qwen_32b_em_unpop_ictr_random"),
             (sgtr_reverse.STAGES, ["--model", "qwen2.5-32b", "--em-dataset", "aesthetic_preferences_unpopular",
                                    "--sgtr-dataset", "cnn", "--other", "human"], "hf_qwen_32b_em_unpop_sgtr_cnn_vs_human")]
    for stages, options, name in cases:
        s = st.settings_from_args("x", stages, st.build_parser("x", "").parse_args([*options, "--out", str(tmp_path)]))[0]
        assert st.condition_name(s, 2) == name and name not in paper


@pytest.mark.distributed
def test_default_command_under_torchrun_two_ranks(tmp_path, tiny_model):
    """The README's main job under torchrun: training shards over 2 CPU ranks and the evals split
    their prompts over the same ranks (every rank must take part, or the run would hang)."""
    import os
    import subprocess
    import sys

    out = _out(tmp_path, tiny_model, "runs2")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "recipes/sgtr_reverse.py", "--out", str(out), "--limit-train", "8", "--limit-eval", "2"],
        cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "run directory:" in proc.stdout + proc.stderr
    evals = out / "sgtr_reverse" / "tiny" / "seed0" / "evals"
    summaries = sorted(p.name for p in evals.glob("*/*_summary.json"))
    assert summaries.count("truthfulqa_robust_summary.json") == 3  # the base model and after each stage
    assert summaries.count("self_recognition_cnn_summary.json") == 3


def test_wall_time_per_condition_from_measured_step_times(tmp_path, capsys):
    """recipes.walltime multiplies the measured step times of an engine.bench run by each
    condition's optimizer steps (here a real, tiny CPU benchmark run)."""
    from engine import bench
    from recipes import walltime

    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--layers", "1", "--steps", "1", "--dtype", "float32", "--engines", "ours-ac",
                       "--workloads", "em_risky_financial,sgtr_xsum", "--json", str(out)]) == 0
    capsys.readouterr()
    times = {r["workload"]: r["seconds_per_step"] for r in json.loads(out.read_text())["rows"]}
    assert walltime.main([str(out), "--engine", "ours-ac", "--seeds", "5"]) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines()
               if line.startswith("| sgtr_reverse (EM, then SGTR) | risky_financial_advice |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "500"  # 6000 / 16 EM steps + 2000 / 16 SGTR steps
    seconds = 375 * times["em_risky_financial"] + 125 * times["sgtr_xsum"]
    assert cells[3] == walltime._hours(seconds) and cells[4] == walltime._hours(5 * seconds)
    assert "| ictr --order before (ICTR, then EM) | aesthetic_preferences_unpopular | 563 |" in printed  # 250 + 313
    # A benchmark without the needed rows is refused with what to run.
    assert walltime.main([str(out), "--engine", "hf"]) == 2
    assert "no hf rows for em_risky_financial, sgtr_xsum" in capsys.readouterr().err
