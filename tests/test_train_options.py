"""The trainer's Axolotl-compatibility options: loss_normalization and optimizer = adamw_8bit.

micro_batch_mean must be the mean over the step's micro-batches (consecutive pairs of samples) of
each one's mean token loss, whatever the packing and the ranks; a run with the 8-bit optimizer
must resume exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from engine import lora, parallel
from engine.assemble import build_model, read_model_args
from engine.config import TrainConfig
from engine.data import Sample, load_samples
from engine.errors import ConfigError
from engine.tokenizer import Tokenizer
from engine.train import accumulate_gradients, main, sample_loss_weights
from tests.tiny import em_subset, tiny_seed_oss_checkpoint, write_toml


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_options")
    return root, tiny_seed_oss_checkpoint(root / "model"), em_subset(root / "em.jsonl", 9)


def sample(targets: int) -> Sample:
    return Sample([1] * (targets + 2), [-100, -100] + [5] * targets, "x", None)


def test_sample_loss_weights_follow_the_step_order():
    step = [sample(n) for n in (3, 1, 4, 4, 2)]  # pairs (3, 1), (4, 4), (2): 4, 8, 2 trained tokens
    assert sample_loss_weights(step, "step_tokens") == [1 / 14] * 5
    assert sample_loss_weights(step, "step_tokens_div_accum") == [1 / 14 / 3] * 5
    assert sample_loss_weights(step, "micro_batch_mean") == [1 / 4 / 3] * 2 + [1 / 8 / 3] * 2 + [1 / 2 / 3]
    assert sample_loss_weights(step, "micro_batch_mean", 3) == [1 / 8 / 2] * 3 + [1 / 6 / 2] * 2
    assert sample_loss_weights(step[::-1], "micro_batch_mean")[0] == 1 / 6 / 3  # pairs follow the order
    assert sample_loss_weights([sample(0), sample(0), sample(2)], "micro_batch_mean") == [0.0, 0.0, 1 / 2 / 2]


def axolotl_gradients(model, samples: list[Sample], pair: int = 2) -> dict[str, torch.Tensor]:
    """The reference: each micro-batch of `pair` consecutive samples through the model unpacked, its
    mean token cross-entropy, averaged over the micro-batches."""
    model.zero_grad(set_to_none=True)
    groups = [samples[i:i + pair] for i in range(0, len(samples), pair)]
    total = 0.0
    for group in groups:
        losses = [F.cross_entropy(model(torch.tensor([s.input_ids]))[0], torch.tensor(s.targets), reduction="sum",
                                  ignore_index=-100) for s in group]
        total = total + sum(losses) / sum(s.num_targets for s in group) / len(groups)
    total.backward()
    return {n: p.grad.clone() for n, p in lora.named_trainable_lora_parameters(model)}


def trainer_gradients(model, samples, budget: int, world: int, normalization: str) -> dict[str, torch.Tensor]:
    """The trainer's accumulation with `world` ranks run one after the other in this process."""
    model.zero_grad(set_to_none=True)
    for rank in range(world):
        dist = parallel.Dist(rank, world, rank, torch.device("cpu"))
        accumulate_gradients(model, samples, dist, budget, normalization)
    return {n: p.grad.clone() for n, p in lora.named_trainable_lora_parameters(model)}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_micro_batch_mean_is_axolotls_mean_of_micro_batch_means_however_packed(setup):
    root, ckpt, data = setup
    ckpt_dir, args = read_model_args(ckpt)
    model = build_model(args, dtype=torch.float32, device="cpu", weights=ckpt_dir,
                        new_adapter=lora.LoraConfig(r=4, alpha=8.0), seed=0)
    with torch.no_grad():  # B is zero at init: make every adapter's gradient matter
        for _, p in lora.named_trainable_lora_parameters(model):
            p.normal_(0, 0.1)
    samples = load_samples(data, Tokenizer.from_file(ckpt), "seed-oss").samples[:7]  # 3 pairs and a single
    want = axolotl_gradients(model, samples)
    assert max(g.abs().max().item() for g in want.values()) > 1e-3
    for budget, world in [(10_000, 1), (300, 2), (1, 3)]:  # one row; 2 ranks; a row per sample on 3 ranks
        got = trainer_gradients(model, samples, budget, world, "micro_batch_mean")
        assert max_diff(got, want) <= 1e-6, (budget, world)
    step_tokens = trainer_gradients(model, samples, 10_000, 1, "step_tokens")
    assert max_diff(step_tokens, want) > 1e-4  # the normalizations differ here


