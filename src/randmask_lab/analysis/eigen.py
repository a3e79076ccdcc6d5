"""Extreme eigenvalues of a symmetric operator given only as v -> A v (power iteration, Lanczos).

Which eigenvalue: the paper's λ_max is the *top* (largest, algebraic) Hessian eigenvalue, the
curvature that bounds gradient descent's stable step (lr < 2/λ_max). Plain power iteration
instead converges to the eigenvalue of largest *magnitude*, which is a negative one when the
loss is more concave along some direction than it is convex along any. So with
``which="top"`` we run power iteration once; if the dominant eigenvalue λ_dom is negative we
run it again on A - λ_dom·I, whose spectrum lies in [0, λ_max - λ_dom] with λ_max - λ_dom
dominant, and shift the answer back. ``which="magnitude"`` returns the signed dominant
eigenvalue (±spectral norm, the smoothness constant) and stops after the first run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]
Which = Literal["top", "magnitude"]


@dataclass
class EigenResult:
    """Outcome of power iteration.

    Attributes:
        eigenvalue: the reported eigenvalue (top algebraic for ``which="top"``, else signed dominant).
        iterations: matrix-vector products used in total (both runs when a shift was needed).
        converged: whether every run met the tolerance within its iteration cap.
        trace: successive estimates of ``eigenvalue`` (Rayleigh quotients, shifted back if shifted).
        largest_magnitude: the signed eigenvalue of largest |λ| found by the first run.
        shifted: whether a second, shifted run was needed (the dominant eigenvalue was negative).
        residual: ||A v - λ v|| / |λ| at the final vector, an accuracy check (0 is exact).
        vector: that final unit vector v (the eigenvector estimate), for ``eigenvector_localization``.
    """

    eigenvalue: float
    iterations: int
    converged: bool
    trace: list[float] = field(default_factory=list)
    largest_magnitude: float = float("nan")
    shifted: bool = False
    residual: float = float("nan")
    vector: torch.Tensor | None = field(default=None, repr=False, compare=False)  # unit; Rayleigh quotient = eigenvalue


@dataclass
class _Run:
    value: float
    iterations: int
    converged: bool
    trace: list[float]
    residual: float
    vector: torch.Tensor | None = None


def random_unit(dim: int, seed: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A unit vector with i.i.d. normal entries from ``seed`` (same seed, same vector, any device)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, generator=gen, dtype=torch.float64)
    return (v / v.norm()).to(device=device, dtype=dtype)


def _power(matvec: MatVec, v: torch.Tensor, tol: float, max_iter: int, shift: float = 0.0) -> _Run:
    """Power iteration on ``matvec`` (= A - shift·I when ``shift`` is set); tolerances are relative to the
    eigenvalue of A itself (the shifted one is larger, ~3x the answer in practice, and would stop early)."""
    trace: list[float] = []
    residual = float("nan")
    for it in range(1, max_iter + 1):
        av = matvec(v)
        if not torch.isfinite(av).all():
            raise FloatingPointError("the operator returned non-finite values; check the loss and dtype.")
        lam = float(v @ av)  # Rayleigh quotient: v is a unit vector
        trace.append(lam)
        norm = float(av.norm())
        if norm == 0.0:  # A v = 0 for a random v: A = 0 almost surely
            return _Run(0.0, it, True, trace, 0.0, v)
        scale = abs(lam + shift)  # |the estimate of A's eigenvalue|; (A - sI)v - λv = Av - (λ + s)v: same residual
        residual = float((av - lam * v).norm()) / scale if scale else float("inf")
        # Stop when the estimate settles AND the residual is small. The change alone stops falsely where the
        # eigengap is small (each step then moves the estimate little while it is still far off: 17% low, marked
        # converged). The Rayleigh quotient's error is at most residual² / gap, so a residual of sqrt(tol) keeps it
        # near tol unless the gap is tiny; some eigenvalue always lies within the residual (Bauer-Fike).
        if it > 1 and abs(lam - trace[-2]) <= tol * scale and residual <= tol ** 0.5:
            return _Run(lam, it, True, trace, residual, v)
        v = av / norm
    return _Run(trace[-1], max_iter, False, trace, residual, v)


def power_iteration(matvec: MatVec, dim: int, *, tol: float = 1e-3, max_iter: int = 100, seed: int = 0,
                    which: Which = "top", dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> EigenResult:
    """An extreme eigenvalue of the symmetric operator ``matvec`` on R^dim by power iteration.

    Stops when the estimate changes by at most ``tol`` (relative) between iterations and the relative residual
    ``||A v - λ v|| / |λ|`` is at most ``sqrt(tol)``, or after ``max_iter`` products per run; the latter is
    reported (``converged=False`` and a ``RuntimeWarning``), never an error. See the module docstring for ``which``.
    """
    if dim < 1:
        raise ValueError("the operator has dimension 0: there is no eigenvalue to compute.")
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}.")
    if which not in ("top", "magnitude"):
        raise ValueError(f"which must be 'top' or 'magnitude', got {which!r}.")
    start = random_unit(dim, seed, dtype, device)
    first = _power(matvec, start, tol, max_iter)
    result = EigenResult(first.value, first.iterations, first.converged, first.trace, first.value,
                         False, first.residual, first.vector)
    if which == "top" and first.value < 0:
        shift = first.value
        second = _power(lambda v: matvec(v) - shift * v, start, tol, max_iter, shift)
        top = second.value + shift
        result = EigenResult(top, first.iterations + second.iterations, first.converged and second.converged,
                             [t + shift for t in second.trace], first.value, True, second.residual, second.vector)
    if not result.converged:
        warnings.warn(
            f"power iteration did not reach tol={tol} within max_iter={max_iter} "
            f"(last estimate {result.eigenvalue:.6g}, relative residual {result.residual:.3g}); "
            "raise max_iter or tol, or use more batches if the estimate oscillates.",
            RuntimeWarning, stacklevel=2,
        )
    return result


def lanczos(matvec: MatVec, dim: int, k: int = 1, *, steps: int | None = None, seed: int = 0,
            dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> list[float]:
    """The ``k`` largest (algebraic) eigenvalues of a symmetric operator, descending, by Lanczos.

    Uses ``steps`` matrix-vector products (default ``max(2k + 10, 20)``, at most ``dim``) and full
    reorthogonalisation, so it stores ``steps`` vectors of length ``dim``. The extreme Ritz values
    converge first; raise ``steps`` if the k-th one matters (:func:`lanczos_with_bounds` says how far
    each one may be off). Fewer than ``k`` values are returned only if the Krylov space is exhausted
    (``dim`` or an invariant subspace is smaller than ``k``).
    """
    return lanczos_with_bounds(matvec, dim, k, steps=steps, seed=seed, dtype=dtype, device=device)[0]


def lanczos_with_bounds(matvec: MatVec, dim: int, k: int = 1, *, steps: int | None = None, seed: int = 0,
                        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
                        ) -> tuple[list[float], list[float]]:
    """:func:`lanczos`'s values and, for each, its residual norm ``|β_m s_m|`` (the last Lanczos coefficient times
    the last entry of its eigenvector of T): some eigenvalue of the operator lies within it of the Ritz value, so
    a bound far above the gaps between values says raise ``steps`` (the top-5 past the second were 5% low)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    steps = min(dim, steps if steps is not None else max(2 * k + 10, 20))
    if steps < k:
        raise ValueError(f"steps={steps} < k={k}: Lanczos needs at least k steps; raise steps.")
    q = random_unit(dim, seed, dtype, device)
    basis, alphas, betas = [q], [], []
    last_beta = 0.0  # β_m: the norm of the residual direction past the last basis vector (0: invariant subspace)
    for j in range(steps):
        w = matvec(basis[-1])
        alphas.append(float(basis[-1] @ w))
        # Full reorthogonalisation (twice: "twice is enough") keeps the basis orthonormal in
        # floating point, so no spurious copies of converged eigenvalues appear in T.
        Q = torch.stack(basis)  # (j + 1, dim)
        for _ in range(2):
            w = w - Q.t() @ (Q @ w)
        beta = float(w.norm())
        if beta <= 1e-10 * max(abs(a) for a in alphas + [1e-30]):
            break  # the Krylov space is an invariant subspace: T's eigenvalues are exact
        if j == steps - 1:
            last_beta = beta
            break
        betas.append(beta)
        basis.append(w / beta)
    # T = Qᵀ A Q is tridiagonal; its eigenvalues (Ritz values) approximate A's extreme ones.
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    ritz, vectors = torch.linalg.eigh(T)  # ascending
    ritz, vectors = ritz.flip(0), vectors.flip(1)
    bounds = (last_beta * vectors[-1, :].abs()).tolist()
    return [float(x) for x in ritz[:k]], [float(b) for b in bounds[:k]]
