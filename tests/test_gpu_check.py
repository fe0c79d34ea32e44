"""scripts/gpu_check.sh cannot rot: its dry run (every step in its CPU form: the environment, the
probe on tiny shapes through the Triton interpreter, the CUDA tests' selection collected, the
step benchmark with --tiny, each kernel-benchmark section with --reference-only) runs here, its
per-step limits sum to at most 8 minutes, and every CUDA-only test carries the ``gpu`` marker the
script selects them by."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
BUDGET_S = 8 * 60


def _steps() -> dict[str, int]:
    """step name -> limit (s), from the script's `step NAME LIMIT ...` calls."""
    text = SCRIPT.read_text()
    return {m[0]: int(m[1]) for m in re.findall(r"^\s*step ([\w-]+) (\d+) ", text, flags=re.M)}


def test_step_limits_sum_to_at_most_eight_minutes_and_match_the_header():
    steps = _steps()
    assert list(steps)[:4] == ["liger", "env", "probe", "tests"]  # most important first
    assert sum(steps.values()) <= BUDGET_S, steps
    header = SCRIPT.read_text().split("set -uo pipefail")[0]
    for name, limit in steps.items():
        assert re.search(rf"#\s+{re.escape(name)}\s+{limit}\s", header), f"header disagrees on {name} ({limit} s)"
    total = re.search(r"#\s+total\s+(\d+)", header)
    assert total and int(total[1]) == sum(steps.values())


def _gpu_marked(decorators) -> bool:
    return any(ast.unparse(d) == "pytest.mark.gpu" for d in decorators)


def _cuda_names(tree: ast.Module) -> set[str]:
    """Module-level names bound to something that asks for CUDA, in order: ``CUDA =
    torch.cuda.is_available()``, then ``gpu = pytest.mark.skipif(not CUDA, ...)``."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and _mentions_cuda(node.value, names):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _mentions_cuda(node: ast.AST, names: set[str]) -> bool:
    text = ast.unparse(node)
    return "cuda.is_available" in text or "device_count" in text or any(
        isinstance(n, ast.Name) and n.id in names for n in ast.walk(node))


def _cuda_only(test: ast.FunctionDef, names: set[str], module_skip: bool) -> bool:
    """Skipped without CUDA: a skipif decorator on CUDA (directly or through a module-level name),
    a module-level ``pytestmark`` that does so, or a ``pytest.skip`` under an ``if`` on CUDA."""
    if module_skip:
        return True
    for d in test.decorator_list:
        if (isinstance(d, ast.Name) and d.id in names) or ("skip" in ast.unparse(d) and _mentions_cuda(d, names)):
            return True
    return any(isinstance(n, ast.If) and _mentions_cuda(n.test, names) and "pytest.skip" in ast.unparse(n)
               for n in ast.walk(test))


def test_every_cuda_only_test_is_marked_gpu():
    """A test skipped without CUDA must carry @pytest.mark.gpu, or gpu_check.sh's `-m gpu` misses it."""
    unmarked, marked = [], 0
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        names = _cuda_names(tree)
        module_marks = [n.value for n in tree.body if isinstance(n, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in n.targets)]
        module_skip = any("skip" in ast.unparse(m) and _mentions_cuda(m, names) for m in module_marks)
        module_gpu = any("pytest.mark.gpu" in ast.unparse(m) for m in module_marks)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                if _cuda_only(node, names, module_skip):
                    if module_gpu or _gpu_marked(node.decorator_list):
                        marked += 1
                    else:
                        unmarked.append(f"{path.name}::{node.name}")
    assert not unmarked, f"CUDA-only tests without @pytest.mark.gpu: {unmarked}"
    assert marked >= 13


def test_the_script_runs_every_file_with_gpu_tests():
    """gpu_check.sh names its test files (cheap ones first): none holding a gpu-marked test is left out."""
    listed = re.search(r"^test_files=\((.*?)\)", SCRIPT.read_text(), re.S | re.M)
    assert listed, "test_files=(...) not found in the script"
    named = set(re.findall(r"tests/(test_\w+\.py)", listed[1]))
    with_gpu = {p.name for p in (ROOT / "tests").glob("test_*.py")
                if p.name != "test_gpu_check.py" and "@pytest.mark.gpu" in p.read_text()}
    assert with_gpu <= named, f"not run by gpu_check.sh: {sorted(with_gpu - named)}"
    assert named <= {p.name for p in (ROOT / "tests").glob("test_*.py")}


