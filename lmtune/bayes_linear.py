r"""The exact Gaussian posterior of the closed-form head, its evidence, and Gaussian-logit predictives.

The closed-form head (:mod:`lmtune.methods.closed_form`, seed 000) is ridge regression of targets ``Y``
(``N x K``) on last-token hidden states ``Z`` (``N x d``). Ridge regression *is* Bayesian linear
regression (seed 003 asks for posteriors over the fine-tuned parameters; here no approximation is needed):

.. math::

    Y = \mathbf 1 b^\top + Z W + E, \qquad E_{ik} \sim \mathcal N(0, \beta^{-1}), \qquad
    W_{:k} \sim \mathcal N(0, \alpha^{-1} I_d), \qquad p(b) \propto 1 ,

with the output columns independent given ``(alpha, beta)``. With :math:`Z_c, Y_c` centred by their
column means and :math:`G = Z_c^\top Z_c = V \operatorname{diag}(s) V^\top` (the eigendecomposition
:mod:`lmtune.ridge` already computes to choose lambda), the posterior of every column of ``W`` is

.. math::

    W_{:k} \mid Y \sim \mathcal N\big(M_{:k}, \Sigma\big), \qquad
    M = (G + \lambda I)^{-1} Z_c^\top Y_c, \quad \lambda = \alpha / \beta, \qquad
    \Sigma = (\beta G + \alpha I)^{-1} = V \operatorname{diag}\!\Big(\frac{1}{\alpha + \beta s}\Big) V^\top
             + \frac{I - V V^\top}{\alpha},

the mean being exactly the ridge solution at ``lambda = alpha/beta`` and ``Sigma`` shared by the ``K``
columns. (The last term matters when ``V`` holds only the ``r < d`` directions of a dual, N x N
decomposition: the others keep their prior variance.)

Intercept
---------
With a flat prior the intercept is integrated out exactly by centring. Writing the model as
``c + (z - z_bar) W`` (``c = b + z_bar W``, flat too), the columns ``1`` and ``Z_c`` are orthogonal, so the
posterior precision is block diagonal: ``c`` has variance ``1/(beta N)``, independent of ``W``, and the
variance of an adapted output at a point ``z`` is

.. math::

    v(z) = \frac{1}{\beta N} + u^\top \Sigma u, \qquad u = z - \bar z .

Without an intercept, ``u = z`` and the first term is absent.

Evidence
--------
A flat prior has no normalisable evidence, so the intercept's direction is left out: the log evidence is
that of ``Y`` projected onto the ``N_e = N - 1`` dimensions orthogonal to ``1`` (the *restricted*
likelihood; ``N_e = N`` without an intercept), in which each column is
:math:`\mathcal N(0, \beta^{-1} I + \alpha^{-1} Z_c Z_c^\top)`. Through the eigenvalues (Woodbury and the
matrix determinant lemma),

.. math::

    \log p(Y \mid \alpha, \beta) = \frac{K_e}{2}\Big[-\sum_j \log\big(1 + \tfrac{\beta s_j}{\alpha}\big)
        + N_e \log \beta - N_e \log 2\pi\Big] - \frac{\beta}{2} R(\lambda), \qquad
    R(\lambda) = \lVert Y_c - Z_c M \rVert_F^2 + \lambda \lVert M \rVert_F^2 ,

the form MacKay (1992) writes as :math:`\tfrac d2 \log\alpha + \tfrac{N}{2}\log\beta - E(M)
- \tfrac12 \log|A| - \tfrac N2 \log 2\pi` per column. For a fixed ``lambda`` the best ``beta`` is
:math:`\beta^*(\lambda) = K_e N_e / R(\lambda)`, which leaves a function of ``lambda`` alone,

.. math::

    \log p^*(\lambda) = \frac{K_e}{2}\Big[-\sum_j \log\big(1 + \tfrac{s_j}{\lambda}\big)
        - N_e \Big(\log \frac{2\pi R(\lambda)}{K_e N_e} + 1\Big)\Big],

maximised here over ``log lambda``: on the same 41-point grid as GCV (the curve goes into the run card),
then by bounded Brent (``scipy.optimize.minimize_scalar``) between the grid neighbours of the best point.
Each evaluation costs ``O(d K)``. We optimise this profile rather than iterate MacKay's fixed-point updates
(:math:`\alpha = K_e\gamma/\lVert M\rVert^2`, :math:`\beta = K_e(N_e - \gamma)/\lVert Y_c - Z_c M\rVert^2`,
:math:`\gamma = \sum_j s_j/(s_j+\lambda)` the number of well-determined parameters): they reach the same
stationary point (the tests check that it satisfies them) but can crawl, and a bracketed 1-D search
cannot diverge. ``R`` is computed as :math:`R_0 + \lambda\sum_j \lVert Q_j\rVert^2/(s_j(s_j+\lambda))`,
with :math:`R_0 = \lVert Y_c\rVert^2 - \sum_j \lVert Q_j\rVert^2/s_j` the least-squares residual
(:math:`Q = V^\top Z_c^\top Y_c`), so it stays accurate when the fit nearly interpolates (``N <= d``, the
usual case for hidden states), where ``R`` is proportional to ``lambda``.

Row-centred targets: ``K_e = K - 1``
------------------------------------
The closed-form head regresses targets centred across the K labels (each row of ``Y`` sums to 0), so ``Y``
lives in a ``K - 1`` dimensional subspace and its K columns are not independent. In an orthonormal basis
``H`` (``K x (K-1)``) of that subspace, ``Y H`` *does* follow the model above with ``K - 1`` independent
columns (an orthogonal map keeps i.i.d. Gaussian columns i.i.d.), and ``||Y H|| = ||Y||``,
``||Q H|| = ||Q||``, so every formula holds with ``K_e = K - 1`` (``n_outputs``) in place of ``K``.
Counting K columns instead would, for K = 2, count the one free column twice and double ``beta``. The
component of ``W`` along the all-ones direction of the labels keeps its prior and adds the same number to
every logit of a row, which softmax ignores.

Predictive distribution of the logits
-------------------------------------
The adapted logits of a record are :math:`f = L + zW + b`; under the posterior their softmax-visible part
is Gaussian with mean :math:`\mu = L + zM + b` and covariance :math:`v(z)\,I` on the ``K - 1`` dimensional
subspace (equivalently: i.i.d. variance ``v(z)`` per logit plus an irrelevant common shift).

*Observation noise is left out.* The predictive of a regression *target* would add ``1/beta``; but the
targets are smoothed log-probabilities that stand in for the labels, and their Gaussian residual is the
misfit of a linear function to ``log((1 - eps) onehot + eps/K)``, not randomness of the logits. The label's
own randomness is already in the categorical likelihood ``softmax(f)``: adding ``1/beta`` would count it a
second time, as one constant extra variance for every record (a temperature, the same near the training
data and far from it), and with ``1/beta`` typically larger than the epistemic ``v(z)`` it would drown the
part that says which records the posterior is unsure about. The predictive here is therefore the epistemic
one, ``p(y | x) = E_{f ~ N(mu, v I)} softmax(f)``, computed by (:func:`gaussian_softmax`):

* ``"mc"``: Monte Carlo with ``samples`` standard normal draws ``xi`` (``samples x K``) from a seeded
  generator, *the same draws for every record* (common random numbers): each record's prediction depends
  only on that record and the seed, never on the batch it arrives in or the records beside it, so saved and
  reloaded runs, subsets and reorderings give identical outputs. The average is taken in the log domain
  (``logsumexp`` of log-softmaxes), so tiny probabilities do not underflow to ``log 0``.
* ``"probit"``: the mean-field approximation. For two classes, :math:`E\,\sigma(a) \approx
  \sigma(\mu_a / \sqrt{1 + \pi s_a^2/8})` (MacKay 1992) for a logit difference ``a`` of mean ``mu_a`` and
  variance ``s_a^2``. For K classes we use its pairwise form (Lu, Ie & Sha 2020, "mean-field 1"):
  :math:`p_k \propto 1 / \sum_j \exp\!\big(-(\mu_k - \mu_j)/\sqrt{1 + \tfrac{\pi}{8}(\sigma_k^2 +
  \sigma_j^2)}\big)`, normalised. Note that the per-logit recipe often quoted,
  ``softmax(mu_k / sqrt(1 + pi sigma_k^2 / 8))``, is *not* the binary probit for K = 2: a difference of
  two logits of variance ``v`` each has variance ``2v``, and the pairwise form accounts for it. With
  this head's equal variances the pairwise form is exactly ``softmax(mu / sqrt(1 + pi v / 4))`` and sums to
  1; for K > 2 it remains an approximation (it ignores the correlation between the pairwise differences),
  which is why ``"mc"`` is kept as the reference.

The per-record uncertainty reported is the entropy of the predictive distribution (nats) and the posterior
standard deviation ``sqrt(v(z))`` of each adapted logit.

Everything is float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp

from lmtune import ridge

__all__ = ["Evidence", "Posterior", "BayesianFit", "fit", "log_evidence", "gaussian_softmax", "entropy",
           "PREDICTIVES"]

PREDICTIVES = ("probit", "mc")
_CHUNK = 1024  # records per Monte Carlo chunk: samples x chunk x K float64 in memory
_XATOL = 1e-7  # Brent tolerance on log(lambda)


# --------------------------------------------------------------------------- #
# results
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class Evidence:
    """Hyper-parameters of the posterior and the evidence they reach.

    Attributes
    ----------
    alpha : float
        Prior precision of each weight.
    beta : float
        Noise precision of the targets.
    log_evidence : float
        :math:`\\log p(Y \\mid \\alpha, \\beta)`, nats, restricted to the ``n_eff`` directions orthogonal
        to the intercept (see the module docstring).
    gamma : float
        Well-determined parameters per output, :math:`\\sum_j s_j/(s_j + \\lambda)`.
    n_outputs : int
        ``K_e``, independent output columns.
    n_eff : int
        ``N_e``, rows minus one for the intercept.
    """

    alpha: float
    beta: float
    log_evidence: float
    gamma: float
    n_outputs: int
    n_eff: int

    @property
    def lam(self) -> float:
        """The ridge penalty these imply, ``alpha / beta``."""
        return self.alpha / self.beta

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "log_evidence": self.log_evidence, "gamma": self.gamma,
                "n_outputs": self.n_outputs, "n_eff": self.n_eff}


@dataclass(frozen=True, eq=False)
class Posterior:
    """The Gaussian posterior over ``(W, b)``: mean ``(W, b)``, column covariance ``Sigma`` in eigen-factors.

    Attributes
    ----------
    W : ndarray, shape (d, K)
        Posterior mean (the ridge solution at ``alpha / beta``).
    b : ndarray, shape (K,)
    V : ndarray, shape (d, r)
        Eigenvectors of ``G`` (``r = d``, or the rank of ``Z_c`` after a dual decomposition).
    s : ndarray, shape (r,)
        Their eigenvalues.
    alpha, beta : float
    z_bar : ndarray of shape (d,), or None
        Training mean of ``z`` when an intercept was fitted.
    n : int
        Training rows.
    """

    W: np.ndarray
    b: np.ndarray
    V: np.ndarray
    s: np.ndarray
    alpha: float
    beta: float
    z_bar: np.ndarray | None
    n: int

    def covariance(self) -> np.ndarray:
        """``Sigma = (beta G + alpha I)^{-1}``, (d, d): shared by every output column of ``W``."""
        d = self.V.shape[0]
        Sigma = (self.V / (self.alpha + self.beta * self.s)) @ self.V.T  # (d, d)
        if self.V.shape[1] < d:
            Sigma += (np.eye(d) - self.V @ self.V.T) / self.alpha
        return Sigma

    def variance(self, Z: Any) -> np.ndarray:
        """Posterior variance of each adapted output ``z W_k + b_k`` at the rows of ``Z`` (N, d): (N,)."""
        Z = np.asarray(Z)
        out = np.empty(len(Z))
        inv = 1.0 / (self.alpha + self.beta * self.s)  # (r,)
        partial = self.V.shape[1] < self.V.shape[0]
        for lo in range(0, len(Z), 4096):
            U = Z[lo:lo + 4096].astype(np.float64)  # (B, d)
            if self.z_bar is not None:
                U = U - self.z_bar
            P = U @ self.V  # (B, r)
            v = (P * P) @ inv  # u' Sigma u within the span of V
            if partial:  # the rest of u keeps the prior variance 1/alpha
                v += np.maximum(np.einsum("bd,bd->b", U, U) - np.einsum("br,br->b", P, P), 0.0) / self.alpha
            out[lo:lo + 4096] = v
        if self.z_bar is not None:
            out += 1.0 / (self.beta * self.n)
        return out


@dataclass(frozen=True, eq=False)
class BayesianFit:
    """What :func:`fit` returns: the ridge solution (the posterior mean), the posterior and its evidence."""

    solution: ridge.RidgeSolution
    posterior: Posterior
    evidence: Evidence


# --------------------------------------------------------------------------- #
# evidence
# --------------------------------------------------------------------------- #
def _check_outputs(n_outputs: Any, k: int) -> int:
    if n_outputs is None:
        return k
    if isinstance(n_outputs, bool) or int(n_outputs) != n_outputs or not 1 <= n_outputs <= k:
        raise ValueError(f"n_outputs must be an integer in [1, K={k}]; got {n_outputs!r}")
    return int(n_outputs)


class _Profile:
    """The pieces of the evidence that do not depend on (alpha, beta), from one eigendecomposition."""

    def __init__(self, eig, n_outputs: int):
        system = eig.system
        self.eig = eig
        self.k_e = n_outputs
        self.n_e = system.n - (system.z_bar is not None)
        if self.n_e < 1:
            raise ValueError(f"the evidence needs at least {2 if system.z_bar is not None else 1} rows; "
                             f"got {system.n}")
        keep = eig.s > 0  # numerically null directions carry no signal (their Q is rounding noise)
        self.s = eig.s[keep]  # (r,)
        self.q2 = np.einsum("jk,jk->j", eig.Q, eig.Q)[keep]  # (r,) ||Q_j,:||^2
        # least-squares residual: what no lambda can fit
        self.R0 = max(float(system.yy.sum() - np.sum(self.q2 / self.s)), 0.0)

    def R(self, lam: float) -> float:
        """Ridge objective at its minimum, ||Y_c - Z_c M||^2 + lam ||M||^2."""
        return self.R0 + lam * float(np.sum(self.q2 / (self.s * (self.s + lam))))

    def log_evidence(self, alpha: float, beta: float) -> float:
        lam = alpha / beta
        return (0.5 * self.k_e * (-np.sum(np.log1p(self.s * (beta / alpha)))
                                  + self.n_e * np.log(beta) - self.n_e * np.log(2 * np.pi))
                - 0.5 * beta * self.R(lam))

    def best_beta(self, lam: float) -> float:
        R = self.R(lam)
        if not R > 0:
            raise ValueError("the targets are fitted exactly (zero residual): the noise precision beta is "
                             "unbounded and the evidence has no maximum")
        return self.k_e * self.n_e / R

    def profile(self, log_lam: float) -> float:
        """log p*(lambda): the evidence at the best beta for this lambda."""
        lam = float(np.exp(log_lam))
        beta = self.best_beta(lam)
        return self.log_evidence(lam * beta, beta)

    def gamma(self, lam: float) -> float:
        return float(np.sum(self.s / (self.s + lam)))

    def result(self, alpha: float, beta: float) -> Evidence:
        return Evidence(float(alpha), float(beta), float(self.log_evidence(alpha, beta)),
                        self.gamma(alpha / beta), self.k_e, self.n_e)


def _check_positive(v: Any, name: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number; got {v!r}") from None
    if not np.isfinite(f) or f <= 0:
        raise ValueError(f"{name} must be finite and > 0; got {v!r}")
    return f


def log_evidence(stats: ridge.GramStats, alpha: float, beta: float, n_outputs: int | None = None,
                 fit_intercept: bool = True) -> float:
    """Log marginal likelihood of the targets under prior precision ``alpha`` and noise precision ``beta``.

    Parameters
    ----------
    stats : lmtune.ridge.GramStats
        Statistics of ``(Z, Y)``.
    alpha, beta : float
        > 0.
    n_outputs : int, optional
        Independent output columns ``K_e``: ``K`` (default), or ``K - 1`` when every row of ``Y`` sums to 0.
    fit_intercept : bool, default True
        Integrate out a flat intercept (the evidence is then the restricted one, over ``N - 1`` dimensions).

    Returns
    -------
    float
        Nats.
    """
    alpha, beta = _check_positive(alpha, "alpha"), _check_positive(beta, "beta")
    prof = _Profile(ridge._eigen(ridge._system(stats, fit_intercept)), _check_outputs(n_outputs, stats.k))
    return float(prof.log_evidence(alpha, beta))


def _maximise(prof: _Profile, lam_grid: np.ndarray) -> tuple[float, ridge.LambdaSelection]:
    """Best lambda: the grid's argmax of the profiled evidence, refined by bounded Brent in log lambda."""
    lam_grid = lam_grid[lam_grid > 0]
    if lam_grid.size == 0:
        raise ValueError("the evidence needs lambdas > 0 in the grid")
    scores = np.array([-prof.profile(np.log(lam)) for lam in lam_grid])  # lower is better
    dof = (prof.eig.system.z_bar is not None) + np.array([prof.gamma(lam) for lam in lam_grid])
    sel = ridge._select("evidence", lam_grid, scores, dof)  # warns when the argmax is a grid edge
    i = int(np.argmin(scores))
    lo, hi = np.log(lam_grid[max(i - 1, 0)]), np.log(lam_grid[min(i + 1, lam_grid.size - 1)])
    lam = float(lam_grid[i])
    if hi > lo:
        res = minimize_scalar(lambda t: -prof.profile(t), bounds=(lo, hi), method="bounded",
                              options={"xatol": _XATOL})
        if res.success and res.fun <= scores[i]:
            lam = float(np.exp(res.x))
    return lam, ridge.LambdaSelection("evidence", sel.grid, sel.scores, lam, sel.dof)


