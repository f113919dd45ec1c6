"""Laplace-LoRA: a Gaussian posterior over the LoRA factors, with KFAC curvature (seed 003).

After ordinary (MAP) LoRA training, the posterior over the adapter parameters theta (every A and B) is
approximated by a Gaussian at the MAP (Yang et al. 2024, "Bayesian low-rank adaptation for large language
models"; the Laplace approximation as in MacKay 1992 and Immer et al. 2021):

    p(theta | D) ~= N(theta*, Sigma),      Sigma^-1 = GGN(theta*) + delta I

with the likelihood of the label-token classifier, ``log p(y | x, theta) = log softmax(f(x; theta))_y``,
``f`` the K label-token logits at the prompt's last position (never the full vocabulary).

Curvature
---------
* **The exact GGN, not a sampled Fisher.** ``GGN = sum_n J_n' H_n J_n`` with ``H_n = diag(p_n) - p_n p_n'``
  the Hessian of the categorical log-likelihood in the logits. ``H_n`` has rank K - 1 (the all-ones
  direction has eigenvalue 0), so its eigendecomposition ``H_n = sum_{j<K} u_j u_j'`` (eigenvalues folded
  into the ``u_j``) gives the GGN exactly with K - 1 backward passes per batch: one for a binary task.
* **Classes.** The exact GGN costs K - 1 backward passes per batch: one for a binary task, 15 for 16
  classes. ``ggn_samples = m`` below that replaces the ``u_j`` by ``m`` Gaussian sketches ``v = U xi /
  sqrt(m)`` (``U`` the ``u_j`` as columns, ``xi ~ N(0, I)``), so ``E[sum v v'] = H_n`` and the output-side
  factor ``G`` is an unbiased estimate (the gradient is linear in ``v``; the input side's weights are not,
  but ``A`` is a mean of inputs either way). A sketch rather than the sampled-label Fisher (``v = p -
  e_y``, ``y ~ p``, also unbiased): on a confident prediction the sampled label is almost always the
  predicted one, whose ``v`` is tiny, and rarely another with a large ``v``, so its relative variance
  grows like ``1 / (1 - p_max)``, while the sketch's stays at most ``2 / m`` whatever the confidence.
  ``LoraClassifier`` sketches with ``m = 2`` by default (exact up to three classes). Measured on the built-in
  reviews labelled by their 16 domains (8 epochs, 352 records, docs/benchmarks.md section 8): the exact
  pass took 16.9 epochs of training, 2 sketches 3.7 and 1 sketch 2.4; the evidence chose priors of 3943,
  950 and 604, and the test ECE was 0.225, 0.205 and 0.186 against the MAP's 0.233 (one adapter, one run:
  the sketched evidence came out looser, for a reason not established here).
* **KFAC per LoRA factor.** Each factor is a linear map ``s = W a`` (``W`` of shape (out, in): A is
  (r, d_in), B is (d_out, r)) applied at every token of the prompt. An example's Jacobian for the GGN
  vector ``u_j`` is ``J_nj = sum_t g_{n,t,j} a_{n,t}'`` (``g`` the backpropagated ``u_j`` at the output of
  ``W``), and the block ``sum_{n,j} vec(J_nj) vec(J_nj)'`` is approximated by a Kronecker product
  ``G (x) A`` (row-major ``vec(W)``; Martens and Grosse 2015) from one rank-one ``J_nj ~= g_nj a_nj'`` per
  example and direction, with ``G = sum g g'`` and ``A`` the mean of ``a a'``. How the tokens are folded
  into ``g`` and ``a`` (``weight_sharing``):

  - ``"weighted"`` (the default): ``g = sum_t g_t`` and ``a = sum_t w_t a_t``, ``w_t = <g_t, g> / |g|^2``
    (weights that sum to 1): the least-squares ``a`` in ``J ~= g a'`` given ``g``. It is exact when only
    one token receives gradient (the query projection of the last layer: only the last token's output
    is read) and when the activations are equal at every token.
  - ``"reduce"`` (Eschenhagen et al. 2023): the same ``g`` and the uniform mean ``a = mean_t a_t``; exact
    only in the second case.
  - ``"expand"``: every token an example, ``G = sum_{n,t} g g'``, ``A = mean_{n,t} a a'``.

  Why "weighted": the label is read at one position, so the gradient concentrates on the last token and
  the tokens it attends to, while the uniform mean describes mostly the prompt's other tokens. On the
  demo's adapter (SmolLM2, q_proj/v_proj of the top 4 blocks) the test Jacobians then fell largely
  outside the directions the reduce and expand factors had seen, and got the prior's variance: median
  margin standard deviations of 9.4 (reduce) and 4.4 (expand) logits at their evidence-tuned priors.
  All three are exact for one token per example and one example (tested).
* **Wide factors.** A LoRA factor is narrow on one side (r) and wide on the other (d_in or d_out). A wide
  side up to ``FULL_FACTOR_MAX_DIM`` (2048; its float64 accumulator is 32 MB) is kept whole: every
  factor of SmolLM2-135M (576 and 1536) is. A wider one is kept as a streaming low-rank sketch: each
  batch's vectors are appended as columns of ``S`` (d x m), compressed by an SVD to the top ``rank``
  directions whenever m passes ``4 rank``, and the dropped directions are replaced by one **isotropic
  remainder** whose eigenvalue is their mean (the factor's trace, accumulated exactly, is preserved).
  Laplace-LoRA uses low rank plus a diagonal; the isotropic remainder is chosen here because it keeps
  one eigenbasis, so the Kronecker eigendecomposition below (log determinant, evidence, predictive
  variance) stays exact for the approximated factor, and needs only the d x rank basis.

Posterior, evidence, prior
--------------------------
With ``G = Q_G diag(e) Q_G'`` and ``A = Q_A diag(s) Q_A'``, the precision block ``G (x) A + delta I`` has
eigenvectors ``Q_G (x) Q_A`` and eigenvalues ``e_i s_j + delta``: inverse and log determinant cost
nothing more. The prior is ``N(0, delta^-1 I)`` on every LoRA parameter, one ``delta`` for all, chosen by
maximising the Laplace evidence (marginal likelihood). With ``lambda_i`` the P eigenvalues of the KFAC
GGN and ``s_i`` the squared components of ``theta*`` along their eigenvectors (``sum s_i = ||theta*||^2``):

    log p(D | delta) ~= log p(D | theta*) - 1/2 sum_i [ s_i w_i + log(1 + lambda_i / delta) ]

    post-hoc (the default):  w_i = delta lambda_i / (lambda_i + delta)
    mode (the textbook form): w_i = delta,  i.e.  - delta/2 ||theta*||^2 + P/2 log delta - 1/2 log det(GGN + delta I)

The textbook form expands the log *joint* at ``theta*`` and so assumes ``theta*`` is its mode, i.e. that
training used this prior. Post hoc it did not: LoRA trains without the penalty, A starts random and AdamW
moves every coordinate by about the learning rate per step, including those the data leave undetermined.
That norm is then read as evidence for a broad prior: on the demo's adapter 89% of ``||theta*||^2 = 294``
lies along eigenvalues below 1, the textbook form chose ``delta = 1.1`` (prior standard deviation ~1 per
weight against trained weights of RMS 0.07), and the linearised predictive came out far under-confident
(test NLL 0.44 against 0.30 for the MAP). The post-hoc form expands the log *likelihood* at ``theta*``
(its mode) and integrates that Gaussian against the prior exactly: a component along a direction the data
do not determine (``lambda_i << delta``) then costs nothing, as it would be shrunk away. On the same
adapter it chose ``delta = 21`` (test NLL 0.32). The posterior covariance is ``(GGN + delta I)^-1`` either
way; the mean stays at the trained adapter (post-hoc Laplace generally keeps the trained weights).
The maximiser over ``log delta`` is found by a grid scan and ``scipy.optimize.brentq`` on the derivative.
Even the post-hoc form collapses on some overconfident adapters: the softmax saturates, the GGN's
eigenvalues shrink, ``theta*`` looks like noise under them, and the evidence keeps rising as the prior
tightens, leaving a posterior equal to the MAP. LoRA's estimator therefore defaults to
``prior_method="auto"``: the evidence's prior unless it lies at the upper bound and validation data are
given, and then the prior with the lowest validation NLL (:func:`tune_prior_on_validation`).

Predictive
----------
The linearised (GLM) predictive: ``f(x; theta) ~= f(x; theta*) + J(x) (theta - theta*)``, so
``f ~ N(f*, J Sigma J')`` with ``J`` (K x P) the Jacobian of the K label logits. ``J`` is exact per example:
the hooks capture every LoRA factor's input ``a_t`` and, over K backward passes (one per logit), the
gradients ``g_t`` at its output, so ``J_W = sum_t g_t a_t'``; ``Sigma`` is applied through the eigenbases
(``J Sigma J'`` never forms Sigma). Probabilities: ``"mc"`` averages softmax over samples
``f* + L xi`` (``L L' = C J Sigma J' C``, ``C = I - 11'/K`` centring the logits: softmax ignores
their common shift, so no samples are spent on it; the ``xi`` are drawn once per call from a seeded generator and shared
by all records, so a record's prediction depends on nothing but the record), or ``"probit"``, the
pairwise mean-field approximation of Lu, Ie and Sha (2020):

    p_k ~= 1 / (1 + sum_{j != k} exp(-(f*_k - f*_j) / sqrt(1 + pi/8 Var(f_k - f_j))))

renormalised (for K = 2 it is exactly the probit-approximated sigmoid of the margin). It uses the
variances of logit *differences*, as softmax does; the per-logit form ``softmax(f*_k / sqrt(1 + pi/8
Lambda_kk))`` is not shift-invariant, and the label logits of an LLM move together (a shared component
that cancels in softmax), so it badly overstates the uncertainty (measured on the demo: accuracy 0.87 -> 0.78).

Why not laplace-torch
---------------------
laplace-torch offers exactly these pieces (KFAC, marginal-likelihood prior tuning, the GLM predictive
with MC or probit link), but not for this setting: version 0.3 requires a newer torch than the pinned
2.13.0 and brings torchvision, backpack and curvlinops with it; it expects ``model(X)`` on tensors from a
DataLoader, while lmtune's forward takes token lists of varying length, reuses cached activations of the
frozen lower layers, and reads K label-token logits from the last position; its KFAC backends see the
LoRA linears inside PEFT but treat the token dimension their own way, and it has no low-rank treatment
of wide factors. What is needed is about 300 lines of tensor algebra over hooks, written here.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from lmtune.errors import LmtuneError

FULL_FACTOR_MAX_DIM = 2048
WEIGHT_SHARING = ("weighted", "reduce", "expand")
PREDICTIVES = ("mc", "probit")
PRIOR_METHODS = ("auto", "evidence", "val")


# ----------------------------------------------------------------------------------------------------
# Kronecker factors.

@dataclass
class KronFactor:
    """Eigendecomposition of one symmetric PSD Kronecker factor of dimension ``dim``.

    ``Q`` (dim, m) has orthonormal columns with eigenvalues ``lam`` (m,); the other ``dim - m`` directions
    (the orthogonal complement, never formed) share the eigenvalue ``rest``. ``m == dim`` for a factor
    kept whole.
    """

    Q: torch.Tensor
    lam: torch.Tensor
    rest: float
    dim: int

    @property
    def m(self) -> int:
        return self.Q.shape[1]

    @property
    def complement(self) -> int:
        return self.dim - self.m

    def spectrum(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct eigenvalues and their multiplicities (the remainder counted ``dim - m`` times)."""
        v = self.lam.double().cpu().numpy()
        c = np.ones_like(v)
        if self.complement:
            v, c = np.append(v, self.rest), np.append(c, self.complement)
        return v, c

    def matrix(self) -> torch.Tensor:
        """The factor as a dense (dim, dim) float64 matrix (for tests and small checks)."""
        Q = self.Q.double()
        M = Q @ torch.diag(self.lam.double()) @ Q.T
        if self.complement:
            M = M + self.rest * (torch.eye(self.dim, dtype=torch.float64) - Q @ Q.T)
        return M


