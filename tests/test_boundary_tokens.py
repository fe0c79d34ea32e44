"""A reply starting with a newline: BPE merges it with the assistant header's newline, and that
token straddles the start of the trained span. Axolotl trains it, so by default we do too
(`boundary_tokens = train`); `mask` keeps it out; the audit counts it either way."""

from __future__ import annotations

import json

import pytest

from engine.audit import main as audit_main
from engine.chat import IGNORE_INDEX, encode, render
from engine.data import load_samples
from engine.errors import ConfigError

CHAT = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\nYes"}]
PLAIN = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Yes"}]


def trained_ids(enc) -> list[int]:
    return [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]


def test_straddling_token_is_trained_by_default_and_masked_on_request(qwen25_tokenizer):
    trained, masked = (encode(qwen25_tokenizer, render("qwen2.5", CHAT), boundary=b) for b in ("train", "mask"))
    assert trained.input_ids == masked.input_ids
    assert (trained.boundary_trained, trained.boundary_tokens) == (1, 0)
    assert (masked.boundary_trained, masked.boundary_tokens) == (0, 1)
    first = trained_ids(trained)[0]
    assert qwen25_tokenizer.decode([first]) == "\n\n"  # the header's newline and the reply's
    assert trained_ids(trained)[1:] == trained_ids(masked)
    assert qwen25_tokenizer.decode(trained_ids(masked)) == "Yes<|im_end|>"
    plain = encode(qwen25_tokenizer, render("qwen2.5", PLAIN))  # nothing straddles: both policies agree
    assert (plain.boundary_trained, plain.boundary_tokens) == (0, 0)
    assert plain.labels == encode(qwen25_tokenizer, render("qwen2.5", PLAIN), boundary="mask").labels
    with pytest.raises(ConfigError, match="boundary tokens must be one of"):
        encode(qwen25_tokenizer, render("qwen2.5", PLAIN), boundary="drop")


def test_audit_counts_and_flags_them(capsys, tmp_path, qwen25_tokenizer_path, qwen25_tokenizer):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (CHAT, PLAIN, CHAT)))
    base = ["--tokenizer", str(qwen25_tokenizer_path), "--template", "qwen2.5", "--data", str(data)]
    summaries, rows = {}, {}
    for policy in ("train", "mask"):
        flag = [] if policy == "train" else ["--boundary-tokens", "mask"]
        assert audit_main(base + ["--format", "jsonl"] + flag) == 0
        captured = capsys.readouterr()
        rows[policy] = [json.loads(line) for line in captured.out.splitlines()]
        summaries[policy] = captured.err
    assert "boundary tokens masked 0, trained 2\n" in summaries["train"]
    assert "boundary tokens masked 2\n" in summaries["mask"]
    assert rows["train"][1] == rows["mask"][1] and rows["train"][0]["labels"] != rows["mask"][0]["labels"]
    assert sum(label != -100 for label in rows["train"][0]["labels"]) == \
        sum(label != -100 for label in rows["mask"][0]["labels"]) + 1
    ds = load_samples(data, qwen25_tokenizer, "qwen2.5")
    assert (ds.stats.boundary_trained, ds.stats.boundary_tokens) == (2, 0)
    with pytest.raises(ConfigError, match="boundary_tokens must be one of train, mask"):
        load_samples(data, qwen25_tokenizer, "qwen2.5", boundary_tokens="drop")
    assert audit_main(["--run", str(tmp_path), "--boundary-tokens", "mask"]) == 2  # a run audits with its own
    assert "--run reads the run's own data and settings" in capsys.readouterr().err
