"""The trainer: split-independent gradients, packing, 1 vs 2 ranks, exact resume, run records, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import lora, parallel, peft_format
from engine.data import load_samples
from engine.tokenizer import Tokenizer
from engine.assemble import build_model, read_model_args
from engine.config import TrainConfig
from engine.chat import check_tokenizer
from engine.errors import ConfigError, TokenizerError
from engine.rundir import sample_hash
from engine.train import accumulate_gradients, lr_lambda, main, rank_micro_batches, step_plan
from tests.tiny import em_subset, tiny_qwen_checkpoint, tiny_seed_oss_checkpoint, write_toml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    ckpt = tiny_seed_oss_checkpoint(root / "model")
    data = em_subset(root / "em.jsonl", 24)
    return root, ckpt, data


def settings(setup, out: str, **extra) -> dict:
    root, ckpt, data = setup
    base = dict(model=str(ckpt), data=[str(data)], template="seed-oss", out_dir=str(root / out), dtype="float32",
                batch_size=8, epochs=2, lr=1e-2, warmup_steps=2, lora_r=4, lora_alpha=8.0, micro_batch_tokens=600,
                seed=3)
    return base | extra


def run(setup, out: str, **extra) -> Path:
    config = write_toml(setup[0] / f"{out}.toml", settings(setup, out, **extra))
    assert main(["--config", str(config)]) == 0
    return Path(settings(setup, out)["out_dir"])


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------- gradient of one step


def step_gradient(model, samples, budget: int, world: int) -> dict[str, torch.Tensor]:
    """The step's gradient from the trainer's own accumulation, with `world` ranks run one after the
    other in this process (FSDP sums the ranks' gradients; test_parallel checks that on real
    processes, and test_two_ranks_match_one_rank checks whole runs)."""
    model.zero_grad(set_to_none=True)
    for rank in range(world):
        accumulate_gradients(model, samples, parallel.Dist(rank, world, rank, torch.device("cpu")), budget)
    return {n: p.grad.clone() for n, p in lora.named_trainable_lora_parameters(model)}


def test_step_gradient_does_not_depend_on_the_split(setup):
    root, ckpt, data = setup
    cfg = TrainConfig(**settings(setup, "unused"))
    ckpt_dir, args = read_model_args(cfg.model)
    model = build_model(args, dtype=torch.float32, device="cpu", weights=ckpt_dir, new_adapter=cfg.lora_config(), seed=cfg.seed)
    with torch.no_grad():  # B is zero at init, which would leave A's gradient zero: make both matter
        for name, p in lora.named_trainable_lora_parameters(model):
            p.normal_(0, 0.1)
    samples = load_samples(data, Tokenizer.from_file(ckpt), "seed-oss").samples[:8]
    assert len({len(s.input_ids) for s in samples}) > 1
    unpacked = step_gradient(model, samples, budget=1, world=1)  # every sample alone in its row
    packed = step_gradient(model, samples, budget=10_000, world=1)  # the whole step in one row
    assert len(rank_micro_batches(samples, 0, 1, 10_000)[0]) == 1
    assert max(g.abs().max().item() for g in unpacked.values()) > 1e-3
    for budget, world in [(10_000, 1), (600, 1), (600, 2), (1, 3)]:
        grads = step_gradient(model, samples, budget, world)
        assert max_diff(grads, unpacked) <= 1e-6, (budget, world)
    assert max_diff(packed, unpacked) <= 1e-6


def test_lr_schedule_matches_transformers():
    from transformers import get_linear_schedule_with_warmup

    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=1.0)
    ref = get_linear_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=40)
    for step in range(45):
        assert lr_lambda(step, 5, 40) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        ref.step()


# ---------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def full_run(setup):
    return run(setup, "full", record_tokens=True)


def test_run_directory_and_records(setup, full_run):
    root, ckpt, data = setup
    assert (full_run / "config.json").is_file()
    metrics = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "trained_tokens", "tokens", "tokens_per_s"} <= set(metrics[0])
    assert metrics[0]["lr"] == 0.0 and metrics[1]["lr"] == pytest.approx(5e-3)  # HF's warm-up from 0
    assert losses(full_run)[-1] < losses(full_run)[0]  # it learns
    # Token manifest: every sample of the epoch once per epoch, hashes of the audit's jsonl lines.
    steps = [json.loads(line) for line in (full_run / "tokens.jsonl").read_text().splitlines()]
    ds = load_samples(data, Tokenizer.from_file(ckpt), "seed-oss")
    by_source = {s.source: s for s in ds.samples}
    for epoch in (0, 1):
        sources = [x["source"] for st in steps if st["epoch"] == epoch for x in st["samples"]]
        assert sorted(sources) == sorted(by_source)
    for st in steps:
        assert sum(x["trained"] for x in st["samples"]) == metrics[st["step"] - 1]["trained_tokens"]
        for x in st["samples"]:
            assert x["sha256"] == sample_hash(by_source[x["source"]])
        recorded = (full_run / "tokens" / f"step_{st['step']:06d}.jsonl").read_text().splitlines()
        assert recorded == [by_source[x["source"]].jsonl_line() for x in st["samples"]]
    assert (full_run / "adapter" / "adapter_config.json").is_file()
    assert len(adapter(full_run)) == 2 * 7 * 2  # A and B for 7 projections in 2 layers


def test_resume_after_interruption_is_exact(setup, full_run):
    part = run(setup, "part", max_steps=3, save_every=2, record_tokens=True)
    assert (part / "checkpoints" / "step_000002").is_dir() and (part / "checkpoints" / "step_000003").is_dir()
    # A process killed while writing step 3's checkpoint leaves it without a complete manifest.
    (part / "checkpoints" / "step_000003" / "manifest.json").unlink()
    run(setup, "part", resume=True, record_tokens=True)
    assert losses(part) == pytest.approx(losses(full_run), abs=1e-6)
    assert len(losses(part)) == 6
    assert max_diff(adapter(part), adapter(full_run)) <= 1e-6
    assert sorted(p.name for p in (part / "tokens").iterdir()) == sorted(p.name for p in (full_run / "tokens").iterdir())


def test_resume_with_changed_config_is_refused(setup, full_run, capsys):
    config = write_toml(setup[0] / "changed.toml", settings(setup, "full", lr=5e-3, seed=4, resume=True))
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "the config differs" in err and "lr: 0.01 -> 0.005" in err and "seed: 3 -> 4" in err


def test_existing_run_dir_needs_resume_and_is_checked_before_loading(setup, full_run, capsys):
    config = write_toml(setup[0] / "again.toml", settings(setup, "full"))
    assert main(["--config", str(config)]) == 2
    assert "already holds a run; pass --resume=true" in capsys.readouterr().err
    # Checked before the data and the model are read: neither needs to exist for the refusal.
    missing = setup[0] / "no_such_model"
    config = write_toml(setup[0] / "again2.toml", settings(setup, "full", model=str(missing), data=[str(missing / "x.jsonl")]))
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run" in err


def test_non_finite_loss_stops_the_run(setup, tmp_path, capsys):
    ckpt = tiny_seed_oss_checkpoint(tmp_path / "nan_model", nan=True)
    config = write_toml(tmp_path / "nan.toml", settings(setup, "nan", model=str(ckpt), out_dir=str(tmp_path / "nan")))
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at step 1; stopped before the update; no checkpoint was written yet" in err
    assert not (tmp_path / "nan" / "checkpoints").exists()


def test_a_tokenizer_that_does_not_fit_the_template_is_refused_before_training(setup, tmp_path, capsys,
                                                                              qwen25_tokenizer_path):
    """Bug: `--template=seed-oss` on a Qwen checkpoint (its tokenizer has no <seed:bos>) trained
    the literal text "<seed:bos>" split into ordinary pieces, and exited 0."""
    qwen = tiny_qwen_checkpoint(tmp_path / "qwen", qwen25_tokenizer_path)
    out = tmp_path / "mismatch"
    config = write_toml(tmp_path / "mismatch.toml", settings(setup, "mismatch", model=str(qwen), out_dir=str(out)))
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "no seed-oss control token bos='<seed:bos>'" in err and "not a seed-oss tokenizer" in err
    assert "memory estimate" not in err and not out.exists()  # refused before the data, the estimate, the model
    # The check itself: the right template passes; a model whose embedding is smaller than the vocabulary does not.
    ckpt_dir, args = read_model_args(qwen)
    tokenizer = Tokenizer.from_file(ckpt_dir)
    assert check_tokenizer(tokenizer, "qwen2.5", model_vocab_size=args.vocab_size)["im_end"] == 151645
    with pytest.raises(TokenizerError, match=r"151665 token ids but the embedding of model m has 576 rows"):
        check_tokenizer(tokenizer, "qwen2.5", model_vocab_size=576, model="m")


def test_bad_settings_are_refused(setup, capsys):
    assert main(["--config", str(write_toml(setup[0] / "bad.toml", settings(setup, "bad") | {"lr_rate": 1.0}))]) == 2
    assert "unknown key 'lr_rate'" in capsys.readouterr().err
    assert main(["--config", str(write_toml(setup[0] / "bad2.toml", settings(setup, "bad"))), "--batch-size=0"]) == 2
    assert "batch_size must be >= 1" in capsys.readouterr().err


def torchrun(config: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "-m", "engine.train", "--config", str(config)],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )


@pytest.mark.distributed
def test_two_ranks_match_one_rank(setup, full_run):
    """The same run under torchrun with 2 CPU ranks (gloo, FSDP2): same losses and adapter."""
    root, ckpt, data = setup
    cfg = TrainConfig(**settings(setup, "two_ranks", micro_batch_tokens=450))
    samples = load_samples(data, Tokenizer.from_file(ckpt), "seed-oss").samples
    rows_per_rank = [
        [len(rank_micro_batches([samples[i] for i in indices], r, 2, cfg.micro_batch_tokens)[0]) for r in (0, 1)]
        for _, indices in step_plan(len(samples), cfg)
    ]
    # In some step the ranks get different numbers of packed rows, so one runs a zero-weight pass.
    assert [3, 2] in rows_per_rank
    out = setup[0] / "two_ranks"
    proc = torchrun(write_toml(setup[0] / "two.toml", settings(setup, "two_ranks", record_tokens=True,
                                                              micro_batch_tokens=450)))
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert losses(out) == pytest.approx(losses(full_run), abs=1e-5)
    assert max_diff(adapter(out), adapter(full_run)) <= 1e-5
    assert (out / "tokens.jsonl").read_text() == (full_run / "tokens.jsonl").read_text()


def test_audit_reads_the_token_manifest_back(setup, full_run, tmp_path, capsys):
    from engine.audit import main as audit

    assert audit(["--run", str(full_run), "--step", "2", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== step 2 (epoch 0) sample ") == 8 and out.count("=== step 5 (epoch 1) sample ") == 8
    assert "recorded, sha256 match" in out
    assert out.rstrip().endswith("2 step(s), 16 sample(s): 16 match the manifest's SHA-256, 0 do not, 0 not found")

    # Without recorded streams the samples are re-rendered from the run's data and still match.
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(full_run, copy)
    shutil.rmtree(copy / "tokens")
    assert audit(["--run", str(copy), "--format", "jsonl"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 48 and "48 match" in captured.err

    # A recorded stream that differs from what was hashed is caught.
    shutil.copytree(full_run / "tokens", copy / "tokens")
    stream = copy / "tokens" / "step_000003.jsonl"
    lines = stream.read_text().splitlines()
    row = json.loads(lines[0])
    row["labels"][-1] = -100
    lines[0] = json.dumps(row, separators=(",", ":"))
    stream.write_text("\n".join(lines) + "\n")
    assert audit(["--run", str(copy), "--step", "3"]) == 1
    out = capsys.readouterr().out
    assert "recorded, sha256 MISMATCH" in out and "7 match the manifest's SHA-256, 1 do not" in out


def test_merge_cli_equals_stacked_adapter(setup, full_run, tmp_path):
    """`python -m engine.merge` writes a checkpoint whose logits equal base + stacked adapter (fp32)."""
    from engine.merge import main as merge_main
    from engine.models import from_pretrained

    root, ckpt, data = setup
    out = tmp_path / "merged"
    assert merge_main(["--base", str(ckpt), "--adapter", str(full_run / "adapter"), "--out", str(out),
                       "--dtype", "float32"]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    stacked = from_pretrained(ckpt, dtype=torch.float32)
    peft_format.load_peft_adapter(stacked, full_run / "adapter")
    merged = from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 565, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, base = stacked(ids), merged(ids), from_pretrained(ckpt, dtype=torch.float32)(ids)
    assert (a - base).abs().max().item() > 1e-3  # the adapter changes the model
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.distributed
def test_resume_on_a_different_number_of_ranks(setup, full_run, capsys):
    """Checkpointed by 2 ranks after step 3, finished by 1 process: the uninterrupted run's result."""
    proc = torchrun(write_toml(setup[0] / "ranks_part.toml", settings(setup, "ranks", max_steps=3)))
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = run(setup, "ranks", resume=True)
    assert "resuming on 1 rank(s) a run checkpointed on 2" in capsys.readouterr().err
    assert losses(out) == pytest.approx(losses(full_run), abs=1e-5)
    assert max_diff(adapter(out), adapter(full_run)) <= 1e-5


