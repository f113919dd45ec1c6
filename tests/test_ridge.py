"""Tests for lmtune.ridge: the closed-form ridge engine."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import linalg as scipy_linalg
from sklearn.linear_model import Ridge

from lmtune import ridge
from lmtune.ridge import (
    GramStats,
    GridEdgeWarning,
    RidgeAccumulator,
    fit,
    lambda_grid,
    select_lambda_gcv,
    select_lambda_loo,
    solve,
)


def _problem(n, d, k, seed=0, noise=0.5, mean=0.0):
    """Y = Z W_true + b_true + noise, so the best lambda is interior."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, d)) + mean
    W_true = rng.standard_normal((d, k))
    b_true = rng.standard_normal(k)
    Y = Z @ W_true + b_true + noise * rng.standard_normal((n, k))
    return Z, Y


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _objective(Z, Y, W, b, lam):
    R = Y - b[None, :] - Z @ W
    return float((R**2).sum() + lam * (W**2).sum())


# --------------------------------------------------------------------------- #
# 1-3: the solution is the ridge minimiser
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("lam", [0.0, 1e-3, 3.0, 250.0])
def test_solve_matches_augmented_lstsq(lam):
    Z, Y = _problem(120, 15, 2, seed=1)
    sol = solve(GramStats.from_arrays(Z, Y), lam, fit_intercept=False)
    d = Z.shape[1]
    A = np.vstack([Z, np.sqrt(lam) * np.eye(d)])
    B = np.vstack([Y, np.zeros((d, Y.shape[1]))])
    W_ref = np.linalg.lstsq(A, B, rcond=None)[0]
    assert sol.solver == "cholesky"
    assert _rel(sol.W, W_ref) < 1e-8
    np.testing.assert_array_equal(sol.b, np.zeros(2))
    assert sol.W.dtype == np.float64 and sol.W.shape == (d, 2)
    assert sol.lam == lam and sol.selection is None


@pytest.mark.parametrize("lam", [1e-2, 1.0, 40.0])
def test_solve_with_intercept_matches_sklearn(lam):
    # Offset features make the centring matter.
    Z, Y = _problem(150, 12, 3, seed=2, mean=4.0)
    sol = solve(GramStats.from_arrays(Z, Y), lam, fit_intercept=True)
    ref = Ridge(alpha=lam, fit_intercept=True, solver="cholesky").fit(Z, Y)
    assert _rel(sol.W, ref.coef_.T) < 1e-8
    assert _rel(sol.b, ref.intercept_) < 1e-8