class FactorAccumulator:
    """``sum x x'`` over the rows ``x`` given to :meth:`add`: a dense matrix, or a low-rank sketch when wide.

    Parameters
    ----------
    dim : int
    rank : int
        Directions kept by the sketch of a factor wider than ``max_full_dim``.
    max_full_dim : int
        Widest factor accumulated densely.
    """

    def __init__(self, dim: int, rank: int = 128, max_full_dim: int = FULL_FACTOR_MAX_DIM):
        self.dim = dim
        self.rank = max(1, min(rank, dim))
        self.full = dim <= max_full_dim
        self.M = torch.zeros((dim, dim), dtype=torch.float64) if self.full else None
        self.S = torch.zeros((dim, 0), dtype=torch.float64)
        self.trace = 0.0

    def add(self, X: torch.Tensor) -> None:
        """Add the rows of ``X`` (n, dim)."""
        X = X.detach().to("cpu", torch.float64)
        self.trace += float((X * X).sum())
        if self.full:
            self.M.addmm_(X.T, X)
            return
        self.S = torch.cat([self.S, X.T], dim=1)
        if self.S.shape[1] > 4 * self.rank:
            self._compress()

    def _compress(self) -> None:
        U, s, _ = torch.linalg.svd(self.S, full_matrices=False)
        self.S = U[:, :self.rank] * s[:self.rank]

    def factor(self, scale: float = 1.0) -> KronFactor:
        """The eigendecomposition of ``scale * sum x x'`` (float32 bases, as stored)."""
        if self.full:
            lam, Q = torch.linalg.eigh(self.M * scale)
            return KronFactor(Q.float(), lam.clamp_min(0).float(), 0.0, self.dim)
        self._compress()
        U, s, _ = torch.linalg.svd(self.S, full_matrices=False)
        k = min(self.rank, int((s > 0).sum()) or 1)
        lam = s[:k] ** 2 * scale
        rest = max(self.trace * scale - float(lam.sum()), 0.0) / max(self.dim - k, 1)
        return KronFactor(U[:, :k].float(), lam.float(), rest, self.dim)


