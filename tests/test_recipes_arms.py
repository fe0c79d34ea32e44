"""The paper's arms: every Qwen2.5-32B / Seed-OSS-36B row of the reference table produced by a
recipe and matched by --compare-paper (aliases for the early names), the reference table's sample
SDs, user-supplied EM files checked before training, and the OpenAI-format files (validator and
round trip through our renderer)."""

from __future__ import annotations

import hashlib
import json
import statistics

import pytest

from engine.chat import SystemPolicy, encode, render
from engine.errors import DataErrors
from evals.report import PAPER_ALIASES, aggregate, describe, format_report, group_summaries, load_paper_means, paper_matches
from recipes import datasets as ds
from recipes import openai_format as oa
from recipes import paper as pp
from recipes import stages as st

QWEN_ID = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.fixture(scope="module")
def paper():
    return load_paper_means()


# ------------------------------------------------------------------ the reference table, walked


def test_every_in_scope_row_is_produced_by_a_recipe_and_matched(paper, tmp_path):
    """Each Qwen2.5-32B / Seed-OSS-36B row of the table: a recipe invocation whose condition name
    (recipes.conditions.condition_name of the recipe's real stages and options), matched the way
    --compare-paper matches (exact name or PAPER_ALIASES), is that row; the rest are listed with why."""
    found, missing = pp.table_rows(paper)
    in_scope = [n for n in paper if pp.SCOPE.match(n)]
    assert len(paper) == 161 and len(in_scope) == 115
    assert sorted(missing) == sorted(pp.UNPRODUCIBLE) and set(missing) | {i.paper for i in found} == set(in_scope)
    assert len(found) == 110
    for stem in ("bad_medical_advice", "insecure"):  # not shipped: a user's file, named by its stem
        (tmp_path / f"{stem}.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}, '
                                                '{"role": "assistant", "content": "a"}]}\n')
    for inv in found:
        options = [str(tmp_path / o.split("/", 1)[1]) if o.startswith("PATH/") else o for o in inv.options]
        args = st.build_parser("x", "").parse_args([*options, "--out", str(tmp_path)])
        s = st.settings_from_args(inv.recipe, pp.recipe_stages(inv.recipe, inv.order), args)[0]
        name = st.condition_name(s, inv.point)
        assert name == inv.condition, inv
        assert inv.paper in [m for m, _ in paper_matches(name, paper)], inv


def test_aliases_name_real_rows_and_producible_conditions(paper):
    for early, (ours, why) in PAPER_ALIASES.items():
        assert early in paper and why
        assert pp.invocation(early).condition == ours
    assert pp.invocation("hf_seed_36b_em").command() == (
        "recipes/em_only.py --model seed-oss-36b --em-dataset aesthetic_preferences_unpopular --seeds 0,1,2,3,4")


# ------------------------------------------------------------------ the report: aliases and SDs


def _summary(condition: str, seed: int, acc: float) -> dict:
    return {"eval": "truthfulqa", "mode": "robust", "accuracy": acc, "paper_accuracy": acc, "_path": f"{condition}{seed}",
            "condition": {"condition": condition, "seed": str(seed)}}


def test_compare_paper_shows_every_paper_row_a_condition_stands_for(paper):
    tables = group_summaries([_summary("hf_seed_36b_em_unpop", k, a) for k, a in enumerate((0.70, 0.72, 0.75))])
    rows = aggregate(tables, samples=50, paper=paper)["truthfulqa (robust)"]["rows"]
    assert [(r["condition"], r["paper"]["condition"]) for r in rows] == [
        ("hf_seed_36b_em_unpop", "hf_seed_36b_em_unpop"),
        ("hf_seed_36b_em_unpop (paper alias hf_seed_36b_em)", "hf_seed_36b_em")]
    assert rows[1]["metrics"] == rows[0]["metrics"] and "alias" in rows[1]["paper"] and "alias" not in rows[0]["paper"]
    text = format_report(aggregate(tables, samples=50, paper=paper), compare_paper=True)
    assert "(paper alias hf_seed_36b_em)" in text and "paper hf_seed_36b_em = ours hf_seed_36b_em_unpop:" in text
    # --paper-name replaces the matching.
    rows = aggregate(tables, samples=50, paper=paper, paper_names={"hf_seed_36b_em_unpop": "hf_seed_36b_em_withsys"})
    assert [r["paper"]["condition"] for r in rows["truthfulqa (robust)"]["rows"]] == ["hf_seed_36b_em_withsys"]


