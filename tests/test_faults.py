"""Fault injection: a diverging run, a full disk, a torn log line, dropout, changed data, a hung rank.

Each case drives `engine.train.main` on the tiny Seed-OSS model (fp32, CPU) and checks what the
product promises: no wrong adapter or checkpoint is ever written silently; a failure ends in one
line (exit 2) that names the file, the step or the rank; what was written before stays intact;
and the next `--resume=true` continues the run exactly (bitwise, on CPU fp32).

Full disks are simulated at the points where the run writes: `torch.save` / `save_file` /
`open(...).write` raising ENOSPC after writing part of their data, and once for real, with a file
size limit (RLIMIT_FSIZE) that makes the kernel refuse the write inside torch's C++ writer.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import engine.checkpoint
import engine.rundir
from engine import peft_format
from engine.config import TrainConfig
from engine.errors import ConfigError
from engine.train import main
from tests.tiny import em_subset, tiny_seed_oss_checkpoint, write_toml

ROOT = Path(__file__).resolve().parents[1]
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return {"root": root, "model": tiny_seed_oss_checkpoint(root / "model"), "data": em_subset(root / "em.jsonl", 16)}


def settings(base, out: str, **extra) -> dict:
    """4 steps (16 rows, 8 a step, 2 epochs), as tests/test_train.py's runs (which have 24 rows)."""
    return dict(model=str(base["model"]), data=[str(base["data"])], template="seed-oss",
                out_dir=str(base["root"] / out), dtype="float32", batch_size=8, epochs=2, lr=1e-2, warmup_steps=2,
                lora_r=4, lora_alpha=8.0, micro_batch_tokens=600, seed=3) | extra


def train(base, out: str, *words: str, **extra) -> int:
    config = write_toml(base["root"] / f"{out}.toml", settings(base, out, **extra))
    return main(["--config", str(config), *words])


