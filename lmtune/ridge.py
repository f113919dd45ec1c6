r"""Closed-form ridge regression from streamed sufficient statistics.

This is the numerical core of the closed-form linear fine-tuning method: a
correction :math:`W` (``d x K``) to an LLM's ``K`` label-token logits is fitted by
regularised least squares on last-token hidden states.

Problem
-------
Given hidden states ``Z`` (``N x d``) and regression targets ``Y`` (``N x K``),
minimise over ``W`` (``d x K``) and an unpenalised intercept ``b`` (``K``)

.. math::

    J(W, b) = \lVert Y - \mathbf{1} b^\top - Z W \rVert_F^2
              + \lambda \lVert W \rVert_F^2, \qquad \lambda \ge 0 .

Memory must stay :math:`O(d^2 + \text{batch})` whatever ``N`` is, so nothing here
keeps ``Z``.  :class:`RidgeAccumulator` streams row batches and accumulates, in
float64 whatever the input dtype,

.. math::

    n,\quad Z^\top Z\ (d \times d),\quad Z^\top Y\ (d \times K),\quad
    \textstyle\sum_i z_i\ (d),\quad \sum_i y_i\ (K),\quad
    \sum_i y_{ik}^2\ (K),

collected in :class:`GramStats`.  Every solution and selection criterion below
is a function of these statistics only, except exact leave-one-out, which
needs a second pass over the rows (still in batches).

Intercept
---------
The intercept is eliminated by centring with the accumulated sums
(:math:`\bar z = \sum_i z_i / n`, :math:`\bar y = \sum_i y_i / n`):

.. math::

    Z_c^\top Z_c = Z^\top Z - n \bar z \bar z^\top, \qquad
    Z_c^\top Y_c = Z^\top Y - n \bar z \bar y^\top, \qquad
    \lVert y_{c,k} \rVert^2 = \textstyle\sum_i y_{ik}^2 - n \bar y_k^2 ,

then :math:`W` solves the centred ridge problem and
:math:`b = \bar y - W^\top \bar z`.  With ``fit_intercept=False`` the raw
statistics are used unchanged and :math:`b = 0`.  Below, :math:`G` and
:math:`C` denote the (centred or raw) :math:`Z^\top Z` and :math:`Z^\top Y`.

Centring from raw moments cancels: roughly
:math:`\log_{10}(\bar z_j^2 / \operatorname{var} z_j)` of float64's ~16 digits
are lost in feature ``j``.  Hidden states with mean/std ratios up to ~1e3
still keep ~10 digits, which is far more than the statistics deserve.

Solving at a given :math:`\lambda` (:func:`solve`)
-------------------------------------------------
:math:`A = G + \lambda I` is factored by Cholesky, :math:`A = L L^\top`, and
:math:`W = A^{-1} C` by two triangular solves, :math:`O(d^3/3)`.  The
reciprocal condition number of :math:`A` is *estimated* by LAPACK ``dpocon``
from the factor and :math:`\lVert A \rVert_1` in :math:`O(d^2)`; it is a
1-norm estimate, typically within a small factor of the 2-norm value.

If Cholesky fails (:math:`A` not numerically positive definite, e.g.
:math:`\lambda = 0` with ``N < d`` or duplicated features) or the estimated
condition number exceeds ``1e12`` (the solve would lose more than ~12 of 16
digits), :func:`solve` falls back to the eigendecomposition
:math:`G = V \operatorname{diag}(s) V^\top`.  Eigenvalues are clipped at 0,
and eigenvalues below :math:`s_{max}\,\varepsilon\, d` are set to 0 (they are
below ``eigh``'s absolute accuracy :math:`\sim \varepsilon \lVert G \rVert`, so
their value is noise).  With :math:`t_j = s_j + \lambda`,

.. math::

    W = V \operatorname{diag}(t^+) V^\top C, \qquad
    t_j^+ = \begin{cases} 1/t_j & t_j > t_{max}\, \varepsilon\, d \\
                          0     & \text{otherwise,} \end{cases}

i.e. a pseudo-inverse, so :math:`\lambda = 0` on a singular problem gives the
minimum-norm least-squares solution.  The reported condition number is then
:math:`t_{max}/t_{min}` (``inf`` when :math:`t_{min} = 0`).

Choosing :math:`\lambda` (:func:`fit`, :func:`select_lambda_gcv`, :func:`select_lambda_loo`)
-----------------------------------------------------------------------------------------
One eigendecomposition :math:`G = V \operatorname{diag}(s) V^\top`
(:math:`O(d^3)`) and :math:`Q = V^\top C` (``d x K``) make every grid point
cost :math:`O(dK)` for GCV, with no extra pass over the data:

.. math::

    W(\lambda) = V \operatorname{diag}\!\big(1/(s+\lambda)\big) Q .

*Residual sum of squares.*  Expanding
:math:`\mathrm{RSS} = \lVert Y_c\rVert^2 - 2\operatorname{tr}(W^\top C)
+ \operatorname{tr}(W^\top G W)` in the eigenbasis gives

.. math::

    \mathrm{RSS}(\lambda) = \sum_k \lVert y_{c,k}\rVert^2
      - \sum_j \frac{s_j + 2\lambda}{(s_j+\lambda)^2}\, \lVert Q_{j,:}\rVert^2 ,

whose coefficients are bounded by :math:`2/\lambda` even for tiny
:math:`s_j` (unlike the split into an OLS part plus a :math:`1/s_j` term,
which amplifies rounding on ill-conditioned hidden states).  The subtraction
can still cancel to a tiny negative number when the fit is near-perfect, so
the result is clipped at 0.

*Degrees of freedom* (trace of the hat matrix, intercept included):

.. math::

    \mathrm{dof}(\lambda) = [1]_{\text{intercept}} + \sum_j \frac{s_j}{s_j+\lambda}.

*Generalised cross-validation*, per entry of ``Y``:

.. math::

    \mathrm{GCV}(\lambda) = \frac{\mathrm{RSS}(\lambda) / (nK)}
                                 {\big(1 - \mathrm{dof}(\lambda)/n\big)^2},

``inf`` where :math:`\mathrm{dof} \ge n` (the fit interpolates; GCV is
undefined).

*Exact leave-one-out* (needs ``Z`` and ``Y``; rows are processed in batches,
so memory is :math:`O(\text{batch}\cdot d + d^2)`).  With
:math:`P = Z_c V` (``N x d``, one batch at a time),

.. math::

    h_{ii}(\lambda) = [1/n]_{\text{intercept}}
        + \sum_j \frac{P_{ij}^2}{s_j + \lambda}, \qquad
    \hat Y_c = P \operatorname{diag}\!\big(1/(s+\lambda)\big) Q, \qquad
    e_{i} = y_{c,i} - \hat y_{c,i},

and the leave-one-out residual of row ``i`` is :math:`e_i / (1 - h_{ii})`.
The score is the mean of the squared LOO residuals over all ``N*K`` entries.
This is *exact*, not an approximation: with :math:`X = [\mathbf{1}, Z]` and
penalty :math:`\Lambda = \operatorname{diag}(0, \lambda I)` the fit is
:math:`\hat Y = X (X^\top X + \Lambda)^{-1} X^\top Y`, and eliminating the
unpenalised intercept column gives exactly the centred hat matrix
:math:`H = \mathbf{1}\mathbf{1}^\top/n + Z_c (Z_c^\top Z_c + \lambda I)^{-1}
Z_c^\top` used above.  Deleting row ``i`` is a rank-one downdate of
:math:`X^\top X + \Lambda`; because the penalty does not depend on the data,
Sherman-Morrison gives the deleted-row prediction in closed form,
:math:`y_i - \hat y_{-i} = e_i/(1-h_{ii})`.  The refit on ``N-1`` rows
re-estimates its own intercept, i.e. its own centring, automatically.
Rows with :math:`1 - h_{ii} \le 10^{-10}` (leverage ~1: the row alone
determines a direction, possible only for :math:`\lambda \approx 0`) make the
LOO error unbounded and the score ``inf``.

*Default grid* (:func:`lambda_grid`): 41 points, geometric, from
:math:`10^{-6}\bar s` to :math:`10^{3}\bar s` with
:math:`\bar s = \operatorname{tr}(G)/d` the mean eigenvalue, so the grid
is invariant to rescaling ``Z`` (:math:`\lambda` scales like :math:`G`).  At
the bottom the ridge is ~OLS, at the top it shrinks every direction with
:math:`s_j \lesssim 10^3 \bar s` by a factor of at least ~2.  When the
argmin lands on the first or last grid point a :class:`GridEdgeWarning` says
so: the optimum may lie outside the grid.

After selection the solution at the chosen :math:`\lambda` reuses the same
eigendecomposition (``solver="eigh"``) and reports the condition number
:math:`(s_{max}+\lambda)/(s_{min}+\lambda)`.

Everything is computed in float64 whatever the input dtype (torch bfloat16
and float16 included).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
from scipy.linalg import lapack

__all__ = [
    "GramStats",
    "GridEdgeWarning",
    "LambdaSelection",
    "RidgeAccumulator",
    "RidgeSolution",
    "fit",
    "lambda_grid",
    "select_lambda_gcv",
    "select_lambda_loo",
    "solve",
]

_EPS = float(np.finfo(np.float64).eps)
# Beyond this the Cholesky solve keeps fewer than ~4 significant digits.
_COND_LIMIT = 1e12
_CRITERIA = ("gcv", "loo")
# Bounds the float64 copy of one input batch (rows * d * 8 bytes).
_CHUNK_ROWS = 8192
# 1 - h_ii below this means the LOO residual is amplified > 1e10: unbounded.
_LOO_MIN_ONE_MINUS_H = 1e-10
_GRID_LOW = 1e-6
_GRID_HIGH = 1e3


class GridEdgeWarning(UserWarning):
    """The selected lambda is the smallest or largest grid value."""


# --------------------------------------------------------------------------- #
# input handling
# --------------------------------------------------------------------------- #
def _as_array(x: Any, name: str) -> Any:
    """Return ``x`` sliceable by rows with a ``shape``: numpy/torch kept, lists converted."""
    if x is None:
        raise ValueError(f"{name} is missing (got None)")
    if hasattr(x, "shape") and hasattr(x, "__getitem__"):
        return x
    return np.asarray(x)


def _shape2(x: Any, name: str, cols: str) -> tuple[int, int]:
    shape = tuple(int(v) for v in x.shape)
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D (rows, {cols}); got shape {shape}")
    return shape  # type: ignore[return-value]


def _to_float64(x: Any, name: str) -> np.ndarray:
    """Convert a numpy array or torch tensor to a float64 numpy array."""
    if hasattr(x, "detach"):
        # torch: bfloat16/float16 have no numpy equivalent, so cast on the torch side.
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_pair(Z: Any, Y: Any, d: int | None = None, k: int | None = None):
    """Validate shapes of a (Z, Y) pair; return them sliceable, with (N, d, K)."""
    Z = _as_array(Z, "Z")
    Y = _as_array(Y, "Y")
    n_z, d_z = _shape2(Z, "Z", "d")
    n_y, k_y = _shape2(Y, "Y", "K")
    if n_z != n_y:
        raise ValueError(
            f"Z and Y must have the same number of rows; got Z {n_z} rows, Y {n_y} rows"
        )
    if d is not None and d_z != d:
        raise ValueError(f"Z must have d={d} columns; got {d_z}")
    if k is not None and k_y != k:
        raise ValueError(f"Y must have K={k} columns; got {k_y}")
    return Z, Y, n_z, d_z, k_y


def _check_lam(lam: Any) -> float:
    try:
        lam_f = float(lam)
    except (TypeError, ValueError):
        raise ValueError(f"lam must be a real number >= 0; got {lam!r}") from None
    if not np.isfinite(lam_f) or lam_f < 0:
        raise ValueError(f"lam must be finite and >= 0; got {lam!r}")
    return lam_f


def _check_criterion(criterion: Any) -> str:
    if criterion not in _CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; expected one of {_CRITERIA}")
    return criterion


def _check_grid(grid: Any) -> np.ndarray:
    lam_grid = np.asarray(grid, dtype=np.float64)
    if lam_grid.ndim != 1 or lam_grid.size == 0:
        raise ValueError(
            f"grid must be a non-empty 1-D sequence of lambdas; got shape {lam_grid.shape}"
        )
    if not np.isfinite(lam_grid).all() or (lam_grid < 0).any():
        raise ValueError("grid lambdas must be finite and >= 0")
    return np.unique(lam_grid)  # ascending, without duplicates


# --------------------------------------------------------------------------- #
# sufficient statistics
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class GramStats:
    """Sufficient statistics of ``(Z, Y)`` for ridge regression, in float64.

    Attributes
    ----------
    n : int
        Number of rows.
    ZtZ : ndarray, shape (d, d)
        :math:`Z^\\top Z`.
    ZtY : ndarray, shape (d, K)
        :math:`Z^\\top Y`.
    z_sum : ndarray, shape (d,)
        Column sums of ``Z``.
    y_sum : ndarray, shape (K,)
        Column sums of ``Y``.
    y_sq : ndarray, shape (K,)
        Column sums of squares of ``Y``.
    """

    n: int
    ZtZ: np.ndarray
    ZtY: np.ndarray
    z_sum: np.ndarray
    y_sum: np.ndarray
    y_sq: np.ndarray

    def __post_init__(self) -> None:
        for name in ("ZtZ", "ZtY", "z_sum", "y_sum", "y_sq"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        n = int(self.n)
        if n != self.n or n < 0:
            raise ValueError(f"n must be a non-negative integer; got {self.n!r}")
        object.__setattr__(self, "n", n)
        if self.ZtY.ndim != 2:
            raise ValueError(f"ZtY must be 2-D (d, K); got shape {self.ZtY.shape}")
        d, k = self.ZtY.shape
        expected = {"ZtZ": (d, d), "z_sum": (d,), "y_sum": (k,), "y_sq": (k,)}
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"{name} must have shape {shape} to match ZtY {self.ZtY.shape}; "
                    f"got {getattr(self, name).shape}"
                )

    @property
    def d(self) -> int:
        """Number of features (columns of ``Z``)."""
        return self.ZtY.shape[0]

    @property
    def k(self) -> int:
        """Number of targets (columns of ``Y``)."""
        return self.ZtY.shape[1]

    @classmethod
    def from_arrays(cls, Z: Any, Y: Any) -> GramStats:
        """Statistics of a whole ``(Z, Y)`` at once.

        Parameters
        ----------
        Z : array_like or torch.Tensor, shape (N, d)
        Y : array_like or torch.Tensor, shape (N, K)

        Returns
        -------
        GramStats
        """
        Z, Y, _, d, k = _check_pair(Z, Y)
        acc = RidgeAccumulator(d, k)
        acc.update(Z, Y)
        return acc.stats()

    def centered(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Statistics about the column means.

        Returns
        -------
        ZtZ_c : ndarray, shape (d, d)
            :math:`Z_c^\\top Z_c = Z^\\top Z - n \\bar z \\bar z^\\top`.
        ZtY_c : ndarray, shape (d, K)
            :math:`Z_c^\\top Y_c = Z^\\top Y - n \\bar z \\bar y^\\top`.
        y_sq_c : ndarray, shape (K,)
            :math:`\\sum_i (y_{ik} - \\bar y_k)^2`, clipped at 0.

        Raises
        ------
        ValueError
            If no rows were accumulated.
        """
        if self.n == 0:
            raise ValueError("GramStats holds no rows (n=0); accumulate data first")
        z_bar = self.z_sum / self.n  # (d,)
        y_bar = self.y_sum / self.n  # (K,)
        ZtZ_c = self.ZtZ - np.outer(self.z_sum, z_bar)  # (d, d)
        # Rounding in the rank-one downdate can break exact symmetry, which eigh assumes.
        ZtZ_c = 0.5 * (ZtZ_c + ZtZ_c.T)
        ZtY_c = self.ZtY - np.outer(self.z_sum, y_bar)  # (d, K)
        # A constant column cancels to ~-eps rather than 0.
        y_sq_c = np.maximum(self.y_sq - self.y_sum * y_bar, 0.0)  # (K,)
        return ZtZ_c, ZtY_c, y_sq_c


