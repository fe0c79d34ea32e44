"""JSONL loading: every bad-input case is refused with file:line and its reason."""

from __future__ import annotations

import json

import pytest

from engine.chat import SystemPolicy
from engine.data import DataError, DataErrors, load_samples

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


BAD_ROWS = [
    ('{"messages": [', "invalid JSON"),
    ('{"conversation": []}', "no messages"),
    ('{"messages": []}', "no messages"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}', "content must be a string, got int"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "tool_calls": []}]}', "tool calls"),
    # Bugs: each of these ended in a traceback (RecursionError, ValueError, TypeError in the tokenizer).
    ('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", "invalid JSON: nested too deeply"),
    ('{"messages": [], "n": 1' + "0" * 5000 + "}", "invalid JSON: Exceeds the limit"),
    ('{"messages": [{"role": "user", "content": "a\\ud800b"}, {"role": "assistant", "content": "y"}]}',
     "message 0 (user): content holds a lone surrogate '\\ud800' at character 1"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}',
     "message 1 (assistant): blank content"),
]


@pytest.mark.parametrize("row, reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_bad_row_fails_with_file_line_and_reason(tmp_path, qwen25_tokenizer, row, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD), row, json.dumps(GOOD)])
    with pytest.raises(DataErrors) as err:
        load_samples(path, qwen25_tokenizer, "qwen2.5")
    assert f"{path}:2: " in str(err.value)
    assert reason in str(err.value)
    assert "--skip-invalid" in str(err.value)


def test_all_bad_rows_are_reported_together(tmp_path, qwen25_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [row for row, _ in BAD_ROWS])
    with pytest.raises(DataErrors) as err:
        load_samples(path, qwen25_tokenizer, "qwen2.5")
    assert [e.line for e in err.value.errors] == list(range(1, len(BAD_ROWS) + 1))


def test_skip_invalid_drops_and_counts(tmp_path, qwen25_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD), BAD_ROWS[0][0], "", json.dumps(GOOD), BAD_ROWS[3][0]])
    ds = load_samples(path, qwen25_tokenizer, "qwen2.5", skip_invalid=True)
    assert ds.stats.rows == 4 and ds.stats.invalid == 2 and ds.stats.kept == 2
    assert [s.source for s in ds.samples] == [f"{path}:1", f"{path}:4"]
    assert [e.line for e in ds.skipped] == [2, 5]


def test_empty_file(tmp_path, qwen25_tokenizer):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=r"empty\.jsonl: empty file: no rows"):
        load_samples(path, qwen25_tokenizer, "qwen2.5")


def test_missing_file(tmp_path, qwen25_tokenizer):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_samples(tmp_path / "nope.jsonl", qwen25_tokenizer, "qwen2.5")


def test_a_directory_is_not_a_file(tmp_path, qwen25_tokenizer):
    """Bug: a directory given as data was reported as "no such file"."""
    write_jsonl(tmp_path / "a.jsonl", [json.dumps(GOOD)])
    with pytest.raises(DataError, match=r"is a directory, not a JSONL file: pass the file\(s\) themselves \(it holds a\.jsonl\)"):
        load_samples(tmp_path, qwen25_tokenizer, "qwen2.5")


def test_invalid_utf8(tmp_path, qwen25_tokenizer):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataErrors, match=r"bin\.jsonl:2: not valid UTF-8"):
        load_samples(path, qwen25_tokenizer, "qwen2.5")


@pytest.mark.parametrize("template", ["qwen2.5", "seed-oss"])
def test_blank_assistant_turns_are_refused_under_both_templates(tmp_path, qwen25_tokenizer, seed_oss_tokenizer, template):
    """Seed-OSS renders a blank assistant turn as a bare header (nothing to train); Qwen2.5 would
    train only `<|im_end|>` right after the header, an empty answer (bug: such rows were kept).
    Both refuse the row, also when another assistant turn has content."""
    tokenizer = {"qwen2.5": qwen25_tokenizer, "seed-oss": seed_oss_tokenizer}[template]
    user = {"role": "user", "content": "x"}
    rows = [
        {"messages": [user, {"role": "assistant", "content": ""}]},
        {"messages": [user, {"role": "assistant", "content": " \n\t"}]},
        {"messages": [user, {"role": "assistant", "content": "\n"}, user, {"role": "assistant", "content": "y"}]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD)] + [json.dumps(r) for r in rows])
    with pytest.raises(DataErrors) as err:
        load_samples(path, tokenizer, template)
    assert [(e.line, e.reason.split(":")[0]) for e in err.value.errors] == [
        (2, "message 1 (assistant)"), (3, "message 1 (assistant)"), (4, "message 1 (assistant)")]
    assert all("blank content" in e.reason for e in err.value.errors)
    assert load_samples(path, tokenizer, template, skip_invalid=True).stats.kept == 1
    if template == "seed-oss":  # a turn with reasoning but no answer is not blank: its thinking is trained
        thinking = {"messages": [user, {"role": "assistant", "content": "", "reasoning_content": "hm"}]}
        write_jsonl(path, [json.dumps(thinking)])
        assert load_samples(path, tokenizer, template).samples[0].num_trained > 0


