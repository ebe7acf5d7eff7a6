"""The lean install: ``softmaxkit`` needs only torch and numpy; the ``cli`` extra adds the rest.

Each check runs in a fresh interpreter whose ``sitecustomize`` blocks scikit-learn, SciPy, matplotlib,
rich, typer, pandas and skops (an import of any of them raises ``ModuleNotFoundError``), as on a machine
where ``pip install softmaxkit`` ran without the extra.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
BLOCKED = ("sklearn", "scipy", "matplotlib", "rich", "typer", "pandas", "skops")

BLOCKER = f"""
import importlib.abc, importlib.util, sys

# A blocked package behaves as if it were not installed: importing it raises ModuleNotFoundError, and asking
# whether it exists (importlib.util.find_spec, as the CLI and torch._dynamo's trace rules do) answers None.
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

_find_spec = importlib.util.find_spec

def _absent_find_spec(name, package=None):
    if name.split(".")[0] in {BLOCKED!r}:
        return None
    return _find_spec(name, package)

importlib.util.find_spec = _absent_find_spec
sys.meta_path.insert(0, _Blocker())
"""


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blocker")
    (folder / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), SRC]), "NO_COLOR": "1"}
    env.pop("PYTHONWARNINGS", None)
    return env


def run(env, *args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def test_the_blocker_blocks(blocked_env):
    result = run(blocked_env, "-c", "import sklearn")
    assert result.returncode != 0 and "blocked by the test" in result.stderr
    result = run(blocked_env, "-c", "import importlib.util; print(importlib.util.find_spec('pandas'))")
    assert result.returncode == 0 and result.stdout.strip() == "None", result.stderr


def test_import_and_every_loss_without_the_extra(blocked_env):
    code = textwrap.dedent("""
        import sys
        import torch
        import softmaxkit
        from softmaxkit import nn

        torch.manual_seed(0)
        z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
        y = torch.tensor([0, 1, 2, 3, 4, 1])
        h, w = torch.randn(6, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
        losses = [
            softmaxkit.cross_entropy(z, y, label_smoothing=0.1, z_loss=1e-4),
            softmaxkit.focal_loss(z, y), softmaxkit.poly1_cross_entropy(z, y),
            softmaxkit.distillation_loss(z, torch.randn(6, 5, dtype=torch.float64), temperature=2.0),
            softmaxkit.sparsemax_loss(z, y), softmaxkit.entmax15_loss(z, y), softmaxkit.entmax_bisect_loss(z, y),
            softmaxkit.linear_cross_entropy(h, w, y),
            softmaxkit.sampled_softmax_loss(h, w, y, num_sampled=3),
            nn.CrossEntropyLoss()(z, y),
        ]
        total = sum(loss.sum() for loss in losses)
        total.backward()
        assert torch.isfinite(total) and torch.isfinite(z.grad).all()
        for f in (softmaxkit.softmax, softmaxkit.log_softmax, softmaxkit.sparsemax, softmaxkit.entmax15,
                  softmaxkit.gumbel_softmax):
            assert torch.isfinite(f(z.detach())).all()
        softmaxkit.logsumexp(z, dim=-1)
        softmaxkit.class_weights(torch.tensor([10.0, 5.0, 1.0]), method="effective_number")
        softmaxkit.metrics.expected_calibration_error(torch.softmax(z.detach(), -1), y)
        blocked = [m for m in sys.modules if m.split(".")[0] in ("sklearn", "scipy", "matplotlib", "pandas")]
        assert not blocked, blocked
        print("ok", len(losses))
    """)
    result = run(blocked_env, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok 10"


def test_softmax_regression_without_the_extra_names_it(blocked_env):
    code = textwrap.dedent("""
        import softmaxkit
        try:
            softmaxkit.SoftmaxRegression
        except ImportError as error:
            print(error)
    """)
    result = run(blocked_env, "-c", code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "softmaxkit[cli]" in lines[0] and "pip install" in lines[0]


@pytest.mark.parametrize("args", [("-m", "softmaxkit", "--help"), ("-m", "softmaxkit", "demo"),
                                  ("-m", "softmaxkit.cli", "--version")])
def test_the_command_line_without_the_extra_is_one_line_exit_2(blocked_env, args):
    result = run(blocked_env, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "softmaxkit[cli]" in lines[0] and "Traceback" not in result.stderr


def test_packaging_metadata():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(SRC).parent
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["dependencies"] == ["torch>=2.4", "numpy>=1.24"]
    cli = " ".join(project["project"]["optional-dependencies"]["cli"])
    for name in ("scikit-learn", "scipy", "matplotlib", "rich", "typer", "pandas", "skops"):
        assert name in cli
    assert "softmaxkit[cli]" in project["project"]["optional-dependencies"]["dev"]
    assert project["project"]["license"] == "Apache-2.0" and project["project"]["license-files"] == ["LICENSE"]
    assert any(r.startswith("setuptools>=77") for r in project["build-system"]["requires"])
    assert "Apache License" in (root / "LICENSE").read_text() and "Version 2.0" in (root / "LICENSE").read_text()
    assert (Path(SRC) / "softmaxkit" / "py.typed").exists()
    assert '-e ".[cli]"' in (root / "Makefile").read_text()


def test_importing_the_estimator_module_names_the_extra(blocked_env):
    result = run(blocked_env, "-c", "import softmaxkit.estimator")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("ImportError: softmaxkit.SoftmaxRegression needs")
    assert "softmaxkit[cli]" in result.stderr.strip().splitlines()[-1]
