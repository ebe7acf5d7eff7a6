"""The ``softmaxkit`` command end to end: each sub-command runs as a subprocess on small data.

Checked: exit status, the files written (and that they are complete and self-contained), the messages,
and the behaviour on broken, empty and missing inputs (exit status 2, one line on stderr, no traceback).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_iris, load_wine

COMMANDS = ("demo", "train", "predict", "compare", "calibrate", "explain", "bench", "claims")


def run_cli(*args, cwd=None, timeout=240):
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "softmaxkit.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
    )


def invoke(*args):
    """Run the command in this process (same app, same exit codes; much faster than a subprocess)."""
    from typer.testing import CliRunner

    return CliRunner().invoke(_cli_module().app, [str(a) for a in args])


def _cli_module():
    import importlib

    return importlib.import_module("softmaxkit.cli.main")


def _bench_module():
    import importlib

    return importlib.import_module("softmaxkit.cli.commands.bench")


def assert_user_error(result, *fragments):
    """Exit status 2, a single line on stderr naming the problem, and no traceback."""
    code = result.returncode if hasattr(result, "returncode") else result.exit_code
    assert code == 2, (result.stdout, result.stderr)
    assert getattr(result, "exception", None) is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_csv(path: Path, X, y, names=None, label="label") -> Path:
    names = names or [f"f{i}" for i in range(X.shape[1])]
    lines = [",".join([*names, label])]
    lines += [",".join([*(f"{v:.17g}" for v in row), str(t)]) for row, t in zip(X, y)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def check_report(out: Path, n_models: int) -> dict:
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    images = page.count('src="data:image/png;base64,')
    assert images == 6
    assert "src=\"http" not in page and "<link" not in page  # self-contained
    first = page.split('src="data:image/png;base64,', 1)[1].split('"', 1)[0]
    assert base64.b64decode(first)[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("reliability", "confusion", "per_class_f1", "loss_curves", "temperature_sweep", "gradients"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "metrics.json").read_text())
    assert len(summary["models"]) == n_models
    for model in summary["models"]:
        for key in ("accuracy", "macro_f1", "balanced_accuracy", "nll", "ece", "ece_after", "temperature"):
            assert np.isfinite(model[key])
        assert 0 <= model["ece"] <= 1 and model["temperature"] > 0
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporaries
    return summary


# ---------------------------------------------------------------------------------------------- help
def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.stdout and "--help" in result.stdout


def test_unknown_command_and_option_exit_2():
    assert invoke("frobnicate").exit_code == 2
    assert invoke("explain", "1", "2", "--bogus").exit_code == 2


# ---------------------------------------------------------------------------------------------- explain
def test_explain_worked_example():
    result = run_cli("explain", "2.0", "1.0", "0.1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "p = (0.659, 0.242, 0.099)" in out
    assert "−log 0.6590 = 0.4170" in out
    assert "(-0.3410, 0.2424, 0.0986)" in out  # p − y for target 0
    assert "eigenvalues (0.0000, 0.1279, 0.3693)" in out
    errors = [float(line.rsplit("=", 1)[1]) for line in out.splitlines() if "finite-difference check" in line]
    assert len(errors) == 2 and max(errors) < 1e-8
    assert "s=10: 0.0001" in out and "→ 0 as s grows" in out  # saturation: the arg-max is the target


def test_explain_temperature_target_and_negative_logits():
    result = invoke("explain", "-1.5", "0.5", "3", "-4", "--temperature", "2", "--target", "3")
    assert result.exit_code == 0, result.output
    from softmaxkit import reference

    p = reference.softmax(np.array([-1.5, 0.5, 3.0, -4.0]), temperature=2.0)
    assert "p = (" + ", ".join(f"{v:.3f}" for v in p) + ")" in result.stdout
    assert "T = 2, target class k = 3" in result.stdout
    assert "√2 = 1.4142 as s grows" in result.stdout  # class 3 is not the arg-max: confidently wrong


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("1.0",), "give at least two logits"),
        (("1", "2", "--target", "2"), "--target must be a class index in [0, 2), but got 2"),
        (("1", "2", "--temperature", "0"), "--temperature must be a finite number > 0"),
        (("1", "inf"), "every logit must be a finite number"),
    ],
)
def test_explain_bad_input(args, fragment):
    assert_user_error(invoke("explain", *args), fragment)



# ---------------------------------------------------------------------------------------------- compare / train
def test_compare_on_a_csv_file(tmp_path):
    X, y = load_iris(return_X_y=True)
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    data = write_csv(tmp_path / "iris.csv", X, names)
    out = tmp_path / "out"
    result = run_cli("compare", data, "--losses", "ce,ls", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "cross-entropy" in result.stdout and "label smoothing" in result.stdout
    summary = check_report(out, 2)
    assert summary["classes"] == ["setosa", "versicolor", "virginica"]
    assert [m["model"] for m in summary["models"]] == ["cross-entropy", "label smoothing ε=0.1"]
    assert min(m["accuracy"] for m in summary["models"]) > 0.85
    assert (out / "metrics.csv").read_text().startswith("model,accuracy,macro_f1")


def test_train_saves_a_loadable_pickle_free_model(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "wine", "--loss", "ce", "--out", out)
    assert result.returncode == 0, result.stderr
    assert (out / "model" / "model.json").exists() and (out / "model" / "model.npz").exists()
    check_report(out, 1)
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["format"] == "softmaxkit.SoftmaxRegression/1"
    with np.load(out / "model" / "model.npz", allow_pickle=False) as archive:  # no object arrays inside
        assert {"coef", "intercept", "mean", "scale"} <= set(archive.files)

    from softmaxkit.cli._io import load_model

    model, meta, mean, scale = load_model(out / "model")
    X, y = load_wine(return_X_y=True)
    proba = model.predict_proba((X - mean) / scale)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert np.mean(model.predict((X - mean) / scale) == y) > 0.95
    assert meta["extra"]["dataset"] == "wine"

    # the public loader: one object, raw features in, preprocessing + standardisation + temperature applied
    import softmaxkit

    saved = softmaxkit.load_model(out / "model")
    T = meta["extra"]["temperature"]
    logits = model._logits((X - mean) / scale) / T
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(saved.predict_proba(X), expected, rtol=1e-10, atol=1e-12)
    assert np.mean(saved.predict(X) == y) > 0.95  # raw features: 99%, not the 33% of an unscaled estimator


def test_train_with_long_tail_and_adamw(tmp_path):
    result = invoke("train", "iris", "--loss", "cb", "--solver", "adamw", "--max-iter", "30",
                    "--long-tail", "5", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o" / "metrics.json").read_text())
    counts = summary["train_counts"]
    assert counts[0] == round(counts[-1] * 5) or abs(counts[0] / counts[-1] - 5) < 1


BROKEN = {
    "missing.csv": (None, ("file not found",)),
    "empty.csv": ("", ("is empty",)),
    "header.csv": ("a,label\n", ("no data rows",)),
    "nolabel.csv": ("a,b\n1,2\n3,4\n", ("no label column 'label'", "--label-column")),
    "text.csv": ("a,label\nx,1\ny,2\n", ("column 'a' must be numeric",)),
    "ragged.csv": ("a,b,label\n1,2,0\n3,1\n", ("line 3: expected 3 comma-separated values",)),
    "junk.npz": ("junk", ("not a readable NPZ archive",)),
    "mnist": (None, ("unknown dataset 'mnist'",)),
}


@pytest.mark.parametrize("name", list(BROKEN))
@pytest.mark.parametrize("command", ["train", "compare"])
def test_broken_empty_and_missing_files(tmp_path, command, name):
    content, fragments = BROKEN[name]
    source = tmp_path / name if name != "mnist" else name
    if content is not None:
        source.write_text(content)
    # --no-preprocess: text feature values are errors (by default they are one-hot encoded)
    result = invoke(command, source, "--out", tmp_path / "out", "--no-preprocess")
    assert_user_error(result, f"softmaxkit {command}: error:", *fragments)
    assert not (tmp_path / "out").exists()  # a validation error leaves no (empty) output folder
    assert not (tmp_path / "out" / "report.html").exists()



def test_compare_bad_options(tmp_path):
    assert_user_error(invoke("compare", "iris", "--losses", "ce,nosuch", "--out", tmp_path),
                      "unknown loss 'nosuch' for --losses")
    assert_user_error(invoke("compare", "iris", "--test-size", "1.5", "--out", tmp_path),
                      "--test-size must lie in (0, 1)")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(invoke("compare", "iris", "--out", blocker), "exists and is not a directory")
    assert_user_error(invoke("train", "iris", "--hidden", "a,b", "--out", tmp_path), "--hidden must be")
    result = invoke("train", "iris", "--class-weight", "bogus", "--out", tmp_path / "cw")
    assert_user_error(result, "--class-weight must be one of 'balanced', 'effective_number', but got 'bogus'")
    assert "training" not in result.stdout  # options are checked before any work (or progress bar) starts
    assert_user_error(invoke("train", "iris", "--loss", "sparsemax", "--label-smoothing", "0.1", "--out", tmp_path / "ls"),
                      "--label-smoothing is not supported with --loss 'sparsemax'")
    assert not (tmp_path / "ls").exists()


# ---------------------------------------------------------------------------------------------- calibrate
def _scores_file(path: Path, n=600, classes=4, scale=3.0, seed=0) -> Path:
    """Logits of an over-confident model: the true class gets a boost, everything is multiplied by ``scale``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), labels] += 1.0
    return write_csv(path, scale * logits, labels, names=[f"z{c}" for c in range(classes)])