def test_solution_is_the_gradient_descent_minimum():
    Z, Y = _problem(200, 6, 2, seed=3, mean=0.3)
    lam = 5.0
    sol = solve(GramStats.from_arrays(Z, Y), lam, fit_intercept=True)

    # Plain GD on J(W, b); the Hessian (same for every column of Y) is
    # 2 [Z 1]^T [Z 1] + 2 diag(lam I, 0), and 1/L is a safe step.
    X = np.hstack([Z, np.ones((len(Z), 1))])
    pen = np.r_[np.full(Z.shape[1], lam), 0.0]
    L = np.linalg.eigvalsh(2 * X.T @ X + 2 * np.diag(pen)).max()
    Zt, Yt = torch.from_numpy(Z), torch.from_numpy(Y)
    W = torch.zeros(Z.shape[1], 2, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    for _ in range(20000):
        J = ((Yt - b - Zt @ W) ** 2).sum() + lam * (W**2).sum()
        gW, gb = torch.autograd.grad(J, (W, b))
        with torch.no_grad():
            W -= gW / L
            b -= gb / L
        if max(gW.abs().max().item(), gb.abs().max().item()) < 1e-11 * L:
            break
    assert _rel(sol.W, W.detach().numpy()) < 1e-6
    assert _rel(sol.b, b.detach().numpy()) < 1e-6

    J_star = _objective(Z, Y, sol.W, sol.b, lam)
    rng = np.random.default_rng(0)
    for scale in (1e-4, 1e-2, 1.0):
        for _ in range(5):
            dW = scale * rng.standard_normal(sol.W.shape)
            db = scale * rng.standard_normal(sol.b.shape)
            assert J_star <= _objective(Z, Y, sol.W + dW, sol.b + db, lam)


# --------------------------------------------------------------------------- #
# 4: lambda selection
# --------------------------------------------------------------------------- #
def _brute_force_loo(Z, Y, grid, fit_intercept):
    n = len(Z)
    sse = np.zeros(len(grid))
    for i in range(n):
        keep = np.arange(n) != i
        Z_tr, Y_tr = Z[keep], Y[keep]
        z_bar = Z_tr.mean(0) if fit_intercept else np.zeros(Z.shape[1])
        y_bar = Y_tr.mean(0) if fit_intercept else np.zeros(Y.shape[1])
        Zc, Yc = Z_tr - z_bar, Y_tr - y_bar
        for g, lam in enumerate(grid):
            W = np.linalg.solve(Zc.T @ Zc + lam * np.eye(Z.shape[1]), Zc.T @ Yc)
            pred = y_bar + (Z[i] - z_bar) @ W
            sse[g] += ((Y[i] - pred) ** 2).sum()
    return sse / Y.size


def _hat_matrix(Z, lam, fit_intercept):
    n, d = Z.shape
    Zc = Z - Z.mean(0) if fit_intercept else Z
    H = Zc @ np.linalg.solve(Zc.T @ Zc + lam * np.eye(d), Zc.T)
    return H + np.ones((n, n)) / n if fit_intercept else H


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_loo_matches_brute_force_refits(fit_intercept):
    Z, Y = _problem(40, 8, 2, seed=4, noise=1.5, mean=1.0)
    grid = np.geomspace(1e-3, 1e3, 13)
    ref = _brute_force_loo(Z, Y, grid, fit_intercept)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GridEdgeWarning)  # the optimum must be interior here
        sel = select_lambda_loo(Z, Y, grid=grid, fit_intercept=fit_intercept, batch_size=7)
    np.testing.assert_allclose(sel.scores, ref, rtol=1e-8, atol=0)
    assert np.argmin(ref) not in (0, len(grid) - 1)
    assert sel.lam == grid[np.argmin(ref)]
    assert sel.criterion == "loo"
    np.testing.assert_array_equal(sel.grid, grid)
    dof_ref = [np.trace(_hat_matrix(Z, lam, fit_intercept)) for lam in grid]
    np.testing.assert_allclose(sel.dof, dof_ref, rtol=1e-10)

    # The same selection through fit(), with the solution at the chosen lambda.
    st = GramStats.from_arrays(Z, Y)
    sol = fit(st, criterion="loo", Z=Z, Y=Y, grid=grid, fit_intercept=fit_intercept)
    assert sol.lam == sel.lam and sol.solver == "eigh"
    np.testing.assert_allclose(sol.selection.scores, ref, rtol=1e-8)
    direct = solve(st, sol.lam, fit_intercept=fit_intercept)
    assert _rel(sol.W, direct.W) < 1e-10
    np.testing.assert_allclose(sol.b, direct.b, rtol=1e-10, atol=1e-12)