# ----------------------------------------------------------------------------------------------------
# Hooks: inputs of every factor and gradients at its output.

class Capture:
    """Forward hooks on linear modules: each call's input (B, T, in), detached, and output (B, T, out).

    Each module must run once per forward pass (a LoRA factor does); :meth:`output_grads` backpropagates
    given vectors from the logits to every captured output.
    """

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> "Capture":
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str):
        def hook(mod, inp, out):
            if name in self.outputs:
                raise LmtuneError(f"{name} ran twice in one forward pass: KFAC needs one call per module")
            self.inputs[name] = _as_3d(inp[0].detach())
            self.outputs[name] = out
        return hook

    def clear(self) -> None:
        self.inputs, self.outputs = {}, {}

    def output_grads(self, logits: torch.Tensor, V: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: (J, B, T, out)}``: the vectors ``V[:, :, j]`` (B, K) backpropagated to each output."""
        names = list(self.outputs)
        missing = [n for n in self.modules if n not in self.outputs]
        if missing:
            raise LmtuneError(f"modules {', '.join(missing[:3])} did not run in the forward pass")
        outs = [self.outputs[n] for n in names]
        per_j = []
        for j in range(V.shape[2]):
            gs = torch.autograd.grad(logits, outs, grad_outputs=V[:, :, j].to(logits.dtype), retain_graph=True,
                                     allow_unused=True)
            per_j.append([torch.zeros_like(o) if g is None else g.detach() for g, o in zip(gs, outs)])
        return {n: _as_3d_stack([per_j[j][i] for j in range(V.shape[2])]) for i, n in enumerate(names)}


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    return x if x.ndim == 3 else x.reshape(x.shape[0], -1, x.shape[-1])


def _as_3d_stack(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([_as_3d(x) for x in xs])


def sketches_used(samples: int | None, n_classes: int) -> int | None:
    """How many Gaussian sketches :func:`ggn_vectors` draws for ``n_classes``: None when the GGN is exact
    (``samples`` None, or at least the K - 1 directions the exact GGN needs)."""
    return None if samples is None or samples >= n_classes - 1 else samples


def ggn_vectors(logits: torch.Tensor, samples: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, K, m) vectors ``v_j`` with ``sum_j v_j v_j' = H = diag(p) - p p'`` (the softmax Hessian), p = softmax.

    ``samples`` None (or at least K - 1): the K - 1 scaled eigenvectors ``u_j`` of ``H``, exactly. Fewer:
    ``m = samples`` Gaussian sketches ``v = U xi / sqrt(m)``, ``xi ~ N(0, I)`` drawn from ``generator`` (CPU),
    so that ``E[sum_j v_j v_j'] = H`` (module docstring, "Classes")."""
    p = torch.softmax(logits.detach().double(), dim=-1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    w, U = torch.linalg.eigh(H)  # ascending: column 0 is the all-ones direction, eigenvalue 0
    U = (U * w.clamp_min(0).sqrt()[:, None, :])[:, :, 1:]
    if sketches_used(samples, logits.shape[-1]) is None:
        return U
    xi = torch.randn((U.shape[0], U.shape[2], samples), generator=generator, dtype=U.dtype)
    return U @ (xi.to(U.device) / math.sqrt(samples))


def centred_basis(K: int) -> torch.Tensor:
    """(K, K-1) float64, orthonormal columns spanning the vectors whose entries sum to 0."""
    C = torch.eye(K, dtype=torch.float64) - 1.0 / K
    return torch.linalg.eigh(C)[1][:, 1:]  # ascending: column 0 is the all-ones direction, eigenvalue 0


def _token_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


# ----------------------------------------------------------------------------------------------------
# Fitting the curvature.

class KFACCollector:
    """Accumulates the KFAC GGN factors of named linear modules over batches.

    Parameters
    ----------
    modules : dict of str to nn.Linear
        The layers whose weights carry the posterior (LoRA's ``lora_A`` and ``lora_B``).
    weight_sharing : str
        ``"weighted"``, ``"reduce"`` or ``"expand"``: how the token dimension enters the factors (module
        docstring).
    rank, max_full_dim : int
        The low-rank sketch of factors wider than ``max_full_dim``.
    ggn_samples : int or None
        Backward passes per batch: None for the exact GGN (K - 1 of them), fewer for that many Gaussian
        sketches of each example's softmax Hessian (:func:`ggn_vectors`), drawn with ``seed``.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], *, weight_sharing: str = "weighted", rank: int = 128,
                 max_full_dim: int = FULL_FACTOR_MAX_DIM, ggn_samples: int | None = None, seed: int = 0):
        if weight_sharing not in WEIGHT_SHARING:
            raise LmtuneError(f"weight_sharing must be one of {', '.join(WEIGHT_SHARING)}, got {weight_sharing!r}")
        if ggn_samples is not None and not (isinstance(ggn_samples, int) and ggn_samples >= 1):
            raise LmtuneError(f"ggn_samples must be an integer >= 1 or None, got {ggn_samples!r}")
        self.modules = modules
        self.weight_sharing = weight_sharing
        self.ggn_samples = ggn_samples
        self._generator = torch.Generator().manual_seed(int(seed))
        self.acc_in = {n: FactorAccumulator(m.weight.shape[1], rank, max_full_dim) for n, m in modules.items()}
        self.acc_out = {n: FactorAccumulator(m.weight.shape[0], rank, max_full_dim) for n, m in modules.items()}
        self.n_examples = 0
        self.n_in_rows = 0  # vectors in the input-side factors (A is their mean outer product)
        self.log_lik = 0.0

    def add_batch(self, forward: Callable[[], torch.Tensor], y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Run ``forward()`` -> (B, K) logits under the hooks and add the batch's factors; returns the logits.

        ``lengths`` (B,) are the prompts' real token counts (right padding follows them).
        """
        with Capture(self.modules) as cap:
            logits = forward()
            grads = cap.output_grads(logits, ggn_vectors(logits, self.ggn_samples, self._generator))
        self.add(logits, y, lengths, cap.inputs, grads)
        return logits

    def add(self, logits: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor, inputs: dict[str, torch.Tensor],
            grads: dict[str, torch.Tensor]) -> None:
        """Add a batch from its logits (B, K), each module's inputs (B, T, in) and the GGN vectors
        backpropagated to its output (J, B, T, out), as :meth:`add_batch` captures them."""
        lp = torch.log_softmax(logits.detach().double(), dim=-1)
        self.log_lik += float(lp.gather(1, y.to(lp.device).view(-1, 1)).sum())
        B = logits.shape[0]
        self.n_examples += B
        J = None
        for name in self.modules:
            a, g = inputs[name], grads[name]  # (B, T, in), (J, B, T, out)
            J = g.shape[0]
            mask = _token_mask(lengths.to(a.device), a.shape[1])
            g = g * mask[None, ..., None]
            g_bar = g.sum(2)  # (J, B, out)
            self.acc_out[name].add(g_bar.reshape(-1, g_bar.shape[-1]) if self.weight_sharing != "expand"
                                   else g[:, mask].reshape(-1, g.shape[-1]))
            if self.weight_sharing == "weighted":
                # a_w = sum_t w_t a_t, w_t = <g_t, g_bar> / |g_bar|^2 (the weights sum to 1): the least-squares
                # a in J ~= g_bar a' for the example's exact Jacobian J = sum_t g_t a_t'
                sq = (g_bar * g_bar).sum(-1)  # (J, B)
                w = torch.einsum("jbto,jbo->jbt", g, g_bar) / sq.clamp_min(torch.finfo(sq.dtype).tiny)[..., None]
                self.acc_in[name].add(torch.einsum("jbt,bti->jbi", w, a).reshape(-1, a.shape[-1]))
            elif self.weight_sharing == "reduce":
                self.acc_in[name].add((a * mask[..., None]).sum(1) / lengths.to(a.device)[:, None].to(a.dtype))
            else:
                self.acc_in[name].add(a[mask])
        self.n_in_rows += {"weighted": B * (J or 0), "reduce": B, "expand": int(lengths.sum())}[self.weight_sharing]

    def posterior(self, theta: dict[str, torch.Tensor], n_data: int | None = None) -> "KFACPosterior":
        """The Laplace posterior at the weights ``theta`` (name -> (out, in)); prior precision 1 until tuned.

        ``n_data`` larger than the examples given: they were a uniform random sample of that many, and the
        sums over examples (the output-side factors and the log-likelihood) are scaled up by the ratio
        (unbiased estimates of the full sums; the input-side factors are means already)."""
        if not self.n_examples:
            raise LmtuneError("no batches were given to the KFAC collector")
        n = self.n_examples if n_data is None else int(n_data)
        if n < self.n_examples:
            raise LmtuneError(f"n_data ({n}) is smaller than the {self.n_examples} examples given")
        scale = n / self.n_examples
        blocks = {k: (self.acc_out[k].factor(scale), self.acc_in[k].factor(1.0 / self.n_in_rows)) for k in self.modules}
        return KFACPosterior(blocks, theta=theta, log_lik=self.log_lik * scale, n_data=n)


# ----------------------------------------------------------------------------------------------------
# The posterior.

class KFACPosterior:
    """Gaussian posterior ``N(theta*, (G (x) A + delta I)^-1)`` per block, blocks independent.

    Parameters
    ----------
    blocks : dict of str to (KronFactor, KronFactor)
        Per weight (out, in): the output-side factor G (out) and the input-side factor A (in).
    theta : dict of str to Tensor
        The trained weights ``theta*`` (out, in) of every block: the posterior mean, and the prior's term
        in the evidence.
    log_lik : float
        ``log p(D | theta*)`` on the training data.
    n_data : int
    prior_precision : float
        ``delta``.
    """

    def __init__(self, blocks: dict[str, tuple[KronFactor, KronFactor]], *, theta: dict[str, torch.Tensor],
                 log_lik: float, n_data: int, prior_precision: float = 1.0):
        self.blocks = blocks
        self.theta = {n: theta[n].detach().to("cpu", torch.float32).clone() for n in blocks}
        self.log_lik = float(log_lik)
        self.n_data = int(n_data)
        self.prior_precision = float(prior_precision)
        self.prior_at_bound = False
        self._groups = None

    @property
    def n_params(self) -> int:
        return sum(G.dim * A.dim for G, A in self.blocks.values())

    @property
    def theta_sq_norm(self) -> float:
        return float(sum(t.double().pow(2).sum() for t in self.theta.values()))

    def spectrum(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The KFAC GGN's eigenvalues (all blocks), their multiplicities (summing to P), and the squared
        norm of ``theta*`` within each eigenvalue's eigenspace (summing to ``||theta*||^2``)."""
        if self._groups is None:
            parts = [_block_groups(G, A, self.theta[n]) for n, (G, A) in self.blocks.items()]
            self._groups = tuple(np.concatenate([p[i] for p in parts]) for i in range(3))
        return self._groups

    # -- evidence -------------------------------------------------------------------------------------

    def log_marginal_likelihood(self, prior_precision: float | None = None, form: str = "post-hoc") -> float:
        """``log p(D | delta)`` under the Laplace approximation, in the ``form`` of the module docstring.

        With ``lambda_i`` the eigenvalues, ``c_i`` their multiplicities and ``s_i`` the squared norm of
        ``theta*`` in their eigenspaces: ``log p(D | theta*) - 1/2 sum_i [s_i w_i + c_i log(1 + lambda_i /
        delta)]``, ``w_i = delta lambda_i / (lambda_i + delta)`` (post-hoc) or ``delta`` (mode).
        """
        d = self._delta(prior_precision)
        lam, c, s2 = self.spectrum()
        w = d * lam / (lam + d) if _form(form) == "post-hoc" else d
        return float(self.log_lik - 0.5 * np.sum(s2 * w + c * np.log1p(lam / d)))

    def log_marginal_likelihood_grad(self, prior_precision: float | None = None, form: str = "post-hoc") -> float:
        """``d log p(D | delta) / d delta``."""
        d = self._delta(prior_precision)
        lam, c, s2 = self.spectrum()
        dw = lam ** 2 / (lam + d) ** 2 if _form(form) == "post-hoc" else 1.0
        return float(-0.5 * np.sum(s2 * dw - c * lam / (d * (lam + d))))

    def optimize_prior_precision(self, form: str = "post-hoc", bounds: tuple[float, float] = (-20.0, 30.0)) -> float:
        """Set ``prior_precision`` to the evidence maximiser over ``log delta`` in ``bounds`` and return it.

        The evidence is scanned on a grid in ``log delta`` (steps of 0.5), and the best grid point's
        neighbourhood is searched for the root of the derivative (``scipy.optimize.brentq``). When the
        maximum lies at a bound (the adapter's weights carry no signal the data determine: the evidence
        keeps rising as the prior tightens), the bound is taken and ``prior_at_bound`` says so.
        """
        from scipy.optimize import brentq

        _form(form)
        ts = np.arange(bounds[0], bounds[1] + 1e-9, 0.5)
        f = [self.log_marginal_likelihood(math.exp(t), form) for t in ts]
        k = int(np.argmax(f))

        def h(t):  # delta * d/d delta, the derivative in log delta
            return math.exp(t) * self.log_marginal_likelihood_grad(math.exp(t), form)

        self.prior_at_bound = k in (0, len(ts) - 1)
        if self.prior_at_bound:
            t = ts[k]
        else:
            lo, hi = ts[k - 1], ts[k + 1]
            t = brentq(h, lo, hi, xtol=1e-12, rtol=1e-12) if h(lo) > 0 > h(hi) else ts[k]
        self.prior_precision = math.exp(t)
        return self.prior_precision

    def _delta(self, prior_precision) -> float:
        d = self.prior_precision if prior_precision is None else float(prior_precision)
        if not d > 0:
            raise LmtuneError(f"prior_precision must be positive, got {d}")
        return d

    # -- predictive -----------------------------------------------------------------------------------

    def block_covariance(self, name: str, J: torch.Tensor, prior_precision: float | None = None) -> torch.Tensor:
        """``J Sigma_W J'`` (B, K, K) for Jacobians ``J`` (B, K, out, in) of block ``name``."""
        return _covariance(self._projections(name, J), self._delta(prior_precision))

    def _projections(self, name: str, J: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``J`` in the block's eigenbasis: pairs ``(M, lam)`` with ``J Sigma J' = sum einsum(M / (lam + delta), M)``.

        Everything but the division by ``lam + delta`` is independent of the prior, so one projection
        serves every ``delta`` (:func:`tune_prior_on_validation`).
        """
        G, A = self.blocks[name]
        X = J.double()
        Q1, Q2 = G.Q.to(X.device, torch.float64), A.Q.to(X.device, torch.float64)
        l1, l2 = G.lam.to(X.device, torch.float64), A.lam.to(X.device, torch.float64)
        P1 = Q1.T @ X  # (B, K, m1, in)
        P12 = P1 @ Q2  # (B, K, m1, m2)
        out = [(P12, l1[:, None] * l2[None, :])]
        if A.complement:  # G's eigenvectors x the complement of A's basis
            out.append((P1 - P12 @ Q2.T, (l1 * A.rest)[:, None]))
        if G.complement:
            out.append((X @ Q2 - Q1 @ P12, (G.rest * l2)[None, :]))  # (B, K, out, m2)
            if A.complement:
                R = X - Q1 @ P1 - (X @ Q2) @ Q2.T + Q1 @ P12 @ Q2.T
                out.append((R, torch.tensor(G.rest * A.rest, dtype=torch.float64, device=X.device)))
        return out

    def precision_matrix(self, name: str) -> torch.Tensor:
        """The dense precision block ``G (x) A + delta I`` (row-major ``vec(W)``), for tests on small layers."""
        G, A = self.blocks[name]
        P = torch.kron(G.matrix(), A.matrix())
        return P + self.prior_precision * torch.eye(P.shape[0], dtype=torch.float64)

    def glm(self, modules: dict[str, torch.nn.Module], forward: Callable[[], torch.Tensor],
            prior_precisions: Iterable[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MAP logits (B, K) and the linearised covariance of the centred logits ``C J Sigma J' C`` (B, K, K),
        float64, ``C = I - 11'/K``.

        Softmax ignores a shift shared by all logits, and every consumer (the MC and probit predictives,
        the reported logit spread) reads the covariance only through ``C``, so only the K - 1 directions
        orthogonal to the all-ones vector are backpropagated: ``Q`` (K, K-1) orthonormal with ``Q'1 = 0``
        gives ``Q'J`` in K - 1 backward passes, and ``C J = Q Q'J`` (one pass for a binary task, where the
        full ``J`` would take two). ``forward()`` runs the model at the MAP with gradients enabled. With
        ``prior_precisions`` (n values) the covariance is (n, B, K, K), one per prior, from one pass.
        """
        with Capture(modules) as cap:
            logits = forward()
            B, K = logits.shape
            Q = centred_basis(K).to(logits.device)
            grads = cap.output_grads(logits, Q.to(logits.dtype).expand(B, K, K - 1))  # (K-1, B, T, out)
        ds = [self.prior_precision] if prior_precisions is None else [self._delta(d) for d in prior_precisions]
        cov = torch.zeros((len(ds), B, K - 1, K - 1), dtype=torch.float64, device=logits.device)
        for name in self.blocks:
            a, g = cap.inputs[name], grads[name]
            J = torch.einsum("kbto,bti->bkoi", g.double(), a.double())  # Q'J; padding has g = 0
            projections = self._projections(name, J)
            for i, d in enumerate(ds):
                cov[i] += _covariance(projections, d)
        cov = Q @ cov @ Q.T
        return logits.detach().double(), (cov[0] if prior_precisions is None else cov)

    # -- files ----------------------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and string metadata for a safetensors file."""
        tensors, meta = {}, {"log_lik": repr(self.log_lik), "n_data": str(self.n_data),
                             "prior_precision": repr(self.prior_precision), "blocks": ",".join(self.blocks)}
        for name, (G, A) in self.blocks.items():
            tensors[f"{name}.theta"] = self.theta[name].contiguous()
            for side, F in (("G", G), ("A", A)):
                tensors[f"{name}.{side}.Q"] = F.Q.contiguous()
                tensors[f"{name}.{side}.lam"] = F.lam.contiguous()
                meta[f"{name}.{side}.rest"] = repr(F.rest)
                meta[f"{name}.{side}.dim"] = str(F.dim)
        return tensors, meta

    def save(self, path) -> None:
        from safetensors.torch import save_file

        tensors, meta = self.state_dict()
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path) -> "KFACPosterior":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            try:
                blocks = {}
                for name in meta["blocks"].split(","):
                    blocks[name] = tuple(
                        KronFactor(f.get_tensor(f"{name}.{s}.Q"), f.get_tensor(f"{name}.{s}.lam"),
                                   float(meta[f"{name}.{s}.rest"]), int(meta[f"{name}.{s}.dim"])) for s in ("G", "A"))
                theta = {name: f.get_tensor(f"{name}.theta") for name in blocks}
                return cls(blocks, theta=theta, log_lik=float(meta["log_lik"]), n_data=int(meta["n_data"]),
                           prior_precision=float(meta["prior_precision"]))
            except (KeyError, SafetensorError) as e:
                raise LmtuneError(f"{path}: not a Laplace posterior file (missing {e})") from None


def _covariance(projections: list[tuple[torch.Tensor, torch.Tensor]], delta: float) -> torch.Tensor:
    """``J Sigma J'`` (B, K, K) from a block's :meth:`KFACPosterior._projections` at prior precision ``delta``."""
    return sum(torch.einsum("bkij,blij->bkl", M / (lam + delta), M) for M, lam in projections)


EVIDENCE_FORMS = ("post-hoc", "mode")


def _form(form: str) -> str:
    if form not in EVIDENCE_FORMS:
        raise LmtuneError(f"evidence form must be one of {', '.join(EVIDENCE_FORMS)}, got {form!r}")
    return form


def _block_groups(G: KronFactor, A: KronFactor, W: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigenvalues of ``G (x) A``, multiplicities, and the squared norm of ``W`` (out, in) in each eigenspace.

    The pairs of kept eigenvectors are single directions; a kept vector of one factor with the other's
    complement, and the two complements, are eigenspaces whose squared norms come from projections.
    """
    W = W.double()
    Q1, Q2, l1, l2 = G.Q.double(), A.Q.double(), G.lam.double(), A.lam.double()
    P1 = Q1.T @ W  # (m1, in)
    P12 = P1 @ Q2  # (m1, m2)
    sq = P12 ** 2
    vals, counts, s2 = [torch.outer(l1, l2).ravel()], [torch.ones(sq.numel(), dtype=torch.float64)], [sq.ravel()]
    if A.complement:
        vals.append(l1 * A.rest)
        counts.append(torch.full((G.m,), float(A.complement), dtype=torch.float64))
        s2.append((P1 ** 2).sum(1) - sq.sum(1))
    if G.complement:
        vals.append(G.rest * l2)
        counts.append(torch.full((A.m,), float(G.complement), dtype=torch.float64))
        s2.append(((W @ Q2) ** 2).sum(0) - sq.sum(0))
    if A.complement and G.complement:
        vals.append(torch.tensor([G.rest * A.rest], dtype=torch.float64))
        counts.append(torch.tensor([float(G.complement * A.complement)], dtype=torch.float64))
        s2.append((W ** 2).sum().reshape(1) - sum(x.sum() for x in s2))
    return (torch.cat(vals).numpy(), torch.cat(counts).numpy(), torch.cat(s2).clamp_min(0).numpy())


# ----------------------------------------------------------------------------------------------------
# Probabilities from a Gaussian over the logits.

def predictive_probs(mean: torch.Tensor, cov: torch.Tensor, method: str = "mc", n_samples: int = 1000,
                     seed: int = 0) -> torch.Tensor:
    """(B, K) class probabilities under ``f ~ N(mean, cov)``: Monte Carlo or the probit approximation."""
    if method not in PREDICTIVES:
        raise LmtuneError(f"predictive must be one of {', '.join(PREDICTIVES)}, got {method!r}")
    mean, cov = mean.double(), cov.double()
    if method == "probit":
        d = torch.diagonal(cov, dim1=1, dim2=2)
        var = (d[:, :, None] + d[:, None, :] - 2 * cov).clamp_min(0)  # Var(f_k - f_j)
        z = (mean[:, :, None] - mean[:, None, :]) / torch.sqrt(1.0 + math.pi / 8.0 * var)
        # 1 / (1 + sum_{j != k} exp(-z_kj)) = exp(-logsumexp_j(-z_kj)), the j = k term being exp(0) = 1
        p = torch.exp(-torch.logsumexp(-z, dim=2))
        return p / p.sum(dim=1, keepdim=True)
    if n_samples < 1:
        raise LmtuneError(f"mc_samples must be at least 1, got {n_samples}")
    K = mean.shape[1]
    C = torch.eye(K, dtype=torch.float64, device=mean.device) - 1.0 / K
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    xi = torch.randn((n_samples, K), generator=gen, dtype=torch.float64).to(mean.device)
    w, V = torch.linalg.eigh(C @ cov @ C)  # centred: the component shared by all logits is not sampled
    L = V * w.clamp_min(0).sqrt()[:, None, :]  # (B, K, K): L L' = cov
    f = mean[:, None, :] + torch.einsum("sk,bjk->bsj", xi, L)  # (B, S, K)
    return torch.softmax(f, dim=-1).mean(dim=1)


def fit_posterior(modules: dict[str, torch.nn.Module], batches: Iterable[tuple[Callable, torch.Tensor, torch.Tensor]],
                  *, weight_sharing: str = "weighted", rank: int = 128, max_full_dim: int = FULL_FACTOR_MAX_DIM,
                  prior_precision: float | None = None, evidence: str = "post-hoc",
                  n_data: int | None = None, ggn_samples: int | None = None, seed: int = 0) -> KFACPosterior:
    """KFAC Laplace posterior of ``modules``' weights from ``(forward, y, lengths)`` batches.

    ``prior_precision`` None maximises the evidence of ``evidence`` form over it; a number fixes it.
    ``n_data``: the batches are a random sample of that many examples (:meth:`KFACCollector.posterior`).
    ``ggn_samples``, ``seed``: the exact GGN (None) or its Gaussian sketches (:class:`KFACCollector`).
    """
    col = KFACCollector(modules, weight_sharing=weight_sharing, rank=rank, max_full_dim=max_full_dim,
                        ggn_samples=ggn_samples, seed=seed)
    for forward, y, lengths in batches:
        col.add_batch(forward, y, lengths)
    post = col.posterior({n: m.weight for n, m in modules.items()}, n_data=n_data)
    if prior_precision is None:
        post.optimize_prior_precision(evidence)
    else:
        if not prior_precision > 0:
            raise LmtuneError(f"prior_precision must be positive, got {prior_precision}")
        post.prior_precision = float(prior_precision)
    return post


def lora_modules(peft_model, adapter: str = "default") -> dict[str, torch.nn.Module]:
    """``{"<module path>.lora_A": Linear, "<module path>.lora_B": Linear}`` for every LoRA layer of a PEFT model."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in getattr(mod, "lora_A", {}):
            out[f"{name}.lora_A"] = mod.lora_A[adapter]
            out[f"{name}.lora_B"] = mod.lora_B[adapter]
    if not out:
        raise LmtuneError("the model has no LoRA layers to put a posterior on")
    return out


# ----------------------------------------------------------------------------------------------------
# LoRA glue: lmtune.methods.LoraClassifier(bayes="laplace") calls these.

POSTERIOR_FILE = "laplace.safetensors"
PREDICT_CHUNK = 1024  # records whose frozen lower-layer activations are held at once while predicting
# Records per curvature / Jacobian batch: the training batch size, at least this many. These rows run in full
# (no shared prompt prefix), so a batch of them holds more tokens than a training batch of the same size. On the
# demo's adapter (352 records, 2 threads) batches of 8 instead of 16 lowered the Laplace step's peak RSS from
# 1.44-1.48 to 1.25-1.26 GB (training: 1.16 GB) at the same time within noise; 32 and 64 were no faster either.
CURVATURE_MIN_BATCH = 8


@contextlib.contextmanager
def lora_grad_pass(est):
    """``est``'s fitted adapter attached, eval mode (no dropout), gradients on for the LoRA factors."""
    lm = est.lm
    was_training = lm.model.training
    with est.attached():
        modules = lora_modules(est._pm)
        for m in modules.values():
            m.weight.requires_grad_(True)
        lm.model.eval()
        try:
            with torch.enable_grad():
                yield modules
        finally:
            lm.model.train(was_training)


def _lora_batches(est, seqs, label_ids, lower, start):
    """(indices, forward, lengths) per length-sorted batch; ``forward()`` gives (B, K) logits with gradients."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
    bs = max(est.batch_size, CURVATURE_MIN_BATCH)
    for b in range(0, len(order), bs):
        idx = order[b:b + bs]
        batch = [seqs[i] for i in idx]
        low = [lower[i] for i in idx] if lower is not None else None
        # every row in full: the KFAC factors need each example's own activations and gradients
        fwd = functools.partial(est._forward, est.lm, batch, label_ids, low, start, share_prefix=False)
        yield idx, fwd, torch.tensor([len(s) for s in batch])


def curvature_sample(n: int, k: int | None, seed: int) -> list[int] | None:
    """The sorted indices of ``k`` of ``n`` examples drawn without replacement (seeded), or None for all."""
    if k is None or k >= n:
        return None
    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())


def fit_lora_laplace(est, ds, val=None) -> tuple[KFACPosterior, dict]:
    """The posterior of a just-trained LoRA estimator on its training data ``ds``, and its card entry.

    With ``est.prior_method == "val"`` the prior precision is then re-chosen on ``val``
    (:func:`tune_prior_on_validation`); with ``"auto"`` (the default) only when the evidence collapsed
    onto the MAP (its maximum at the upper bound) and ``val`` is given. The evidence's choice stays in
    the card either way.

    Why "auto": on the built-in reviews trained into overconfidence (8 epochs, 3-fold cross-validation
    over 640 records, docs/benchmarks.md section 8), the evidence collapsed in two folds of three, and the
    pooled ECE of the evidence-only posterior was 0.85x the MAP's, against 0.42x with the prior chosen on
    validation; where it did not collapse, it is kept (it needs no held-out data, and it is what the
    issue's Laplace-LoRA asks for).
    """
    from lmtune.profiling import PeakMemory

    lm = est.lm
    task = est._check_task()
    label_ids = torch.tensor(task.label_token_ids(lm.tokenizer), device=lm.device)
    enc = task.encode(lm.tokenizer, ds, labeled=True)
    seqs, y = enc.input_ids, torch.as_tensor(enc.y, device=lm.device)
    kept = getattr(est, "_kept_lower", None)
    n_all = len(seqs)
    sample = curvature_sample(n_all, est.kfac_samples, est.seed)  # None: every example
    t0 = time.perf_counter()
    with PeakMemory() as mem, lora_grad_pass(est) as modules:
        start = est._frozen_below(lm)
        reuse = kept is not None and kept[1] == start and kept[0] == seqs
        if sample is not None:
            seqs, y = [seqs[i] for i in sample], y[torch.as_tensor(sample, device=y.device)]
        if reuse:  # the frozen layers' activations computed for training
            lower = kept[2] if sample is None or kept[2] is None else [kept[2][i] for i in sample]
        else:
            lower = est._lower_cache(lm, seqs, start)
        batches = ((fwd, y[idx], lengths) for idx, fwd, lengths in _lora_batches(est, seqs, label_ids, lower, start))
        post = fit_posterior(modules, batches, rank=est.kfac_rank, prior_precision=est.prior_precision,
                             n_data=n_all, ggn_samples=est.ggn_samples, seed=est.seed)
        shapes = {n: tuple(m.weight.shape) for n, m in modules.items()}
    evidence_delta, evidence_at_bound = post.prior_precision, post.prior_at_bound
    tuning = None
    method = getattr(est, "prior_method", "auto")
    collapsed = method == "auto" and evidence_at_bound and val is not None
    if est.prior_precision is None and (method == "val" or collapsed):
        if val is None:
            raise LmtuneError("prior_method='val' chooses the prior on validation data: give it (--val)")
        est.posterior_ = post
        tuning = tune_prior_on_validation(est, val)
    seconds = time.perf_counter() - t0
    wide = [F for G, A in post.blocks.values() for F in (G, A) if F.complement]
    d = post.prior_precision
    lam, c, s2 = post.spectrum()
    mode_delta = KFACPosterior(post.blocks, theta=post.theta, log_lik=post.log_lik,
                               n_data=post.n_data).optimize_prior_precision("mode")
    m = sketches_used(est.ggn_samples, task.n_classes)
    ggn = ("the exact GGN" if m is None
           else f"the GGN from {m} Gaussian sketch{'es' if m > 1 else ''} of each example's softmax Hessian")
    info = {"kind": "laplace", "curvature": f"KFAC of {ggn} per LoRA factor, gradient-weighted token reduction",
            "ggn_samples": m, "backward_passes_per_batch": task.n_classes - 1 if m is None else m,
            "predictive": f"linearised (GLM), {est.predictive}"
                          + (f" with {est.mc_samples} samples" if est.predictive == "mc" else ""),
            "prior_precision": d, "prior_precision_tuned": est.prior_precision is None,
            "prior_method": ("fixed" if est.prior_precision is not None
                             else "validation NLL (the evidence collapsed)" if tuning and method == "auto"
                             else "validation NLL" if tuning else "evidence (post-hoc)"),
            "prior_at_bound": post.prior_at_bound, "evidence": "post-hoc",
            "evidence_prior_precision": evidence_delta, "evidence_prior_at_bound": evidence_at_bound,
            "validation_tuning": tuning,
            "log_marginal_likelihood": post.log_marginal_likelihood(), "log_likelihood": post.log_lik,
            "effective_params": float(np.sum(c * lam / (lam + d))),
            "theta_sq_norm": post.theta_sq_norm, "theta_sq_determined": float(s2[lam > d].sum()),
            "mode_form_prior_precision": mode_delta,
            "n_params": post.n_params, "n_data": post.n_data,
            "factors": len(shapes), "low_rank_factors": len(wide), "kfac_rank": est.kfac_rank,
            "curvature_examples": len(seqs), "curvature_sampled": sample is not None,
            "full_factor_max_dim": FULL_FACTOR_MAX_DIM, "reused_lower_layers": start if lower is not None else 0,
            "seconds": seconds, "peak_rss_bytes": mem.peak_rss_bytes, "rss_at_start_bytes": mem.start_rss_bytes,
            "cuda_peak_bytes": mem.cuda_peak_bytes}
    return post, info


def _glm_batches(est, data, labeled: bool, prior_precisions: Iterable[float] | None = None):
    """The encoded records of ``data`` and an iterator of ``(rows, mean, cov)`` over their length-sorted batches:
    the MAP logits and linearised covariance(s) of :meth:`KFACPosterior.glm`, the frozen lower layers run
    once per chunk of ``PREDICT_CHUNK`` records."""
    from lmtune.methods.base import as_dataset

    lm = est.lm
    task = est._check_task()
    label_ids = torch.tensor(task.label_token_ids(lm.tokenizer), device=lm.device)
    enc = task.encode(lm.tokenizer, as_dataset(data), labeled=labeled)
    seqs = enc.input_ids

    def batches():
        with lora_grad_pass(est) as modules:
            start = est._frozen_below(lm)
            for c in range(0, len(seqs), PREDICT_CHUNK):
                part = seqs[c:c + PREDICT_CHUNK]
                lower = est._lower_cache(lm, part, start)
                for idx, fwd, _ in _lora_batches(est, part, label_ids, lower, start):
                    mean, cov = est.posterior_.glm(modules, fwd, prior_precisions)
                    yield [c + i for i in idx], mean, cov

    return enc, batches()


VAL_PRIOR_GRID = tuple(float(x) for x in np.logspace(-1, 5, 25))  # 0.1 to 1e5, four points a decade


def tune_prior_on_validation(est, val, grid: Iterable[float] = VAL_PRIOR_GRID) -> dict:
    """Set ``est.posterior_.prior_precision`` to the value of ``grid`` (plus the current one) with the lowest
    validation NLL of the estimator's predictive, and return what was tried.

    The alternative to the evidence, as laplace-torch offers it (its "gridsearch"): the post-hoc evidence
    judges the adapter by the quadratic expansion of the log-likelihood at theta*, and LoRA's bilinear
    ``B A`` makes that expansion read the way back to the base model as much cheaper than it is. When
    the expansion credits the adapter with less than the Occam factor charges, the evidence keeps rising
    as the prior tightens and the posterior collapses onto the MAP (``prior_at_bound``). Measured on the
    demo task trained 8 epochs (the adapter overconfident): the expansion said the adapter gains 21 nats
    over the base, the base's actual deficit is about 250, the evidence took its upper bound, and the
    predictive equalled the MAP (test NLL 0.68), while delta = 30 gave 0.42. The current value (the
    evidence's) is a candidate, so validation can also keep it.

    One Jacobian pass over ``val`` serves every candidate (:meth:`KFACPosterior.glm` with several priors).
    """
    post = est.posterior_
    cands = sorted({*(float(d) for d in grid), float(post.prior_precision)})
    t0 = time.perf_counter()
    enc, batches = _glm_batches(est, val, labeled=True, prior_precisions=cands)
    y = torch.as_tensor(enc.y)
    nll = torch.zeros(len(cands), dtype=torch.float64)
    for rows, mean, covs in batches:
        for k in range(len(cands)):
            p = predictive_probs(mean, covs[k], est.predictive, est.mc_samples, est.seed).cpu()
            nll[k] -= torch.log(p[torch.arange(len(rows)), y[rows]].clamp_min(1e-300)).sum()
    nll /= max(1, len(enc.input_ids))
    best = int(torch.argmin(nll))
    post.prior_precision = cands[best]
    post.prior_at_bound = best in (0, len(cands) - 1)
    return {"n_val": len(enc.input_ids), "candidates": cands, "val_nll": nll.tolist(), "chosen": cands[best],
            "seconds": time.perf_counter() - t0}


def predict_lora_laplace(est, data, labeled: bool = False, base: bool = False):
    """``label_logits`` of a Laplace LoRA estimator: log predictive probabilities (N, K), base logits, y, dataset.

    Sets ``est.last_uncertainty_``: per record the predictive ``entropy`` (N,) and ``logit_std`` (N,), the
    posterior standard deviation of the centred label logits ``f_k - mean_j f_j`` (what softmax sees; root
    mean square over the labels).
    """
    from lmtune.methods.base import as_dataset

    ds = as_dataset(data)
    t0 = time.perf_counter()
    enc, batches = _glm_batches(est, ds, labeled=labeled)
    N, K = len(enc.input_ids), est.task.n_classes
    probs, std = np.empty((N, K)), np.empty(N)
    for rows, mean, cov in batches:  # cov: of the centred logits already (KFACPosterior.glm)
        p = predictive_probs(mean, cov, est.predictive, est.mc_samples, est.seed)
        probs[rows] = p.cpu().numpy()
        std[rows] = torch.diagonal(cov, dim1=1, dim2=2).mean(1).clamp_min(0).sqrt().cpu().numpy()
    est.last_predict_seconds_ = time.perf_counter() - t0
    est.last_uncertainty_ = {"entropy": _entropy(probs), "logit_std": std}
    base_logits = None
    if base:
        feats, _, _ = est.features(ds)
        base_logits = np.asarray(feats.L, dtype=np.float64)
    return np.log(np.maximum(probs, 1e-300)), base_logits, enc.y, ds


def _entropy(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs, 1e-300, 1.0)
    return -(probs * np.log(p)).sum(axis=1)