def run_dir(base, out: str) -> Path:
    return base["root"] / out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_run(out: Path, ref: Path) -> None:
    """Bitwise the same run: every logged loss and grad norm, the token manifest, the adapter."""
    def key(m): return (m["step"], m["loss"], m["grad_norm"], m["lr"], m["trained_tokens"])

    assert [key(m) for m in metrics(out)] == [key(m) for m in metrics(ref)]
    assert (out / "tokens.jsonl").read_text() == (ref / "tokens.jsonl").read_text()
    a, b = adapter(out), adapter(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_error_line(capsys) -> str:
    """The run's error: the last line of stderr, the only one starting with "error", no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error")] == lines[-1:], err
    assert "Traceback" not in err
    return lines[-1]


def all_finite(path: Path) -> bool:
    tensors = load_file(str(path))
    return all(torch.isfinite(t).all() for t in tensors.values())


@pytest.fixture(scope="module")
def ref(base) -> Path:
    """The uninterrupted run every interrupted-and-resumed run must equal."""
    assert train(base, "ref", record_tokens=True) == 0
    return run_dir(base, "ref")


# ---------------------------------------------------------------- 1. divergence is never checkpointed


def test_a_diverging_run_stops_before_the_bad_update_and_names_the_last_good_checkpoint(tmp_path, capsys):
    """The issue's reproduction: 48 rows, 4 a step, a checkpoint every step, lr 1e6. At step 3 the
    loss is finite but the gradient norm is NaN: the step is refused before the update, so no
    non-finite checkpoint is ever written and the one named is finite; a resumption refuses again."""
    model = tiny_seed_oss_checkpoint(tmp_path / "model")
    data = em_subset(tmp_path / "em.jsonl", 48)
    config = write_toml(tmp_path / "lr.toml", dict(
        model=str(model), data=[str(data)], template="seed-oss", out_dir=str(tmp_path / "out"), dtype="float32",
        batch_size=4, save_every=1, lora_r=4, lr=1e6))
    assert main(["--config", str(config)]) == 2
    line = one_error_line(capsys)
    assert "non-finite gradient norm (nan) at step 3; stopped before the update" in line, line
    last_good = tmp_path / "out" / "checkpoints" / "step_000002"
    assert f"the last good checkpoint is {last_good}" in line
    checkpoints = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert checkpoints == ["step_000001", "step_000002"]  # nothing of step 3, not even a temporary
    for name in checkpoints:
        assert engine.checkpoint.verify(tmp_path / "out" / "checkpoints" / name) == []
        assert all_finite(tmp_path / "out" / "checkpoints" / name / "adapter.safetensors")
    assert not (tmp_path / "out" / "adapter").exists()
    assert [m["step"] for m in metrics(tmp_path / "out")] == [1, 2]  # the refused step is not logged
    # Resuming from the named checkpoint repeats the same refusal (an exact resume), nothing worse.
    assert main(["--config", str(config), "--resume=true"]) == 2
    assert "non-finite gradient norm (nan) at step 3; stopped before the update" in one_error_line(capsys)


@pytest.mark.parametrize("key", ["lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "max_grad_norm",
                                 "lora_alpha", "lora_dropout", "memory_gib", "collective_timeout_min"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_settings_are_refused(base, capsys, key, value):
    assert train(base, f"bad_{key}", f"--{key}={value}") == 2
    assert f"{key} must be a finite number, got {value}" in one_error_line(capsys)
    assert not run_dir(base, f"bad_{key}").exists()


def test_every_float_setting_is_checked_for_finiteness():
    """A float setting added later is covered too: the check is by type, not by a list of names."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(TrainConfig)
    floats = [f.name for f in dataclasses.fields(TrainConfig)
              if hints[f.name] is float or float in typing.get_args(hints[f.name])]
    assert {"lr", "lora_alpha", "memory_gib", "collective_timeout_min"} <= set(floats)
    required = dict(model="m", data=["d"], template="seed-oss", out_dir="o")
    for name in floats:
        with pytest.raises(ConfigError, match=f"{name} must be a finite number"):
            TrainConfig(**required, **{name: float("inf")})


def test_lr_inf_with_one_step_writes_nothing(base, capsys):
    """Bug: --lr=inf passed validation; one step ended `done`, exit 0, with an all-NaN adapter."""
    assert train(base, "lr_inf", "--lr=inf", "--max-steps=1") == 2
    assert "lr must be a finite number, got inf" in one_error_line(capsys)
    assert not run_dir(base, "lr_inf").exists()


def _poison_after_optimizer_step(monkeypatch, at_step: int, what: str) -> None:
    """Make AdamW's update of step `at_step` leave an infinity in a parameter or in its state."""
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == at_step:
            p = self.param_groups[0]["params"][0]
            with torch.no_grad():
                (p if what == "parameter" else self.state[p]["exp_avg_sq"]).view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.mark.parametrize("what", ["parameter", "optimizer state"])
def test_non_finite_values_after_the_update_are_not_saved(base, ref, monkeypatch, capsys, what):
    """A finite loss and gradient norm, yet the update leaves an infinity (a huge lr times weight
    decay, an overflowing second moment): the step is not saved, the run stops naming the last good
    checkpoint, and a resumption (the fault gone) ends as the uninterrupted run, bitwise."""
    out = f"after_update_{what.replace(' ', '_')}"
    _poison_after_optimizer_step(monkeypatch, 3, what)
    assert train(base, out, "--save-every=2", record_tokens=True) == 2
    line = one_error_line(capsys)
    last_good = run_dir(base, out) / "checkpoints" / "step_000002"
    assert "non-finite adapter values after the update of step 3" in line and what in line, line
    assert f"the step was not saved; the last good checkpoint is {last_good}" in line
    assert sorted(p.name for p in (run_dir(base, out) / "checkpoints").iterdir()) == ["step_000002"]
    assert [m["step"] for m in metrics(run_dir(base, out))] == [1, 2]
    monkeypatch.undo()
    assert train(base, out, "--save-every=2", "--resume=true", record_tokens=True) == 0
    assert_same_run(run_dir(base, out), ref)


# ---------------------------------------------------------------- 3. torn log lines, full disks


def test_a_torn_last_log_line_is_dropped_on_resume(base, ref, capsys):
    """Bug: a partial trailing line in metrics.jsonl / tokens.jsonl (a full disk during the append)
    made every --resume=true die with a bare JSONDecodeError, although the checkpoints verified."""
    out = run_dir(base, "torn")
    assert train(base, "torn", "--max-steps=3", "--save-every=2", record_tokens=True) == 0
    for name in ("metrics.jsonl", "tokens.jsonl"):
        with open(out / name, "a") as f:
            f.write('{"step": 4, "epoch": 1, "lo')  # the disk filled up mid-line
    capsys.readouterr()
    assert train(base, "torn", "--resume=true", record_tokens=True) == 0
    err = capsys.readouterr().err
    assert f"{out / 'metrics.jsonl'}: dropped a partial last line" in err
    assert f"{out / 'tokens.jsonl'}: dropped a partial last line" in err
    assert_same_run(out, ref)


def test_a_damaged_log_line_before_the_last_is_named(base, capsys):
    out = run_dir(base, "damaged_log")
    assert train(base, "damaged_log", "--max-steps=2", "--save-every=1") == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0][:-5] + "\n" + lines[1] + "\n")
    assert train(base, "damaged_log", "--resume=true") == 2
    assert f"{out / 'metrics.jsonl'}:1: not a JSON record" in one_error_line(capsys)