def test_loo_is_independent_of_batch_size_and_input_type():
    Z, Y = _problem(60, 5, 3, seed=5, noise=1.0)
    grid = np.geomspace(1e-2, 1e2, 9)
    a = select_lambda_loo(Z, Y, grid=grid, batch_size=4096)
    b = select_lambda_loo(torch.from_numpy(Z), torch.from_numpy(Y), grid=grid, batch_size=13)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-12)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_gcv_matches_explicit_hat_matrix(fit_intercept):
    Z, Y = _problem(40, 8, 2, seed=6, noise=1.5, mean=-2.0)
    n, K = Y.shape
    grid = np.geomspace(1e-3, 1e3, 13)
    ref, dof_ref = [], []
    for lam in grid:
        H = _hat_matrix(Z, lam, fit_intercept)
        R = Y - H @ Y
        ref.append(((R**2).sum() / (n * K)) / (1 - np.trace(H) / n) ** 2)
        dof_ref.append(np.trace(H))
    sel = select_lambda_gcv(GramStats.from_arrays(Z, Y), grid=grid, fit_intercept=fit_intercept)
    np.testing.assert_allclose(sel.scores, ref, rtol=1e-8)
    np.testing.assert_allclose(sel.dof, dof_ref, rtol=1e-10)
    assert sel.lam == grid[np.argmin(ref)] and sel.criterion == "gcv"

    sol = fit(GramStats.from_arrays(Z, Y), grid=grid, fit_intercept=fit_intercept)
    assert sol.selection.criterion == "gcv" and sol.lam == sel.lam and sol.solver == "eigh"
    Zc = Z - Z.mean(0) if fit_intercept else Z
    s = np.linalg.eigvalsh(Zc.T @ Zc)
    cond_ref = (s.max() + sol.lam) / (s.min() + sol.lam)
    assert sol.condition_number == pytest.approx(cond_ref, rel=1e-8)


def test_gcv_interpolating_regime_is_inf_and_all_inf_raises():
    # N=6 < d=10 with intercept: at lam=0 the fit interpolates, dof = n.
    Z, Y = _problem(6, 10, 2, seed=7)
    st = GramStats.from_arrays(Z, Y)
    sel = select_lambda_gcv(st, grid=[0.0, 1.0, 10.0, 100.0])
    assert np.isinf(sel.scores[0]) and np.isfinite(sel.scores[1:]).all()
    assert sel.lam > 0
    with pytest.raises(ValueError, match="undefined for every lambda"):
        select_lambda_gcv(st, grid=[0.0])


def test_default_grid_is_scale_free_and_selection_follows_scale():
    Z, Y = _problem(300, 10, 2, seed=8, noise=2.0)
    st, st10 = GramStats.from_arrays(Z, Y), GramStats.from_arrays(10 * Z, Y)
    grid = lambda_grid(st)
    assert grid.shape == (41,) and np.all(np.diff(grid) > 0)
    Zc = Z - Z.mean(0)
    s_bar = np.trace(Zc.T @ Zc) / Z.shape[1]
    np.testing.assert_allclose(grid[[0, -1]], [1e-6 * s_bar, 1e3 * s_bar], rtol=1e-10)
    np.testing.assert_allclose(np.diff(np.log(grid)), np.log(1e9) / 40, rtol=1e-10)
    np.testing.assert_allclose(lambda_grid(st10), 100 * grid, rtol=1e-10)
    assert lambda_grid(st, n_points=5).shape == (5,)

    a, b = fit(st), fit(st10)
    assert b.lam == pytest.approx(100 * a.lam, rel=1e-10)
    assert _rel(b.W, a.W / 10) < 1e-8
    assert a.selection.lam == a.lam and a.selection.grid.shape == (41,)


def test_grid_edge_warns_and_interior_does_not():
    rng = np.random.default_rng(0)
    Z, Y = rng.standard_normal((40, 30)), rng.standard_normal((40, 2))  # pure noise: lam -> inf
    with pytest.warns(GridEdgeWarning, match="largest value of the grid"):
        sol = fit(GramStats.from_arrays(Z, Y))
    assert sol.lam == sol.selection.grid[-1]

    Z, Y = _problem(200, 10, 2, seed=9, noise=0.0)  # noiseless: lam -> 0
    with pytest.warns(GridEdgeWarning, match="smallest value of the grid"):
        sel = select_lambda_gcv(GramStats.from_arrays(Z, Y), grid=[1.0, 10.0, 100.0])
    assert sel.lam == 1.0

    Z, Y = _problem(200, 10, 2, seed=9, noise=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GridEdgeWarning)
        sol = fit(GramStats.from_arrays(Z, Y))
    i = int(np.argmin(sol.selection.scores))
    assert 0 < i < 40