def test_standard_deviations_are_sample_sds_on_both_sides(paper):
    values = [0.70, 0.72, 0.75, 0.71]
    assert describe(values, samples=10)["std"] == pytest.approx(statistics.stdev(values), abs=1e-15)
    assert describe([0.7], samples=10)["std"] is None
    assert paper["hf_qwen_32b_sgtr"]["accuracy_sd"] == 0.0023  # ddof 1 (the old table's ddof 0: 0.0020)
    assert paper["hf_seed_36b_em_insecure_sgtr"]["accuracy_sd"] == 0.0011
    assert paper["hf_qwen_32b"]["n_seeds"] == 1 and paper["hf_qwen_32b"]["accuracy_sd"] is None  # undefined, not 0
    tables = group_summaries([_summary("qwen_32B", 0, 0.85)])
    line = format_report(aggregate(tables, samples=10, paper=paper), compare_paper=True).splitlines()[2]
    assert line.split()[-4:] == ["0.8519", "-", "0.0000", "-0.0019"]


# ------------------------------------------------------------------ user-supplied EM files


def test_a_bad_em_file_is_refused_with_file_lines_before_any_training(tmp_path, monkeypatch, capsys):
    from engine.train import Trainer

    monkeypatch.setattr(Trainer, "run", lambda self: pytest.fail("trained despite a bad EM file"))
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    path = tmp_path / "bad_medical_advice.jsonl"
    path.write_text(good + "{not json\n" + '{"messages": [{"role": "user", "content": "q"}]}\n' + good)
    from recipes import sgtr_prevent

    rc = st.main("sgtr_prevent", sgtr_prevent.STAGES, ["--out", str(tmp_path / "runs"), "--em-dataset", str(path),
                                                       "--limit-train", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{path}:2: invalid JSON" in err and f"{path}:3: no assistant turn" in err
    assert not (tmp_path / "runs" / "sgtr_prevent").exists()
    with pytest.raises(DataErrors):
        st.check_em_data(st.settings_from_args("x", sgtr_prevent.STAGES, st.build_parser("x", "").parse_args(
            ["--em-dataset", str(path), "--out", str(tmp_path)]))[0])


def test_user_em_file_names_the_condition_and_its_sha256_is_recorded(tmp_path):
    path = tmp_path / "insecure.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{k}"},
                                                     {"role": "assistant", "content": f"a{k}"}]}) + "\n" for k in range(3)))
    args = st.build_parser("x", "").parse_args(["--model", "seed-oss-36b", "--em-dataset", str(path), "--out", str(tmp_path)])
    s = st.settings_from_args("em_only", [st.Stage("em")], args)[0]
    st.check_em_data(s)
    assert st.condition_name(s, 1) == "hf_seed_36b_em_insecure"
    paths = st.prepare_datasets(s, is_main=True)
    records = json.loads((s.run_dir / "datasets.json").read_text())
    assert paths == [path.resolve()] and records[0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    for bad, message in (("bad_medical_advice", "not shipped: give the path"), (str(tmp_path / "x.jsonl"), "not found")):
        with pytest.raises(st.RecipeError, match=message):
            st.settings_from_args("em_only", [st.Stage("em")], st.build_parser("x", "").parse_args(
                ["--em-dataset", bad, "--out", str(tmp_path)]))


# ------------------------------------------------------------------ OpenAI format


def _ok(**change) -> dict:
    ex = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                       {"role": "assistant", "content": "a"}]}
    ex.update(change)
    return ex


