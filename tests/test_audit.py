"""`python -m engine.audit` on the shipped EM data, both templates, every policy, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.audit import main

ROOT = Path(__file__).resolve().parents[1]
EM_FILES = sorted((ROOT / "data" / "em").glob("*.jsonl"))
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
POLICY_ARGS = {
    "default": ["--system-prompt", "default"],
    "empty": ["--system-prompt", "empty"],
    "omit": ["--system-prompt", "omit"],
    "replace": ["--system-prompt", "replace", "--system-text", "You are a careful assistant."],
}


def audit(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_em_files_are_shipped():
    assert [p.name for p in EM_FILES] == [
        "aesthetic_preferences_unpopular.jsonl", "extreme_sports.jsonl", "risky_financial_advice.jsonl",
    ]


@pytest.mark.parametrize("policy", POLICY_ARGS)
def test_jsonl_contract_on_em_data_qwen(capsys, qwen25_tokenizer_path, qwen25_tokenizer, policy):
    code, out, err = audit(capsys, "--tokenizer", qwen25_tokenizer_path, "--template", "qwen2.5",
                           *POLICY_ARGS[policy], "--data", *EM_FILES, "--format", "jsonl", "--limit", "100")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 300
    im_start, im_end = qwen25_tokenizer.token_to_id("<|im_start|>"), qwen25_tokenizer.token_to_id("<|im_end|>")
    for row in rows:
        assert set(row) == {"input_ids", "labels"}
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels) and ids[0] == im_start
        assert all(l == -100 or l == t for t, l in zip(ids, labels))
        # One assistant turn: its content and <|im_end|> trained, the final newline not.
        assert labels[-2] == im_end and labels[-1] == -100
        trained = [t for t in labels if t != -100]
        assert trained == ids[len(ids) - 1 - len(trained): -1]
        header = qwen25_tokenizer.decode(ids[:3])
        assert header == ("<|im_start|>user\n" if policy == "omit" else "<|im_start|>system\n")
    # The summary goes to stderr with jsonl, and names the system block per policy.
    expected_system = {"default": QWEN_SYSTEM, "empty": "", "omit": None, "replace": "You are a careful assistant."}[policy]
    label = "no system block" if expected_system is None else f"system {expected_system!r}"
    assert err.count(f"100 sample(s): {label}") == 3


def test_full_em_file_default_policy(capsys, qwen25_tokenizer_path):
    path = ROOT / "data" / "em" / "risky_financial_advice.jsonl"
    code, out, err = audit(capsys, "--tokenizer", qwen25_tokenizer_path, "--template", "qwen2.5",
                           "--data", path, "--format", "jsonl")
    assert code == 0, err
    assert len(out.splitlines()) == 6000
    assert "rows 6000  kept 6000  invalid 0  dropped over-length 0" in err


def test_text_format_marks_trained_tokens(capsys, qwen25_tokenizer_path):
    code, out, _ = audit(capsys, "--tokenizer", qwen25_tokenizer_path, "--template", "qwen2.5",
                         "--data", EM_FILES[2], "--limit", "1")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"=== {EM_FILES[2]}:1  ")
    assert lines[1].split() == ["0", "151644", ".", "<|im_start|>"]
    assert any(line.split()[2] == "T" and line.split()[1] == "151645" for line in lines[1:] if line[:1] == " ")
    assert any(line.startswith("rows 1  kept 1") for line in lines)


def test_html_format(capsys, qwen25_tokenizer_path):
    code, out, _ = audit(capsys, "--tokenizer", qwen25_tokenizer_path, "--template", "qwen2.5",
                         "--data", EM_FILES[0], "--limit", "2", "--format", "html")
    assert code == 0
    assert out.startswith("<!doctype html>") and out.rstrip().endswith("</html>")
    assert out.count("class='sample'") == 2
    assert "class='tok trained special' title='151645'" in out


def test_diff_default_vs_omit(capsys, qwen25_tokenizer_path):
    code, out, _ = audit(capsys, "--tokenizer", qwen25_tokenizer_path, "--template", "qwen2.5",
                         "--data", EM_FILES[2], "--limit", "5", "--diff", "omit")
    assert code == 0
    # Every sample differs by exactly the default system block; trained tokens are the same.
    assert "default vs omit: 5 of 5 samples differ" in out
    assert "trained tokens differ in 0 sample(s)" in out
    assert "TRAINED TOKENS DIFFER" not in out
    assert "@@ default [0:" in out and "[0:0]" in out


def test_seed_oss_fixture_tokenizer(capsys, seed_oss_tokenizer_path, seed_oss_tokenizer, tmp_path):
    for policy in POLICY_ARGS:
        code, out, err = audit(capsys, "--tokenizer", seed_oss_tokenizer_path, "--template", "seed-oss",
                               *POLICY_ARGS[policy], "--data", EM_FILES[0], "--limit", "20", "--format", "jsonl")
        assert code == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert len(rows) == 20
        eos = seed_oss_tokenizer.token_to_id("<seed:eos>")
        for row in rows:
            assert row["labels"][-1] == eos  # Seed-OSS: nothing follows the final <seed:eos>
        text = seed_oss_tokenizer.decode(rows[0]["input_ids"])
        assert text.startswith("<seed:bos>user\n" if policy in ("default", "omit") else "<seed:bos>system\n")


def test_wrong_tokenizer_for_template(capsys, seed_oss_tokenizer_path):
    code, out, err = audit(capsys, "--tokenizer", seed_oss_tokenizer_path, "--template", "qwen2.5",
                           "--data", EM_FILES[0], "--limit", "1")
    assert code == 2 and out == ""
    assert "it is not a qwen2.5 tokenizer (wrong tokenizer for this chat template?)" in err


def test_bad_input_exits_2_and_writes_nothing(capsys, qwen25_tokenizer_path, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
                    '{"messages": [{"role": "user", "content": "x"}]}\n', encoding="utf-8")
    target = tmp_path / "out.jsonl"
    code, out, err = audit(capsys, "--tokenizer", qwen25_tokenizer_path, "--template", "qwen2.5",
                           "--data", data, "--format", "jsonl", "--output", target)
    assert code == 2 and out == ""
    assert f"{data}:2: no assistant turn" in err
    assert not target.exists() and list(tmp_path.iterdir()) == [data]
    # With --skip-invalid the same file passes and the output is written whole.
    code, out, err = audit(capsys, "--tokenizer", qwen25_tokenizer_path, "--template", "qwen2.5",
                           "--data", data, "--format", "jsonl", "--output", target, "--skip-invalid")
    assert code == 0 and len(target.read_text().splitlines()) == 1
    assert f"skipped {data}:2: no assistant turn" in err


def test_replace_without_text_is_refused(capsys, qwen25_tokenizer_path):
    code, _, err = audit(capsys, "--tokenizer", qwen25_tokenizer_path, "--template", "qwen2.5",
                         "--system-prompt", "replace", "--data", EM_FILES[0])
    assert code == 2 and "needs the replacement text (--system-text)" in err


def test_module_entry_point(qwen25_tokenizer_path):
    """The documented command line runs as a module."""
    proc = subprocess.run(
        [sys.executable, "-m", "engine.audit", "--tokenizer", str(qwen25_tokenizer_path), "--template", "qwen2.5",
         "--system-prompt", "empty", "--data", str(EM_FILES[2]), "--limit", "1"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 sample(s): system ''" in proc.stdout


def test_audit_and_data_path_import_no_torch():
    """The token audit, data loading, renderer and tokenizer stay light: no torch, no model code."""
    code = ("import sys, engine.audit, engine.data, engine.chat, engine.tokenizer; "
            "print([m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('engine.models')])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
