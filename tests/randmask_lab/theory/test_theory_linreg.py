"""The section-5 model: GD limit, stability threshold, eigenvalue concentration, solution norm, bad input."""

import math

import numpy as np
import pytest

from randmask_lab.theory.experiment import measure_critical_lr, run_sweep
from randmask_lab.theory.linreg import (
    bernoulli_mask,
    check_p,
    expected_sq_norm,
    gd_masked,
    gram_eigvals,
    make_problem,
    masked_gram_eigvals,
    min_norm_solution,
    prop53_lower_bound,
    stable_lr,
    theorem51_deviation,
)


@pytest.fixture
def setup():
    prob = make_problem(n=10, d=300, sigma=0.5, seed=3)
    return prob, bernoulli_mask(300, 0.2, seed=3)


def test_gd_fixed_point_is_min_norm_solution(setup):
    prob, mask = setup
    res = gd_masked(prob.X, prob.y, mask, 0.9 * stable_lr(prob.X, mask), steps=20000, w0=prob.w0)
    closed = min_norm_solution(prob.X, prob.y, mask, w0=prob.w0)
    assert res.converged and not res.diverged
    assert np.linalg.norm(res.delta - closed) <= 1e-8 * np.linalg.norm(closed)
    assert np.all(res.delta[~mask] == 0.0)  # untrainable coordinates never move
    assert res.losses[-1] < 1e-20  # n < kept coordinates: the masked model interpolates


@pytest.mark.parametrize("p", [0.1, 0.5, 1.0])
def test_gd_converges_below_and_diverges_above_two_over_lambda_max(p):
    prob = make_problem(n=10, d=300, seed=1)
    mask = bernoulli_mask(300, p, seed=1)
    lr = stable_lr(prob.X, mask)
    assert lr == pytest.approx(2.0 / masked_gram_eigvals(prob.X, mask)[0])
    ok = gd_masked(prob.X, prob.y, mask, 0.9 * lr, steps=20000, w0=prob.w0)
    bad = gd_masked(prob.X, prob.y, mask, 1.1 * lr, steps=2000, w0=prob.w0)
    assert ok.converged and not ok.diverged
    assert bad.diverged and not bad.converged


def test_measured_critical_lr_matches_two_over_lambda_max(setup):
    prob, mask = setup
    measured = measure_critical_lr(prob.X, prob.target, mask, steps=2000)
    assert measured / stable_lr(prob.X, mask) == pytest.approx(1.0, abs=0.005)


def test_theorem51_formula_value():
    # n sqrt(2 d (4n + ln 1/delta)) with n=2, d=8, ln(1/delta)=1: 2 sqrt(16 * 9) = 24
    assert theorem51_deviation(2, 8, delta=math.exp(-1.0)) == pytest.approx(24.0)
    assert theorem51_deviation(2, 8, delta=math.exp(-1.0), entry_bound=2.0) == pytest.approx(96.0)


def test_eigenvalues_concentrate_as_d_grows_and_stay_within_bound():
    n, p, seeds = 8, 0.2, range(4)
    rel_dev, top_gap = [], []
    for d in (100, 1000, 10000):
        devs, gaps = [], []
        for s in seeds:
            X = make_problem(n, d, seed=s).X
            lam, lam_m = gram_eigvals(X), masked_gram_eigvals(X, bernoulli_mask(d, p, seed=s))
            dev = np.max(np.abs(lam_m - p * lam))
            assert dev <= theorem51_deviation(n, d, delta=0.05)
            devs.append(dev / (p * lam[0]))
            gaps.append(abs(lam_m[0] / (p * lam[0]) - 1.0))
        rel_dev.append(np.mean(devs))
        top_gap.append(np.mean(gaps))
    assert rel_dev[0] > rel_dev[1] > rel_dev[2]
    assert top_gap[0] > top_gap[1] > top_gap[2] and top_gap[2] < 0.1  # top ratio -> 1


def test_solution_norm_grows_as_p_shrinks_and_respects_prop53():
    records = run_sweep(n=8, d=400, p_values=[0.1, 0.3, 1.0], seeds=[0, 1, 2], gd_steps=300, noise_draws=400)
    by_p = {p: [r for r in records if r["p"] == p] for p in (0.1, 0.3, 1.0)}
    mean_sq = [np.mean([r["sq_norm_mc"] for r in by_p[p]]) for p in (0.1, 0.3, 1.0)]
    mean_gd = [np.mean([r["norm_gd"] for r in by_p[p]]) for p in (0.1, 0.3, 1.0)]
    assert mean_sq[0] > mean_sq[1] > mean_sq[2]
    assert mean_gd[0] > mean_gd[1] > mean_gd[2]
    for r in records:
        assert r["sq_norm_exact"] >= r["sq_norm_bound"]
        assert r["sq_norm_mc"] >= r["sq_norm_bound"]
        assert r["sq_norm_mc"] == pytest.approx(r["sq_norm_exact"], rel=0.2)  # Monte Carlo vs exact


def test_expected_sq_norm_matches_direct_average(setup):
    prob, mask = setup
    rng = np.random.default_rng(0)
    norms = [
        np.sum(min_norm_solution(prob.X, prob.X @ prob.w_star + rng.normal(0, 0.5, 10), mask) ** 2)
        for _ in range(2000)
    ]
    assert np.mean(norms) == pytest.approx(expected_sq_norm(prob.X, mask, prob.w_star, 0.5), rel=0.05)
    assert np.mean(norms) >= prop53_lower_bound(prob.X, mask, prob.w_star, 0.5)


@pytest.mark.parametrize("p", [0.0, 1.5, -0.1, float("nan")])
def test_bad_p_raises_with_value_and_range(p):
    with pytest.raises(ValueError, match=r"\(0, 1\]") as err:
        bernoulli_mask(100, p)
    assert repr(float(p)) in str(err.value)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_p(p)


def test_n_at_least_d_warns():
    with pytest.warns(UserWarning, match="n < d"):
        make_problem(n=50, d=20)
    with pytest.warns(UserWarning, match="n < d"):
        make_problem(n=20, d=20)


def test_too_sparse_mask_is_refused():
    with pytest.raises(ValueError, match="raise p or d"):
        run_sweep(n=10, d=100, p_values=[0.05], seeds=[0])
    X = make_problem(n=10, d=100).X
    mask = np.zeros(100, dtype=bool)
    mask[:5] = True  # 5 kept coordinates < n = 10: X M X^T is singular
    with pytest.raises(ValueError, match="singular"):
        prop53_lower_bound(X, mask, np.zeros(100), 0.5)


def test_masks_are_seeded_bernoulli_and_nested():
    a, b = bernoulli_mask(20000, 0.1, seed=7), bernoulli_mask(20000, 0.3, seed=7)
    assert np.array_equal(a, bernoulli_mask(20000, 0.1, seed=7))
    assert np.all(b[a])  # nested in p for a fixed seed
    assert a.mean() == pytest.approx(0.1, abs=0.01)