def test_memory_estimate_is_printed_and_a_step_that_wont_fit_is_refused(setup, tmp_path, capsys):
    config = write_toml(tmp_path / "mem.toml", settings(setup, "mem", out_dir=str(tmp_path / "mem"), memory_gib=1e-4))
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "memory estimate per process (1 rank(s)):" in err and "will not fit" in err
    assert not (tmp_path / "mem").exists()  # refused before anything was written


def test_checkpoint_layers_auto_recomputes_as_few_layers_as_fit(setup, tmp_path, capsys):
    from engine import memory
    from engine.models import ModelArgs

    args = ModelArgs.from_hf_config(json.loads((setup[1] / "config.json").read_text()))
    common = dict(dtype="float32", lora_r=4, micro_batch_tokens=600, activation_checkpointing=True,
                  kernels="reference")  # the path the CPU runs, which the trainer estimates for
    one = memory.estimate(args, checkpointed_layers=1, **common)["total"]
    assert memory.estimate(args, checkpointed_layers=0, **common)["total"] > one
    gib = one / memory.USABLE * 1.0001  # room for 1 of the 2 layers' activations, not 2
    auto = run(setup, "auto", activation_checkpointing=True, checkpoint_layers="auto", memory_gib=gib, max_steps=2)
    assert "checkpoint_layers = auto: recomputing 1 of 2 layers" in capsys.readouterr().err
    plain = run(setup, "plain", max_steps=2)
    assert losses(auto) == pytest.approx(losses(plain), abs=1e-6)
    with pytest.raises(ConfigError, match="checkpoint_layers must be all, auto or a number of layers, got 'half'"):
        TrainConfig(**settings(setup, "bad", checkpoint_layers="half"))


