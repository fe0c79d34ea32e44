"""The per-GPU memory estimate printed before training, and the refusal of a step that won't fit."""

from __future__ import annotations

import pytest
import torch

from engine.memory import WontFit, check_fits, estimate, eval_estimate
from engine.models import ModelArgs
from engine.models.presets import QWEN25_32B_CONFIG, SEED_OSS_36B_CONFIG


def test_estimate_scales_with_shards_and_checkpointing():
    args = ModelArgs.from_hf_config(QWEN25_32B_CONFIG)
    one = estimate(args, activation_checkpointing=True, world_size=1)
    eight = estimate(args, activation_checkpointing=True, world_size=8)
    assert 60 < one["weights (÷ ranks when sharded)"] < 62  # 32.76B bf16 parameters = 61.0 GiB
    assert eight["weights (÷ ranks when sharded)"] * 8 == pytest.approx(one["weights (÷ ranks when sharded)"])
    # r32 on the seven projections of 64 layers: 32 * (in + out) summed = 4,194,304 per layer,
    # 268,435,456 fp32 parameters = 1.0 GiB.
    assert one["adapters fp32 (new + stacked, ÷ ranks when sharded)"] == pytest.approx(268_435_456 * 4 / 2**30)
    no_ckpt = estimate(args, activation_checkpointing=False)
    act = [k for k in one if k.startswith("saved activations")][0]
    act_no = [k for k in no_ckpt if k.startswith("saved activations")][0]
    assert no_ckpt[act_no] > 10 * one[act]
    # Recomputing only some layers lands in between, monotonically.
    some = [estimate(args, activation_checkpointing=True, checkpointed_layers=k)["total"] for k in (0, 32, 64)]
    assert some[0] == pytest.approx(no_ckpt["total"]) and some[0] > some[1] > some[2]
    assert some[2] == pytest.approx(one["total"])
    assert one["total"] == pytest.approx(sum(v for k, v in one.items() if k != "total"))
    assert estimate(ModelArgs.from_hf_config(SEED_OSS_36B_CONFIG))["weights (÷ ranks when sharded)"] > one["weights (÷ ranks when sharded)"]


def test_refusal_names_the_figures():
    est = estimate(ModelArgs.from_hf_config(QWEN25_32B_CONFIG), world_size=1)
    with pytest.raises(WontFit, match=r"will not fit: about \d+\.\d GiB per GPU estimated, 40\.0 GiB given"):
        check_fits(est, torch.device("cpu"), available_gib=40.0)
    check_fits(est, torch.device("cpu"), available_gib=1000.0)  # fits
    check_fits(est, torch.device("cpu"))  # CPU without a given size: nothing to check


def test_planning_helpers():
    from engine.memory import fewest_checkpointed_layers, largest_micro_batch

    args = ModelArgs.from_hf_config(QWEN25_32B_CONFIG)
    # One 80 GiB GPU: the paper's 4096-token micro-batches need most layers recomputed; the
    # answer is the fewest for which the estimate fits, and one fewer does not.
    k = fewest_checkpointed_layers(args, 80.0, micro_batch_tokens=4096)
    assert 0 < k < 64
    fits = lambda n: estimate(args, activation_checkpointing=True, checkpointed_layers=n)["total"] <= 0.92 * 80
    assert fits(k) and not fits(k - 1)
    assert fewest_checkpointed_layers(args, 40.0) is None  # 61 GiB of weights alone
    assert fewest_checkpointed_layers(args, 80.0, world_size=8) == 0
    n = largest_micro_batch(args, 80.0, activation_checkpointing=True)
    assert n % 256 == 0 and n > 4096
    assert estimate(args, micro_batch_tokens=n, activation_checkpointing=True)["total"] <= 0.92 * 80
    assert estimate(args, micro_batch_tokens=n + 256, activation_checkpointing=True)["total"] > 0.92 * 80


def test_memory_cli(capsys):
    from engine.memory import main

    assert main(["--preset", "seed-oss-36b", "--gpus", "8", "--gpu-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "memory estimate per GPU, seed-oss-36b, 8 GPU(s)" in out and "largest micro-batch with" in out


def test_memory_cli_replicated(capsys):
    """Replicated ranks hold everything whole: the 8-GPU replicated estimate is the 1-GPU one."""
    from engine.memory import main

    assert main(["--gpus", "8", "--gpu-gib", "79.2", "--data-parallel", "replicate", "--micro-batch-tokens", "2048"]) == 0
    replicated = capsys.readouterr().out
    assert main(["--gpus", "1", "--gpu-gib", "79.2", "--micro-batch-tokens", "2048"]) == 0
    single = capsys.readouterr().out
    assert "8 GPU(s), replicated" in replicated
    totals = [[line for line in out.splitlines() if line.strip().startswith("total")] for out in (replicated, single)]
    assert totals[0] == totals[1] and "66.90 GiB" in totals[0][0]


def test_eval_estimate_shards_the_weights():
    args = ModelArgs.from_hf_config(SEED_OSS_36B_CONFIG)
    whole = eval_estimate(args, world_size=8, sharded=False, adapter_params=1 << 28)
    eight = eval_estimate(args, world_size=8, sharded=True, adapter_params=1 << 28)
    weights = "weights (÷ ranks when sharded)"
    assert 66 < whole[weights] < 68  # 36.15B bf16 parameters = 67.3 GiB: more than a 40 GB card holds
    assert eight[weights] * 8 == pytest.approx(whole[weights])
    assert whole["stacked adapters fp32 (÷ ranks when sharded)"] == pytest.approx(1.0)  # 2**28 fp32 elements
    gathered = "gathered during a pass (FSDP: LM head + 2 layers in flight)"
    assert whole[gathered] == 0 and 2 < eight[gathered] < 5  # the LM head (1.5 GiB) and two layers (2 x 1 GiB)
    kv = [k for k in whole if k.startswith("KV cache")][0]
    assert whole[kv] == pytest.approx(8 * 2048 * 64 * 2 * 8 * 128 * 2 / 2**30)  # 64 layers, 8 KV heads of 128, bf16
    for est in (whole, eight):
        assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"))
    assert eight["total"] < 0.92 * 40 < whole["total"]
