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