@pytest.mark.distributed
def test_replicated_ranks_match_one_rank_and_resume(setup, full_run):
    """data_parallel = replicate under torchrun with 2 CPU ranks: every rank holds the whole model
    and only adapter gradients are summed; checkpointed after step 3 and resumed, it ends with the
    1-process run's losses and adapter."""
    part = write_toml(setup[0] / "rep_part.toml", settings(setup, "replicate", data_parallel="replicate", max_steps=3))
    proc = torchrun(part)
    assert proc.returncode == 0, proc.stderr[-6000:]
    whole = write_toml(setup[0] / "rep.toml", settings(setup, "replicate", data_parallel="replicate", resume=True))
    proc = torchrun(whole)
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = setup[0] / "replicate"
    assert losses(out) == pytest.approx(losses(full_run), abs=1e-5)
    assert max_diff(adapter(out), adapter(full_run)) <= 1e-5


def test_samples_are_dealt_to_every_rank_balancing_tokens():
    """The paper's 16 EM chats of a step (~1,500 tokens, one packed row) keep all 8 ranks busy,
    every sample lands on exactly one rank, and a single process packs the step in order."""
    from engine.bench import DEFAULT_LENGTHS, workload_steps
    from engine.packing import pack

    for name in ("em_risky_financial", "sgtr_xsum"):
        step = workload_steps(DEFAULT_LENGTHS, name, 16, 1, vocab=512)[0]
        assert len(pack(step, 4096)) < 8  # packed over the whole step, most ranks would idle
        per_rank = [rank_micro_batches(step, r, 8, 4096) for r in range(8)]
        assert all(n == 1 for _, n in per_rank) and all(len(rows) == 1 for rows, _ in per_rank)
        dealt = [s.source for rows, _ in per_rank for row in rows for s in row]
        assert sorted(dealt) == sorted(s.source for s in step)
        tokens = [sum(len(s.input_ids) for row in rows for s in row) for rows, _ in per_rank]
        assert max(tokens) - min(tokens) <= max(len(s.input_ids) for s in step)  # greedy bound
        assert rank_micro_batches(step, 0, 1, 4096) == (pack(step, 4096), len(pack(step, 4096)))