def test_calibrate_temperature(tmp_path):
    scores = _scores_file(tmp_path / "scores.csv")
    out = tmp_path / "cal"
    result = run_cli("calibrate", scores, "--method", "temperature", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "temperature_" in result.stdout and "ECE" in result.stdout and "NLL" in result.stdout
    summary = json.loads((out / "calibration.json").read_text())
    # the scores were sharpened by 3: temperature scaling must soften them and cut NLL and ECE
    assert summary["parameters"]["temperature_"] > 1.5
    assert summary["nll_after"] < summary["nll_before"]
    assert summary["ece_after"] < summary["ece_before"]
    assert summary["accuracy_after"] == summary["accuracy_before"]
    rows = (out / "calibrated.csv").read_text().splitlines()
    assert rows[0] == "p_z0,p_z1,p_z2,p_z3,label,split" and len(rows) == 601
    probs = np.array([[float(v) for v in row.split(",")[:4]] for row in rows[1:]])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-8)
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in (out / "report.html").read_text()


@pytest.mark.parametrize("method", ["vector", "isotonic", "histogram"])
def test_calibrate_other_methods(tmp_path, method):
    scores = _scores_file(tmp_path / "scores.csv", n=400, classes=3)
    result = invoke("calibrate", scores, "--method", method, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o" / "calibration.json").read_text())
    assert summary["method"] == method and np.isfinite(summary["nll_after"])
    # the saved calibrator reloads and reproduces the written probabilities
    from softmaxkit import calibration

    reloaded = calibration.load(tmp_path / "o" / "calibrator.json")
    rows = (tmp_path / "o" / "calibrated.csv").read_text().splitlines()[1:]
    written = np.array([[float(v) for v in row.split(",")[:3]] for row in rows])
    logits = np.array([[float(v) for v in row.split(",")[:3]]
                       for row in scores.read_text().splitlines()[1:]])
    np.testing.assert_allclose(np.asarray(reloaded.predict_proba(logits)), written, rtol=1e-9, atol=1e-12)


def test_calibrate_bad_inputs(tmp_path):
    # one real subprocess: the exit status and the single stderr line as a shell sees them
    assert_user_error(run_cli("calibrate", tmp_path / "none.csv", "--out", tmp_path / "o"),
                      "softmaxkit calibrate: error: file not found")
    (tmp_path / "empty.csv").write_text("")
    assert_user_error(invoke("calibrate", tmp_path / "empty.csv", "--out", tmp_path / "o"), "is empty")
    (tmp_path / "junk.npz").write_text("junk")
    assert_user_error(invoke("calibrate", tmp_path / "junk.npz", "--out", tmp_path / "o"), "not a readable NPZ")
    bad = write_csv(tmp_path / "bad.csv", np.zeros((4, 2)), [0, 1, 2, 1])
    assert_user_error(invoke("calibrate", bad, "--out", tmp_path / "o"),
                      "must hold class indices in [0, 2) matching the 2 logit columns")
    assert invoke("calibrate", bad, "--method", "no-such-method").exit_code == 2
    assert not (tmp_path / "o" / "calibrated.csv").exists()


# ---------------------------------------------------------------------------------------------- bench, demo
def test_bench_reaches_the_benchmark_suite():
    # An unknown op makes the suite itself refuse (exit 2) before timing anything: proof that `softmaxkit
    # bench` found and called `benchmarks.__main__.main` with its arguments, in well under a second of work.
    result = run_cli("bench", "--op", "no_such_op", cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2
    assert "unknown op(s) no_such_op" in result.stderr


def test_bench_without_the_repository_says_how_to_run_it(monkeypatch):
    monkeypatch.setattr(_bench_module(), "find_benchmarks", lambda: None)
    result = invoke("bench")
    assert_user_error(result, "python -m benchmarks --quick")


def test_bench_passes_quick_and_options(monkeypatch):
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(_bench_module(), "find_benchmarks",
                        lambda: SimpleNamespace(main=lambda argv: calls.append(argv) or 0))
    result = invoke("bench", "--op", "cross_entropy", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert invoke("bench", "--save-csv").exit_code == 0
    assert calls == [["--quick", "cross_entropy", "--device", "cpu", "--no-csv"], ["--quick"]]


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", out, timeout=300)
    assert result.returncode == 0, result.stderr
    for label in ("cross-entropy", "label smoothing", "class-balanced", "focal", "Poly-1"):
        assert label in result.stdout
    assert "ECE(T)" in result.stdout and "report:" in result.stdout
    summary = check_report(out, 5)
    counts = summary["train_counts"]
    assert counts[0] / counts[-1] >= 40  # long-tailed ×50 (rounded to whole samples)
    assert summary["dataset"] == "digits"
    # every model is useful on the balanced test set, and temperature scaling keeps accuracy
    assert min(m["accuracy"] for m in summary["models"]) > 0.6


# ---------------------------------------------------------------------------------------------- output files
def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    from softmaxkit.cli import _io

    target = tmp_path / "report.html"
    _io.write_text_atomic(target, "old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_io.os, "replace", broken_replace)
    with pytest.raises(OSError):
        _io.write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # the temporary file is gone


def test_atomic_write_gives_files_the_umask_permissions(tmp_path):
    import os

    from softmaxkit.cli import _io

    previous = os.umask(0o022)
    try:
        path = _io.write_text_atomic(tmp_path / "metrics.csv", "a,b\n")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644  # as open() would give, not mkstemp's 0600


def test_load_model_rejects_missing_and_foreign_files(tmp_path):
    from softmaxkit import SoftmaxRegression
    from softmaxkit.cli import _io

    with pytest.raises(_io.UserError, match="not a saved softmaxkit model: model.json is missing"):
        _io.load_model(tmp_path)
    X, y = load_iris(return_X_y=True)
    model = SoftmaxRegression(alpha=1e-2, hidden_layer_sizes=(5,), random_state=0).fit(X, y)
    _io.save_model(model, tmp_path / "m", feature_names=[f"f{i}" for i in range(4)])
    loaded, meta, mean, scale = _io.load_model(tmp_path / "m")
    assert mean is None and scale is None and meta["params"]["hidden_layer_sizes"] == [5]
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))  # MLP head round-trips
    meta["format"] = "something-else/9"
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(_io.UserError, match="has format 'something-else/9'"):
        _io.load_model(tmp_path / "m")