def test_user_grid_is_sorted_and_deduplicated():
    Z, Y = _problem(80, 6, 2, seed=10, noise=2.0)
    sel = select_lambda_gcv(GramStats.from_arrays(Z, Y), grid=[10.0, 0.1, 1.0, 10.0, 100.0, 0.01])
    np.testing.assert_array_equal(sel.grid, [0.01, 0.1, 1.0, 10.0, 100.0])
    assert sel.scores.shape == sel.dof.shape == (5,)


# --------------------------------------------------------------------------- #
# 5: streaming
# --------------------------------------------------------------------------- #
def _assert_stats_close(a, b, rtol=1e-12):
    assert a.n == b.n
    for name in ("ZtZ", "ZtY", "z_sum", "y_sum", "y_sq"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=rtol, atol=1e-10)


def test_streaming_uneven_batches_match_one_shot():
    Z, Y = _problem(137, 9, 3, seed=11, mean=2.0)
    ref = GramStats.from_arrays(Z, Y)

    acc = RidgeAccumulator(9, 3)
    for lo, hi in [(0, 7), (7, 8), (8, 58), (58, 58), (58, 137)]:  # 7, 1, 50, empty, rest
        acc.update(Z[lo:hi], Y[lo:hi])
    one = RidgeAccumulator(9, 3)
    one.update(Z, Y)

    _assert_stats_close(acc.stats(), ref)
    _assert_stats_close(one.stats(), ref)
    np.testing.assert_allclose(ref.ZtZ, Z.T @ Z, rtol=1e-12)
    np.testing.assert_allclose(ref.y_sq, (Y**2).sum(0), rtol=1e-12)
    for lam in (0.1, 10.0):
        s_ref, s_acc = solve(ref, lam), solve(acc.stats(), lam)
        assert _rel(s_acc.W, s_ref.W) < 1e-10 and _rel(s_acc.b, s_ref.b) < 1e-10
        assert _rel(solve(one.stats(), lam).W, s_ref.W) < 1e-10


def test_torch_and_numpy_inputs_give_the_same_stats():
    Z, Y = _problem(50, 6, 2, seed=12)
    Z32, Y32 = Z.astype(np.float32), Y.astype(np.float32)
    from_np = GramStats.from_arrays(Z32, Y32)
    from_torch = GramStats.from_arrays(torch.from_numpy(Z32), torch.from_numpy(Y32))
    _assert_stats_close(from_np, from_torch, rtol=0)
    assert from_np.ZtZ.dtype == np.float64
    # float32 inputs are promoted before accumulating, not accumulated in float32.
    Z64 = Z32.astype(np.float64)
    np.testing.assert_allclose(from_np.ZtZ, Z64.T @ Z64, rtol=1e-13)

    acc = RidgeAccumulator(6, 2)
    acc.update(torch.from_numpy(Z[:20]).requires_grad_(), Y[:20])  # mixed, grad-tracking
    acc.update(Z[20:].tolist(), torch.from_numpy(Y[20:]))
    _assert_stats_close(acc.stats(), GramStats.from_arrays(Z, Y))

    bf = torch.from_numpy(Z32).to(torch.bfloat16)
    st_bf = GramStats.from_arrays(bf, torch.from_numpy(Y32).to(torch.float16))
    Zbf = bf.double().numpy()
    np.testing.assert_allclose(st_bf.ZtZ, Zbf.T @ Zbf, rtol=1e-12)


