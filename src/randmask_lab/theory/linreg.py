"""The paper's masked over-parameterised linear regression (section 5 and appendix A), simulated.

Notation, paper -> code (float64 numpy throughout; the matrices are small):

    X in R^{n x d}, rows x_i, n < d           X, shape (n, d)
    M = diag(m), m_j ~ Bernoulli(p) i.i.d.    mask, shape (d,), bool
    w0 pretrained, w trainable                w0, delta (the trainable shift, called Delta below)
    loss (1)                                  L(Delta) = 1/2 ||X (w0 + m * Delta) - y||^2
    lambda_i(A), i-th largest eigenvalue      lambda_i := lambda_i(X X^T)
    G_m := X M X^T = X_S X_S^T                (n, n); X_S = X[:, mask], the kept columns

The Hessian of L is M X^T X M; its nonzero eigenvalues are those of G_m (same nonzero spectrum
as (X M)^T (X M)), so the smoothness of L is lambda_1(G_m) and E_m[G_m] = p X X^T. The loss has
the paper's 1/2 and no 1/n, which is what makes the thresholds below read 2/lambda_1(G_m).

The extracted paper text lost its formulas; each bound's docstring says which formula is
implemented and how it was reconstructed from the proof skeleton that survived (appendix A).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]


def check_p(p: float) -> float:
    """Return ``p`` as a float, or raise ``ValueError`` unless 0 < p <= 1 (a keep probability)."""
    p = float(p)
    if not (0.0 < p <= 1.0):  # also rejects NaN
        raise ValueError(f"mask density p must be in the interval (0, 1], got p={p!r}")
    return p


# Why a cap: the sweep squares sigma-sized numbers (losses, ||Delta_inf||^2 ~ sigma^2 tr G_m^{-1}, loss curves
# allowed to grow 1e8-fold before GD counts as diverged), and past ~1e150 these overflow float64, so the
# critical-rate search sees inf everywhere and fails. 1e100 leaves a 1e100-fold margin for n, 1/lambda_n
# and the blow-up factor; nothing is lost, since once noise dominates every quantity scales as sigma or sigma^2.
SIGMA_MAX = 1e100


def check_sigma(sigma: float) -> None:
    """Raise ``ValueError`` unless 0 <= sigma <= ``SIGMA_MAX`` (also rejects NaN and inf)."""
    if not sigma >= 0:
        raise ValueError(f"noise level sigma must be >= 0, got sigma={sigma!r}")
    if not sigma <= SIGMA_MAX:
        raise ValueError(
            f"noise level sigma must be finite and at most {SIGMA_MAX:g} (larger values overflow float64 in the "
            f"squared norms), got sigma={sigma!r}; use a smaller sigma"
        )


def check_delta(delta: float) -> None:
    """Raise ``ValueError`` unless the failure probability lies in (0, 1) (also rejects NaN)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"failure probability delta must be in (0, 1), got delta={delta!r}")


def check_shape(n: int, d: int) -> None:
    """Raise on non-positive sizes; warn when n >= d, which leaves the paper's regime."""
    if n < 1 or d < 1:
        raise ValueError(f"need n >= 1 samples and d >= 1 features, got n={n}, d={d}")
    if n >= d:
        warnings.warn(
            f"n={n} >= d={d}: section 5 of the paper assumes the over-parameterised regime n < d; "
            "the bounds and the minimum-norm picture may not apply",
            stacklevel=2,
        )


@dataclass(frozen=True)
class Problem:
    """One seeded regression task: y = X (w0 + w_star) + noise, noise ~ N(0, sigma^2 I_n).

    ``w_star`` is the ground truth *relative to the pretrained* ``w0`` (the paper: "w* can
    encompass the pretrained weights w0"), so after merging X w0 into y the target is
    ``X w_star + noise``.
    """

    X: Array  # (n, d), entries uniform in [-1, 1] (Theorem 5.1's assumption)
    w0: Array  # (d,)
    w_star: Array  # (d,)
    noise: Array  # (n,)
    y: Array  # (n,)
    sigma: float

    @property
    def target(self) -> Array:
        """y - X w0: what the masked shift has to fit (the paper merges X w0 into Y)."""
        return self.y - self.X @ self.w0


def make_problem(n: int, d: int, sigma: float = 0.5, seed: int = 0) -> Problem:
    """Draw X ~ U[-1, 1]^{n x d}, w0, w_star ~ N(0, I/d) and noise ~ N(0, sigma^2), all from ``seed``.

    The 1/d variance keeps each x_i . w_star of order one, comparable to the noise.
    """
    check_shape(n, d)
    check_sigma(sigma)
    rng = np.random.default_rng([seed, 0])
    X = rng.uniform(-1.0, 1.0, size=(n, d))
    w0 = rng.normal(0.0, 1.0 / math.sqrt(d), size=d)
    w_star = rng.normal(0.0, 1.0 / math.sqrt(d), size=d)
    noise = rng.normal(0.0, sigma, size=n)
    return Problem(X=X, w0=w0, w_star=w_star, noise=noise, y=X @ (w0 + w_star) + noise, sigma=float(sigma))


