"""benchmarks/bench_calibration.py --folds: the fold split, the pooled rows and the goals read off them."""

import numpy as np
import pytest
from conftest import load_benchmark

NAMES = ("lora (MAP)", "lora + laplace (mc)", "lora + laplace (mc, prior on validation)",
         "lora + laplace (mc, auto)")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_calibration")


def test_folds_partition_the_records(bench):
    folds = bench.fold_indices(11, 3, seed=0)
    assert sorted(i for f in folds for i in f) == list(range(11))
    assert sorted(len(f) for f in folds) == [3, 4, 4]
    assert all(f == sorted(f) for f in folds)
    assert folds == bench.fold_indices(11, 3, seed=0)
    assert folds != bench.fold_indices(11, 3, seed=1)
    with pytest.raises(SystemExit, match="--folds"):
        bench.fold_indices(5, 1, seed=0)


def _fold(rng, n, sharpness):
    """Labels drawn from known probabilities; each row's probabilities are those sharpened on the logit scale."""
    p_true = rng.uniform(0.05, 0.95, n)
    y = (rng.random(n) < p_true).astype(int)
    rows = {}
    for name, s in zip(NAMES, sharpness):
        p1 = 1 / (1 + np.exp(-s * np.log(p_true / (1 - p_true))))
        rows[name] = {"_probs": np.stack([1 - p1, p1], axis=1), "_y": y.copy(), "predict_seconds": 1.0,
                      "prior_precision": s}
        rows[name].update({k: 0.0 for k in ("accuracy", "macro_f1", "nll", "ece", "brier")})
    return rows


def test_pooled_rows_score_every_held_out_record_once(bench):
    from lmtune.metrics import ece, nll

    rng = np.random.default_rng(0)
    per_fold = [_fold(rng, 400, (3.0, 1.0, 1.1, 1.0)), _fold(rng, 377, (3.0, 1.0, 1.1, 1.0))]
    rows = bench.pool_rows(per_fold, ["no", "yes"])
    for name in NAMES:
        probs = np.concatenate([f[name]["_probs"] for f in per_fold])
        y = np.concatenate([f[name]["_y"] for f in per_fold])
        assert rows[name]["_probs"].shape == (777, 2)
        assert rows[name]["ece"] == pytest.approx(ece(y, probs))
        assert rows[name]["nll"] == pytest.approx(nll(y, probs))
        assert rows[name]["accuracy"] == pytest.approx(float(np.mean(probs.argmax(1) == y)))
        assert rows[name]["predict_seconds"] == 2.0
        assert len(rows[name]["per_fold"]) == 2
    assert rows["lora + laplace (mc)"]["prior_precision_per_fold"] == [1.0, 1.0]

    predictions = bench.sampling_analysis(rows, "lora (MAP)", draws=200)
    assert "_probs" not in rows["lora (MAP)"]
    assert predictions["y"] == np.concatenate([f["lora (MAP)"]["_y"] for f in per_fold]).tolist()
    assert np.allclose(predictions["probs"]["lora + laplace (mc)"],
                       np.concatenate([f["lora + laplace (mc)"]["_probs"] for f in per_fold]), atol=1e-7)
    goals = bench.goals_for(rows, 777, [1.3, 1.5], [0.8, 0.9])
    # the MAP is over-sharpened, the "laplace" row holds the true probabilities: a fraction of its ECE
    assert goals["laplace_ece_ratio"] == pytest.approx(rows["lora + laplace (mc)"]["ece"] / rows["lora (MAP)"]["ece"])
    assert goals["laplace_ece_ratio"] < 0.5
    assert goals["accuracy_met"]
    assert goals["time_met"] is False and goals["time_met_with_sampled_curvature"] is True
    assert goals["met_with_auto_prior"] and goals["auto_prior"]["ece_ratio"] == goals["laplace_ece_ratio"]
    assert goals["laplace_calibrated_floor"] == rows["lora + laplace (mc)"]["ece_sampling"]["calibrated_floor"]
