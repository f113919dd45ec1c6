"""The closed-form estimator: its targets, parity with an independent ridge fit, save/load, errors."""

import numpy as np
import pytest
from sklearn.linear_model import Ridge

import lmtune
from lmtune.errors import LmtuneError
from lmtune.features import Features
from lmtune.methods.base import softmax
from lmtune.methods.closed_form import ClosedFormClassifier, center_rows, smoothed_log_targets


def test_smoothed_targets_are_finite_and_normalised():
    T = smoothed_log_targets(np.array([0, 2, 1]), 3, 0.1)
    assert np.isfinite(T).all()
    np.testing.assert_allclose(np.exp(T).sum(1), 1.0)
    np.testing.assert_allclose(np.exp(T[0]), [0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(LmtuneError, match="strictly between 0 and 1"):
            smoothed_log_targets(np.array([0]), 2, bad)


def test_row_centring_keeps_softmax():
    X = np.random.default_rng(0).normal(size=(5, 4)) * 10
    np.testing.assert_allclose(softmax(center_rows(X)), softmax(X))
    np.testing.assert_allclose(center_rows(X).sum(1), 0, atol=1e-12)


def _synthetic(n=300, d=12, k=3, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, d)).astype(np.float32)
    W_true = rng.normal(size=(d, k))
    L = (Z @ rng.normal(size=(d, k))).astype(np.float32)  # as in an LM: label logits are linear in z
    y = (Z @ W_true + rng.normal(size=(n, k))).argmax(1)
    return Features(Z, L), y


@pytest.fixture
def task3():
    return lmtune.ClassificationTask("Q: {text}", "a=alpha,b=beta,c=gamma")


def test_fit_features_matches_sklearn_ridge(task3):
    feats, y = _synthetic()
    lam = 3.0
    cf = ClosedFormClassifier(None, task3, lam=lam, smoothing=0.2).fit_features(feats, y)
    Y = center_rows(smoothed_log_targets(y, 3, 0.2)) - center_rows(feats.L.astype(np.float64))
    ref = Ridge(alpha=lam, fit_intercept=True, solver="cholesky").fit(feats.Z.astype(np.float64), Y)
    np.testing.assert_allclose(cf.weight_, ref.coef_.T, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(cf.bias_, ref.intercept_, rtol=1e-7, atol=1e-9)
    assert cf.solution_.solver == "cholesky" and cf.lam_ == lam


def test_closed_form_learns_where_zero_shot_cannot(task3):
    feats, y = _synthetic(n=600)
    tr, te = slice(0, 400), slice(400, 600)
    cf = ClosedFormClassifier(None, task3).fit_features(Features(feats.Z[tr], feats.L[tr]), y[tr])
    test = Features(feats.Z[te], feats.L[te])
    zero_shot_acc = (test.L.argmax(1) == y[te]).mean()
    adapted_acc = (cf.logits(test).argmax(1) == y[te]).mean()
    assert cf.solution_.selection is not None and cf.solution_.selection.criterion == "gcv"
    assert adapted_acc > zero_shot_acc + 0.3, (zero_shot_acc, adapted_acc)


def test_loo_criterion_chooses_a_lambda(task3):
    feats, y = _synthetic()
    gcv = ClosedFormClassifier(None, task3).fit_features(feats, y)
    loo = ClosedFormClassifier(None, task3, criterion="loo").fit_features(feats, y)
    assert loo.solution_.selection.criterion == "loo"
    # both criteria estimate the same prediction error: on this problem they pick nearby grid points
    assert abs(np.log10(loo.lam_) - np.log10(gcv.lam_)) <= 1.0


def test_single_label_training_data_is_an_error(task3):
    feats, _ = _synthetic(n=20)
    with pytest.raises(LmtuneError, match="only one label"):
        ClosedFormClassifier(None, task3).fit_features(feats, np.zeros(20, dtype=int))


def test_unfitted_predict_is_an_error(task3):
    feats, _ = _synthetic(n=5)
    with pytest.raises(LmtuneError, match="not fitted"):
        ClosedFormClassifier(None, task3).logits(feats)


def test_save_load_round_trip_on_tiny_model(tiny_lm, review_task, tmp_path):
    train = lmtune.load_builtin("reviews", "train").subset(range(60))
    test = lmtune.load_builtin("reviews", "test").subset(range(30))
    cf = ClosedFormClassifier(tiny_lm, review_task, lam=1.0, progress=False).fit(train)
    p = cf.predict_proba(test)
    run = cf.save(tmp_path / "run")
    card = (run / "card.json").read_text()
    assert '"method": "closed-form"' in card and cf.data_hash_ in card
    loaded = lmtune.load_run(run, model=tiny_lm, progress=False)
    assert isinstance(loaded, ClosedFormClassifier) and loaded.lam_ == 1.0
    np.testing.assert_array_equal(loaded.predict_proba(test), p)
    np.testing.assert_array_equal(loaded.weight_, cf.weight_)