def bernoulli_mask(d: int, p: float, seed: int = 0) -> NDArray[np.bool_]:
    """m_j ~ Bernoulli(p) i.i.d., as ``u_j < p`` with u ~ U[0, 1)^d drawn from ``seed``.

    Why thresholding one uniform vector: for a fixed seed the masks are *nested* in p (a larger
    p keeps a superset), which removes mask-to-mask noise when comparing p values.
    """
    p = check_p(p)
    u = np.random.default_rng([seed, 1]).random(d)
    return u < p


def _kept(X: Array, mask: NDArray[np.bool_]) -> Array:
    if mask.shape != (X.shape[1],):
        raise ValueError(f"mask has shape {mask.shape}, expected ({X.shape[1]},) to match X's columns")
    if not mask.any():
        raise ValueError("mask keeps no coordinate; use a larger p or d")
    return X[:, mask]  # (n, k)


def gram_eigvals(X: Array) -> Array:
    """lambda_1 >= ... >= lambda_n of X X^T (n values)."""
    return np.linalg.eigvalsh(X @ X.T)[::-1]


def masked_gram_eigvals(X: Array, mask: NDArray[np.bool_]) -> Array:
    """lambda_1(G_m) >= ... >= lambda_n(G_m), G_m = X M X^T: the Hessian's nonzero spectrum."""
    XS = _kept(X, mask)
    return np.linalg.eigvalsh(XS @ XS.T)[::-1]


def theorem51_deviation(n: int, d: int, delta: float = 0.05, entry_bound: float = 1.0) -> float:
    """Theorem 5.1's deviation: with prob. >= 1 - delta over m, for all i,
    |lambda_i(X M X^T) - p lambda_i(X X^T)| <= B^2 n sqrt(2 d (4 n + ln(1/delta))),  B = max|X_ij|.

    Reconstructed from appendix A.3 (the formulas were lost, the steps survived): with
    Z = X (M - pI) X^T and columns x^(j) of X, Lemma A.1 gives for unit u
    E exp(t u^T Z u) <= exp(t^2/8 sum_j (u^T x^(j))^4) <= exp(t^2 d n^2 / 8)   (m_j - p lies in an
    interval of length 1, so it is 1/2-sub-Gaussian; Cauchy-Schwarz gives (u^T x^(j))^2 <= n).
    A 1/8-net of N <= 17^n unit vectors has ||Z|| <= 2 max_k |u_k^T Z u_k| (Wainwright, Thm 6.5),
    so E exp(t ||Z||) <= 2 * 17^n exp(t^2 d n^2 / 2) <= exp(t^2 d n^2 / 2 + 4 n). Chernoff with
    t = s / (d n^2) gives P(||Z|| >= s) <= exp(-s^2 / (2 d n^2) + 4 n); setting this to delta gives
    s above, and Weyl's inequality turns ||Z|| into the eigenvalue statement. The theorem assumes
    entries in [-1, 1]; for |X_ij| <= B, Z scales by B^2.
    """
    check_delta(delta)
    return entry_bound**2 * n * math.sqrt(2.0 * d * (4.0 * n + math.log(1.0 / delta)))


def bernstein_deviation(X: Array, p: float, delta: float = 0.05) -> float:
    """Reference only (NOT from the paper): matrix Bernstein (Tropp 2015, Thm 6.1.1) for
    Z = sum_j (m_j - p) x^(j) x^(j)^T: with prob. >= 1 - delta,
    ||Z|| <= sqrt(2 v ln(2n/delta)) + L ln(2n/delta) / 3,
    v = p(1-p) ||sum_j ||x^(j)||^2 x^(j) x^(j)^T||,  L = max(p, 1-p) max_j ||x^(j)||^2.
    Shown next to Theorem 5.1 because its constants are tight enough to be informative at small n, d.
    """
    p = check_p(p)
    col_sq = (X * X).sum(axis=0)  # ||x^(j)||^2, (d,)
    v = p * (1.0 - p) * np.linalg.eigvalsh((X * col_sq) @ X.T)[-1]
    log_term = math.log(2.0 * X.shape[0] / delta)
    return math.sqrt(2.0 * v * log_term) + max(p, 1.0 - p) * col_sq.max() * log_term / 3.0


def stable_lr(X: Array, mask: NDArray[np.bool_]) -> float:
    """Proposition 5.2's threshold 2 / lambda_1(X M X^T): GD on (1) converges from every
    initialisation iff lr < this (appendix A.1: the error evolves by I - lr M X^T X M)."""
    return 2.0 / masked_gram_eigvals(X, mask)[0]


def loss(X: Array, y: Array, mask: NDArray[np.bool_], delta: Array, w0: Array | None = None) -> float:
    """L(Delta) = 1/2 ||X (w0 + m * Delta) - y||^2, the paper's objective (1)."""
    w = (0.0 if w0 is None else w0) + np.where(mask, delta, 0.0)
    r = X @ w - y
    return 0.5 * float(r @ r)