class PartialWrite:
    """A file whose writes put half their data on disk, then fail as a full disk does."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def writelines(self, lines):
        self.write("".join(lines))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_disk_on_open(monkeypatch, module, name: str, nth: int = 1) -> None:
    """The `nth` opening for writing, in `module`, of a file called `name` gives a PartialWrite."""
    seen = {"n": 0}

    def fake_open(file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        if Path(file).name == name and ("w" in mode or "a" in mode):
            seen["n"] += 1
            if seen["n"] == nth:
                return PartialWrite(f)
        return f

    monkeypatch.setattr(module, "open", fake_open, raising=False)


def fill_disk_in_torch_save(monkeypatch, name: str, nth: int = 1) -> None:
    """The `nth` torch.save into a file called `name` writes a few bytes, then fails with ENOSPC."""
    real, seen = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        if Path(str(getattr(f, "name", f))).name == name:
            seen["n"] += 1
            if seen["n"] == nth:
                if hasattr(f, "write"):
                    f.write(b"PK\x03\x04 partial")
                else:
                    Path(f).write_bytes(b"PK\x03\x04 partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def fill_disk_in_save_file(monkeypatch, module) -> None:
    """safetensors' save_file as it fails on a full disk (its Rust writer's error, no file name)."""
    from safetensors import SafetensorError

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x08\x00 partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(module, "save_file", save_file)


FULL_DISK = {  # case: (how the disk fills, the file named, the step named, the last good checkpoint)
    "metrics_append": (lambda mp: fill_disk_on_open(mp, engine.rundir, "metrics.jsonl", nth=3),
                       "metrics.jsonl", "at step 3", "step_000002"),
    "token_stream": (lambda mp: fill_disk_on_open(mp, engine.rundir, "step_000003.jsonl"),
                     "tokens/step_000003.jsonl", "at step 3", "step_000002"),
    "checkpoint_state": (lambda mp: fill_disk_in_torch_save(mp, "optimizer.pt", nth=2),
                         "checkpoints/.tmp-step_000004/optimizer.pt", "at step 4", "step_000002"),
    "checkpoint_rng": (lambda mp: fill_disk_in_torch_save(mp, "rng_rank0.pt", nth=2),
                       "checkpoints/.tmp-step_000004/rng_rank0.pt", "at step 4", "step_000002"),
    "checkpoint_manifest": (lambda mp: fill_disk_on_open(mp, engine.checkpoint, "manifest.json", nth=2),
                            "checkpoints/.tmp-step_000004/manifest.json", "at step 4", "step_000002"),
    "final_adapter": (lambda mp: fill_disk_in_save_file(mp, peft_format), "adapter", "at step 4", "step_000004"),
    "config": (lambda mp: fill_disk_on_open(mp, engine.rundir, ".config.json.tmp"), ".config.json.tmp",
               "before the first step", None),
}


@pytest.mark.parametrize("case", sorted(FULL_DISK))
def test_a_full_disk_ends_in_one_line_and_the_next_start_resumes_exactly(base, ref, monkeypatch, capsys, case):
    """Bug: a full disk ended in `basic_ios::clear: iostream error` (or a bare OSError) naming no
    file. Now: one line, exit 2, the file and the step named, the last good checkpoint intact; the
    next start removes the debris and the resumed run equals the uninterrupted one, bitwise."""
    fill, path, step, last_good = FULL_DISK[case]
    out = run_dir(base, f"full_{case}")
    fill(monkeypatch)
    assert train(base, f"full_{case}", "--save-every=2", record_tokens=True) == 2
    line = one_error_line(capsys)
    assert f"cannot write {out / path}" in line and step in line, line
    assert "No space left on device" in line and "--resume=true" in line, line
    if last_good is None:
        assert "no checkpoint was written yet" in line, line
    else:
        assert f"the last good checkpoint is {out / 'checkpoints' / last_good}" in line, line
        assert engine.checkpoint.verify(out / "checkpoints" / last_good) == []
    monkeypatch.undo()
    assert train(base, f"full_{case}", "--save-every=2", "--resume=true", record_tokens=True) == 0
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no debris left
    assert_same_run(out, ref)


def test_stale_temporaries_are_removed_on_the_next_start(base, capsys):
    out = run_dir(base, "stale")
    assert train(base, "stale", "--max-steps=2", "--save-every=2") == 0
    debris = [out / "checkpoints" / ".tmp-step_000004", out / ".config.json.tmp", out / "adapter" / ".x.tmp-123",
              out / ".metrics.jsonl.tmp"]
    debris[0].mkdir()
    (debris[0] / "optimizer.pt").write_bytes(b"partial")
    for p in debris[1:]:
        p.write_text("partial")
    capsys.readouterr()
    assert train(base, "stale", "--max-steps=3", "--save-every=2", "--resume=true") == 0
    err = capsys.readouterr().err
    for p in debris:
        assert not p.exists() and f"removed stale temporary {p}" in err


@pytest.fixture
def file_size_limit():
    """Every write past `limit` bytes of a file fails (EFBIG) as a full disk does, in C++ too."""
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def set_limit(limit: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))

    yield set_limit
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)


def test_a_real_write_failure_inside_torch_save_is_named(base, ref, capsys, file_size_limit):
    """The kernel refuses the write inside torch.save's C++ writer (which by itself reports only
    `unexpected pos` or `basic_ios::clear: iostream error`): the message still names the file."""
    out = run_dir(base, "rlimit")
    assert train(base, "rlimit", "--max-steps=2", "--save-every=2") == 0
    size = (out / "checkpoints" / "step_000002" / "optimizer.pt").stat().st_size
    assert (out / "checkpoints" / "step_000002" / "adapter.safetensors").stat().st_size < size - 4096
    capsys.readouterr()
    file_size_limit(size - 4096)  # the adapter still fits; the optimizer state does not
    code = train(base, "rlimit", "--save-every=2", "--resume=true")
    file_size_limit(resource.RLIM_INFINITY)
    assert code == 2
    line = one_error_line(capsys)
    assert f"cannot write {out / 'checkpoints' / '.tmp-step_000004' / 'optimizer.pt'} at step 4" in line, line
    assert "File too large" in line and f"the last good checkpoint is {out / 'checkpoints' / 'step_000002'}" in line
    assert engine.checkpoint.verify(out / "checkpoints" / "step_000002") == []
    assert train(base, "rlimit", "--save-every=2", "--resume=true") == 0
    assert_same_run(out, ref)


# ---------------------------------------------------------------- 4. dropout: the same config, the same run


@pytest.fixture(scope="module")
def dropout_base(tmp_path_factory):
    """A tiny Seed-OSS model with the real one's attention and residual dropout (0.1)."""
    root = tmp_path_factory.mktemp("dropout")
    return {"root": root, "model": tiny_seed_oss_checkpoint(root / "model", dropout=0.1),
            "data": em_subset(root / "em.jsonl", 16)}