def test_a_row_certainly_over_length_is_dropped_without_tokenising(tmp_path, qwen25_tokenizer, monkeypatch):
    """Bug: a 5 MB row was tokenised (a minute, a GB) before being dropped as over-length. A row
    whose UTF-8 length proves it longer than max_len tokens is now dropped untokenised; a row
    that only might be is tokenised and judged by its exact count."""
    tok = qwen25_tokenizer
    huge = {"messages": [{"role": "user", "content": "word " * 120_000}, {"role": "assistant", "content": "y"}]}
    spaces = {"messages": [{"role": "user", "content": " " * 20_000}, {"role": "assistant", "content": "y"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD), json.dumps(huge), json.dumps(spaces)])
    n_spaces = len(tok.encode(spaces["messages"][0]["content"]))  # ~160 tokens of 128 spaces each
    seen = []
    encode = tok.encode_batch_with_offsets
    monkeypatch.setattr(tok, "encode_batch_with_offsets", lambda texts: seen.extend(map(len, texts)) or encode(texts))
    ds = load_samples(path, tok, "qwen2.5", max_len=1000)
    assert ds.stats.dropped_overlong == 1 and ds.stats.kept == 2 and max(seen) < 30_000  # the huge row: not tokenised
    assert tok.fewest_tokens(600_000) > 1000 >= n_spaces + 40  # 20,000 bytes, but few enough tokens to keep
    seen.clear()
    cut = load_samples(path, tok, "qwen2.5", max_len=1000, overlong="truncate")
    assert cut.stats.dropped_untrained_after_truncation == 1 and max(seen) > 600_000  # truncating needs the tokens
    for text in [" " * 5000, "\u1100\u1161\u11a8" * 500, "\u1fbe\u0308\u0341" * 500, "😀" * 500, "-" * 9000,
                 "<|im_end|>" * 300, "e\u0301" * 900]:  # the bound is a lower bound, also where NFC shrinks most
        assert len(tok.encode(text)) >= tok.fewest_tokens(len(text.encode())) > 1, repr(text[:6])


def test_overlong_samples_are_dropped_and_counted_or_truncated(tmp_path, qwen25_tokenizer):
    long = {"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "yes " * 50}]}
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD), json.dumps(long)])
    short_len = len(load_samples(path, qwen25_tokenizer, "qwen2.5", limit=1).samples[0].input_ids)
    max_len = short_len + 60  # the long row is ~130 tokens; its assistant part starts after ~70

    dropped = load_samples(path, qwen25_tokenizer, "qwen2.5", max_len=max_len)
    assert dropped.stats.kept == 1 and dropped.stats.dropped_overlong == 1 and dropped.stats.truncated == 0

    cut = load_samples(path, qwen25_tokenizer, "qwen2.5", max_len=max_len, overlong="truncate")
    assert cut.stats.kept == 2 and cut.stats.truncated == 1 and cut.stats.dropped_overlong == 0
    sample = cut.samples[1]
    assert sample.truncated and len(sample.input_ids) == max_len and len(sample.labels) == max_len
    assert 0 < sample.num_trained < 51

    # Truncated before the assistant turn starts: nothing left to train, so it is dropped and counted.
    tiny = load_samples(path, qwen25_tokenizer, "qwen2.5", max_len=20, overlong="truncate")
    assert tiny.stats.dropped_untrained_after_truncation >= 1
    assert all(s.num_trained > 0 for s in tiny.samples)


def test_system_text_is_recorded_per_policy(tmp_path, qwen25_tokenizer):
    with_sys = {"messages": [{"role": "system", "content": "S"}] + GOOD["messages"]}
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD), json.dumps(with_sys)])
    qwen_default = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    expect = {
        SystemPolicy("default"): {qwen_default: 1, "S": 1},
        SystemPolicy("empty"): {"": 2},
        SystemPolicy("omit"): {None: 2},
        SystemPolicy("replace", "R"): {"R": 2},
    }
    for policy, texts in expect.items():
        assert dict(load_samples(path, qwen25_tokenizer, "qwen2.5", policy).stats.system_texts) == texts