@dataclass(frozen=True)
class GDResult:
    """Outcome of ``gd_masked``: the final shift (length d, zero off the mask) and the loss curve."""

    delta: Array
    losses: Array  # losses[t] = L(Delta_t), t = 0..steps_run
    converged: bool  # gradient norm fell below tol * initial gradient norm
    diverged: bool  # loss became non-finite or exceeded blowup * initial loss
    steps_run: int


def gd_masked(
    X: Array,
    y: Array,
    mask: NDArray[np.bool_],
    lr: float,
    steps: int = 5000,
    w0: Array | None = None,
    tol: float = 1e-12,
    blowup: float = 1e8,
) -> GDResult:
    """Full-batch GD on the masked coordinates: Delta <- Delta - lr * m * X^T (X (w0 + m Delta) - y),
    from Delta = 0 (the paper's initialisation). Stops early on convergence or divergence.

    Only the kept columns are touched: the gradient is zero off the mask, so those entries stay 0.
    """
    XS = _kept(X, mask)  # (n, k)
    target = y - (0.0 if w0 is None else X @ w0)  # merge X w0 into y, as the paper does
    w = np.zeros(XS.shape[1])
    r = -target  # residual X_S w - target at w = 0
    losses = [0.5 * float(r @ r)]
    g0 = float(np.linalg.norm(XS.T @ r))
    converged = diverged = False
    for _ in range(steps):
        g = XS.T @ r  # dL/dw on the kept coordinates, (k,)
        if float(np.linalg.norm(g)) <= tol * g0:
            converged = True
            break
        w -= lr * g
        r = XS @ w - target
        losses.append(0.5 * float(r @ r))
        # why a loss test: above 2/lambda_1 the top eigen-mode grows geometrically, so the loss explodes
        if not math.isfinite(losses[-1]) or losses[-1] > blowup * max(losses[0], 1e-300):
            diverged = True
            break
    else:
        converged = float(np.linalg.norm(XS.T @ r)) <= tol * g0
    delta = np.zeros(X.shape[1])
    delta[mask] = w
    return GDResult(
        delta=delta,
        losses=np.asarray(losses),
        converged=converged,
        diverged=diverged,
        steps_run=len(losses) - 1,
    )


def min_norm_solution(X: Array, y: Array, mask: NDArray[np.bool_], w0: Array | None = None) -> Array:
    """Delta_inf = (X M)^+ (y - X w0), zero off the mask: appendix A.1's limit of GD from 0.

    GD from zero never leaves the row space of X_S, so its limit is the minimum-norm (least-
    squares) solution on the kept coordinates; computed by an SVD-based lstsq.
    """
    XS = _kept(X, mask)
    target = y - (0.0 if w0 is None else X @ w0)
    delta = np.zeros(X.shape[1])
    delta[mask] = np.linalg.lstsq(XS, target, rcond=None)[0]
    return delta


def expected_sq_norm(X: Array, mask: NDArray[np.bool_], w_star: Array, sigma: float) -> float:
    """Exact E_noise ||Delta_inf||^2 = ||X_S^+ X w*||^2 + sigma^2 ||X_S^+||_F^2 (= ... + sigma^2 tr G_m^{-1}
    when G_m is invertible), for the target X w* + noise. The quantity Proposition 5.3 lower-bounds."""
    pinv = np.linalg.pinv(_kept(X, mask))  # (k, n)
    return float(np.sum((pinv @ (X @ w_star)) ** 2) + sigma**2 * np.sum(pinv**2))


def prop53_lower_bound(X: Array, mask: NDArray[np.bool_], w_star: Array, sigma: float) -> float:
    """Proposition 5.3: E_noise ||Delta_inf||^2 >= (||X w*||^2 + n sigma^2) / lambda_1(X M X^T).

    Reconstructed (the formula was lost; only "expected norm ... ground truth w* ... noise variance
    sigma^2 ... expectation over the noise" survived): with G_m invertible, Delta_inf = X_S^T G_m^{-1} y,
    so ||Delta_inf||^2 = y^T G_m^{-1} y and E ||Delta_inf||^2 = (X w*)^T G_m^{-1} (X w*) + sigma^2 tr G_m^{-1}
    >= (||X w*||^2 + n sigma^2) / lambda_1(G_m). With Theorem 5.1 (lambda_1(G_m) ~ p lambda_1) the
    bound grows like 1/p. Requires G_m invertible (rank n, so at least n kept coordinates).
    """
    eig = masked_gram_eigvals(X, mask)
    n = X.shape[0]
    if eig[-1] <= 1e-10 * eig[0]:
        raise ValueError(
            f"Proposition 5.3 needs X M X^T invertible, but it is singular (mask keeps {int(mask.sum())} "
            f"coordinates for n={n} samples); use a larger p or d"
        )
    return (float(np.sum((X @ w_star) ** 2)) + n * sigma**2) / float(eig[0])