def test_the_same_config_gives_the_same_run_with_dropout(dropout_base):
    """Bug: the global torch RNG was never seeded, so dropout made every run different. Two runs
    of one config (in one process, the RNG left wherever the first run put it) are bitwise equal;
    a third with LoRA dropout off differs (the dropout is really on)."""
    a, b = run_dir(dropout_base, "drop_a"), run_dir(dropout_base, "drop_b")
    assert train(dropout_base, "drop_a", "--max-steps=2", lora_dropout=0.1) == 0
    torch.rand(7)  # whatever ran in between
    assert train(dropout_base, "drop_b", "--max-steps=2", lora_dropout=0.1) == 0
    assert_same_run(b, a)
    assert train(dropout_base, "drop_off", "--max-steps=2", lora_dropout=0.0) == 0
    assert metrics(run_dir(dropout_base, "drop_off"))[-1]["loss"] != metrics(a)[-1]["loss"]


def test_resume_is_exact_with_dropout(dropout_base):
    ref = run_dir(dropout_base, "drop_a")  # 2 steps, by the test above
    if not ref.exists():
        assert train(dropout_base, "drop_a", "--max-steps=2", lora_dropout=0.1) == 0
    out = run_dir(dropout_base, "drop_part")
    assert train(dropout_base, "drop_part", "--max-steps=1", lora_dropout=0.1) == 0
    torch.rand(7)
    assert train(dropout_base, "drop_part", "--max-steps=2", "--resume=true", lora_dropout=0.1) == 0
    assert_same_run(out, ref)