def fit(stats: ridge.GramStats, lam: float | None = None, *, n_outputs: int | None = None, Z: Any = None,
        grid: Any = None, fit_intercept: bool = True) -> BayesianFit:
    """The posterior of the ridge head, with ``alpha`` and ``beta`` by evidence maximisation.

    Parameters
    ----------
    stats : lmtune.ridge.GramStats
        Statistics of ``(Z, Y)``.
    lam : float, optional
        Given: ``alpha / beta`` is fixed at it and only ``beta`` is chosen (in closed form,
        ``beta = K_e N_e / R(lam)``). None: both are chosen by maximising the evidence.
    n_outputs : int, optional
        ``K_e``: ``K`` (default), or ``K - 1`` for row-centred targets (see the module docstring).
    Z : array_like, shape (N, d), optional
        The rows ``stats`` came from; when N < d they allow the cheaper N x N decomposition.
    grid : array_like, optional
        Candidate lambdas for the first, coarse search; default :func:`lmtune.ridge.lambda_grid`.
    fit_intercept : bool, default True

    Returns
    -------
    BayesianFit
        ``solution`` is the ridge solution at the chosen lambda (``selection.criterion == "evidence"``
        when it was chosen here), ``posterior`` its Gaussian posterior, ``evidence`` the hyper-parameters.
    """
    k_e = _check_outputs(n_outputs, stats.k)
    system = ridge._system(stats, fit_intercept)
    if Z is not None:
        Z = ridge._to_float64(Z, "Z")
        if Z.shape != (stats.n, stats.d):
            raise ValueError(f"Z has shape {Z.shape} but stats was accumulated from ({stats.n}, {stats.d})")
    eig = ridge._decompose(system, Z)
    prof = _Profile(eig, k_e)
    if lam is None:
        lam, selection = _maximise(prof, ridge._grid_for(eig, grid))
    else:
        lam, selection = _check_positive(lam, "lam"), None
    beta = prof.best_beta(lam)
    evidence = prof.result(lam * beta, beta)
    sol = ridge._solve_eigh(eig, lam, selection)
    z_bar = None if system.z_bar is None else system.z_bar.copy()
    post = Posterior(sol.W, sol.b, eig.V, eig.s, evidence.alpha, evidence.beta, z_bar, stats.n)
    return BayesianFit(sol, post, evidence)


