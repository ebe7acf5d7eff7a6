"""The command line on real-world tables: what users have is read, what is wrong is refused.

One test (or more) per case of the report that motivated these checks: index columns, categorical and
missing values, delimiters, compression, header-less files, column selection, calibrate's input checks,
predict / load_model, output folders, reports for many classes, convergence, warnings, bench devices,
start-up time and the wording of errors.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_iris, load_wine

from .test_cli import assert_user_error, invoke

SRC = str(Path(__file__).resolve().parents[1] / "src")


def iris_frame(sorted_by_class=True) -> pd.DataFrame:
    frame = load_iris(as_frame=True).frame
    frame["label"] = np.array(["setosa", "versicolor", "virginica"])[frame.pop("target")]
    return frame if sorted_by_class else frame.sample(frac=1.0, random_state=0)


def penguins_like(n=150, seed=0) -> pd.DataFrame:
    """A penguins-style table: a categorical column that carries the signal, numbers with missing cells."""
    rng = np.random.default_rng(seed)
    species = rng.integers(0, 3, n)
    island = np.array(["Biscoe", "Dream", "Torgersen"])[species]
    flip = rng.random(n) < 0.1
    island[flip] = "Dream"
    frame = pd.DataFrame({
        "island": island,
        "bill_length_mm": 40 + 5 * species + rng.normal(size=n),
        "body_mass_g": 4000 + 300 * rng.normal(size=n),
        "species": np.array(["Adelie", "Chinstrap", "Gentoo"])[species],
    })
    frame.loc[[3, 10, 20], "bill_length_mm"] = np.nan
    frame.loc[[5, 30], "island"] = None
    return frame


def model_meta(out: Path) -> dict:
    return json.loads((out / "model" / "model.json").read_text())


# ------------------------------------------------------------------ 1. a pandas / R index column
def test_pandas_index_column_is_dropped_with_a_note(tmp_path):
    path = tmp_path / "iris.csv"
    iris_frame().to_csv(path)  # pandas' default: an unnamed first column 0, 1, 2, ... (class-sorted rows)
    result = invoke("train", path, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "note:" in result.stdout and "row index" in result.stdout
    meta = model_meta(tmp_path / "run")
    assert meta["input_features"] == list(load_iris().feature_names)  # no '' / 'Unnamed: 0' feature


def test_r_write_csv_row_names_are_dropped(tmp_path):
    frame = iris_frame()
    lines = ['"",' + ",".join(f'"{c}"' for c in frame.columns)]
    lines += [f'"{i + 1}",' + ",".join(f'"{v}"' if isinstance(v, str) else repr(v) for v in row)
              for i, row in enumerate(frame.itertuples(index=False))]
    path = tmp_path / "iris_r.csv"
    path.write_text("\n".join(lines) + "\n")
    from softmaxkit.datasets import load_dataset

    data = load_dataset(path)
    assert data.feature_names == list(load_iris().feature_names)
    assert any("row index" in note for note in data.notes)


# ------------------------------------------------------------------ 2. ordinary tables
def test_categorical_and_missing_values_are_encoded_saved_and_applied(tmp_path):
    frame = penguins_like()
    path = tmp_path / "penguins.csv"
    frame.to_csv(path, index=False)
    out = tmp_path / "run"
    result = invoke("train", path, "--label-column", "species", "--out", out)
    assert result.exit_code == 0, result.output
    assert "one-hot encoded (island)" in result.stdout and "missing values imputed" in result.stdout
    meta = model_meta(out)
    assert meta["categorical"] == ["island"] and meta["preprocessing"]
    assert (out / "model" / "preprocess.skops").exists()
    assert not list(out.rglob("*.pkl")) and not list(out.rglob("*.pickle"))

    import softmaxkit

    saved = softmaxkit.load_model(out / "model")
    raw = frame.drop(columns="species")
    accuracy = np.mean(saved.predict(raw) == frame["species"].to_numpy())
    assert accuracy > 0.85
    # a category never seen in training and a missing cell still predict (one-hot zeros, imputed value)
    odd = raw.iloc[:2].copy()
    odd.loc[odd.index[0], "island"] = "Atlantis"
    odd.loc[odd.index[1], "body_mass_g"] = np.nan
    np.testing.assert_allclose(saved.predict_proba(odd).sum(axis=1), 1.0)

    strict = invoke("train", path, "--label-column", "species", "--no-preprocess", "--out", tmp_path / "s")
    assert_user_error(strict, "column 'island' must be numeric", "--no-preprocess")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("name", "writer", "extra"),
    [
        ("iris.tsv", lambda f, p: f.to_csv(p, sep="\t", index=False), ()),
        ("iris_semicolon.csv", lambda f, p: f.to_csv(p, sep=";", index=False), ()),
        ("iris_pipe.txt", lambda f, p: f.to_csv(p, sep="|", index=False), ("--delimiter", "|")),
        ("iris.csv.gz", lambda f, p: f.to_csv(p, index=False, compression="gzip"), ()),
        ("iris.csv.bz2", lambda f, p: f.to_csv(p, index=False, compression="bz2"), ()),
    ],
)
def test_delimiters_and_compression(tmp_path, name, writer, extra):
    path = tmp_path / name
    writer(iris_frame(sorted_by_class=False), path)
    from softmaxkit.datasets import load_dataset

    data = load_dataset(path, delimiter=extra[1] if extra else None)
    assert data.X.shape == (150, 4) and data.feature_names == list(load_iris().feature_names)
    assert sorted(set(data.y)) == ["setosa", "versicolor", "virginica"]


def test_header_less_files(tmp_path):
    X, y = load_iris(return_X_y=True)
    path = tmp_path / "iris.data"
    path.write_text("".join(",".join(map(str, row)) + f",{t}\n" for row, t in zip(X, y)))
    # without --no-header the first data row is not silently eaten as column names
    assert_user_error(invoke("train", path, "--out", tmp_path / "a"), "looks like data", "--no-header")
    from softmaxkit.datasets import load_dataset

    data = load_dataset(path, header=False)
    assert data.X.shape == (150, 4) and data.y.tolist() == y.tolist()  # every row kept, label = last column
    assert any("the label is the last column" in note for note in data.notes)
    first = load_dataset(path, header=False, label_column="1")
    assert first.feature_names == ["column_2", "column_3", "column_4", "column_5"]
    with pytest.raises(ValueError, match="column number in \\[1, 5\\]"):
        load_dataset(path, header=False, label_column="species")


def test_features_and_drop_columns(tmp_path):
    path = tmp_path / "iris.csv"
    iris_frame(False).to_csv(path, index=False)
    from softmaxkit.datasets import load_dataset

    names = load_iris().feature_names
    assert load_dataset(path, features=[names[2], names[0]]).feature_names == [names[2], names[0]]
    assert load_dataset(path, drop_columns=[names[0]]).feature_names == names[1:]
    assert load_dataset("wine", features=["alcohol", "proline"]).X.shape == (178, 2)
    assert_user_error(invoke("train", path, "--features", "petal,sepal", "--out", tmp_path / "o"),
                      "--features:", "no column 'petal', 'sepal'")


def test_identifier_columns_are_refused(tmp_path):
    frame = iris_frame(False)
    frame["name"] = [f"flower-{i}" for i in range(len(frame))]
    frame.to_csv(tmp_path / "ids.csv", index=False)
    assert_user_error(invoke("train", tmp_path / "ids.csv", "--out", tmp_path / "o"),
                      "column 'name' holds 150 distinct text values", "--drop-columns name")


# ------------------------------------------------------------------ 3. calibrate checks its input
def _logits_file(path: Path, n=600, classes=4, seed=0, probabilities=False) -> Path:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = 2 * rng.normal(size=(n, classes))
    logits[np.arange(n), labels] += 2.0
    values = logits
    if probabilities:
        values = np.exp(logits - logits.max(1, keepdims=True))
        values /= values.sum(1, keepdims=True)
    frame = pd.DataFrame(values, columns=[f"c{i}" for i in range(classes)])
    frame["label"] = labels
    frame.to_csv(path, index=False, float_format="%.12g")
    return path


def test_calibrate_converts_probabilities_and_says_so(tmp_path):
    logits = _logits_file(tmp_path / "logits.csv")
    probs = _logits_file(tmp_path / "probs.csv", probabilities=True)
    a = invoke("calibrate", logits, "--out", tmp_path / "a")
    b = invoke("calibrate", probs, "--out", tmp_path / "b")
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert "holds probabilities" in b.stdout and "logarithms" in b.stdout
    ta = json.loads((tmp_path / "a" / "calibration.json").read_text())["parameters"]["temperature_"]
    tb = json.loads((tmp_path / "b" / "calibration.json").read_text())["parameters"]["temperature_"]
    assert ta == pytest.approx(tb, rel=1e-6)  # log softmax(z) differs from z by a per-row constant only
    assert_user_error(invoke("calibrate", probs, "--input", "logits", "--out", tmp_path / "c"),
                      "holds probabilities", "not logits")
    assert not (tmp_path / "c").exists()


def test_calibrate_refuses_features(tmp_path):
    assert_user_error(invoke("calibrate", "digits", "--out", tmp_path / "o"), "'digits' is a dataset of features")
    X, y = load_wine(return_X_y=True)
    frame = pd.DataFrame(X, columns=load_wine().feature_names)
    frame["label"] = y
    frame.to_csv(tmp_path / "wine.csv", index=False)
    assert_user_error(invoke("calibrate", tmp_path / "wine.csv", "--out", tmp_path / "o"),
                      "uses only 3 of the 13 classes", "look like features")
    iris = pd.DataFrame(load_iris().data, columns=["a", "b", "c", "d"])
    iris["label"] = load_iris().target
    iris.to_csv(tmp_path / "iris.csv", index=False)
    assert_user_error(invoke("calibrate", tmp_path / "iris.csv", "--out", tmp_path / "o"),
                      "no better than always predicting the most frequent class")
    assert not (tmp_path / "o").exists()


def test_calibrate_reports_a_temperature_at_its_bound(tmp_path):
    # every row right with a huge margin: the likelihood keeps rising as T -> 0, so T stops at 0.01
    n = 200
    labels = np.arange(n) % 2
    logits = np.where(np.eye(2)[labels] > 0, 30.0, 0.0)
    frame = pd.DataFrame(logits, columns=["z0", "z1"])
    frame["label"] = labels
    frame.to_csv(tmp_path / "sharp.csv", index=False)
    result = invoke("calibrate", tmp_path / "sharp.csv", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "warning:" in lines[0] and "at a bound" in lines[0]
    assert ".py" not in result.stderr  # one line, no source path
    assert json.loads((tmp_path / "o" / "calibrator.json").read_text())["at_bound"] is True
    assert json.loads((tmp_path / "o" / "calibration.json").read_text())["at_bound"] is True
    from softmaxkit import calibration

    assert calibration.load(tmp_path / "o" / "calibrator.json").at_bound_


# ------------------------------------------------------------------ 4. predict, load_model, output folders
def test_predict_command_matches_load_model(tmp_path):
    frame = penguins_like(seed=1)
    path = tmp_path / "p.csv"
    frame.to_csv(path, index=False)
    assert invoke("train", path, "--label-column", "species", "--out", tmp_path / "run").exit_code == 0
    out = tmp_path / "pred.csv"
    result = invoke("predict", tmp_path / "run" / "model", path, "--label-column", "species", "--out", out)
    assert result.exit_code == 0, result.output
    assert "accuracy against column 'species'" in result.stdout
    written = pd.read_csv(out)
    assert list(written.columns) == ["prediction", "p_Adelie", "p_Chinstrap", "p_Gentoo"]
    import softmaxkit

    saved = softmaxkit.load_model(tmp_path / "run" / "model")
    expected = saved.predict_proba(frame.drop(columns="species"))
    np.testing.assert_allclose(written.iloc[:, 1:].to_numpy(), expected, rtol=1e-5)
    assert (written["prediction"] == saved.predict(frame.drop(columns="species"))).all()
    # --out is checked before any work; an existing file is not replaced without --overwrite
    assert_user_error(invoke("predict", tmp_path / "run" / "model", path, "--out", out), "exists", "--overwrite")
    assert_user_error(invoke("predict", tmp_path / "nomodel", path), "not a saved softmaxkit model")
    missing = frame.drop(columns=["island", "species"])
    missing.to_csv(tmp_path / "m.csv", index=False)
    assert_user_error(invoke("predict", tmp_path / "run" / "model", tmp_path / "m.csv"),
                      "lacks the model's feature column(s) 'island'")


def test_an_earlier_output_folder_is_refused_or_replaced_whole(tmp_path):
    out = tmp_path / "run"
    assert invoke("train", "iris", "--out", out).exit_code == 0
    assert (out / "model").is_dir()
    before = (out / "report.html").stat().st_mtime_ns
    assert_user_error(invoke("compare", "iris", "--losses", "ce", "--out", out), "earlier run", "--overwrite")
    assert (out / "report.html").stat().st_mtime_ns == before  # untouched
    assert invoke("compare", "iris", "--losses", "ce", "--out", out, "--overwrite").exit_code == 0
    assert not (out / "model").exists()  # replaced whole: no model/ of the earlier train beside the new report
    assert (out / "report.html").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_user_error(invoke("train", "iris", "--out", other, "--overwrite"), "holds other files")
    assert (other / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ 5. reports that scale
def _capture_figures(monkeypatch):
    from softmaxkit.cli.report import figures

    captured = {}
    original = figures.to_png

    def keep(fig):
        captured.setdefault("figs", []).append(fig)
        return original(fig)

    monkeypatch.setattr(figures, "to_png", keep)
    return captured


def test_confusion_labels_are_full_class_names(tmp_path, monkeypatch):
    captured = _capture_figures(monkeypatch)
    from softmaxkit.cli import _experiment
    from softmaxkit.cli.report import figures
    from softmaxkit.datasets import load_dataset

    experiment = _experiment.run(load_dataset("wine"), ["cross_entropy"], max_iter=50, sweep=False)
    figures.confusion_grid(experiment)
    axis = captured["figs"][-1].axes[0]
    assert [t.get_text() for t in axis.get_xticklabels()] == ["class_0", "class_1", "class_2"]


def test_many_classes_report_shows_summaries(tmp_path):
    rng = np.random.default_rng(0)
    classes, per = 40, 12
    y = np.repeat(np.arange(classes), per)
    X = rng.normal(size=(classes, 6))[y] + 0.5 * rng.normal(size=(classes * per, 6))
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(6)])
    frame["label"] = [f"a-rather-long-class-name-{c:03d}" for c in y]
    frame.to_csv(tmp_path / "many.csv", index=False)
    result = invoke("compare", tmp_path / "many.csv", "--losses", "ce", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "o" / "report.html").read_text()
    assert "Most confused classes" in page and "worst classes" in page
    assert "a-rather-long-class-name-0" in page  # full names in the tables
    assert not (tmp_path / "o" / "figures" / "confusion.png").exists()
    assert "<th>a-rather-long-class-name-000</th>" not in page  # no 40-column count table
    assert "rows per class" in page


# ------------------------------------------------------------------ 6. many classes: alpha and convergence
def test_auto_alpha_scales_with_the_data():
    from softmaxkit.cli._experiment import auto_alpha

    assert auto_alpha(100) == 1e-3 and auto_alpha(40_000) == pytest.approx(2.5e-5)


def test_convergence_is_reported(tmp_path):
    from softmaxkit import SoftmaxRegression

    X, y = load_iris(return_X_y=True)
    model = SoftmaxRegression(alpha=1e-3).fit((X - X.mean(0)) / X.std(0), y)
    assert model.converged_ and model.stop_reason_ == "converged"
    with pytest.warns(Warning, match="did not converge"):
        short = SoftmaxRegression(alpha=1e-6, max_iter=2).fit(X, y)
    assert not short.converged_ and "stopped after" in short.stop_reason_
    result = invoke("train", "iris", "--max-iter", "2", "--alpha", "1e-6", "--out", tmp_path / "o")
    assert result.exit_code == 0
    assert "NOT converged" in result.stdout
    assert "may be far from its optimum" in result.stderr and ".py" not in result.stderr
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["models"][0]["converged"] is False


# ------------------------------------------------------------------ 8. bench devices
def test_bench_bad_devices_are_one_line():
    assert_user_error(invoke("bench", "--device", "tpu"), "--device must be one of cpu, cuda, but got 'tpu'")
    import torch

    if not torch.cuda.is_available():
        assert_user_error(invoke("bench", "--device", "cuda"), "no CUDA device is available")


# ------------------------------------------------------------------ 9. --out checked before work
def test_unwritable_out_is_found_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke("train", "iris", "--out", blocker / "run")
    assert_user_error(result, "cannot write --out", "not a writable folder")
    assert "training" not in result.stdout


# ------------------------------------------------------------------ 10. feedback
def _subprocess(*args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": SRC, "NO_COLOR": "1", **(env or {})})


@pytest.mark.parametrize(
    "args",
    [("--help",), ("train", "--help"), ("--version",), ("train", "iris", "--seed", "-1"),
     ("train", "no-such-file.csv"), ("train", "iris", "--class-weight", "bogus"), ("bench", "--device", "tpu"),
     ("claims", "--help"), ("claims", "--only", "bogus")],
)
def test_help_and_user_errors_do_not_import_torch(args):
    import re

    result = _subprocess("-X", "importtime", "-m", "softmaxkit", *args)
    assert result.returncode == (0 if "--help" in args or "--version" in args else 2), result.stderr
    torch_lines = [line for line in result.stderr.splitlines() if re.search(r"\|\s+torch(\.|$)", line)]
    assert not torch_lines, torch_lines[:3]


def test_import_softmaxkit_registers_everything_outside_the_command():
    code = "import sys, softmaxkit; assert 'softmaxkit.functional' in sys.modules and 'torch' in sys.modules"
    assert _subprocess("-c", code).returncode == 0


def test_version_and_python_m_softmaxkit():
    import softmaxkit

    result = _subprocess("-m", "softmaxkit", "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"softmaxkit {softmaxkit.__version__}"


def test_progress_lines_show_when_piped(tmp_path):
    result = _subprocess("-m", "softmaxkit", "train", "iris", "--out", str(tmp_path / "o"),
                         env={"SOFTMAXKIT_PROGRESS_INTERVAL": "0"})
    assert result.returncode == 0, result.stderr
    assert "[1/1] training cross-entropy ..." in result.stdout
    assert "[1/1] training cross-entropy: iteration 1/300" in result.stdout  # a line while it runs
    assert "[1/1] cross-entropy:" in result.stdout and "converged" in result.stdout


# ------------------------------------------------------------------ 11. wording
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("train", "iris", "--hidden", "0"), "--hidden widths must be integers >= 1"),
        (("train", "iris", "--loss", "nosuch"), "unknown loss 'nosuch' for --loss;"),
        (("train", "iris", "--loss", "ce,focal"), "--loss takes one loss"),
        (("train", "iris", "--seed", "-1"), "--seed must be an integer in [0, 2**32 - 1]"),
        (("train", "iris", "--alpha", "nan"), "--alpha must be a finite number >= 0 or 'auto'"),
        (("train", "iris", "--solver", "sgd"), "--solver must be one of 'lbfgs', 'adamw'"),
        (("train", "iris", "--label-smoothing", "2"), "--label-smoothing"),
        (("train", "iris", "--max-iter", "0"), "--max-iter must be an integer >= 1"),
        (("compare", "iris", "--long-tail", "0.5"), "--long-tail must be a finite imbalance ratio >= 1"),
        (("calibrate", "x.csv", "--bins", "0"), "--bins must be an integer >= 1"),
        (("predict", "nomodel", "iris", "--out", "/"), "is a folder"),
    ],
)
def test_errors_name_the_command_line_flags(tmp_path, args, fragment):
    result = invoke(*args, *(() if "--out" in args else ("--out", tmp_path / "o")))
    assert_user_error(result, fragment)
    assert "hidden_layer_sizes" not in result.stderr and "np.int64" not in result.stderr


def test_messages_never_show_numpy_reprs():
    from softmaxkit.cli._app import cli_wording
    from softmaxkit.cli._experiment import _shown

    assert _shown(np.int64(2)) == "2" and _shown(np.str_("cat")) == "'cat'"
    assert cli_wording("class np.int64(2) and `hidden_layer_sizes`") == "class 2 and --hidden"


def test_gzip_garbage_is_one_line(tmp_path):
    (tmp_path / "bad.csv.gz").write_bytes(b"not gzip at all")
    assert_user_error(invoke("train", tmp_path / "bad.csv.gz", "--out", tmp_path / "o"), "not a readable gzip file")
    good = tmp_path / "ok.csv.gz"
    good.write_bytes(gzip.compress(b"a,label\n1,x\n2,y\n3,x\n"))
    from softmaxkit.datasets import load_dataset

    assert load_dataset(good).X.shape == (3, 1)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("train", "iris", "--seed", "abc"), "Invalid value for '--seed'"),
        (("calibrate", "x.csv", "--method", "nosuch"), "Invalid value for '--method'"),
        (("train", "iris", "--bogus"), "No such option: --bogus"),
        (("frobnicate",), "No such command 'frobnicate'"),
    ],
)
def test_usage_errors_are_one_line_without_traceback(args, fragment):
    result = _subprocess("-m", "softmaxkit", *args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "--help" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