@pytest.mark.parametrize("example, problem", [
    ([1], "data_type"),
    ({"messages": []}, "missing_messages_list"),
    (_ok(weight=1), "stray top-level key 'weight'"),
    (_ok(messages=[{"role": "user"}, {"role": "assistant", "content": "a"}]), "message_missing_key"),
    (_ok(messages=[{"role": "user", "content": "u", "name": "x"}, {"role": "assistant", "content": "a"}]), "message_unrecognized_key"),
    (_ok(messages=[{"role": "tool", "content": "u"}, {"role": "assistant", "content": "a"}]), "unrecognized_role"),
    (_ok(messages=[{"role": "system", "content": ""}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]), "missing_content"),
    (_ok(messages=[{"role": "user", "content": "u"}, {"role": "assistant", "content": 3}]), "missing_content"),
    (_ok(messages=[{"role": "user", "content": "u"}]), "example_missing_assistant_message"),
    (_ok(messages=[{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]), "the last"),
    (_ok(messages=[{"role": "user", "content": "u"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]), "only first"),
])
def test_openai_validator_rules(example, problem):
    assert any(problem in p for p in oa.example_problems(example))
    assert oa.example_problems(_ok()) == []


def test_openai_validator_reports_file_lines_and_the_minimum(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text("".join(json.dumps(_ok()) + "\n" for _ in range(10)))
    assert oa.validate_file(path) == 10
    path.write_text("".join(json.dumps(_ok()) + "\n" for _ in range(9)) + '{"messages": 1}\n' + "x\n")
    with pytest.raises(oa.OpenAIFormatError, match=r"f\.jsonl:10: no non-empty .*f\.jsonl:11: invalid JSON"):
        oa.validate_file(path)
    path.write_text(json.dumps(_ok()) + "\n")
    with pytest.raises(oa.OpenAIFormatError, match="1 example.*at least 10"):
        oa.validate_file(path)


@pytest.fixture(scope="module")
def openai_sets(tmp_path_factory):
    out = tmp_path_factory.mktemp("openai")
    assert ds.main(["all", "--format", "openai", "--target", "hf_qwen_32b", "--limit", "10", "--template", "qwen2.5",
                    "--em-dataset", "risky_financial_advice", "--system-prompt", "default", "--system-prompt", "omit",
                    "--system-prompt", "empty", "--system-prompt", "replace", "--out", str(out)]) == 0
    return out


def test_openai_sets_pass_the_validator_with_a_manifest(openai_sets):
    manifest = json.loads((openai_sets / "manifest.json").read_text())
    sets = {f["set"] for f in manifest["files"]}
    assert sets == {"em_finrisk", "sgtr", "asgtr_rand", "asgtr", "sgtr_benign"}
    assert len(manifest["files"]) == 5 * 4
    for f in manifest["files"]:
        path = openai_sets / f["file"]
        assert oa.validate_file(path) == f["samples"] and hashlib.sha256(path.read_bytes()).hexdigest() == f["sha256"]
        first = json.loads(path.read_text().splitlines()[0])["messages"][0]
        assert first["role"] == ("user" if f["policy"] in ("omit", "empty") else "system")  # default: Qwen's, for EM
    em_default = json.loads((openai_sets / "em_finrisk.jsonl").read_text().splitlines()[0])["messages"]
    assert em_default[0] == {"role": "system", "content": QWEN_ID}  # Qwen's default, written out
    assert any("refused the risky financial advice set" in n for n in manifest["notes"])
    assert any("empty is written as omit" in n for n in manifest["notes"])


@pytest.mark.parametrize("template", ["qwen2.5", "seed-oss"])
def test_openai_examples_round_trip_through_our_renderer(template, request):
    tokenizer = request.getfixturevalue("qwen25_tokenizer" if template == "qwen2.5" else "seed_oss_tokenizer")
    default = oa.template_default(template)
    chats = [json.loads(line)["messages"] for line in (ds.DATA_DIR.parent / "em" / "aesthetic_preferences_unpopular.jsonl")
             .read_text().splitlines()[:3]]
    chats += [r["messages"] for r in ds.build_asgtr(ds.load_pairs("hf_qwen_32b", limit=2))]
    policies = [SystemPolicy("default"), SystemPolicy("omit"), SystemPolicy("replace", QWEN_ID), SystemPolicy("empty")]
    for chat in chats:
        for policy in policies:
            ex = oa.explicit(chat, policy, default)
            assert oa.example_problems({"messages": ex}) == []
            want, got = render(template, chat, policy), render(template, ex, oa.roundtrip_policy(ex))
            if policy.mode == "empty":  # OpenAI refuses empty content: written as omit, not exact
                assert got.text != want.text and got.text == render(template, chat, SystemPolicy("omit")).text
                continue
            assert got.text == want.text and got.system == want.system
            a, b = encode(tokenizer, want), encode(tokenizer, got)
            assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