def test_the_cuda_only_test_finder_finds_each_form():
    """The check above is not blind: each way a test says it needs CUDA is recognised."""
    source = """
import pytest, torch
CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
@gpu
def test_alias(): pass
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_direct(): pass
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_through_name(): pass
def test_in_body():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
def test_cpu(): pass
"""
    tree = ast.parse(source)
    names = _cuda_names(tree)
    found = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and _cuda_only(n, names, False)}
    assert found == {"test_alias", "test_direct", "test_through_name", "test_in_body"}


def test_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, LIGER_WHEEL="")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = {}
    for line in (out / "steps.tsv").read_text().splitlines():
        name, rc, seconds, limit = line.split("\t")
        status[name] = int(rc)
    assert list(status) == list(_steps()), status
    failed = {name: (out / f"{name}.log").read_text()[-2000:] for name, rc in status.items() if rc != 0}
    assert not failed, failed

    probe = json.loads((out / "probe.json").read_text())
    assert probe["precompile"]["launches"] >= 1 and not probe["precompile"]["failed"]
    names = [c["name"] for c in probe["checks"]]
    assert len(names) == 10 and all(c["ok"] for c in probe["checks"]), probe["checks"]
    assert any("dropout" in n for n in names) and any("rope" in n for n in names)
    assert json.loads((out / "env.json").read_text())["torch"]
    # The CUDA tests are selected (collected, not run) by their marker, the fp32 one apart.
    collected = re.search(r"(\d+)/\d+ tests collected|(\d+) tests? collected", (out / "tests.log").read_text())
    assert collected and int(collected[1] or collected[2]) >= 15
    assert "test_cuda_fp32_and_noncausal" in (out / "tests-fp32.log").read_text()
    assert "test_cuda_fp32" not in (out / "tests.log").read_text()
    step = json.loads((out / "step.json").read_text())
    assert {r["engine"] for r in step["rows"]} == {"ours-ac", "hf"}
    for section in ("ce", "elementwise", "attention"):
        rows = json.loads((out / f"kernels_{section}.json").read_text())["results"]
        assert rows and all(r["ms"] > 0 for r in rows), section
    # A wheel carried into the checkout (or Liger installed) changes what the step says, not whether it passes.
    assert re.search(r"no liger_kernel-\*\.whl found|would install \S*liger_kernel-\S*\.whl|already importable",
                     (out / "liger.log").read_text())


@pytest.mark.parametrize("where", ["beside", "root", "dot-whl", "env"])
def test_a_carried_liger_wheel_is_found(tmp_path, where):
    """The wheel is found beside the checkout, in its root, in its .whl/ folder, or from LIGER_WHEEL
    (the script runs from the repository root)."""
    checkout = tmp_path / "checkout"
    wheel_dir = {"beside": tmp_path, "root": checkout, "dot-whl": checkout / ".whl", "env": tmp_path / "w"}[where]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    checkout.mkdir(exist_ok=True)
    (wheel_dir / "liger_kernel-0.8.5-py3-none-any.whl").write_bytes(b"")
    script = f'source <(sed -n "/^find_liger_wheel()/,/^}}/p" {SCRIPT}); cd {checkout}; find_liger_wheel'
    env = dict(os.environ, LIGER_WHEEL=str(wheel_dir) if where == "env" else "")
    found = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True).stdout.strip()
    assert found.endswith("liger_kernel-0.8.5-py3-none-any.whl"), found
    empty = tmp_path / "empty" / "sub"  # neither it nor its parent holds a wheel
    empty.mkdir(parents=True)
    script = f'source <(sed -n "/^find_liger_wheel()/,/^}}/p" {SCRIPT}); cd {empty}; find_liger_wheel'
    nothing = subprocess.run(["bash", "-c", script], env=dict(os.environ, LIGER_WHEEL=""), capture_output=True,
                             text=True).stdout.strip()
    assert nothing == ""