# ---------------------------------------------------------------- 5. changed data is refused


def test_a_changed_data_file_is_refused_on_resume(base, tmp_path, capsys):
    """Bug: replacing a data file at the same path continued the run silently on other rows."""
    data = tmp_path / "em.jsonl"
    data.write_text(base["data"].read_text())
    out = run_dir(base, "data_changed")
    assert train(base, "data_changed", "--max-steps=2", "--save-every=2", data=[str(data)]) == 0
    sha256 = engine.checkpoint.sha256_file(data)
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # the same rows, in another order
    assert train(base, "data_changed", "--resume=true", data=[str(data)]) == 2
    line = one_error_line(capsys)
    assert f"cannot resume {out}: data file {data} changed since the run started" in line, line
    assert [m["step"] for m in metrics(out)] == [1, 2]  # nothing touched
    assert json.loads((out / "config.json").read_text())["data_sha256"] == {str(data): sha256}
    data.unlink()
    assert train(base, "data_changed", "--resume=true", data=[str(data)]) == 2
    assert f"data file {data} is missing" in one_error_line(capsys)


# ---------------------------------------------------------------- hung rank


@pytest.mark.distributed
def test_a_hung_rank_fails_the_job_naming_the_rank_and_the_step(base, tmp_path):
    """Rank 1 hangs before step 2; rank 0, waiting in the step's collective, gives up after the
    configured timeout (10 s here) and names rank 1 and step 2; torchrun then ends the job."""
    config = write_toml(tmp_path / "hang.toml", settings(base, "unused", out_dir=str(tmp_path / "out"),
                                                         collective_timeout_min=10 / 60))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "dist_worker_hang.py"), "--config", str(config)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert errors[0].startswith("error (rank 0): a collective operation at step 2 timed out after 10 s"), errors[0]
    assert "rank 1 did not answer (hung or dead" in errors[0], errors[0]
    assert "no checkpoint was written yet" in errors[0] and "--resume=true" in errors[0]
    assert time.monotonic() - started < 200
