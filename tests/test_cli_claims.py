"""``softmaxkit claims`` and the comparison options of ``compare`` / ``calibrate``, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from softmaxkit.cli import claims as claims_module

from .test_cli import _scores_file, assert_user_error, invoke, run_cli

MATH = [c.id for c in claims_module.CLAIMS if c.kind == "math"]
EXPECTED = {  # what the mathematics says, whatever the run: these verdicts cannot change
    "jacobian-eigenvalues": "does not hold",
    "soft-label-cost": "does not hold",
    "binary-derivative-formula": "does not hold",
    "label-smoothing-0.1/K": "does not hold",
    "saturation-thresholds": "does not hold",
    "ce-gradient": "holds",
    "jacobian-range": "holds",
    "jacobian-symmetric-singular": "holds",
    "temperature-jacobian": "holds",
    "binary-sigmoid": "holds",
    "softmax-example": "holds",
    "table3-ce": "holds",
    "table3-mse": "depends",
    "table3-hinge": "holds",
}


def test_every_claim_is_well_formed():
    ids = [c.id for c in claims_module.CLAIMS]
    assert len(ids) == len(set(ids))
    for c in claims_module.CLAIMS:
        assert c.text in {"000", "001", "002", "003", "004"} and c.kind in {"math", "empirical", "performance"}
        assert c.quote and c.claim and c.section


def test_math_claims_verdicts():
    ctx = claims_module.Context(seeds=[0], quick=True)
    rows = claims_module.run([c for c in claims_module.CLAIMS if c.kind == "math"], ctx)
    by_id = {r["id"]: r for r in rows}
    for claim_id, verdict in EXPECTED.items():
        assert by_id[claim_id]["verdict"] == verdict, (claim_id, by_id[claim_id]["evidence"])
    for r in rows:
        assert "could not run" not in r["evidence"], r
        assert r["reproduce"] == f"softmaxkit claims --only {r['id']}"


def test_quick_run_writes_the_report(tmp_path):
    out = tmp_path / "claims"
    result = run_cli("claims", "--quick", "--out", out, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "does not hold" in result.stdout and "Traceback" not in result.stdout + result.stderr
    data = json.loads((out / "claims.json").read_text())
    assert len(data["claims"]) == len(claims_module.CLAIMS) and data["seeds"] == [0]
    for row in data["claims"]:
        assert row["verdict"] in ("holds", "does not hold", "depends")
        assert "could not run" not in row["evidence"], row
    page = (out / "report.html").read_text()
    assert "<table>" in page and "jacobian-eigenvalues" in page and "12.7%" in page
    empirical = {r["id"]: r for r in data["claims"]}["ce-vs-mse-12.7%"]
    assert set(empirical["numbers"]["datasets"]) == {"iris", "wine"}
    assert empirical["reproduce"].endswith("--seeds 0 --quick")


def test_only_and_list(tmp_path):
    result = invoke("claims", "--only", "jacobian-eigenvalues,binary-sigmoid", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "o" / "claims.json").read_text())["claims"]
    assert [r["id"] for r in rows] == ["jacobian-eigenvalues", "binary-sigmoid"]
    listing = invoke("claims", "--list")
    assert listing.exit_code == 0 and all(c.id in listing.output for c in claims_module.CLAIMS)


def test_bad_options_name_the_flag(tmp_path):
    assert_user_error(invoke("claims", "--only", "bogus", "--out", tmp_path / "o"), "unknown claim 'bogus'", "--list")
    assert_user_error(invoke("claims", "--seeds", "a,b", "--out", tmp_path / "o"), "--seeds must be")
    assert_user_error(invoke("claims", "--only", ",", "--out", tmp_path / "o"), "--only is empty")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(invoke("claims", "--only", "binary-sigmoid", "--out", blocker), "not a directory")


def test_compare_with_the_comparison_losses(tmp_path):
    out = tmp_path / "cmp"
    result = invoke("compare", "iris", "--losses", "ce,mse,mse_scores,hinge,cs,sigmoid", "--max-iter", "100",
                    "--out", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "metrics.json").read_text())
    assert [m["model"] for m in summary["models"]] == [
        "cross-entropy", "MSE on softmax probabilities", "MSE on raw scores", "hinge (Weston–Watkins)",
        "hinge (Crammer–Singer)", "one-vs-rest sigmoid"]
    page = (out / "report.html").read_text()
    assert "Gradient against the error" in page and "Confidence and confusion" in page
    assert (out / "figures" / "gradients.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("method", ["platt", "dirichlet"])
def test_calibrate_platt_and_dirichlet(tmp_path, method):
    scores = _scores_file(tmp_path / "scores.csv", n=400, classes=3)
    result = invoke("calibrate", scores, "--method", method, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o" / "calibration.json").read_text())
    assert summary["method"] == method and summary["nll_after"] < summary["nll_before"]
    from softmaxkit import calibration

    reloaded = calibration.load(tmp_path / "o" / "calibrator.json")
    assert type(reloaded).__name__ == {"platt": "PlattScaling", "dirichlet": "DirichletCalibration"}[method]
    rows = (tmp_path / "o" / "calibrated.csv").read_text().splitlines()[1:]
    written = np.array([[float(v) for v in row.split(",")[:3]] for row in rows])
    np.testing.assert_allclose(written.sum(1), 1.0, atol=1e-8)


def test_claims_is_listed_and_has_help():
    result = invoke("--help")
    assert result.exit_code == 0 and "claims" in result.stdout
    result = invoke("claims", "--help")
    assert result.exit_code == 0 and "--quick" in result.stdout and "--only" in result.stdout


def test_output_folder_is_whole_or_refused(tmp_path):
    out = tmp_path / "o"
    assert invoke("claims", "--only", "binary-sigmoid", "--out", out).exit_code == 0
    assert_user_error(invoke("claims", "--only", "binary-sigmoid", "--out", out), "earlier run", "--overwrite")
    result = invoke("claims", "--only", "binary-sigmoid,binary-gradient", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "claims.json").read_text())["claims"]
    assert [r["id"] for r in rows] == ["binary-sigmoid", "binary-gradient"]
    assert not (tmp_path / "missing").exists()
    assert_user_error(invoke("claims", "--only", "bogus", "--out", tmp_path / "missing"), "unknown claim")
    assert not (tmp_path / "missing").exists()  # a refused run leaves no folder behind
