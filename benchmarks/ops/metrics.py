"""Metrics on (N, C) probabilities: expected calibration error and one-vs-rest macro ROC-AUC.

Implementations:

* ``softmaxkit`` — :func:`softmaxkit.metrics.expected_calibration_error` / :func:`~softmaxkit.metrics.roc_auc`,
  input validation included;
* ``torch`` — the plain eager-PyTorch formulation, the baseline of the ratios: top-label confidence,
  ``bucketize`` and ``bincount`` for ECE; for AUC one ``argsort`` per class and the Mann-Whitney rank sum
  (no tie correction, no validation);
* ``sklearn`` — ``sklearn.metrics.roc_auc_score(multi_class="ovr")`` on NumPy arrays (no ECE in
  scikit-learn);
* ``torchmetrics`` — ``multiclass_calibration_error`` / ``multiclass_auroc`` (``thresholds=None``: exact),
  ``validate_args`` left at its default (True), as softmaxkit validates too.

Metrics have no backward: the cases run in mode ``forward`` only, so pass ``--modes forward``::

    python -m benchmarks metrics --modes forward
"""

from __future__ import annotations

import torch

from .._harness import Case, Skip

SHAPES = [(1_000_000, 100)]
QUICK_SHAPES = [(100_000, 100)]
N_BINS = 15


def _inputs(n: int, c: int, dtype: torch.dtype, device: str):
    generator = torch.Generator(device="cpu").manual_seed(0)
    probs = torch.softmax(torch.randn(n, c, generator=generator) * 2, dim=1).to(device=device, dtype=dtype)
    labels = torch.randint(0, c, (n,), generator=generator).to(device)
    return probs, labels


def _torch_ece(probs: torch.Tensor, labels: torch.Tensor) -> float:
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == labels).to(confidence.dtype)
    edges = torch.linspace(0, 1, N_BINS + 1, device=probs.device, dtype=confidence.dtype)
    index = torch.bucketize(confidence, edges[1:-1])
    confidence_sum = torch.bincount(index, weights=confidence, minlength=N_BINS)
    correct_sum = torch.bincount(index, weights=correct, minlength=N_BINS)
    return float((correct_sum - confidence_sum).abs().sum() / probs.shape[0])


def _torch_auc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    num_rows, num_classes = probs.shape
    ranks = torch.empty(num_rows, dtype=torch.int64, device=probs.device)
    positions = torch.arange(1, num_rows + 1, device=probs.device)
    total = 0.0
    for c in range(num_classes):
        ranks[torch.argsort(probs[:, c])] = positions
        positive = labels == c
        n_pos = int(positive.sum())
        rank_sum = int(ranks[positive].sum())
        total += (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * (num_rows - n_pos))
    return total / num_classes


def _setup(metric: str, impl: str, n: int, c: int, dtype: torch.dtype, device: str):
    def setup(mode: str):
        probs, labels = _inputs(n, c, dtype, device)
        if impl == "softmaxkit":
            from softmaxkit import metrics

            if metric == "ece":
                return lambda: metrics.expected_calibration_error(probs, labels, N_BINS)
            return lambda: metrics.roc_auc(probs, labels)
        if impl == "torch":
            function = _torch_ece if metric == "ece" else _torch_auc
            return lambda: function(probs, labels)
        if impl == "sklearn":
            if metric == "ece":
                raise Skip("scikit-learn has no expected calibration error")
            if device != "cpu":
                raise Skip("scikit-learn runs on the CPU")
            from sklearn.metrics import roc_auc_score

            probs_np, labels_np = probs.numpy(), labels.numpy()
            return lambda: roc_auc_score(labels_np, probs_np, multi_class="ovr", average="macro")
        if impl == "torchmetrics":
            try:
                from torchmetrics.functional.classification import (
                    multiclass_auroc,
                    multiclass_calibration_error,
                )
            except ImportError as error:  # pragma: no cover - depends on the environment
                raise Skip(f"torchmetrics not installed ({error})") from error
            if metric == "ece":
                return lambda: multiclass_calibration_error(probs, labels, num_classes=c, n_bins=N_BINS)
            return lambda: multiclass_auroc(probs, labels, num_classes=c, average="macro", thresholds=None)
        raise ValueError(f"unknown impl {impl!r}")

    return setup


def cases(device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    out = []
    for n, c in QUICK_SHAPES if quick else SHAPES:
        element_bytes = torch.empty((), dtype=dtype).element_size()
        for metric in ("ece", "roc_auc"):
            for impl in ("softmaxkit", "torch", "sklearn", "torchmetrics"):
                out.append(
                    Case(
                        op="metrics",
                        impl=impl,
                        shape=f"{metric}:{n}x{c}",
                        dtype=str(dtype).replace("torch.", ""),
                        setup=_setup(metric, impl, n, c, dtype, device),
                        bytes_moved=n * c * element_bytes + n * 8,  # read the probabilities and labels once
                        modes=("forward",),
                        extra={"bytes_by_mode": {"forward": n * c * element_bytes + n * 8}},
                    )
                )
    return out
