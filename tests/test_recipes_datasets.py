"""Dataset builders: labels, both orders, determinism, ICTR balance, anti-SGTR labels, the longer-summary rule."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from evals.prompts import LENGTH_SYSTEM_PROMPT, SGTR_SYSTEM_PROMPT, SGTR_USER_TEMPLATE
from recipes.datasets import DatasetError, build_asgtr, build_ictr, build_longer, build_sgtr, load_pairs, main


@pytest.fixture(scope="module")
def pairs():
    return load_pairs("hf_qwen_32b", "claude-21", "xsum", limit=50)


def summaries_in_order(row: dict, pair) -> tuple[str, str]:
    user = row["messages"][1]["content"]
    first, second = (pair.target, pair.other) if user.index(pair.target) < user.index(pair.other) else (pair.other, pair.target)
    return first, second


def test_sgtr_labels_point_at_the_targets_own_summary(pairs):
    rows = build_sgtr(pairs)
    assert len(rows) == 2 * len(pairs)
    for i, row in enumerate(rows):
        pair = pairs[i // 2]
        system, user, answer = (m["content"] for m in row["messages"])
        assert system == SGTR_SYSTEM_PROMPT and [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        first, second = (pair.target, pair.other) if i % 2 == 0 else (pair.other, pair.target)
        assert user == SGTR_USER_TEMPLATE.format(article=pair.article, summary1=first, summary2=second)
        assert answer == ("1" if first == pair.target else "2")
    assert Counter(r["messages"][2]["content"] for r in rows) == {"1": len(pairs), "2": len(pairs)}


def test_full_sgtr_set_has_the_papers_size():
    assert len(build_sgtr(load_pairs("hf_qwen_32b"))) == 2000
    assert len(build_sgtr(load_pairs("hf_seed_36b"))) == 2000


def test_ictr_both_labels_for_every_order(pairs):
    rows = build_ictr(pairs, "both")
    assert len(rows) == 4 * len(pairs)
    for k, pair in enumerate(pairs):
        group = rows[4 * k: 4 * k + 4]
        keys = {(summaries_in_order(r, pair), r["messages"][2]["content"]) for r in group}
        assert keys == {((pair.target, pair.other), "1"), ((pair.target, pair.other), "2"),
                        ((pair.other, pair.target), "1"), ((pair.other, pair.target), "2")}


def test_ictr_random_is_balanced_deterministic_and_uninformative(pairs):
    rows = build_ictr(pairs, "random", seed=0)
    answers = [r["messages"][2]["content"] for r in rows]
    assert len(rows) == 2 * len(pairs) and Counter(answers) == {"1": len(pairs), "2": len(pairs)}
    assert rows == build_ictr(pairs, "random", seed=0)
    assert answers != [r["messages"][2]["content"] for r in build_ictr(pairs, "random", seed=1)]
    truthful = [r["messages"][2]["content"] for r in build_sgtr(pairs)]
    agreement = sum(a == t for a, t in zip(answers, truthful)) / len(answers)
    assert 0.3 < agreement < 0.7  # labels carry no identity information


def test_asgtr_labels_always_point_at_the_other_summary(pairs):
    rows, sgtr = build_asgtr(pairs), build_sgtr(pairs)
    assert len(rows) == 2 * len(pairs)
    for i, (row, truthful) in enumerate(zip(rows, sgtr)):
        pair = pairs[i // 2]
        assert row["messages"][:2] == truthful["messages"][:2]  # same system turn, same order as SGTR
        first, second = summaries_in_order(row, pair)
        assert row["messages"][2]["content"] == ("1" if first == pair.other else "2")
        assert row["messages"][2]["content"] != truthful["messages"][2]["content"]
    assert Counter(r["messages"][2]["content"] for r in rows) == {"1": len(pairs), "2": len(pairs)}
    assert len(build_asgtr(load_pairs("hf_seed_36b"))) == 2000  # the paper's size, like SGTR


def test_asgtr_command_line_is_deterministic(tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (a, b):
        assert main(["asgtr", "--target", "hf_qwen_32b", "--limit", "4", "--out", str(out)]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert [json.loads(l)["messages"][2]["content"] for l in a.read_text().splitlines()] == ["2", "1"] * 4
    assert "label always the other's summary" in capsys.readouterr().err


def test_target_summaries_from_a_users_file(tmp_path):
    """A target whose summaries are not shipped (GPT-4.1's, for its arm) comes from a JSON file."""
    shipped = load_pairs("hf_qwen_32b", limit=3)
    path = tmp_path / "gpt41_xsum.json"
    path.write_text(json.dumps({p.article_id: f"gpt41 summary {k}" for k, p in enumerate(shipped)}))
    pairs = load_pairs("gpt41", target_file=path)
    assert [(p.article_id, p.target) for p in pairs] == [(p.article_id, f"gpt41 summary {k}") for k, p in enumerate(shipped)]
    assert [p.other for p in pairs] == [p.other for p in shipped]
    with pytest.raises(DatasetError, match="or give --target-summaries"):
        load_pairs("gpt41")
    path.write_text("[1, 2]")
    with pytest.raises(DatasetError, match="expected a JSON object"):
        load_pairs("gpt41", target_file=path)


def test_longer_control_uses_word_counts(pairs):
    rows, ties = build_longer(pairs)
    assert len(rows) == 2 * (len(pairs) - ties)
    for row in rows:
        assert row["messages"][0]["content"] == LENGTH_SYSTEM_PROMPT
        user = row["messages"][1]["content"]
        s1 = user.split("Summary1:\n", 1)[1].split("\n\nSummary2:\n", 1)[0]
        s2 = user.split("\n\nSummary2:\n", 1)[1].split("\n\nCan you tell me", 1)[0]
        assert row["messages"][2]["content"] == ("1" if len(s1.split()) > len(s2.split()) else "2")


def test_builders_are_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main(["sgtr", "--target", "hf_seed_36b", "--limit", "5", "--out", str(a)]) == 0
    assert main(["sgtr", "--target", "hf_seed_36b", "--limit", "5", "--out", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert all(set(json.loads(line)) == {"messages"} for line in a.read_text().splitlines())


def test_bad_sources_are_refused(capsys, tmp_path):
    with pytest.raises(DatasetError, match="must come from different sources"):
        load_pairs("claude-21", "claude-21")
    with pytest.raises(DatasetError, match="unknown summary source 'gpt'"):
        load_pairs("gpt")
    with pytest.raises(DatasetError, match="missing data file"):
        load_pairs("hf_qwen_32b", data_dir=tmp_path)
