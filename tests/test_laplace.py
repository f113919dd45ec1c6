"""Laplace-LoRA: KFAC factors against the exact GGN, the posterior against explicit inverses, the evidence
and its prior precision, the GLM predictive, and LoraClassifier(bayes="laplace") end to end on the tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lmtune.errors import LmtuneError
from lmtune.laplace import (FactorAccumulator, KFACCollector, KFACPosterior, KronFactor, fit_posterior, ggn_vectors,
                            lora_modules, predictive_probs)

F64 = torch.float64  # the toy models run in float64
TOL = {"rtol": 1e-5, "atol": 1e-7}  # the posterior keeps its eigenbases in float32, as it stores them


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=TOL["rtol"], atol=TOL["atol"] * float(expected.abs().max()))


def randn(*shape, generator=None):
    return torch.randn(*shape, generator=generator, dtype=F64)


class LoraToy(torch.nn.Module):
    """x (B, T, d) -> y = W0 x + B A x -> tanh -> last token -> K logits: one LoRA pair on a frozen linear."""

    def __init__(self, d=5, r=2, d_out=4, K=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W0 = randn(d_out, d, generator=g) * 0.5
        self.A = torch.nn.Linear(d, r, bias=False, dtype=F64)
        self.B = torch.nn.Linear(r, d_out, bias=False, dtype=F64)
        with torch.no_grad():
            self.A.weight.copy_(randn(r, d, generator=g) * 0.7)
            self.B.weight.copy_(randn(d_out, r, generator=g) * 0.7)
        self.head = randn(K, d_out, generator=g)

    def forward(self, x, lengths):
        h = torch.tanh(x @ self.W0.T + self.B(self.A(x)))
        last = h[torch.arange(x.shape[0]), lengths - 1]
        return last @ self.head.T

    def modules_(self):
        return {"A": self.A, "B": self.B}


def explicit_ggn(model, x, lengths, name):
    """sum_n J_n' H_n J_n for the weight of module ``name``, from autograd.functional.jacobian."""
    mod = model.modules_()[name]
    W = mod.weight.detach().clone()

    def logits_of(w):
        saved = mod.weight
        del mod.weight
        mod.weight = w
        try:
            return model(x, lengths)
        finally:
            mod.weight = saved

    J = torch.autograd.functional.jacobian(logits_of, W)  # (N, K, out, in)
    N, K = J.shape[:2]
    J = J.reshape(N, K, -1)
    p = torch.softmax(model(x, lengths).detach(), -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nkp,nkl,nlq->pq", J, H, J)


def collect(model, x, lengths, y, weight_sharing="reduce", **kw):
    col = KFACCollector(model.modules_(), weight_sharing=weight_sharing, **kw)
    col.add_batch(lambda: model(x, lengths), y, lengths)
    return col.posterior({n: m.weight for n, m in model.modules_().items()})


def test_ggn_vectors_factor_the_softmax_hessian():
    logits = randn(6, 4)
    U = ggn_vectors(logits)
    p = torch.softmax(logits, -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    assert U.shape == (6, 4, 3)  # K - 1 backward passes suffice
    torch.testing.assert_close(U @ U.transpose(1, 2), H, atol=1e-12, rtol=0)


def test_ggn_sketches_are_exact_when_they_suffice_else_seeded_and_unbiased():
    logits = randn(3, 4)
    exact = ggn_vectors(logits)
    torch.testing.assert_close(ggn_vectors(logits, 3), exact, atol=0, rtol=0)  # K - 1 sketches: exact instead
    torch.testing.assert_close(ggn_vectors(logits, 7), exact, atol=0, rtol=0)
    V = ggn_vectors(logits, 2, torch.Generator().manual_seed(0))
    assert V.shape == (3, 4, 2)
    torch.testing.assert_close(V, ggn_vectors(logits, 2, torch.Generator().manual_seed(0)), atol=0, rtol=0)
    assert not torch.allclose(V, ggn_vectors(logits, 2, torch.Generator().manual_seed(1)))
    # every sketch lies in the span of the exact vectors (the softmax ignores a common shift: each sums to 0)
    torch.testing.assert_close(V.sum(1), torch.zeros(3, 2, dtype=F64), atol=1e-12, rtol=0)
    # E[V V'] = H: 20,000 single sketches average to the Hessian (relative error ~ sqrt(2 / 20000) = 1%)
    g = torch.Generator().manual_seed(2)
    H = exact @ exact.transpose(1, 2)
    mean = sum(v @ v.transpose(1, 2) for v in (ggn_vectors(logits, 1, g) for _ in range(20000))) / 20000
    torch.testing.assert_close(mean, H, atol=0.05 * float(H.abs().max()), rtol=0)
    assert (mean - H).abs().max() > 0  # and it is an estimate, not the Hessian itself


def test_kfac_from_ggn_sketches_estimates_the_exact_output_factor_without_bias():
    # reduce sharing: the input-side factor does not depend on the vectors, the output side is linear in
    # their outer products, so the sketched G averages to the exact G over seeds
    model = LoraToy(d=5, r=2, d_out=4, K=5, seed=3)
    g = torch.Generator().manual_seed(6)
    x, lengths, y = randn(6, 3, 5, generator=g), torch.tensor([3, 2, 3, 1, 2, 3]), torch.tensor([0, 4, 1, 3, 2, 0])
    exact = collect(model, x, lengths, y)
    draws = [collect(model, x, lengths, y, ggn_samples=2, seed=s) for s in range(1500)]  # 2 of K - 1 = 4
    for name in ("A", "B"):
        G = exact.blocks[name][0].matrix()
        mean = sum(p.blocks[name][0].matrix() for p in draws) / len(draws)
        torch.testing.assert_close(mean, G, atol=0.1 * float(G.abs().max()), rtol=0)
        torch.testing.assert_close(draws[0].blocks[name][1].matrix(), exact.blocks[name][1].matrix())
        one = draws[0].blocks[name][0].matrix()
        assert (one - G).abs().max() > 0.1 * float(G.abs().max())  # one draw alone is visibly noisy
    with pytest.raises(LmtuneError, match="ggn_samples must be"):
        KFACCollector(model.modules_(), ggn_samples=0)


@pytest.mark.parametrize("weight_sharing", ["weighted", "reduce", "expand"])
@pytest.mark.parametrize("name", ["A", "B"])
def test_kfac_equals_the_exact_ggn_block_for_one_example_and_token(name, weight_sharing):
    model = LoraToy()
    x, lengths, y = randn(1, 1, 5), torch.tensor([1]), torch.tensor([2])
    post = collect(model, x, lengths, y, weight_sharing)
    P = post.precision_matrix(name)
    kfac = P - post.prior_precision * torch.eye(P.shape[0], dtype=F64)
    close(kfac, explicit_ggn(model, x, lengths, name))


@pytest.mark.parametrize("name", ["A", "B"])
def test_weighted_kfac_is_exact_when_only_the_last_token_receives_gradient(name):
    # LoraToy reads the label at the last token and its LoRA acts token by token: only that token's
    # output gets gradient, as for the query projection of an LLM's last layer
    model = LoraToy()
    x, lengths, y = randn(1, 4, 5), torch.tensor([4]), torch.tensor([1])
    exact = explicit_ggn(model, x, lengths, name)
    post = collect(model, x, lengths, y, "weighted")
    P = post.precision_matrix(name)
    close(P - post.prior_precision * torch.eye(P.shape[0], dtype=F64), exact)
    for other in ("reduce", "expand"):  # the uniform token weightings describe the other tokens too
        P = collect(model, x, lengths, y, other).precision_matrix(name)
        assert (P - torch.eye(P.shape[0], dtype=F64) - exact).abs().max() > 1e-3 * exact.abs().max()


def test_kfac_is_exact_for_one_linear_layer_when_examples_share_the_softmax_hessian():
    # logits = W x with W = 0: every example has p uniform, the same H, so sum_n H (x) x x' = (N H) (x) mean x x'.
    lin = torch.nn.Linear(6, 3, bias=False, dtype=F64)
    torch.nn.init.zeros_(lin.weight)
    x = randn(10, 1, 6)
    lengths, y = torch.ones(10, dtype=torch.long), torch.randint(0, 3, (10,))
    col = KFACCollector({"W": lin})
    col.add_batch(lambda: lin(x)[:, -1], y, lengths)
    post = col.posterior({"W": lin.weight})
    H = torch.full((3, 3), -1 / 9.0, dtype=F64) + torch.eye(3, dtype=F64) / 3  # softmax Hessian at p = 1/3
    explicit = sum(torch.kron(H, x[n, 0, :, None] @ x[n, 0, None, :]) for n in range(10))
    kfac = post.precision_matrix("W") - post.prior_precision * torch.eye(18, dtype=F64)
    close(kfac, explicit)
    # and, as there, the KFAC is not exact once the examples' Hessians differ
    torch.nn.init.normal_(lin.weight)
    col = KFACCollector({"W": lin})
    col.add_batch(lambda: lin(x)[:, -1], y, lengths)
    P = col.posterior({"W": lin.weight}).precision_matrix("W")
    p = torch.softmax(lin(x)[:, -1].detach(), -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    exact = sum(torch.kron(H[n], x[n, 0, :, None] @ x[n, 0, None, :]) for n in range(10))
    assert (P - torch.eye(18, dtype=F64) - exact).abs().max() > 1e-3


def test_a_sample_scaled_to_the_whole_set_equals_the_sample_counted_that_many_times():
    # n_data = 3 x the examples given: the same posterior as giving the examples three times
    model = LoraToy(seed=4)
    g = torch.Generator().manual_seed(5)
    x, lengths, y = randn(6, 4, 5, generator=g), torch.tensor([4, 2, 3, 4, 1, 3]), torch.tensor([0, 2, 1, 1, 0, 2])
    once = KFACCollector(model.modules_())
    once.add_batch(lambda: model(x, lengths), y, lengths)
    thrice = KFACCollector(model.modules_())
    for _ in range(3):
        thrice.add_batch(lambda: model(x, lengths), y, lengths)
    theta = {n: m.weight for n, m in model.modules_().items()}
    a, b = once.posterior(theta, n_data=18), thrice.posterior(theta)
    assert a.n_data == b.n_data == 18 and a.log_lik == pytest.approx(b.log_lik)
    for name in a.blocks:
        close(a.precision_matrix(name), b.precision_matrix(name))
    assert a.optimize_prior_precision() == pytest.approx(b.optimize_prior_precision())
    with pytest.raises(LmtuneError, match="smaller than"):
        once.posterior(theta, n_data=5)


def test_curvature_sample_is_seeded_sorted_and_without_replacement():
    from lmtune.laplace import curvature_sample

    assert curvature_sample(10, None, 0) is None and curvature_sample(10, 10, 0) is None
    s = curvature_sample(100, 30, 7)
    assert s == sorted(set(s)) and len(s) == 30 and s == curvature_sample(100, 30, 7)
    assert s != curvature_sample(100, 30, 8)


def test_laplace_covariance_and_glm_predictive_match_explicit_inverses():
    model = LoraToy()
    x, lengths, y = randn(1, 1, 5), torch.tensor([1]), torch.tensor([0])
    post = collect(model, x, lengths, y)
    post.prior_precision = 0.3
    # KFAC is exact here, so each block's covariance is the inverse of the explicit GGN block + prior
    for name in ("A", "B"):
        ggn = explicit_ggn(model, x, lengths, name)
        Sigma_explicit = torch.linalg.inv(ggn + 0.3 * torch.eye(ggn.shape[0], dtype=F64))
        close(torch.linalg.inv(post.precision_matrix(name)), Sigma_explicit)
    # the GLM covariance of new multi-token, padded inputs: J Sigma J' with explicit Jacobians
    xt, lt = randn(3, 4, 5), torch.tensor([4, 2, 3])
    mean, cov = post.glm(model.modules_(), lambda: model(xt, lt))
    expected = torch.zeros(3, 3, 3, dtype=F64)
    for name, mod in model.modules_().items():
        W = mod.weight.detach().clone()

        def logits_of(w, mod=mod):
            saved = mod.weight
            del mod.weight
            mod.weight = w
            try:
                return model(xt, lt)
            finally:
                mod.weight = saved

        J = torch.autograd.functional.jacobian(logits_of, W).reshape(3, 3, -1)
        expected += J @ torch.linalg.inv(post.precision_matrix(name)) @ J.transpose(1, 2)
    C = torch.eye(3, dtype=F64) - 1 / 3  # the covariance of the centred logits, what softmax sees
    close(cov, C @ expected @ C)
    torch.testing.assert_close(mean, model(xt, lt).detach())
    # and the predictives read the full covariance and the centred one alike
    for method in ("mc", "probit"):
        torch.testing.assert_close(predictive_probs(mean, cov, method), predictive_probs(mean, expected, method))


def test_glm_with_several_priors_equals_one_pass_per_prior():
    model = LoraToy()
    post = collect(model, randn(2, 3, 5), torch.tensor([3, 2]), torch.tensor([0, 2]))
    xt, lt = randn(3, 4, 5), torch.tensor([4, 2, 3])
    priors = [0.1, 0.3, 5.0]
    mean, covs = post.glm(model.modules_(), lambda: model(xt, lt), priors)
    assert covs.shape == (3, 3, 3, 3)
    for d, cov in zip(priors, covs):
        post.prior_precision = d
        m1, c1 = post.glm(model.modules_(), lambda: model(xt, lt))
        close(cov, c1)
        torch.testing.assert_close(mean, m1)


def _random_factor(d, m, seed, rest):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(randn(d, d, generator=g))
    return KronFactor(Q[:, :m].float(), (torch.rand(m, generator=g) * 3).float(), rest, d)  # float32, as stored


@pytest.mark.parametrize("m_out,m_in", [(4, 6), (2, 6), (4, 3), (2, 3)])
def test_block_covariance_with_low_rank_factors_matches_the_dense_inverse(m_out, m_in):
    G, A = _random_factor(4, m_out, 1, 0.25), _random_factor(6, m_in, 2, 0.5)
    post = KFACPosterior({"W": (G, A)}, theta={"W": torch.ones(4, 6)}, log_lik=0.0, n_data=1, prior_precision=0.7)
    J = randn(5, 3, 4, 6)
    cov = post.block_covariance("W", J)
    Sigma = torch.linalg.inv(post.precision_matrix("W"))
    Jf = J.reshape(5, 3, -1)
    close(cov, Jf @ Sigma @ Jf.transpose(1, 2))
    cov2 = post.block_covariance("W", J, 2.5)  # another prior, given per call
    post.prior_precision = 2.5
    close(cov2, Jf @ torch.linalg.inv(post.precision_matrix("W")) @ Jf.transpose(1, 2))
    post.prior_precision = 0.7
    # and the evidence's spectrum is the dense matrix's (log det included)
    lam, c, s2 = post.spectrum()
    assert c.sum() == 24
    # theta's squared components: they add up to its norm, and weighted by the eigenvalues to theta' H theta
    th = post.theta["W"].double().reshape(-1)
    H = torch.kron(G.matrix(), A.matrix())
    assert s2.sum() == pytest.approx(float(th @ th), rel=1e-6)
    assert float((s2 * lam).sum()) == pytest.approx(float(th @ H @ th), rel=1e-5)
    dense = torch.linalg.eigvalsh(torch.kron(G.matrix(), A.matrix()))
    np.testing.assert_allclose(np.sort(np.repeat(lam, c.astype(int))), np.sort(dense.numpy()), atol=1e-6)


def test_low_rank_accumulator_is_exact_when_the_rank_suffices_and_keeps_the_trace_otherwise():
    g = torch.Generator().manual_seed(3)
    X = randn(40, 3, generator=g) @ randn(3, 30, generator=g)  # rank 3 in 30 dims
    dense = FactorAccumulator(30, max_full_dim=64)
    sketch = FactorAccumulator(30, rank=5, max_full_dim=8)  # forced onto the sketch; compresses as it goes
    for part in X.split(7):
        dense.add(part)
        sketch.add(part)
    assert not sketch.full and dense.full
    torch.testing.assert_close(sketch.factor(0.5).matrix(), dense.factor(0.5).matrix(), atol=1e-4, rtol=1e-4)
    # full rank data, rank 4 kept: top eigenvalues follow the dense ones, the remainder keeps the trace
    Y = randn(200, 30, generator=g) * torch.linspace(3, 0.1, 30, dtype=F64)
    dense, sketch = FactorAccumulator(30), FactorAccumulator(30, rank=4, max_full_dim=8)
    for part in Y.split(16):
        dense.add(part)
        sketch.add(part)
    F, D = sketch.factor(), dense.factor()
    assert F.m == 4 and F.complement == 26
    assert abs(float(torch.trace(F.matrix())) - float(torch.trace(D.matrix()))) < 1e-3 * float(torch.trace(D.matrix()))
    top = torch.sort(D.lam.double(), descending=True).values[:2]
    torch.testing.assert_close(torch.sort(F.lam.double(), descending=True).values[:2], top, rtol=0.05, atol=0)


def _toy_posterior():
    model = LoraToy(d=6, r=2, d_out=5, K=3, seed=4)
    x, lengths = randn(12, 3, 6), torch.tensor([3, 1, 2] * 4)
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(0))
    return collect(model, x, lengths, y)


def _dense_evidence(post, delta, form):
    """Both forms from dense matrices: H the KFAC GGN block, theta the trained weights (row-major)."""
    out = post.log_lik
    for n in post.blocks:
        H = post.precision_matrix(n) - post.prior_precision * torch.eye(post.precision_matrix(n).shape[0], dtype=F64)
        th = post.theta[n].double().reshape(-1)
        I = torch.eye(H.shape[0], dtype=F64)
        occam = 0.5 * float(torch.logdet(I + H / delta))
        if form == "mode":
            out -= 0.5 * delta * float(th @ th) + occam
        else:  # the Gaussian integral of exp(-1/2 (t - th)' H (t - th)) against N(0, I / delta)
            out -= 0.5 * float(th @ (delta * H @ torch.linalg.solve(H + delta * I, th))) + occam
    return out


@pytest.mark.parametrize("form", ["post-hoc", "mode"])
def test_log_marginal_likelihood_matches_a_dense_computation_and_its_gradient_finite_differences(form):
    post = _toy_posterior()
    for delta in (0.05, 0.8, 12.0):
        assert post.log_marginal_likelihood(delta, form) == pytest.approx(_dense_evidence(post, delta, form), rel=1e-6)
        eps = 1e-6 * delta
        up, down = post.log_marginal_likelihood(delta + eps, form), post.log_marginal_likelihood(delta - eps, form)
        fd = (up - down) / (2 * eps)
        assert post.log_marginal_likelihood_grad(delta, form) == pytest.approx(fd, rel=1e-5)


def test_post_hoc_evidence_is_the_integral_of_the_quadratic_likelihood_against_the_prior():
    # one weight: log of the integral of exp(L - lam/2 (t - th)^2) N(t; 0, 1/delta) dt, by quadrature
    G = KronFactor(torch.ones(1, 1), torch.tensor([2.0]), 0.0, 1)
    A = KronFactor(torch.ones(1, 1), torch.tensor([1.5]), 0.0, 1)
    post = KFACPosterior({"w": (G, A)}, theta={"w": torch.tensor([[0.75]])}, log_lik=-4.0, n_data=3)
    lam, th = 3.0, 0.75
    t = np.linspace(-30, 30, 600001)
    for delta in (0.1, 1.0, 7.0):
        f = -4.0 - lam / 2 * (t - th) ** 2 + 0.5 * np.log(delta / (2 * np.pi)) - delta * t ** 2 / 2
        assert post.log_marginal_likelihood(delta) == pytest.approx(np.log(np.trapezoid(np.exp(f), t)), abs=1e-7)
    # a component the data do not determine costs the post-hoc evidence nothing, the textbook form delta/2 x^2
    G2 = KronFactor(torch.eye(2), torch.tensor([2.0, 0.0]), 0.0, 2)
    flat = KFACPosterior({"w": (G2, A)}, theta={"w": torch.tensor([[0.75], [5.0]])}, log_lik=-4.0, n_data=3)
    assert flat.log_marginal_likelihood(1.0) == pytest.approx(post.log_marginal_likelihood(1.0))
    assert flat.log_marginal_likelihood(1.0, "mode") == pytest.approx(post.log_marginal_likelihood(1.0, "mode") - 12.5)
    with pytest.raises(LmtuneError, match="evidence form"):
        post.log_marginal_likelihood(1.0, "laplace")


@pytest.mark.parametrize("form", ["post-hoc", "mode"])
def test_tuned_prior_precision_maximises_the_evidence(form):
    post = _toy_posterior()
    post.theta = {n: 4.0 * t for n, t in post.theta.items()}  # weights the data determine (random ones do not)
    post._groups = None
    best = post.optimize_prior_precision(form)
    assert post.prior_precision == best > 0 and not post.prior_at_bound
    assert abs(post.log_marginal_likelihood_grad(best, form)) * best < 1e-6 * post.n_params
    at = post.log_marginal_likelihood(best, form)
    for f in (0.5, 0.9, 0.99, 1.01, 1.1, 2.0):
        assert post.log_marginal_likelihood(best * f, form) < at


def test_an_adapter_without_signal_takes_the_tightest_prior():
    post = _toy_posterior()
    post.theta = {n: torch.zeros_like(t) for n, t in post.theta.items()}
    post._groups = None
    assert post.optimize_prior_precision() == pytest.approx(math.exp(30.0)) and post.prior_at_bound


def test_fit_posterior_fixes_or_tunes_the_prior_and_refuses_nonsense():
    model = LoraToy()
    x, lengths, y = randn(8, 2, 5), torch.full((8,), 2), torch.randint(0, 3, (8,))
    batches = [(lambda: model(x, lengths), y, lengths)]
    assert fit_posterior(model.modules_(), batches, prior_precision=2.5).prior_precision == 2.5
    tuned = fit_posterior(model.modules_(), batches)
    assert tuned.log_marginal_likelihood() >= tuned.log_marginal_likelihood(2.5)
    with pytest.raises(LmtuneError, match="prior_precision must be positive"):
        fit_posterior(model.modules_(), batches, prior_precision=0.0)
    with pytest.raises(LmtuneError, match="weight_sharing"):
        KFACCollector(model.modules_(), weight_sharing="mean")


def test_predictive_probabilities_mc_and_probit():
    mean = torch.tensor([[1.5, -0.5], [0.0, 0.3]], dtype=F64)
    zero = torch.zeros(2, 2, 2, dtype=F64)
    torch.testing.assert_close(predictive_probs(mean, zero, "mc", 50), torch.softmax(mean, -1))
    torch.testing.assert_close(predictive_probs(mean, zero, "probit"), torch.softmax(mean, -1))
    # binary case: p(y=1) = E[sigmoid(d)], d ~ N(m, v), computed by quadrature
    cov = torch.tensor([[[1.0, -0.2], [-0.2, 0.5]], [[2.0, 0.0], [0.0, 0.1]]], dtype=F64)
    mc = predictive_probs(mean, cov, "mc", 200_000, seed=1)
    for b in range(2):
        m = float(mean[b, 0] - mean[b, 1])
        v = float(cov[b, 0, 0] + cov[b, 1, 1] - 2 * cov[b, 0, 1])
        t = np.linspace(-12, 12, 20001)
        w = np.exp(-0.5 * t ** 2) / np.sqrt(2 * np.pi)
        exact = np.trapezoid(w / (1 + np.exp(-(m + np.sqrt(v) * t))), t)
        assert float(mc[b, 0]) == pytest.approx(exact, abs=3e-3)
    # seeded: identical on every call; the variance pulls probabilities towards uniform
    torch.testing.assert_close(predictive_probs(mean, cov, "mc", 100, seed=3),
                               predictive_probs(mean, cov, "mc", 100, seed=3))
    pr = predictive_probs(mean, cov, "probit")
    assert float(pr[0, 0]) < float(torch.softmax(mean, -1)[0, 0])
    # probit, binary: the sigmoid of the margin scaled by its variance; a variance shared by all logits
    # (which softmax ignores) changes nothing
    for b in range(2):
        m = float(mean[b, 1] - mean[b, 0])
        v = float(cov[b, 0, 0] + cov[b, 1, 1] - 2 * cov[b, 0, 1])
        assert float(pr[b, 1]) == pytest.approx(1 / (1 + math.exp(-m / math.sqrt(1 + math.pi / 8 * v))), rel=1e-12)
    shared = cov + 5.0 * torch.ones(2, 2, dtype=F64)
    torch.testing.assert_close(predictive_probs(mean, shared, "probit"), pr)
    torch.testing.assert_close(predictive_probs(mean, shared, "mc", 100, seed=3),
                               predictive_probs(mean, cov, "mc", 100, seed=3))
    # K = 3: rows sum to 1, zero covariance gives the softmax
    mean3 = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64)
    torch.testing.assert_close(predictive_probs(mean3, torch.zeros(1, 3, 3, dtype=F64), "probit"),
                               torch.softmax(mean3, -1))
    with pytest.raises(LmtuneError, match="predictive must be"):
        predictive_probs(mean, cov, "laplace")


def test_posterior_file_round_trip(tmp_path):
    G, A = _random_factor(4, 2, 1, 0.25), _random_factor(6, 6, 2, 0.0)
    theta = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    post = KFACPosterior({"m.lora_A": (G, A)}, theta={"m.lora_A": theta}, log_lik=-3.25, n_data=7,
                         prior_precision=0.125)
    post.save(tmp_path / "p.safetensors")
    back = KFACPosterior.load(tmp_path / "p.safetensors")
    assert (back.log_lik, back.n_data, back.prior_precision) == (-3.25, 7, 0.125)
    assert torch.equal(back.theta["m.lora_A"], theta)
    assert back.log_marginal_likelihood() == post.log_marginal_likelihood()
    torch.testing.assert_close(back.precision_matrix("m.lora_A"), post.precision_matrix("m.lora_A"))


# ----------------------------------------------------------------------------------------------------
# LoraClassifier(bayes="laplace") on the tiny Llama.

@pytest.fixture(scope="module")
def laplace_run(tiny_lm, tmp_path_factory):
    import lmtune
    from lmtune.data import load_builtin, write_jsonl
    from lmtune.tasks import ClassificationTask

    d = tmp_path_factory.mktemp("laplace")
    recs = list(load_builtin("reviews"))
    write_jsonl(d / "train.jsonl", recs[:32])
    write_jsonl(d / "test.jsonl", recs[32:44])
    task = ClassificationTask("Review: {text}\nIs this review positive? Answer yes or no.", "negative=no,positive=yes")
    # a fixed prior: the random tiny model's adapter has no signal, and the evidence would (rightly) pick the
    # tightest prior, leaving nothing to compare
    est = lmtune.LoraClassifier(tiny_lm, task, rank=4, alpha=8, epochs=2, lr=1e-2, bayes="laplace", progress=False,
                                cache=False, batch_size=8, prior_precision=1.0).fit(d / "train.jsonl")
    return est, d


def test_lora_laplace_on_a_sample_of_the_training_set(laplace_run):
    from lmtune.data import open_data
    from lmtune.laplace import fit_lora_laplace

    est, d = laplace_run
    full = est.posterior_info_
    assert full["curvature_examples"] == full["n_data"] == 32 and not full["curvature_sampled"]
    est.kfac_samples = 12
    try:
        post, info = fit_lora_laplace(est, open_data(d / "train.jsonl"))
    finally:
        est.kfac_samples = None
    assert info["curvature_examples"] == 12 and info["curvature_sampled"] and post.n_data == 32
    # the factors estimate the same sums: the same order of magnitude as the full pass's
    lam_s, c_s, _ = post.spectrum()
    lam_f, c_f, _ = est.posterior_.spectrum()
    ratio = float((lam_s * c_s).sum() / (lam_f * c_f).sum())
    assert 0.3 < ratio < 3.0


def test_lora_laplace_card_and_identical_predictions_after_loading(laplace_run, tiny_lm, tmp_path):
    import lmtune

    est, d = laplace_run
    info = est.posterior_info_
    assert info["kind"] == "laplace" and not info["prior_precision_tuned"] and info["prior_precision"] == 1.0
    assert info["n_params"] == est.fit_info_["trainable_params"] and info["n_data"] == 32
    assert info["log_marginal_likelihood"] == pytest.approx(est.posterior_.log_marginal_likelihood())
    assert info["seconds"] > 0 and info["peak_rss_bytes"] > 0
    p = est.predict_proba(d / "test.jsonl")
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
    run = est.save(tmp_path / "run")
    assert {f.name for f in run.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                              "laplace.safetensors", "card.json"}
    card = json.loads((run / "card.json").read_text())
    assert card["hyperparameters"]["bayes"] == "laplace" and card["posterior"]["kind"] == "laplace"
    back = lmtune.load_run(run, model=tiny_lm, progress=False, cache=False)
    np.testing.assert_allclose(back.predict_proba(d / "test.jsonl"), p, rtol=0, atol=1e-12)


def test_lora_laplace_tunes_the_prior_by_the_post_hoc_evidence(laplace_run):
    import lmtune

    est, d = laplace_run
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = lmtune.LoraClassifier(est.lm, est.task, rank=4, alpha=8, epochs=2, lr=1e-2, bayes="laplace",
                                      progress=False, cache=False, batch_size=8).fit(d / "train.jsonl")
    info, post = tuned.posterior_info_, tuned.posterior_
    # a posterior collapsed onto the MAP is said out loud, and only then
    assert any("collapsed onto the MAP" in str(w.message) for w in caught) == post.prior_at_bound
    assert info["prior_precision_tuned"] and info["evidence"] == "post-hoc"
    assert info["prior_precision"] == post.prior_precision
    at = post.log_marginal_likelihood()
    assert post.log_marginal_likelihood(post.prior_precision / 2) <= at
    assert info["prior_at_bound"] == post.prior_at_bound  # (the random tiny adapter: the evidence rises to the bound)
    if not post.prior_at_bound:
        assert post.log_marginal_likelihood(post.prior_precision * 2) <= at
    assert info["mode_form_prior_precision"] > 0 and info["log_marginal_likelihood"] == pytest.approx(at)
    assert 0 <= info["theta_sq_determined"] <= info["theta_sq_norm"]


def test_lora_laplace_auto_prior_turns_to_validation_only_when_the_evidence_collapses(laplace_run, monkeypatch):
    """prior_method="auto" (the default): the evidence's prior, and the validation NLL's when the evidence
    collapsed onto the MAP and validation data are given."""
    from lmtune.data import open_data
    from lmtune.laplace import KFACPosterior, fit_lora_laplace

    est, d = laplace_run
    train, val = open_data(d / "train.jsonl"), open_data(d / "test.jsonl")
    saved = est.posterior_, est.prior_precision, est.prior_method
    est.prior_precision = None
    try:
        assert est.prior_method == "auto"  # what LoraClassifier defaults to (the fixture leaves it)
        post, info = fit_lora_laplace(est, train, val)
        # the random tiny model's adapter carries no signal: the evidence takes its upper bound
        assert info["evidence_prior_at_bound"] and info["prior_method"] == "validation NLL (the evidence collapsed)"
        vt = info["validation_tuning"]
        assert vt["n_val"] == 12 and info["evidence_prior_precision"] in vt["candidates"]
        assert vt["chosen"] == post.prior_precision == info["prior_precision"]
        assert vt["val_nll"][vt["candidates"].index(vt["chosen"])] == min(vt["val_nll"])

        post, info = fit_lora_laplace(est, train)  # no validation data: the evidence's prior stands
        assert info["validation_tuning"] is None and info["prior_method"] == "evidence (post-hoc)"
        assert post.prior_at_bound and post.prior_precision == info["evidence_prior_precision"]

        est.prior_method = "evidence"  # asked for the evidence alone: validation data do not change it
        post, info = fit_lora_laplace(est, train, val)
        assert info["validation_tuning"] is None and post.prior_precision == info["evidence_prior_precision"]

        def interior(self, form="post-hoc", bounds=(-20.0, 30.0)):  # an evidence with an interior maximum
            self.prior_precision, self.prior_at_bound = 5.0, False
            return 5.0

        monkeypatch.setattr(KFACPosterior, "optimize_prior_precision", interior)
        est.prior_method = "auto"
        post, info = fit_lora_laplace(est, train, val)
        assert info["validation_tuning"] is None and info["prior_method"] == "evidence (post-hoc)"
        assert post.prior_precision == info["prior_precision"] == 5.0
    finally:
        est.posterior_, est.prior_precision, est.prior_method = saved


def test_lora_laplace_prior_chosen_on_validation_data(laplace_run):
    """prior_method="val": the grid value with the lowest validation NLL, which the predictive then has."""
    import lmtune
    from lmtune.data import open_data
    from lmtune.metrics import nll

    est, d = laplace_run
    val = open_data(str(d / "test.jsonl"))
    tuned = lmtune.LoraClassifier(est.lm, est.task, rank=4, alpha=8, epochs=2, lr=1e-2, bayes="laplace",
                                  prior_method="val", predictive="probit", progress=False, cache=False,
                                  batch_size=8).fit(d / "train.jsonl", val=val)
    info = tuned.posterior_info_
    vt = info["validation_tuning"]
    assert info["prior_method"] == "validation NLL" and vt["n_val"] == 12
    assert info["evidence_prior_precision"] in vt["candidates"] and len(vt["candidates"]) >= 25
    best = int(np.argmin(vt["val_nll"]))
    assert vt["chosen"] == vt["candidates"][best] == tuned.posterior_.prior_precision == info["prior_precision"]
    y = np.array([{"negative": 0, "positive": 1}[r["label"]] for r in val.records])
    for k in (best, 0, len(vt["candidates"]) - 1):  # the recorded NLLs are the predictive's
        tuned.posterior_.prior_precision = vt["candidates"][k]
        assert nll(y, tuned.predict_proba(val)) == pytest.approx(vt["val_nll"][k], rel=1e-6)
    assert len(set(np.round(vt["val_nll"], 9))) > 1  # the prior does change the predictive


def test_lora_laplace_jacobians_from_hooks_equal_autograd_and_batching_does_not_matter(laplace_run):
    from lmtune.laplace import _lora_batches, lora_grad_pass

    est, d = laplace_run
    lm = est.lm
    task = est.task
    label_ids = torch.tensor(task.label_token_ids(lm.tokenizer))
    from lmtune.data import open_data

    seqs = task.encode(lm.tokenizer, open_data(str(d / "test.jsonl"))).input_ids[:5]
    post = est.posterior_
    with lora_grad_pass(est) as modules:
        together = {}
        for idx, fwd, _ in _lora_batches(est, seqs, label_ids, None, 0):  # one padded batch of 5
            mean, cov = post.glm(modules, fwd)
            for r, i in enumerate(idx):
                together[i] = (mean[r], cov[r])
        for i in range(5):
            alone_mean, alone_cov = post.glm(modules, lambda: est._forward(lm, [seqs[i]], label_ids))
            torch.testing.assert_close(alone_cov[0], together[i][1], atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(alone_mean[0], together[i][0], atol=1e-5, rtol=1e-5)
        # explicit: J from autograd on the LoRA weights themselves, Sigma as a dense inverse per block
        logits = est._forward(lm, [seqs[0]], label_ids)[0]
        expected = torch.zeros(2, 2, dtype=torch.float64)
        for name, mod in modules.items():
            J = torch.stack([torch.autograd.grad(logits[k], mod.weight, retain_graph=True)[0].reshape(-1)
                             for k in range(2)]).double()
            expected += (J @ torch.linalg.inv(post.precision_matrix(name).to(J.device)) @ J.T).cpu()
    C = torch.eye(2, dtype=torch.float64) - 0.5
    torch.testing.assert_close(together[0][1].cpu(), C @ expected @ C, atol=1e-6, rtol=1e-4)


def test_lora_laplace_is_less_confident_than_its_map_and_reports_uncertainty(laplace_run):
    from lmtune.evaluate import predict_records

    est, d = laplace_run
    est.predictive = "probit"
    try:
        p_bayes = est.predict_proba(d / "test.jsonl")
        rows = list(predict_records(est, d / "test.jsonl"))
    finally:
        est.predictive = "mc"
    est.bayes = None
    try:
        p_map = est.predict_proba(d / "test.jsonl")
    finally:
        est.bayes = "laplace"
    assert np.all(np.abs(p_bayes - 0.5) <= np.abs(p_map - 0.5) + 1e-12)
    assert np.any(np.abs(p_bayes - 0.5) < np.abs(p_map - 0.5) - 1e-6)
    assert len(rows) == 12 and set(rows[0]["uncertainty"]) == {"entropy", "logit_std"}
    assert all(r["uncertainty"]["logit_std"] > 0 and 0 < r["uncertainty"]["entropy"] <= math.log(2) for r in rows)


def test_lora_modules_of_a_peft_model(laplace_run):
    est, _ = laplace_run
    with est.attached():
        mods = lora_modules(est._pm)
    # q_proj and v_proj of 2 layers, A and B each
    assert len(mods) == 8 and all(n.endswith((".lora_A", ".lora_B")) for n in mods)


def test_bayes_options_are_checked_before_training(tiny_lm):
    import lmtune
    from lmtune.tasks import ClassificationTask

    task = ClassificationTask("{text}", "negative=no,positive=yes")
    for kwargs, msg in (({"bayes": "exact"}, "bayes must be one of laplace, svgd"),
                        ({"bayes": "laplace", "dora": True}, "not with dora"),
                        ({"bayes": "laplace", "predictive": "sampled"}, "predictive must be mc or probit"),
                        ({"bayes": "laplace", "prior_precision": -1.0}, "prior_precision must be"),
                        ({"bayes": "laplace", "prior_method": "cv"}, "prior_method must be auto or evidence or val"),
                        ({"bayes": "laplace", "kfac_samples": 0}, "kfac_samples must be"),
                        ({"bayes": "laplace", "ggn_samples": 0}, "ggn_samples must be"),
                        ({"bayes": "laplace", "prior_method": "val"}, "give it \\(--val\\)")):
        with pytest.raises(LmtuneError, match=msg):
            lmtune.LoraClassifier(tiny_lm, task, **kwargs).fit("builtin:reviews:train")


def test_cli_fit_eval_predict_laplace(tiny_model_dir, tmp_path, capsys):
    from lmtune.cli import main
    from lmtune.data import load_builtin, write_jsonl

    recs = list(load_builtin("reviews"))
    write_jsonl(tmp_path / "train.jsonl", recs[:24])
    write_jsonl(tmp_path / "test.jsonl", recs[24:34])
    run = tmp_path / "run"
    assert main(["fit", "--method", "lora", "--bayes", "laplace", "--model", str(tiny_model_dir), "--train",
                 str(tmp_path / "train.jsonl"), "--template", "Review: {text}\\nPositive?", "--label-words",
                 "negative=no,positive=yes", "--rank", "4", "--max-steps", "3", "--predictive", "probit",
                 "--prior-precision", "2.5", "--out", str(run), "--no-cache", "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["posterior"]["prior_precision"] == 2.5 and not card["posterior"]["prior_precision_tuned"]
    assert card["hyperparameters"]["predictive"] == "probit"
    assert main(["eval", str(run), "--data", str(tmp_path / "test.jsonl"), "--json", "--no-cache"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["method"] == "lora" and ev["data"]["n"] == 10 and 0 <= ev["metrics"]["ece"] <= 1
    assert main(["predict", str(run), "--data", str(tmp_path / "test.jsonl"), "--no-cache"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 10 and all(r["uncertainty"]["logit_std"] > 0 for r in rows)
    assert main(["fit", "--method", "adapter", "--bayes", "laplace", "--model", str(tiny_model_dir), "--train",
                 str(tmp_path / "train.jsonl"), "--template", "{text}", "--label-words", "negative=no,positive=yes",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--bayes laplace does not apply to --method adapter" in capsys.readouterr().err


def test_lora_laplace_with_ggn_sketches_on_a_three_class_task(tiny_lm):
    import lmtune
    from lmtune.data import Dataset, load_builtin
    from lmtune.laplace import fit_lora_laplace
    from lmtune.tasks import ClassificationTask

    recs = [r for r in load_builtin("reviews") if r["domain"] in ("film", "book", "hotel")][:24]
    ds = Dataset.from_records(recs)
    task = ClassificationTask("What is reviewed?\nReview: {text}", "film=film,book=book,hotel=hotel",
                              label_field="domain")
    est = lmtune.LoraClassifier(tiny_lm, task, rank=4, alpha=8, epochs=1, lr=1e-2, bayes="laplace", progress=False,
                                cache=False, batch_size=8, prior_precision=1.0, ggn_samples=1).fit(ds)
    info = est.posterior_info_
    assert info["ggn_samples"] == 1 and info["backward_passes_per_batch"] == 1
    assert "1 Gaussian sketch of" in info["curvature"]
    est.ggn_samples = None
    exact, exact_info = fit_lora_laplace(est, ds)
    assert exact_info["ggn_samples"] is None and exact_info["backward_passes_per_batch"] == 2
    assert exact_info["curvature"].startswith("KFAC of the exact GGN")
    # the sketch estimates the same curvature: its total within a factor of a few of the exact one
    lam_s, c_s, _ = est.posterior_.spectrum()
    lam_e, c_e, _ = exact.spectrum()
    ratio = float((lam_s * c_s).sum() / (lam_e * c_e).sum())
    assert 0.2 < ratio < 5.0 and ratio != 1.0
    est.ggn_samples = 2  # as many as K - 1: the exact GGN, identically
    same, same_info = fit_lora_laplace(est, ds)
    assert same_info["ggn_samples"] is None
    for name in exact.blocks:
        torch.testing.assert_close(same.precision_matrix(name), exact.precision_matrix(name))
    probs = est.predict_proba(ds)
    assert probs.shape == (24, 3) and np.allclose(probs.sum(1), 1.0)
