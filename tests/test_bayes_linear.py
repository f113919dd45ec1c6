"""The exact posterior of the closed-form head (:mod:`lmtune.bayes_linear`) against direct computations, and
``ClosedFormClassifier(bayes="exact")`` through the library and the CLI on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import multivariate_normal
from sklearn.linear_model import Ridge

import lmtune
from lmtune import bayes_linear as bl
from lmtune import ridge
from lmtune.cli import main
from lmtune.errors import LmtuneError
from lmtune.features import Features
from lmtune.methods.base import softmax
from lmtune.methods.closed_form import ClosedFormClassifier, center_rows

TEMPLATE = "Review: {text}\nIs this review positive? Answer yes or no."


def _problem(n=30, d=8, k=3, seed=0, centre_rows=False):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, d)) * np.arange(1, d + 1) + 2.0  # uneven scales and a mean to centre away
    Y = 0.3 * Z @ rng.normal(size=(d, k)) + rng.normal(size=(n, k)) + np.arange(1, k + 1)
    return Z, (center_rows(Y) if centre_rows else Y)


def _direct_log_evidence(Z, Y, alpha, beta, n_outputs=None):
    """log p(Y) by multivariate normal densities: each column projected onto the N - 1 directions orthogonal to
    the intercept (where the flat intercept has no effect), and for row-centred Y onto K - 1 label directions."""
    n, k = Y.shape
    P = scipy.linalg.null_space(np.ones((1, n)))  # (N, N-1), orthonormal
    if n_outputs == k - 1:
        Y = Y @ scipy.linalg.null_space(np.ones((1, k)))  # (N, K-1)
    cov = P.T @ (np.eye(n) / beta + Z @ Z.T / alpha) @ P
    dist = multivariate_normal(np.zeros(n - 1), cov)
    return sum(dist.logpdf(P.T @ Y[:, j]) for j in range(Y.shape[1]))


# -- the posterior -----------------------------------------------------------------------------------------


def test_posterior_mean_is_the_ridge_solution_at_alpha_over_beta():
    Z, Y = _problem()
    stats = ridge.GramStats.from_arrays(Z, Y)
    res = bl.fit(stats)  # alpha, beta by the evidence
    lam = res.evidence.alpha / res.evidence.beta
    assert res.solution.lam == pytest.approx(lam, rel=1e-12)
    ref = Ridge(alpha=lam, fit_intercept=True, solver="cholesky").fit(Z, Y)
    np.testing.assert_allclose(res.posterior.W, ref.coef_.T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(res.posterior.b, ref.intercept_, rtol=1e-8, atol=1e-10)
    chol = ridge.solve(stats, lam)  # the plain ridge path, by Cholesky
    np.testing.assert_allclose(res.posterior.W, chol.W, rtol=1e-8, atol=1e-10)


def test_posterior_covariance_is_the_explicit_inverse():
    Z, Y = _problem()
    res = bl.fit(ridge.GramStats.from_arrays(Z, Y), lam=2.0)
    a, b = res.evidence.alpha, res.evidence.beta
    Zc = Z - Z.mean(0)
    Sigma = np.linalg.inv(b * Zc.T @ Zc + a * np.eye(Z.shape[1]))
    np.testing.assert_allclose(res.posterior.covariance(), Sigma, rtol=1e-9, atol=1e-14)


def test_predictive_variance_includes_the_intercept_exactly():
    """Var(b + z W_k) from the joint posterior of (b, W) with design [1, Z] and penalty diag(0, alpha I)."""
    Z, Y = _problem()
    res = bl.fit(ridge.GramStats.from_arrays(Z, Y), lam=2.0)
    a, b = res.evidence.alpha, res.evidence.beta
    X = np.hstack([np.ones((len(Z), 1)), Z])
    cov = np.linalg.inv(b * X.T @ X + np.diag([0.0] + [a] * Z.shape[1]))
    Znew = np.random.default_rng(1).normal(size=(7, Z.shape[1])) * 3
    Xnew = np.hstack([np.ones((7, 1)), Znew])
    np.testing.assert_allclose(res.posterior.variance(Znew), np.einsum("ij,jk,ik->i", Xnew, cov, Xnew), rtol=1e-9)
    # further from the data, more uncertain
    far = res.posterior.variance(Z.mean(0) + np.outer([0.0, 1.0, 10.0], Z.std(0)))
    assert far[0] < far[1] < far[2]


def test_without_intercept_nothing_is_centred():
    Z, Y = _problem()
    res = bl.fit(ridge.GramStats.from_arrays(Z, Y), lam=2.0, fit_intercept=False)
    a, b = res.evidence.alpha, res.evidence.beta
    Sigma = np.linalg.inv(b * Z.T @ Z + a * np.eye(Z.shape[1]))
    assert res.posterior.z_bar is None and res.evidence.n_eff == len(Z)
    np.testing.assert_allclose(res.posterior.variance(Z[:5]), np.einsum("ij,jk,ik->i", Z[:5], Sigma, Z[:5]), rtol=1e-9)
    n, k = Y.shape
    direct = sum(multivariate_normal(np.zeros(n), np.eye(n) / b + Z @ Z.T / a).logpdf(Y[:, j]) for j in range(k))
    assert res.evidence.log_evidence == pytest.approx(direct, rel=1e-9)


def test_dual_decomposition_gives_the_same_posterior():
    """N < d: the N x N decomposition keeps r < d directions; the rest keep their prior variance."""
    Z, Y = _problem(n=6, d=8)
    stats = ridge.GramStats.from_arrays(Z, Y)
    primal, dual = bl.fit(stats, lam=0.5), bl.fit(stats, lam=0.5, Z=Z)
    assert dual.posterior.V.shape[1] < primal.posterior.V.shape[1] == 8
    np.testing.assert_allclose(dual.posterior.covariance(), primal.posterior.covariance(), rtol=1e-8, atol=1e-12)
    Znew = np.random.default_rng(2).normal(size=(5, 8))
    np.testing.assert_allclose(dual.posterior.variance(Znew), primal.posterior.variance(Znew), rtol=1e-8)
    assert dual.evidence.log_evidence == pytest.approx(primal.evidence.log_evidence, rel=1e-10)


# -- the evidence ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha, beta", [(0.7, 1.3), (20.0, 0.05), (1e-3, 10.0)])
def test_log_evidence_equals_the_gaussian_marginal_likelihood(alpha, beta):
    Z, Y = _problem()
    got = bl.log_evidence(ridge.GramStats.from_arrays(Z, Y), alpha, beta)
    assert got == pytest.approx(_direct_log_evidence(Z, Y, alpha, beta), rel=1e-9)


def test_flat_intercept_is_the_limit_of_a_broad_gaussian_one():
    """b ~ N(0, tau^2) for large tau: log p_tau(Y) + K/2 log(2 pi tau^2 N) tends to the restricted evidence."""
    Z, Y = _problem()
    n, k = Y.shape
    alpha, beta, tau = 0.7, 1.3, 1e4
    cov = np.eye(n) / beta + Z @ Z.T / alpha + tau**2 * np.ones((n, n))
    broad = sum(multivariate_normal(np.zeros(n), cov).logpdf(Y[:, j]) for j in range(k))
    limit = broad + k * 0.5 * np.log(2 * np.pi * tau**2 * n)
    assert bl.log_evidence(ridge.GramStats.from_arrays(Z, Y), alpha, beta) == pytest.approx(limit, abs=1e-4)


def test_row_centred_targets_count_k_minus_1_outputs():
    Z, Y = _problem(centre_rows=True)
    stats = ridge.GramStats.from_arrays(Z, Y)
    got = bl.log_evidence(stats, 0.7, 1.3, n_outputs=2)
    assert got == pytest.approx(_direct_log_evidence(Z, Y, 0.7, 1.3, n_outputs=2), rel=1e-9)
    # counting the K dependent columns as independent gives another (wrong) number
    assert abs(bl.log_evidence(stats, 0.7, 1.3) - got) > 1.0


def test_evidence_maximiser_agrees_with_a_grid_search_and_is_a_mackay_fixed_point():
    Z, Y = _problem(n=40)
    stats = ridge.GramStats.from_arrays(Z, Y)
    res = bl.fit(stats)
    ev = res.evidence
    log_a = np.log(ev.alpha) + np.linspace(-1.5, 1.5, 121)
    log_b = np.log(ev.beta) + np.linspace(-1.5, 1.5, 121)
    grid = np.array([[bl.log_evidence(stats, np.exp(a), np.exp(b)) for b in log_b] for a in log_a])
    i, j = np.unravel_index(grid.argmax(), grid.shape)
    assert grid.max() <= ev.log_evidence + 1e-9  # nothing on the grid beats the optimum
    assert abs(log_a[i] - np.log(ev.alpha)) <= 0.026 and abs(log_b[j] - np.log(ev.beta)) <= 0.026  # one step
    assert ev.log_evidence == pytest.approx(bl.log_evidence(stats, ev.alpha, ev.beta), rel=1e-12)
    # MacKay's conditions: alpha = K gamma / ||M||^2, beta = K (N_e - gamma) / ||Y_c - Z_c M||^2
    M = res.posterior.W
    resid = Y - res.posterior.b - Z @ M
    k = Y.shape[1]
    assert ev.alpha == pytest.approx(k * ev.gamma / np.sum(M**2), rel=1e-4)
    assert ev.beta == pytest.approx(k * (len(Z) - 1 - ev.gamma) / np.sum(resid**2), rel=1e-4)


def test_selection_curve_is_recorded_and_a_given_lambda_is_kept():
    Z, Y = _problem()
    stats = ridge.GramStats.from_arrays(Z, Y)
    res = bl.fit(stats)
    sel = res.solution.selection
    assert sel.criterion == "evidence" and len(sel.grid) == 41
    assert np.min(sel.scores) >= -res.evidence.log_evidence - 1e-9  # the refined optimum beats every grid point
    fixed = bl.fit(stats, lam=3.0)
    assert fixed.solution.lam == 3.0 and fixed.solution.selection is None
    assert fixed.evidence.alpha / fixed.evidence.beta == pytest.approx(3.0)
    assert fixed.evidence.log_evidence < res.evidence.log_evidence


# -- the predictive ----------------------------------------------------------------------------------------


def test_mc_converges_to_the_exact_binary_predictive_and_probit_is_close():
    mean = np.array([[0.0, 1.5], [2.0, -1.0], [0.3, 0.0], [4.0, 0.0]])
    var = np.array([0.5, 2.0, 4.0, 9.0])
    # exact E sigmoid(a), a = f_1 - f_0 ~ N(mu_a, 2 v): 200-point Gauss-Hermite quadrature
    x, w = np.polynomial.hermite_e.hermegauss(200)
    mu_a = mean[:, 1] - mean[:, 0]
    exact = (w[None] / np.sqrt(2 * np.pi) / (1 + np.exp(-(mu_a[:, None] + np.sqrt(2 * var)[:, None] * x)))).sum(1)
    errors = []
    for s in (100, 10_000, 400_000):
        p = np.exp(bl.gaussian_softmax(mean, var, "mc", samples=s, seed=1))
        np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-12)
        errors.append(np.abs(p[:, 1] - exact).max())
    assert errors[2] < errors[0] and errors[2] < 2e-3
    probit = np.exp(bl.gaussian_softmax(mean, var, "probit"))
    assert np.abs(probit[:, 1] - exact).max() < 0.02  # the probit approximation's known accuracy
    # the per-logit recipe softmax(mu / sqrt(1 + pi v / 8)) misses that a difference has variance 2 v
    naive = softmax(mean / np.sqrt(1 + np.pi * var / 8)[:, None])
    assert np.abs(naive[:, 1] - exact).max() > 2 * np.abs(probit[:, 1] - exact).max()


def test_mc_and_probit_agree_roughly_for_three_classes():
    rng = np.random.default_rng(3)
    mean, var = rng.normal(size=(50, 3)) * 2, rng.uniform(0, 3, size=50)
    mc = np.exp(bl.gaussian_softmax(mean, var, "mc", samples=100_000, seed=0))
    probit = np.exp(bl.gaussian_softmax(mean, var, "probit"))
    np.testing.assert_allclose(probit.sum(1), 1.0, rtol=1e-12)
    assert np.abs(mc - probit).max() < 0.05
    # no variance: both are the plain softmax
    np.testing.assert_allclose(np.exp(bl.gaussian_softmax(mean, np.zeros(50), "mc", samples=10)), softmax(mean))
    np.testing.assert_allclose(np.exp(bl.gaussian_softmax(mean, np.zeros(50), "probit")), softmax(mean))


def test_mc_prediction_of_a_record_does_not_depend_on_its_neighbours():
    rng = np.random.default_rng(4)
    mean, var = rng.normal(size=(9, 2)), rng.uniform(0.1, 2, size=9)
    full = bl.gaussian_softmax(mean, var, "mc", samples=500, seed=7)
    part = bl.gaussian_softmax(mean[[5, 2]], var[[5, 2]], "mc", samples=500, seed=7)
    np.testing.assert_array_equal(part, full[[5, 2]])
    assert not np.array_equal(bl.gaussian_softmax(mean, var, "mc", samples=500, seed=8), full)


def test_predictive_input_errors():
    with pytest.raises(ValueError, match="unknown predictive 'laplace'"):
        bl.gaussian_softmax(np.zeros((2, 2)), np.ones(2), "laplace")
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        bl.gaussian_softmax(np.zeros((2, 2)), np.ones(2), "mc", samples=0)
    with pytest.raises(ValueError, match="var must have shape"):
        bl.gaussian_softmax(np.zeros((2, 2)), np.ones(3))
    with pytest.raises(ValueError, match="n_outputs must be an integer in"):
        bl.fit(ridge.GramStats.from_arrays(*_problem()), n_outputs=4)


# -- the estimator ----------------------------------------------------------------------------------------


def _synthetic_features(n=200, d=10, k=3, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, d)).astype(np.float32)
    L = (Z @ rng.normal(size=(d, k))).astype(np.float32)
    y = (Z @ rng.normal(size=(d, k)) + rng.normal(size=(n, k))).argmax(1)
    return Features(Z, L), y


def test_estimator_predicts_with_the_posterior_predictive():
    task = lmtune.ClassificationTask("Q: {text}", "a=alpha,b=beta,c=gamma")
    feats, y = _synthetic_features()
    cf = ClosedFormClassifier(None, task, bayes="exact", criterion="evidence").fit_features(feats, y)
    plain = ClosedFormClassifier(None, task, lam=cf.lam_).fit_features(feats, y)
    np.testing.assert_allclose(cf.weight_, plain.weight_, rtol=1e-8, atol=1e-10)  # the mean is the ridge head
    mean = feats.L + feats.Z.astype(np.float64) @ cf.weight_ + cf.bias_
    var = cf.posterior_.variance(feats.Z)
    np.testing.assert_allclose(cf.logits(feats), bl.gaussian_softmax(mean, var, "probit"), rtol=1e-12)
    assert cf.evidence_.n_outputs == 2 and cf.evidence_.n_eff == len(y) - 1  # row-centred targets: K - 1
    # with the posterior predictive, every probability is pulled towards uniform, never past it
    p_map, p_bayes = softmax(mean), softmax(cf.logits(feats))
    assert (p_bayes.max(1) <= p_map.max(1) + 1e-12).all() and (p_bayes.max(1) < p_map.max(1)).any()
    assert (p_bayes.argmax(1) == p_map.argmax(1)).mean() > 0.95


def test_estimator_rejects_unknown_modes():
    task = lmtune.ClassificationTask("Q: {text}", "a=alpha,b=beta")
    feats, y = _synthetic_features(k=2)
    with pytest.raises(LmtuneError, match="closed-form offers bayes=exact"):
        ClosedFormClassifier(None, task, bayes="laplace").fit_features(feats, y)
    with pytest.raises(LmtuneError, match="criterion must be one of gcv, loo, evidence"):
        ClosedFormClassifier(None, task, criterion="aic").fit_features(feats, y)
    with pytest.raises(LmtuneError, match="unknown predictive"):
        ClosedFormClassifier(None, task, bayes="exact", predictive="laplace").fit_features(feats, y)
    assert ClosedFormClassifier.bayes_modes == ("exact",)


@pytest.fixture(scope="module")
def data():
    return lmtune.open_data("builtin:reviews:train").subset(range(40)), \
        lmtune.open_data("builtin:reviews:test").subset(range(16))


@pytest.mark.parametrize("predictive", ["probit", "mc"])
def test_save_and_load_give_identical_predictions(tmp_path, tiny_lm, review_task, data, predictive):
    train, test = data
    est = ClosedFormClassifier(tiny_lm, review_task, bayes="exact", predictive=predictive, mc_samples=300,
                               progress=False).fit(train)
    est.save(tmp_path / "run")
    card = json.loads((tmp_path / "run/card.json").read_text())
    assert card["params"]["bayes"] == "exact" and card["fitted"]["evidence"]["alpha"] == est.evidence_.alpha
    back = lmtune.load_run(tmp_path / "run", model=tiny_lm, progress=False)
    np.testing.assert_array_equal(back.predict_proba(test), est.predict_proba(test))
    np.testing.assert_array_equal(back.posterior_.covariance(), est.posterior_.covariance())
    logits, extras, _ = back.uncertainty(test)
    assert set(extras) == {"entropy", "logit_std"} and (extras["logit_std"] > 0).all()
    p = softmax(logits)
    np.testing.assert_allclose(extras["entropy"], -(p * np.log(p)).sum(1), rtol=1e-10)


def test_a_plain_run_has_no_uncertainty(tiny_lm, review_task, data):
    train, test = data
    est = ClosedFormClassifier(tiny_lm, review_task, progress=False).fit(train)
    logits, extras, _ = est.uncertainty(test)
    assert extras == {} and est.posterior_ is None
    np.testing.assert_array_equal(softmax(logits), est.predict_proba(test))


def test_cli_fit_bayes_exact_and_predict_with_uncertainty(tmp_path, capsys, tiny_model_dir, data):
    train, test = data
    lmtune.data.write_jsonl(tmp_path / "train.jsonl", train.records)
    lmtune.data.write_jsonl(tmp_path / "test.jsonl", test.records)
    common = ["--model", str(tiny_model_dir), "--train", str(tmp_path / "train.jsonl"), "--template", TEMPLATE,
              "--label-words", "negative=no,positive=yes"]
    capsys.readouterr()
    assert main(["fit", "--method", "closed-form", "--bayes", "exact", "--criterion", "evidence", *common,
                 "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "evidence: log p(targets)" in out and "exact posterior" in out
    card = json.loads((tmp_path / "run/card.json").read_text())
    assert card["fitted"]["lambda_selection"]["criterion"] == "evidence"
    evidence = card["fitted"]["evidence"]
    assert card["fitted"]["lam"] == pytest.approx(evidence["alpha"] / evidence["beta"])
    assert main(["predict", str(tmp_path / "run"), "--data", str(tmp_path / "test.jsonl")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == len(test) and all(set(r["uncertainty"]) == {"entropy", "logit_std"} for r in rows)
    est = lmtune.load_run(tmp_path / "run", progress=False)
    probs = est.predict_proba(str(tmp_path / "test.jsonl"))
    np.testing.assert_allclose([r["probabilities"]["positive"] for r in rows], probs[:, 1], rtol=1e-12)
    # a mode the method does not offer is refused before any work
    assert main(["fit", "--method", "closed-form", "--bayes", "laplace", *common, "--out", str(tmp_path / "r2")]) == 2
    assert "--bayes laplace does not apply to --method closed-form" in capsys.readouterr().err


def test_cli_predictive_options_reach_the_closed_form_posterior(tmp_path, capsys, tiny_model_dir, data):
    train, _ = data
    lmtune.data.write_jsonl(tmp_path / "train.jsonl", train.records)
    common = ["fit", "--method", "closed-form", "--model", str(tiny_model_dir), "--train",
              str(tmp_path / "train.jsonl"), "--template", TEMPLATE, "--label-words", "negative=no,positive=yes"]
    capsys.readouterr()
    assert main([*common, "--bayes", "exact", "--predictive", "mc", "--mc-samples", "64", "--seed", "3",
                 "--out", str(tmp_path / "run"), "--json"]) == 0
    params = json.loads(capsys.readouterr().out)["params"]
    assert (params["predictive"], params["mc_samples"], params["seed"]) == ("mc", 64, 3)
    assert main([*common, "--predictive", "mc", "--out", str(tmp_path / "r2")]) == 2
    assert "--predictive applies to a posterior: add --bayes exact" in capsys.readouterr().err