def test_large_batch_is_chunked_transparently(monkeypatch):
    import lmtune.ridge as ridge

    monkeypatch.setattr(ridge, "_CHUNK_ROWS", 16)
    Z, Y = _problem(100, 4, 2, seed=13)
    acc = RidgeAccumulator(4, 2)
    acc.update(Z, Y)
    np.testing.assert_allclose(acc.stats().ZtZ, Z.T @ Z, rtol=1e-12)
    assert acc.n == 100
    # A bad value in a late chunk must not leave the first chunks added.
    Z_bad = Z.copy()
    Z_bad[90, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        acc.update(Z_bad, Y)
    assert acc.n == 100
    np.testing.assert_allclose(acc.stats().ZtZ, Z.T @ Z, rtol=1e-12)


def test_stats_snapshot_is_independent_of_later_updates():
    Z, Y = _problem(30, 3, 2, seed=14)
    acc = RidgeAccumulator(3, 2)
    acc.update(Z[:10], Y[:10])
    snap = acc.stats()
    acc.update(Z[10:], Y[10:])
    assert snap.n == 10
    np.testing.assert_allclose(snap.ZtZ, Z[:10].T @ Z[:10])


def test_centered_matches_explicit_centring():
    Z, Y = _problem(70, 5, 2, seed=15, mean=3.0)
    ZtZ_c, ZtY_c, y_sq_c = GramStats.from_arrays(Z, Y).centered()
    Zc, Yc = Z - Z.mean(0), Y - Y.mean(0)
    np.testing.assert_allclose(ZtZ_c, Zc.T @ Zc, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ZtY_c, Zc.T @ Yc, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y_sq_c, (Yc**2).sum(0), rtol=1e-10)


# --------------------------------------------------------------------------- #
# 6: solver choice and conditioning
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("lam", [0.0, 1e-20])
def test_singular_problem_uses_eigh_and_gives_min_norm_lstsq(fit_intercept, lam):
    # lam=1e-20 is below the rounding of the Gram: 1/(0 + lam) would amplify noise
    # in the null directions, so those must be treated as exactly null too.
    rng = np.random.default_rng(16)
    base = rng.standard_normal((20, 15))
    # Columns 15-19 duplicate 0-4, and d=30 > N=20: rank-deficient twice over.
    Z = np.hstack([base, base[:, :5], rng.standard_normal((20, 10))])
    Y = rng.standard_normal((20, 2))
    sol = solve(GramStats.from_arrays(Z, Y), lam, fit_intercept=fit_intercept)
    assert sol.solver == "eigh"
    assert sol.condition_number > 1e12
    Zc = Z - Z.mean(0) if fit_intercept else Z
    Yc = Y - Y.mean(0) if fit_intercept else Y
    W_ref = np.linalg.lstsq(Zc, Yc, rcond=None)[0]  # minimum-norm
    assert _rel(sol.W, W_ref) < 1e-8
    b_ref = Y.mean(0) - Z.mean(0) @ W_ref if fit_intercept else np.zeros(2)
    np.testing.assert_allclose(sol.b, b_ref, rtol=1e-8, atol=1e-10)
    # The duplicated columns share their weight equally, as the minimum norm demands.
    np.testing.assert_allclose(sol.W[:5], sol.W[15:20], rtol=1e-8, atol=1e-12)


def _near_duplicates(perturbation, seed=17):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((100, 6))
    Z = np.hstack([base, base[:, :2] + perturbation * rng.standard_normal((100, 2))])
    return Z, rng.standard_normal((100, 2))


def test_cholesky_above_condition_limit_falls_back_to_eigh():
    # Columns differing by 1e-6: Cholesky of the Gram succeeds, but cond ~5e12.
    Z, Y = _near_duplicates(1e-6)
    st = GramStats.from_arrays(Z, Y)
    scipy_linalg.cho_factor(st.centered()[0])  # the fallback is not a Cholesky failure
    sol = solve(st, 0.0)
    assert sol.solver == "eigh" and sol.condition_number > 1e12
    Zc, Yc = Z - Z.mean(0), Y - Y.mean(0)
    W_ls = np.linalg.lstsq(Zc, Yc, rcond=None)[0]
    rss = lambda W: ((Yc - Zc @ W) ** 2).sum()  # noqa: E731
    assert rss(sol.W) <= rss(W_ls) * (1 + 1e-6)
    # A penalty small next to the spectrum (mean eigenvalue ~100) is well-conditioned again.
    assert solve(st, 1e-3).solver == "cholesky"


def test_directions_below_gram_precision_are_truncated():
    # Columns differing by 1e-8: their Gram eigenvalue (~1e-16 relative) is rounding
    # noise, so the solution is the rank-6 pseudo-inverse one.
    Z, Y = _near_duplicates(1e-8)
    sol = solve(GramStats.from_arrays(Z, Y), 0.0)
    assert sol.solver == "eigh" and sol.condition_number == np.inf  # t_min = 0 + 0
    Zc, Yc = Z - Z.mean(0), Y - Y.mean(0)
    W_trunc = np.linalg.lstsq(Zc, Yc, rcond=1e-6)[0]
    assert _rel(sol.W, W_trunc) < 1e-6


@pytest.mark.parametrize("seed", [18, 19, 20])
def test_condition_number_estimate_is_close_to_true(seed):
    rng = np.random.default_rng(seed)
    scales = np.geomspace(1.0, 30.0, 20)  # condition number of the Gram ~1e3
    Z = rng.standard_normal((400, 20)) * scales
    Y = rng.standard_normal((400, 2))
    lam = 2.0
    sol = solve(GramStats.from_arrays(Z, Y), lam)
    assert sol.solver == "cholesky"
    Zc = Z - Z.mean(0)
    A = Zc.T @ Zc + lam * np.eye(20)
    true2 = np.linalg.cond(A)
    assert true2 / 3 <= sol.condition_number <= true2 * 3
    true1 = np.linalg.cond(A, 1)
    assert true1 / 3 <= sol.condition_number <= true1 * 1.0001


def test_eigh_path_matches_cholesky_path():
    Z, Y = _problem(90, 7, 2, seed=21, noise=4.0, mean=1.0)
    st = GramStats.from_arrays(Z, Y)
    auto = fit(st, grid=[0.05, 0.5, 5.0, 50.0, 500.0])
    direct = solve(st, auto.lam)
    assert auto.solver == "eigh" and direct.solver == "cholesky"
    assert _rel(auto.W, direct.W) < 1e-10 and _rel(auto.b, direct.b) < 1e-10
    given = fit(st, lam=auto.lam)
    assert given.selection is None and given.solver == "cholesky"


# --------------------------------------------------------------------------- #
# 7: input validation
# --------------------------------------------------------------------------- #
def test_validation_errors_name_the_problem():
    Z, Y = _problem(20, 4, 2, seed=22)
    st = GramStats.from_arrays(Z, Y)
    acc = RidgeAccumulator(4, 2)

    with pytest.raises(ValueError, match="same number of rows"):
        acc.update(Z, Y[:-1])
    with pytest.raises(ValueError, match="d=4 columns"):
        acc.update(Z[:, :3], Y)
    with pytest.raises(ValueError, match="K=2 columns"):
        acc.update(Z, np.hstack([Y, Y]))
    with pytest.raises(ValueError, match="2-D"):
        acc.update(Z[:, 0], Y)
    with pytest.raises(ValueError, match="NaN or infinite"):
        acc.update(np.where(Z > 1, np.inf, Z), Y)
    with pytest.raises(ValueError, match="real numbers"):
        acc.update(Z.astype(complex), Y)
    assert acc.n == 0
    with pytest.raises(ValueError, match="positive integer"):
        RidgeAccumulator(0, 2)
    with pytest.raises(ValueError, match="same number of rows"):
        GramStats.from_arrays(Z, Y[:5])

    with pytest.raises(ValueError, match="lam must be finite and >= 0"):
        solve(st, -1.0)
    with pytest.raises(ValueError, match="lam must be finite and >= 0"):
        fit(st, lam=float("nan"))
    with pytest.raises(ValueError, match="unknown criterion 'aic'"):
        fit(st, criterion="aic")
    with pytest.raises(ValueError, match="unknown criterion"):
        fit(st, lam=1.0, criterion="LOO")
    with pytest.raises(ValueError, match="missing: Z and Y"):
        fit(st, criterion="loo")
    with pytest.raises(ValueError, match="missing: Y"):
        fit(st, criterion="loo", Z=Z)
    with pytest.raises(ValueError, match="missing: Z"):
        fit(st, criterion="loo", Y=Y)
    with pytest.raises(ValueError, match="20 rows but stats was accumulated from 10"):
        fit(GramStats.from_arrays(Z[:10], Y[:10]), criterion="loo", Z=Z, Y=Y)
    with pytest.raises(ValueError, match="grid lambdas must be finite and >= 0"):
        select_lambda_gcv(st, grid=[-1.0, 1.0])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        fit(st, grid=[])
    with pytest.raises(ValueError, match="n_points"):
        lambda_grid(st, n_points=1)
    with pytest.raises(ValueError, match="batch_size"):
        select_lambda_loo(Z, Y, batch_size=0)
    with pytest.raises(ValueError, match="n=0"):
        solve(RidgeAccumulator(4, 2).stats(), 1.0)
    with pytest.raises(ValueError, match="ZtZ must have shape"):
        GramStats(
            n=3, ZtZ=np.eye(3), ZtY=np.zeros((4, 2)),
            z_sum=np.zeros(4), y_sum=np.zeros(2), y_sq=np.zeros(2),
        )


@pytest.mark.parametrize("criterion", ["gcv", "loo"])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_dual_decomposition_matches_primal_when_n_below_d(criterion, fit_intercept):
    """With N < d and the rows at hand, the N x N decomposition gives the primal's scores and solution."""
    rng = np.random.default_rng(7)
    Z = rng.normal(size=(30, 50)) + 0.5
    Y = rng.normal(size=(30, 2))
    st = ridge.GramStats.from_arrays(Z, Y)
    primal = ridge._eigen(ridge._system(st, fit_intercept))
    dual = ridge._decompose(ridge._system(st, fit_intercept), Z)
    assert dual.V.shape[1] < primal.V.shape[1], "the dual path was not taken"
    grid = ridge.lambda_grid(st, fit_intercept=fit_intercept)
    if criterion == "gcv":
        s_p, dof_p = ridge._gcv_scores(primal, grid)
        s_d, dof_d = ridge._gcv_scores(dual, grid)
    else:
        s_p, dof_p = ridge._loo_scores(primal, Z, Y, grid, 7)
        s_d, dof_d = ridge._loo_scores(dual, Z, Y, grid, 7)
    # Near interpolation (dof -> N at tiny lambda) both forms divide rounding noise by (1 - dof/N)^2 ~ 0,
    # so the comparison is made where the criterion is well posed.
    posed = dof_p < 0.9 * len(Z)
    assert posed.sum() >= 15
    np.testing.assert_allclose(s_d[posed], s_p[posed], rtol=1e-7)
    np.testing.assert_allclose(dof_d, dof_p, rtol=1e-7)
    assert np.argmin(s_d) == np.argmin(s_p)
    with_rows = ridge.fit(st, criterion=criterion, Z=Z, Y=Y if criterion == "loo" else None,
                          fit_intercept=fit_intercept)
    ref = ridge.solve(st, with_rows.lam, fit_intercept)
    np.testing.assert_allclose(with_rows.W, ref.W, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(with_rows.b, ref.b, rtol=1e-6, atol=1e-10)
    # null directions keep the condition number honest: (s_max + lam) / lam
    assert with_rows.condition_number == pytest.approx((dual.s.max() + with_rows.lam) / with_rows.lam)


def test_gcv_rows_must_match_stats():
    rng = np.random.default_rng(0)
    Z, Y = rng.normal(size=(10, 20)), rng.normal(size=(10, 2))
    st = ridge.GramStats.from_arrays(Z, Y)
    with pytest.raises(ValueError, match="shape"):
        ridge.fit(st, Z=Z[:5])
