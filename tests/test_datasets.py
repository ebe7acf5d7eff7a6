"""Datasets: named sets, user files (CSV / NPZ / Parquet) with every kind of broken input, long tails."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.datasets import load_digits, load_wine

from softmaxkit.datasets import NAMED, DatasetError, load_dataset, long_tail_counts, make_long_tailed


@pytest.mark.parametrize("name", NAMED)
def test_named_datasets_match_sklearn(name):
    from sklearn import datasets

    data = load_dataset(name)
    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    np.testing.assert_array_equal(data.X, X)
    np.testing.assert_array_equal(data.y, y)
    assert data.X.dtype == np.float64
    assert len(data.feature_names) == X.shape[1]
    assert len(data.target_names) == len(np.unique(y)) == data.n_classes


def _write_csv(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_round_trip(tmp_path):
    path = _write_csv(tmp_path / "d.csv", "a,b,label\n1,2.5,cat\n-3,4e-1,dog\n0.5,6,cat\n")
    data = load_dataset(path)
    np.testing.assert_array_equal(data.X, [[1, 2.5], [-3, 0.4], [0.5, 6]])
    assert data.y.tolist() == ["cat", "dog", "cat"]
    assert data.feature_names == ["a", "b"]
    assert data.name == "d.csv"


def test_csv_integer_labels_and_custom_label_column(tmp_path):
    path = _write_csv(tmp_path / "d.csv", "target,x\n1,0.1\n0,0.2\n2,0.3\n")
    data = load_dataset(path, label_column="target")
    assert data.y.dtype == np.int64 and data.y.tolist() == [1, 0, 2]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "is empty"),
        ("\n\n", "is empty"),
        ("a,b,label\n", "header row but no data rows"),
        ("a,b\n1,2\n3,4\n", "has no label column 'label'; its columns are 'a', 'b'"),
        ("a,label\n1,x\n2\n", "line 3: expected 2 comma-separated values"),
        ("a,label\nhello,x\n2,y\n", "column 'a' must be numeric, but row 1 holds 'hello'"),
        ("a,label\n,x\n2,y\n", "column 'a' holds a missing or non-finite value at row 1"),
        ("a,label\n1,x\n2,x\n", "every row has the label 'x'; at least 2 classes"),
        ("a,label\n1,x\n", "1 data row"),
        ("a,a,label\n1,2,x\n", "repeats a column name"),
        ("label\nx\ny\n", "has a label column but no feature columns"),
        ("a,label\n1,\n2,y\n", "the label is missing at row 1"),
        ("a,label\nnan,x\n2,y\n", "missing or non-finite value at row 1"),
    ],
)
def test_broken_csv_files_raise_one_clear_error(tmp_path, content, match):
    # preprocess=False: text and missing feature values are errors (by default they are encoded / imputed)
    path = _write_csv(tmp_path / "bad.csv", content)
    with pytest.raises(DatasetError, match=match):
        load_dataset(path, preprocess=False)


def test_binary_garbage_csv(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(DatasetError, match="not a UTF-8 text file"):
        load_dataset(path)


def test_missing_file_unknown_name_and_suffix(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        load_dataset(tmp_path / "nope.csv")
    with pytest.raises(DatasetError, match="unknown dataset 'mnist': expected one of digits, iris"):
        load_dataset("mnist")
    other = tmp_path / "d.xlsx"
    other.write_text("x")
    with pytest.raises(DatasetError, match="unsupported file type '.xlsx'"):
        load_dataset(other)
    with pytest.raises(DatasetError, match="is not a file"):
        load_dataset(tmp_path)
    assert issubclass(DatasetError, ValueError)


def test_npz_with_X_and_y(tmp_path):
    X, y = load_wine(return_X_y=True)
    np.savez(tmp_path / "w.npz", X=X, y=y)
    data = load_dataset(tmp_path / "w.npz")
    np.testing.assert_array_equal(data.X, X)
    np.testing.assert_array_equal(data.y, y)


def test_npz_with_columns(tmp_path):
    np.savez(tmp_path / "c.npz", f0=np.array([1.0, 2.0, 3.0]), f1=np.array([0, 1, 0]), label=np.array([0, 1, 1]))
    data = load_dataset(tmp_path / "c.npz")
    assert data.feature_names == ["f0", "f1"]
    np.testing.assert_array_equal(data.X, [[1, 0], [2, 1], [3, 0]])


def test_broken_npz_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive at all")
    with pytest.raises(DatasetError, match="not a readable NPZ archive"):
        load_dataset(tmp_path / "junk.npz")
    np.savez(tmp_path / "obj.npz", X=np.array([[1, None]], dtype=object), y=np.array([0]))
    with pytest.raises(DatasetError, match="object arrays are refused"):
        load_dataset(tmp_path / "obj.npz")
    np.savez(tmp_path / "nolabel.npz", f0=np.arange(3.0))
    with pytest.raises(DatasetError, match="neither arrays 'X' and 'y' nor a label column 'label'"):
        load_dataset(tmp_path / "nolabel.npz")
    np.savez(tmp_path / "shape.npz", X=np.arange(3.0), y=np.arange(3))
    with pytest.raises(DatasetError, match="'X' must be 2-d"):
        load_dataset(tmp_path / "shape.npz")
    np.savez(tmp_path / "rows.npz", X=np.ones((3, 2)), y=np.array([0, 1]))
    with pytest.raises(DatasetError, match="X has 3 rows but y has 2"):
        load_dataset(tmp_path / "rows.npz")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="the parquet extra (pyarrow) is not installed")
    import pyarrow.parquet as pq

    table = pa.table({"x0": [0.5, 1.5, 2.5, 3.5], "x1": [1, 2, 3, 4], "label": ["a", "b", "a", "b"]})
    pq.write_table(table, tmp_path / "d.parquet")
    data = load_dataset(tmp_path / "d.parquet")
    np.testing.assert_array_equal(data.X, [[0.5, 1], [1.5, 2], [2.5, 3], [3.5, 4]])
    assert data.y.tolist() == ["a", "b", "a", "b"]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        load_dataset(tmp_path / "bad.parquet")


def test_long_tail_counts_profiles():
    # exponential: n_max · ρ^(−c/(C−1)), from the head n_max down to n_max/ρ
    counts = long_tail_counts([100] * 5, 16.0)
    np.testing.assert_array_equal(counts, [100, 50, 25, 12, 6])
    # step: half the classes keep n_max, the rest n_max/ρ; two classes at ρ = 49 is the 98:2 split
    np.testing.assert_array_equal(long_tail_counts([500, 700], 49.0, "step"), [500, 10])
    np.testing.assert_array_equal(long_tail_counts([60, 60, 60], 3.0, "step"), [60, 60, 20])
    # the tail never vanishes
    assert long_tail_counts([10, 10], 1000.0).min() == 1


def test_make_long_tailed_on_digits():
    X, y = load_digits(return_X_y=True)
    X_lt, y_lt = make_long_tailed(X, y, imbalance_ratio=50, random_state=0)
    counts = np.bincount(y_lt)
    assert counts[0] == np.bincount(y).min() and counts[-1] == round(counts[0] / 50)
    assert np.all(np.diff(counts) <= 0)
    # rows are real rows of X with their own labels, in the original order, without repeats
    index = np.array([np.flatnonzero((X == row).all(axis=1))[0] for row in X_lt[:50]])
    assert np.all(np.diff(index) > 0)
    np.testing.assert_array_equal(y[index], y_lt[:50])
    # deterministic for a seed, different for another
    again = make_long_tailed(X, y, imbalance_ratio=50, random_state=0)[0]
    other = make_long_tailed(X, y, imbalance_ratio=50, random_state=1)[0]
    np.testing.assert_array_equal(X_lt, again)
    assert X_lt.shape == other.shape and not np.array_equal(X_lt, other)


def test_make_long_tailed_ratio_one_is_balanced_and_inputs_are_untouched():
    X, y = load_wine(return_X_y=True)
    X_copy = X.copy()
    _, y_bal = make_long_tailed(X, y, imbalance_ratio=1.0, random_state=0)
    assert len(set(np.bincount(y_bal))) == 1
    np.testing.assert_array_equal(X, X_copy)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"imbalance_ratio": 0.5}, ValueError, r"`imbalance_ratio` must be a finite number >= 1, but got 0.5"),
        ({"imbalance_ratio": float("inf")}, ValueError, r"`imbalance_ratio` must be a finite number >= 1"),
        ({"imbalance_ratio": "10"}, TypeError, r"`imbalance_ratio` must be a real number, but got str"),
        ({"imbalance_ratio": 10, "profile": "linear"}, ValueError, r"`profile` must be one of 'exponential', 'step'"),
    ],
)
def test_make_long_tailed_validation(kwargs, error, match):
    X, y = load_wine(return_X_y=True)
    with pytest.raises(error, match=match):
        make_long_tailed(X, y, **kwargs)


def test_make_long_tailed_shape_errors():
    with pytest.raises(ValueError, match="same number of rows"):
        make_long_tailed(np.ones((3, 2)), np.array([0, 1]), 2.0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        make_long_tailed(np.ones((3, 2)), np.array([0, 0, 0]), 2.0)


@given(
    counts=st.lists(st.integers(1, 400), min_size=2, max_size=12),
    ratio=st.floats(1.0, 500.0),
    profile=st.sampled_from(["exponential", "step"]),
)
def test_long_tail_counts_properties(counts, ratio, profile):
    kept = long_tail_counts(counts, ratio, profile)
    n_max = min(counts)
    assert kept.shape == (len(counts),)
    assert kept[0] == n_max  # the head keeps every sample it can
    assert np.all(kept >= 1) and np.all(kept <= n_max)  # every class survives, nothing is invented
    assert np.all(np.diff(kept) <= 0)  # non-increasing from head to tail
    # the realised ratio is the requested one up to rounding of the tail (and the floor of 1 sample)
    assert kept[-1] == max(1, round(n_max / ratio))
    if profile == "step":
        assert len(set(kept.tolist())) <= 2