class RidgeAccumulator:
    """Streams ``(Z, Y)`` row batches into :class:`GramStats`.

    Accumulates in float64: ``n``, :math:`Z^\\top Z` (d, d), :math:`Z^\\top Y`
    (d, K), column sums of ``Z`` (d,) and ``Y`` (K,), and per-column sums of
    squares of ``Y`` (K,).  Memory is :math:`O(d^2 + dK)` plus one float64
    chunk of at most 8192 rows of the current batch.

    Parameters
    ----------
    d : int
        Number of features (columns of ``Z``).
    k : int
        Number of targets (columns of ``Y``).
    """

    def __init__(self, d: int, k: int):
        for name, v in (("d", d), ("k", k)):
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
        self.d = int(d)
        self.k = int(k)
        self._n = 0
        self._ZtZ = np.zeros((self.d, self.d))  # (d, d)
        self._ZtY = np.zeros((self.d, self.k))  # (d, K)
        self._z_sum = np.zeros(self.d)  # (d,)
        self._y_sum = np.zeros(self.k)  # (K,)
        self._y_sq = np.zeros(self.k)  # (K,)

    @property
    def n(self) -> int:
        """Rows accumulated so far."""
        return self._n

    def update(self, Z: Any, Y: Any) -> None:
        """Add a batch of rows.

        Parameters
        ----------
        Z : array_like or torch.Tensor, shape (B, d)
        Y : array_like or torch.Tensor, shape (B, K)

        Raises
        ------
        ValueError
            On a shape mismatch or non-finite / non-real values.  The
            accumulator is left unchanged in that case.
        """
        Z, Y, n_rows, _, _ = _check_pair(Z, Y, self.d, self.k)
        chunks = [(lo, min(lo + _CHUNK_ROWS, n_rows)) for lo in range(0, n_rows, _CHUNK_ROWS)]

        def converted(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
            return _to_float64(Z[lo:hi], "Z"), _to_float64(Y[lo:hi], "Y")  # (b, d), (b, K)

        if len(chunks) <= 1:
            batches = [converted(lo, hi) for lo, hi in chunks]
        else:
            # Validate every chunk before touching the totals, so a bad batch cannot half-apply.
            for lo, hi in chunks:
                converted(lo, hi)
            batches = (converted(lo, hi) for lo, hi in chunks)
        for Z_b, Y_b in batches:
            self._ZtZ += Z_b.T @ Z_b  # (d, d); numpy routes A.T @ A to syrk
            self._ZtY += Z_b.T @ Y_b  # (d, K)
            self._z_sum += Z_b.sum(axis=0)
            self._y_sum += Y_b.sum(axis=0)
            self._y_sq += np.einsum("ik,ik->k", Y_b, Y_b)
        self._n += n_rows

    def stats(self) -> GramStats:
        """Snapshot of the statistics so far (copies; further updates do not alter it)."""
        return GramStats(
            n=self._n,
            ZtZ=self._ZtZ.copy(),
            ZtY=self._ZtY.copy(),
            z_sum=self._z_sum.copy(),
            y_sum=self._y_sum.copy(),
            y_sq=self._y_sq.copy(),
        )


# --------------------------------------------------------------------------- #
# results
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class LambdaSelection:
    """Outcome of an automatic choice of lambda.

    Attributes
    ----------
    criterion : str
        ``"gcv"`` or ``"loo"``.
    grid : ndarray, shape (G,)
        Candidate lambdas, ascending.
    scores : ndarray, shape (G,)
        Criterion per lambda, lower is better: mean squared LOO / GCV error
        per entry of ``Y``.  ``inf`` where undefined.
    lam : float
        The argmin.
    dof : ndarray, shape (G,)
        Effective degrees of freedom per lambda (trace of the hat matrix,
        intercept included).
    """

    criterion: str
    grid: np.ndarray
    scores: np.ndarray
    lam: float
    dof: np.ndarray


@dataclass(frozen=True, eq=False)
class RidgeSolution:
    """A fitted ridge correction: predictions are ``Z @ W + b``.

    Attributes
    ----------
    W : ndarray, shape (d, K)
    b : ndarray, shape (K,)
        Zeros when ``fit_intercept=False``.
    lam : float
    solver : str
        ``"cholesky"`` or ``"eigh"``.
    condition_number : float
        Of :math:`Z_c^\\top Z_c + \\lambda I`, the matrix actually solved
        (a 1-norm estimate from ``dpocon`` for Cholesky, exact 2-norm from
        the eigenvalues for eigh).
    selection : LambdaSelection or None
        Set when lambda was chosen automatically.
    """

    W: np.ndarray
    b: np.ndarray
    lam: float
    solver: str
    condition_number: float
    selection: LambdaSelection | None = None


# --------------------------------------------------------------------------- #
# linear algebra
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class _System:
    """The (centred or raw) normal equations: G W = C."""

    n: int
    G: np.ndarray  # (d, d)  Z_c^T Z_c or Z^T Z
    C: np.ndarray  # (d, K)  Z_c^T Y_c or Z^T Y
    yy: np.ndarray  # (K,)   ||y_c,k||^2 or ||y_k||^2
    z_bar: np.ndarray | None  # (d,) when fitting an intercept
    y_bar: np.ndarray | None  # (K,)


def _system(stats: GramStats, fit_intercept: bool) -> _System:
    if not isinstance(stats, GramStats):
        raise ValueError(f"stats must be a GramStats; got {type(stats).__name__}")
    if stats.n == 0:
        raise ValueError("GramStats holds no rows (n=0); accumulate data first")
    if fit_intercept:
        G, C, yy = stats.centered()
        return _System(stats.n, G, C, yy, stats.z_sum / stats.n, stats.y_sum / stats.n)
    G = 0.5 * (stats.ZtZ + stats.ZtZ.T)
    return _System(stats.n, G, stats.ZtY, stats.y_sq, None, None)


def _intercept(system: _System, W: np.ndarray) -> np.ndarray:
    if system.z_bar is None:
        return np.zeros(W.shape[1])
    return system.y_bar - system.z_bar @ W  # (K,)


@dataclass(frozen=True, eq=False)
class _Eigen:
    """G = V diag(s) V^T and the targets rotated into that basis."""

    system: _System
    s: np.ndarray  # (d,)   eigenvalues, ascending, >= 0, noise-level ones set to 0
    V: np.ndarray  # (d, d) eigenvectors (columns)
    Q: np.ndarray  # (d, K) V^T C

    @property
    def d(self) -> int:
        return self.s.shape[0]


def _eigen(system: _System) -> _Eigen:
    s, V = np.linalg.eigh(system.G)
    s = np.maximum(s, 0.0)
    # eigh is accurate to ~eps*||G|| in absolute terms; smaller eigenvalues are noise,
    # and left in they would leak spurious degrees of freedom at small lambda.
    s[s <= s[-1] * _EPS * s.shape[0]] = 0.0
    return _Eigen(system, s, V, V.T @ system.C)


def _eigen_dual(system: _System, Z: Any) -> _Eigen:
    """The same decomposition from the N x N kernel Z_c Z_c^T, for N < d.

    ``Z_c = U diag(sigma) V^T`` gives ``Z_c Z_c^T = U diag(s) U^T`` and ``Z_c^T Z_c = V diag(s) V^T``
    with the same nonzero ``s = sigma^2``, and ``V = Z_c^T U diag(1/sigma)``. Directions outside the row
    space of ``Z_c`` have ``s = 0`` and carry nothing (``C = Z_c^T Y_c`` has no component there), so they
    are dropped: ``V`` is (d, r). An N x N eigendecomposition instead of a d x d one: 440 training
    prompts at d = 576 take about half the time.
    """
    Z = _to_float64(Z, "Z")
    Zc = Z - system.z_bar if system.z_bar is not None else Z  # (N, d)
    s, U = np.linalg.eigh(Zc @ Zc.T)  # (N,), (N, N)
    keep = s > max(s[-1], 0.0) * _EPS * s.shape[0]
    s, U = s[keep], U[:, keep]  # (r,), (N, r)
    V = (Zc.T @ U) / np.sqrt(s)  # (d, r)
    return _Eigen(system, s, V, V.T @ system.C)


def _decompose(system: _System, Z: Any = None) -> _Eigen:
    """Primal (d x d) or, when the rows are at hand and fewer than d, dual (N x N) decomposition."""
    if Z is not None and system.n < system.G.shape[0]:
        return _eigen_dual(system, Z)
    return _eigen(system)


def _inv_spectrum(s: np.ndarray, lam_grid: np.ndarray) -> np.ndarray:
    """1/(s_j + lam) per lambda, 0 for numerically null directions: shape (G, d)."""
    T = s[None, :] + lam_grid[:, None]  # (G, d)
    tol = T.max(axis=1, keepdims=True) * _EPS * s.shape[0]  # (G, 1)
    return np.divide(1.0, T, out=np.zeros_like(T), where=T > tol)


def _solve_eigh(eig: _Eigen, lam: float, selection: LambdaSelection | None = None) -> RidgeSolution:
    inv = _inv_spectrum(eig.s, np.array([lam]))[0]  # (d,)
    W = eig.V @ (inv[:, None] * eig.Q)  # (d, K)
    t = eig.s + lam  # (d,) or (r,) after a dual decomposition
    # a dual decomposition leaves out the d - r null directions, whose eigenvalue is lam
    t_min = float(t.min()) if eig.V.shape[1] == eig.V.shape[0] else min(float(t.min()), lam)
    t_max = float(t.max())
    cond = t_max / t_min if t_min > 0 else float("inf")
    return RidgeSolution(W, _intercept(eig.system, W), lam, "eigh", cond, selection)


def solve(stats: GramStats, lam: float, fit_intercept: bool = True) -> RidgeSolution:
    """Ridge solution at a given lambda.

    Cholesky of :math:`A = G + \\lambda I` with a ``dpocon`` condition
    estimate; falls back to a pseudo-inverse through ``eigh`` when Cholesky
    fails or the estimate exceeds 1e12 (see the module docstring).

    Parameters
    ----------
    stats : GramStats
    lam : float
        Penalty, >= 0.  ``0`` is plain least squares (minimum-norm when
        singular).
    fit_intercept : bool, default True
        Fit an unpenalised intercept by centring.

    Returns
    -------
    RidgeSolution
        ``selection`` is None.

    Raises
    ------
    ValueError
        If ``lam`` is negative or not finite, or ``stats`` holds no rows.
    """
    lam = _check_lam(lam)
    system = _system(stats, fit_intercept)
    d = system.G.shape[0]
    A = system.G + lam * np.eye(d)  # (d, d)
    try:
        L, lower = scipy.linalg.cho_factor(A, lower=True, check_finite=False)  # (d, d)
    except np.linalg.LinAlgError:
        pass  # not numerically positive definite
    else:
        A_norm1 = float(np.abs(A).sum(axis=0).max())
        rcond, info = lapack.dpocon(L, A_norm1, uplo="L")
        cond = 1.0 / rcond if (info == 0 and rcond > 0) else float("inf")
        if cond <= _COND_LIMIT:
            W = scipy.linalg.cho_solve((L, lower), system.C, check_finite=False)  # (d, K)
            return RidgeSolution(W, _intercept(system, W), lam, "cholesky", cond, None)
    return _solve_eigh(_eigen(system), lam)


# --------------------------------------------------------------------------- #
# lambda selection
# --------------------------------------------------------------------------- #
def _default_grid(G: np.ndarray, n_points: int) -> np.ndarray:
    if isinstance(n_points, bool) or int(n_points) != n_points or n_points < 2:
        raise ValueError(f"n_points must be an integer >= 2; got {n_points!r}")
    s_mean = float(np.trace(G)) / G.shape[0]
    if not s_mean > 0:
        # Constant Z: every lambda gives W = 0, any positive scale will do.
        s_mean = 1.0
    return np.geomspace(_GRID_LOW * s_mean, _GRID_HIGH * s_mean, int(n_points))


def lambda_grid(stats: GramStats, n_points: int = 41, fit_intercept: bool = True) -> np.ndarray:
    """Default candidate lambdas: geometric from 1e-6 to 1e3 times tr(G)/d.

    ``G`` is :math:`Z_c^\\top Z_c` (or :math:`Z^\\top Z` without intercept),
    so ``tr(G)/d`` is its mean eigenvalue and the grid scales with ``Z``.

    Parameters
    ----------
    stats : GramStats
    n_points : int, default 41
    fit_intercept : bool, default True

    Returns
    -------
    ndarray, shape (n_points,)
        Ascending.
    """
    return _default_grid(_system(stats, fit_intercept).G, n_points)


def _dof(eig: _Eigen, inv: np.ndarray) -> np.ndarray:
    """Trace of the hat matrix per lambda, intercept included: shape (G,)."""
    return (eig.system.z_bar is not None) + inv @ eig.s


def _gcv_scores(eig: _Eigen, lam_grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    system = eig.system
    n, K = system.n, system.C.shape[1]
    inv = _inv_spectrum(eig.s, lam_grid)  # (G, d)
    coef = inv * (2.0 - eig.s[None, :] * inv)  # (G, d) = (s + 2 lam)/(s + lam)^2
    q2 = np.einsum("jk,jk->j", eig.Q, eig.Q)  # (d,) ||Q_j,:||^2
    rss = np.maximum(system.yy.sum() - coef @ q2, 0.0)  # (G,)
    dof = _dof(eig, inv)  # (G,)
    one_minus = 1.0 - dof / n
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(one_minus > 0, (rss / (n * K)) / one_minus**2, np.inf)
    return scores, dof


def _loo_scores(
    eig: _Eigen, Z: Any, Y: Any, lam_grid: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    system = eig.system
    n, K = system.n, system.C.shape[1]
    n_grid = lam_grid.shape[0]
    inv = _inv_spectrum(eig.s, lam_grid)  # (G, d)
    # Column block g of M is diag(inv_g) Q, so P @ M gives every grid point's fit in one GEMM.
    M = inv[:, :, None] * eig.Q[None, :, :]  # (G, d, K)
    M = M.transpose(1, 0, 2).reshape(eig.d, n_grid * K)  # (d, G*K)
    sse = np.zeros(n_grid)  # (G,)
    unbounded = np.zeros(n_grid, dtype=bool)  # (G,)
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        Z_b = _to_float64(Z[lo:hi], "Z")  # (B, d)
        Y_b = _to_float64(Y[lo:hi], "Y")  # (B, K)
        if system.z_bar is not None:
            Z_b = Z_b - system.z_bar
            Y_b = Y_b - system.y_bar
        P = Z_b @ eig.V  # (B, d)
        h = (P * P) @ inv.T  # (B, G)
        if system.z_bar is not None:
            h += 1.0 / n
        E = Y_b[:, None, :] - (P @ M).reshape(hi - lo, n_grid, K)  # (B, G, K)
        one_minus_h = 1.0 - h  # (B, G)
        ok = one_minus_h > _LOO_MIN_ONE_MINUS_H
        unbounded |= ~ok.all(axis=0)
        R = E / np.where(ok, one_minus_h, 1.0)[:, :, None]  # (B, G, K) LOO residuals
        sse += np.einsum("bgk,bgk->g", R, R)  # rows that are not ok make the score inf below
    scores = sse / (n * K)
    scores[unbounded] = np.inf
    return scores, _dof(eig, inv)


def _select(
    criterion: str, lam_grid: np.ndarray, scores: np.ndarray, dof: np.ndarray
) -> LambdaSelection:
    if not np.isfinite(scores).any():
        raise ValueError(
            f"{criterion.upper()} is undefined for every lambda in the grid "
            "(the fit interpolates the data); use more rows or larger lambdas"
        )
    i = int(np.argmin(scores))
    if lam_grid.shape[0] > 1 and i in (0, lam_grid.shape[0] - 1):
        edge = "smallest" if i == 0 else "largest"
        warnings.warn(
            f"{criterion.upper()} selected lam={lam_grid[i]:.3g}, the {edge} value of the grid "
            f"[{lam_grid[0]:.3g}, {lam_grid[-1]:.3g}]; the optimum may lie outside it, "
            "consider a wider grid",
            GridEdgeWarning,
            stacklevel=3,
        )
    return LambdaSelection(criterion, lam_grid, scores, float(lam_grid[i]), dof)


def _grid_for(eig: _Eigen, grid: Any) -> np.ndarray:
    return _default_grid(eig.system.G, 41) if grid is None else _check_grid(grid)


def select_lambda_gcv(
    stats: GramStats, grid: Any = None, fit_intercept: bool = True
) -> LambdaSelection:
    """Choose lambda by generalised cross-validation, from statistics alone.

    Parameters
    ----------
    stats : GramStats
    grid : array_like, optional
        Candidate lambdas (>= 0); default :func:`lambda_grid`.
    fit_intercept : bool, default True

    Returns
    -------
    LambdaSelection
        ``criterion="gcv"``.  Warns :class:`GridEdgeWarning` when the argmin
        is a grid edge.
    """
    eig = _eigen(_system(stats, fit_intercept))
    lam_grid = _grid_for(eig, grid)
    return _select("gcv", lam_grid, *_gcv_scores(eig, lam_grid))


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    return int(batch_size)


def select_lambda_loo(
    Z: Any, Y: Any, grid: Any = None, fit_intercept: bool = True, batch_size: int = 4096
) -> LambdaSelection:
    """Choose lambda by exact leave-one-out cross-validation.

    Two passes over the rows in batches of ``batch_size``: one to accumulate
    :class:`GramStats`, one to score every grid lambda.

    Parameters
    ----------
    Z : array_like or torch.Tensor, shape (N, d)
    Y : array_like or torch.Tensor, shape (N, K)
    grid : array_like, optional
        Candidate lambdas (>= 0); default :func:`lambda_grid`.
    fit_intercept : bool, default True
    batch_size : int, default 4096
        Rows per batch; memory is O(batch_size * d + d^2).

    Returns
    -------
    LambdaSelection
        ``criterion="loo"``.
    """
    batch_size = _check_batch_size(batch_size)
    Z, Y, n_rows, d, k = _check_pair(Z, Y)
    acc = RidgeAccumulator(d, k)
    for lo in range(0, n_rows, batch_size):
        acc.update(Z[lo : lo + batch_size], Y[lo : lo + batch_size])
    eig = _eigen(_system(acc.stats(), fit_intercept))
    lam_grid = _grid_for(eig, grid)
    return _select("loo", lam_grid, *_loo_scores(eig, Z, Y, lam_grid, batch_size))


def fit(
    stats: GramStats,
    lam: float | None = None,
    criterion: str = "gcv",
    Z: Any = None,
    Y: Any = None,
    grid: Any = None,
    fit_intercept: bool = True,
) -> RidgeSolution:
    """Fit the ridge correction, choosing lambda automatically if not given.

    Parameters
    ----------
    stats : GramStats
        Statistics of ``(Z, Y)``.
    lam : float, optional
        Given: solve at it directly (:func:`solve`).  None: select it by
        ``criterion`` over ``grid`` from one eigendecomposition, then solve at
        the chosen value with the same eigendecomposition.
    criterion : {"gcv", "loo"}, default "gcv"
        ``"gcv"`` needs only ``stats``; ``"loo"`` (exact leave-one-out) also
        needs the rows ``Z`` and ``Y`` that ``stats`` was built from.
    Z : array_like or torch.Tensor, shape (N, d), optional
        Needed by ``"loo"``; with either criterion, when N < d it lets the
        selection use the cheaper N x N decomposition (same result).
    Y : array_like or torch.Tensor, shape (N, K), optional
    grid : array_like, optional
        Candidate lambdas; default :func:`lambda_grid`.
    fit_intercept : bool, default True

    Returns
    -------
    RidgeSolution
        With ``selection`` set when lambda was chosen here.

    Raises
    ------
    ValueError
        Unknown criterion; ``"loo"`` without ``Z``/``Y`` or with rows that do
        not match ``stats``; negative lambda.
    """
    criterion = _check_criterion(criterion)
    if lam is not None:
        return solve(stats, lam, fit_intercept)
    if criterion == "loo":
        missing = [name for name, v in (("Z", Z), ("Y", Y)) if v is None]
        if missing:
            raise ValueError(
                f"criterion='loo' needs the data rows; missing: {' and '.join(missing)} "
                "(pass Z=..., Y=..., or use criterion='gcv')"
            )
        Z, Y, n_rows, _, _ = _check_pair(Z, Y, stats.d, stats.k)
        if n_rows != stats.n:
            raise ValueError(f"Z and Y have {n_rows} rows but stats was accumulated from {stats.n}")
    elif Z is not None:
        Z = _to_float64(Z, "Z")
        if Z.ndim != 2 or Z.shape != (stats.n, stats.d):
            raise ValueError(f"Z has shape {Z.shape} but stats was accumulated from ({stats.n}, {stats.d})")
    eig = _decompose(_system(stats, fit_intercept), Z)
    lam_grid = _grid_for(eig, grid)
    if criterion == "gcv":
        selection = _select("gcv", lam_grid, *_gcv_scores(eig, lam_grid))
    else:
        selection = _select("loo", lam_grid, *_loo_scores(eig, Z, Y, lam_grid, 4096))
    return _solve_eigh(eig, selection.lam, selection)