# ---------------------------------------------------------------- whole runs


def settings(setup, out: str, **extra) -> dict:
    root, ckpt, data = setup
    # r = 136: lora A (136 x 32) and most B have >= 4096 elements (8-bit state), k/v's B (16 x 136) not.
    return dict(model=str(ckpt), data=[str(data)], template="seed-oss", out_dir=str(root / out), dtype="float32",
                batch_size=5, epochs=1, lr=1e-2, warmup_steps=1, lora_r=136, lora_alpha=8.0, micro_batch_tokens=300,
                seed=3, optimizer="adamw_8bit", loss_normalization="micro_batch_mean") | extra


def run(setup, out: str, **extra) -> Path:
    config = write_toml(setup[0] / f"{out}.toml", settings(setup, out, **extra))
    assert main(["--config", str(config)]) == 0
    return setup[0] / out


def test_8bit_micro_batch_mean_run_resumes_exactly(setup):
    """9 chats in steps of 5 and 4 (pairs 2, 2, 1 and 2, 2): interrupted after step 1 (its
    checkpoint holding 8-bit codes), resumed, the run ends bit for bit where the uninterrupted one
    does."""
    full = run(setup, "full")
    part = run(setup, "part", max_steps=1)
    state = torch.load(part / "checkpoints" / "step_000001" / "optimizer.pt", weights_only=False)["optimizer"]["state"]
    dtypes = {v["state1"].dtype for v in state.values()}
    assert dtypes == {torch.uint8, torch.float32} and all(v["step"] == 1 for v in state.values())
    run(setup, "part", resume=True)
    metrics = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (full, part)]
    assert [m["loss"] for m in metrics[0]] == [m["loss"] for m in metrics[1]] and len(metrics[0]) == 2
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (full, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_recorded_before_these_settings_resumes_with_what_it_ran_with(setup, tmp_path):
    from engine.errors import RunDirError
    from engine.rundir import RunDir

    cfg = TrainConfig(**settings(setup, "old", out_dir=str(tmp_path / "old"), resume=True))
    run_dir = RunDir(cfg.out_dir)
    run_dir.write_config(cfg, 1)
    record = json.loads(run_dir.config_path.read_text())
    for key in ("optimizer", "loss_normalization", "loss_micro_batch_size", "boundary_tokens"):
        del record[key]
    run_dir.config_path.write_text(json.dumps(record))
    with pytest.raises(RunDirError, match="boundary_tokens: 'mask' -> 'train'.*loss_normalization: 'step_tokens' -> "
                                          "'micro_batch_mean'.*optimizer: 'adamw' -> 'adamw_8bit'"):
        run_dir.check_start(cfg, 1)
    old = TrainConfig(**settings(setup, "old", out_dir=str(tmp_path / "old"), resume=True, optimizer="adamw",
                                 loss_normalization="step_tokens", boundary_tokens="mask"))
    assert run_dir.check_start(old, 1) and run_dir.read_config().boundary_tokens == "mask"


def test_bad_settings_are_refused(setup):
    for key, value, message in [("optimizer", "adam8", "optimizer must be one of adamw, adamw_8bit, got 'adam8'"),
                                ("loss_normalization", "mean", "loss_normalization must be one of step_tokens, "
                                                               "micro_batch_mean, step_tokens_div_accum, got 'mean'"),
                                ("loss_micro_batch_size", 0, "loss_micro_batch_size must be >= 1"),
                                ("boundary_tokens", "drop", "boundary_tokens must be one of train, mask, got 'drop'")]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**settings(setup, "bad", **{key: value}))
