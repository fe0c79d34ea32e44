"""The step benchmark runs its real code path (tiny dimensions on CPU) and reports what it measured."""

from __future__ import annotations

import json

import torch

from engine.bench import build, main


def test_bench_reports_a_measurement(capsys):
    assert main(["--tiny", "--layers", "2", "--seq-len", "64", "--steps", "1", "--json", "--activation-checkpointing"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens_per_s"] > 0 and result["steps_per_s"] > 0
    assert result["samples"] * result["seq_len"] == 128 and result["activation_checkpointing"] is True


def test_bench_model_weights_are_random_and_adapted():
    model = build("qwen2.5-32b", 2, torch.float32, torch.device("cpu"), tiny=True, activation_checkpointing=False)
    q = model.model.layers[0].self_attn.q_proj
    assert 0.015 < q.weight.std().item() < 0.025  # N(0, 0.02), never zeros
    adapters = [p for n, p in model.named_parameters() if n.endswith((".A", ".B"))]
    assert len(adapters) == 2 * 7 * 2 and all(p.requires_grad and p.abs().sum() > 0 for p in adapters)


def test_workload_steps_use_the_real_lengths(capsys):
    import json as _json

    from engine.bench import DEFAULT_LENGTHS, workload_steps

    table = _json.loads(DEFAULT_LENGTHS.read_text())
    steps = workload_steps(DEFAULT_LENGTHS, "sgtr_xsum", 16, 2, vocab=512)
    assert len(steps) == 2 and all(len(batch) == 16 for batch in steps)
    pairs = {tuple(x) for x in table["sgtr_xsum"]}
    for s in steps[0]:
        assert (len(s.input_ids), s.num_trained) in pairs
        assert s.labels[-1] != -100 and s.num_trained == 2  # SGTR: the answer digit and <|im_end|>
    assert main(["--tiny", "--layers", "1", "--workload", "em_risky_financial", "--steps", "1", "--json"]) == 0
    assert _json.loads(capsys.readouterr().out)["samples"] == 16


def test_shipped_em_lengths_match_the_audit(qwen25_tokenizer):
    """data/workload_lengths.json is what the renderer and tokenizer give for the shipped EM data."""
    import json as _json
    from pathlib import Path

    from engine.bench import DEFAULT_LENGTHS
    from engine.data import load_samples

    em = _json.loads(DEFAULT_LENGTHS.read_text())["em_risky_financial"]
    path = Path(__file__).resolve().parents[1] / "data" / "em" / "risky_financial_advice.jsonl"
    samples = load_samples(path, qwen25_tokenizer, "qwen2.5", limit=50).samples
    assert em[:50] == [[len(s.input_ids), s.num_targets] for s in samples]