# --------------------------------------------------------------------------- #
# predictive
# --------------------------------------------------------------------------- #
def _check_predictive(method: Any, samples: Any) -> None:
    if method not in PREDICTIVES:
        raise ValueError(f"unknown predictive {method!r}; expected one of {PREDICTIVES}")
    if method == "mc" and (isinstance(samples, bool) or int(samples) != samples or samples < 1):
        raise ValueError(f"samples must be a positive integer; got {samples!r}")


def gaussian_softmax(mean: Any, var: Any, method: str = "probit", samples: int = 1000,
                     seed: int = 0) -> np.ndarray:
    """Log of ``E softmax(f)`` for Gaussian logits ``f ~ N(mean, diag(var))``, per record.

    Parameters
    ----------
    mean : array_like, shape (N, K)
        Mean logits.
    var : array_like, shape (N,), (N, 1) or (N, K)
        Variance of each logit (independent logits; a common shift of a row is irrelevant).
    method : {"probit", "mc"}
        Pairwise mean-field (probit) approximation, or Monte Carlo with common random numbers (see the
        module docstring).
    samples : int
        Monte Carlo draws (``"mc"`` only).
    seed : int
        Seed of the Monte Carlo draws.

    Returns
    -------
    ndarray, shape (N, K)
        Log predictive probabilities (each row's ``exp`` sums to 1).
    """
    _check_predictive(method, samples)
    mu = np.asarray(mean, dtype=np.float64)
    if mu.ndim != 2:
        raise ValueError(f"mean must be 2-D (N, K); got shape {mu.shape}")
    v = np.asarray(var, dtype=np.float64)
    v = v[:, None] if v.ndim == 1 else v
    if v.ndim != 2 or v.shape[0] != mu.shape[0] or v.shape[1] not in (1, mu.shape[1]):
        raise ValueError(f"var must have shape (N,), (N, 1) or (N, K) for mean {mu.shape}; got {np.shape(var)}")
    if not np.isfinite(v).all() or (v < 0).any():
        raise ValueError("var must be finite and >= 0")
    v = np.broadcast_to(v, mu.shape)
    if method == "probit":
        diff = mu[:, :, None] - mu[:, None, :]  # (N, K, K) mu_k - mu_j
        scale = np.sqrt(1.0 + (np.pi / 8.0) * (v[:, :, None] + v[:, None, :]))  # (N, K, K)
        log_unnorm = -logsumexp(-diff / scale, axis=2)  # (N, K): -log sum_j exp(-(mu_k - mu_j)/s_kj)
        return log_unnorm - logsumexp(log_unnorm, axis=1, keepdims=True)
    xi = np.random.default_rng(seed).standard_normal((int(samples), mu.shape[1]))  # (S, K), the same for all
    out = np.empty_like(mu)
    for lo in range(0, len(mu), _CHUNK):
        m, sd = mu[lo:lo + _CHUNK], np.sqrt(v[lo:lo + _CHUNK])  # (B, K)
        f = m[None] + sd[None] * xi[:, None, :]  # (S, B, K)
        out[lo:lo + _CHUNK] = logsumexp(log_softmax(f, axis=2), axis=0) - np.log(samples)
    return out


def entropy(log_probs: Any) -> np.ndarray:
    """Entropy (nats) of each row of a categorical distribution given by its log-probabilities: (N,)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    p = np.exp(lp)
    return -np.sum(np.where(p > 0, p * lp, 0.0), axis=1)
