"""The factorisations: one layer's weight W [N, C*k2] (BN folded) and bias b become a rank-r pair.

Each returns (A [r, C*k2], P [N, r], bias [N]) with y' = P (A x) + bias:

- `svd_factors`: truncated SVD of W (no data).
- `linear_factors` (linear case of Zhang et al. 2015, "Efficient and Accurate Approximations of
  Nonlinear Convolutional Networks"): PCA of the sampled responses y; with U_r the top-r eigenvectors of
  their covariance, M = U_r U_r^T and y' = M y + (I - M) ybar: A = U_r^T W, P = U_r, bias M b + (I - M) ybar.
- `nonlinear_factors`: where the layer feeds a ReLU/ReLU6, minimise sum ||act(y) - act(M y + b)||^2 over
  rank-r M by the paper's relaxation (auxiliary z, alternating a reduced-rank regression for (M, b)
  with a closed-form per-element z update while the penalty lambda grows), started from the linear
  solution, on the calibration images outside a held-out share (`holdout_images`); the best iterate is
  kept only if its post-activation error on the held-out images is below the linear solution's, so per
  layer the nonlinear case is never worse than the linear one there.
- `rrr`: the reduced-rank regression behind the asymmetric fit (sec. 3.3), responses X of the
  approximated network against the original's Y.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch

from .eligible import LayerInfo
from .responses import Responses, pca

__all__ = ["svd_factors", "linear_factors", "nonlinear_factors", "rrr", "linear_start", "holdout_images", "row_mask",
           "nonlinear_label", "HOLDOUT_FRACTION", "Factors", "LowRankMap"]

#: (A [r, C*k2], P [N, r], bias [N] or None): y' = P (A x) + bias
Factors = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]
#: (P [N, r], Q [r, N], c [N]): the rank-r map y' = P Q y + c on a layer's responses
LowRankMap = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]

#: share of the calibration images held out to check the nonlinear solution against the linear one
HOLDOUT_FRACTION = 0.2


def svd_factors(info: LayerInfo, r: int) -> Factors:
    U, S, Vh = torch.linalg.svd(info.weight, full_matrices=False)
    return Vh[:r], U[:, :r] * S[:r], info.bias.clone()


def linear_factors(info: LayerInfo, resp: Responses, r: int) -> Factors:
    U = resp.evecs[:, :r]
    M = U @ U.T
    bias = M @ info.bias + resp.mean - M @ resp.mean  # M b + (I - M) ybar
    return U.T @ info.weight, U, bias


def _pca_map(resp: Responses, r: int) -> LowRankMap:
    """The linear case as a map on responses: y' = U U^T y + (I - U U^T) ybar."""
    U = resp.evecs[:, :r]
    return U, U.T.clone(), resp.mean - U @ (U.T @ resp.mean)


def rrr(Y: torch.Tensor, X: torch.Tensor, r: int) -> LowRankMap:
    """Reduced-rank regression of Y on X: (P [N, r], Q [r, N], c) minimising ||Y - (P Q X + c)||^2.

    The asymmetric linear case (Zhang et al. 2015, sec. 3.3): X are the layer's responses to the
    *approximated* network's inputs, Y the original network's; with X = Y it is the response PCA.
    """
    xbar, ybar = X.mean(0), Y.mean(0)
    Xc, Yc = X - xbar, Y - ybar
    Sxx = Xc.T @ Xc
    Sxx.diagonal().add_(1e-10 * float(Sxx.diagonal().mean()) + 1e-30)  # near-exact: X is often ~Y
    B = torch.linalg.solve(Sxx, Xc.T @ Yc).T  # OLS: Yc ~ Xc B^T
    Fit = Xc @ B.T
    _, evecs = torch.linalg.eigh(Fit.T @ Fit)
    P = evecs[:, -r:].flip(1)
    Q = P.T @ B
    return P, Q, ybar - P @ (Q @ xbar)


def linear_start(Y: torch.Tensor, X: Optional[torch.Tensor], r: int) -> LowRankMap:
    """The linear solution (P, Q, c) with y' = P Q x + c: response PCA (X None: x = y) or reduced-rank
    regression of Y on X (asymmetric)."""
    return _pca_map(pca(Y), r) if X is None else rrr(Y, X, r)


def _act(x: torch.Tensor, kind: str) -> torch.Tensor:
    return x.clamp(0, 6) if kind == "relu6" else x.clamp_min(0)


def _z_step(t: torch.Tensor, p: torch.Tensor, lam: float, kind: str) -> torch.Tensor:
    """argmin_z (t - act(z))^2 + lam (z - p)^2, element-wise, for act = ReLU or ReLU6 (t = act(y))."""
    z0 = p.clamp_max(0)  # region z <= 0: act(z) = 0
    c0 = t ** 2 + lam * (z0 - p) ** 2
    hi = 6.0 if kind == "relu6" else float("inf")
    z1 = ((lam * p + t) / (1 + lam)).clamp(0, hi)  # region 0 <= z (<= 6): act(z) = z
    c1 = (t - z1) ** 2 + lam * (z1 - p) ** 2
    z = torch.where(c0 < c1, z0, z1)
    if kind == "relu6":
        c = torch.minimum(c0, c1)
        z2 = p.clamp_min(6)  # region z >= 6: act(z) = 6
        c2 = (t - 6) ** 2 + lam * (z2 - p) ** 2
        z = torch.where(c2 < c, z2, z)
    return z


def _post_act_error(Y: torch.Tensor, X: torch.Tensor, kind: str) -> Callable[..., float]:
    """error(P, Q, b, rows): sum of ||act(y) - act(P Q x + b)||^2 over the chosen rows."""
    def error(P: torch.Tensor, Q: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> float:
        Xr = X[rows]
        return float(((_act(Y[rows], kind) - _act(Xr @ Q.T @ P.T + b, kind)) ** 2).sum())
    return error


def _iterates(T: torch.Tensor, Xf: torch.Tensor, start: LowRankMap, r: int, kind: str, iters: int, lam0: float,
              growth: float) -> Iterator[LowRankMap]:
    """The relaxation's iterates from `start` (T = act(y) of the same rows as the inputs Xf).

    (1) z-step: per element argmin (act(y) - act(z))^2 + lam (z - M x - b)^2; (2) (M, b)-step:
    min ||z - M x - b||^2 s.t. rank(M) <= r, a reduced-rank regression (OLS, then the projection of its
    fitted values on their top-r principal directions: the generalised-SVD solution). lam grows by `growth`.
    """
    N = Xf.shape[1]
    xbar = Xf.mean(0)
    Xc = Xf - xbar
    Sxx = Xc.T @ Xc
    ridge = 1e-6 * float(Sxx.diagonal().mean()) + 1e-12
    Sxx_chol = torch.linalg.cholesky(Sxx + ridge * torch.eye(N, dtype=Xf.dtype))
    P, Q, b = start
    lam = lam0
    for _ in range(iters):
        Z = _z_step(T, Xf @ Q.T @ P.T + b, lam, kind)
        zbar = Z.mean(0)
        Zc = Z - zbar
        B = torch.cholesky_solve((Zc.T @ Xc).T, Sxx_chol).T  # OLS B = Zc^T Xc Sxx^-1
        Fit = Xc @ B.T
        _, evecs = torch.linalg.eigh(Fit.T @ Fit)
        P = evecs[:, -r:].flip(1)
        Q = P.T @ B
        b = zbar - P @ (Q @ xbar)
        yield P, Q, b
        lam *= growth


def nonlinear_factors(info: LayerInfo, resp: Responses, r: int, iters: int = 25, lam0: float = 0.01,
                      growth: float = 1.5, X: Optional[torch.Tensor] = None, raw: bool = False,
                      holdout: Optional[torch.Tensor] = None) -> Tuple[Any, Dict[str, Any]]:
    """Zhang et al. 2015 nonlinear case: min ||act(y) - act(M y + b)||^2 over rank(M) <= r, with a
    fallback to the linear solution where it does not generalise.

    `holdout` (bool per row, whole images) splits the rows: the solver runs on the others, starting from
    their linear solution, and keeps its best iterate there; its post-activation error on the held-out
    rows is then compared with that of the linear solution fitted on ALL rows (what the linear case
    returns), and the linear solution is returned unless the nonlinear one is strictly better.
    stats["method"] says which won. X: the asymmetric fit's inputs (None: x = y). raw: return the map
    (P, Q, c) on responses instead of the layer's factors.
    """
    kind = info.act or "relu"
    Y_all = resp.Y
    X_all = Y_all if X is None else X
    lin = _pca_map(resp, r) if X is None else rrr(Y_all, X, r)  # the linear case, from all rows
    use_holdout = holdout is not None and bool(holdout.any()) and bool((~holdout).any())
    fit = ~holdout if use_holdout else torch.ones(Y_all.shape[0], dtype=torch.bool)
    test = holdout if use_holdout else fit
    Y, Xf = Y_all[fit], X_all[fit]
    error = _post_act_error(Y_all, X_all, kind)
    start = linear_start(Y, None if X is None else Xf, r) if use_holdout else lin
    start_err = error(*start, fit)
    obj, (P, Q, b) = start_err, start
    for m in _iterates(_act(Y, kind), Xf, start, r, kind, iters, lam0, growth):
        err = error(*m, fit)
        if err < obj:
            obj, (P, Q, b) = err, m
    n, n_test = max(Y.shape[0], 1), max(int(test.sum()), 1)
    e_lin, e_non = error(*lin, test) / n_test, error(P, Q, b, test) / n_test
    won = e_non < e_lin
    stats: Dict[str, Any] = {"linear_obj": start_err / n, "nonlinear_obj": obj / n,
                             "heldout_linear": e_lin, "heldout_nonlinear": e_non, "heldout_rows": int(test.sum()),
                             "heldout": use_holdout, "method": "nonlinear" if won else "linear"}
    if not won:
        P, Q, b = lin
    if raw:  # y' = P Q y + b
        return (P, Q, b), stats
    return (Q @ info.weight, P, P @ (Q @ info.bias) + b), stats  # y' = P Q (W x + b0) + b


def holdout_images(n_images: int, seed: int) -> torch.Tensor:
    """Bool per calibration image: held out from the nonlinear fit (about HOLDOUT_FRACTION, at least one
    image on each side when there are two or more)."""
    if n_images < 2:
        return torch.zeros(n_images, dtype=torch.bool)
    k = min(n_images - 1, max(1, int(round(HOLDOUT_FRACTION * n_images))))
    gen = torch.Generator().manual_seed(int(seed) + 7919)  # its own stream, apart from the position draws
    mask = torch.zeros(n_images, dtype=torch.bool)
    mask[torch.randperm(n_images, generator=gen)[:k]] = True
    return mask


def row_mask(images: torch.Tensor, n_rows: int) -> Optional[torch.Tensor]:
    """Per-row mask from a per-image mask (rows are image-major, the same count per image)."""
    n_img = images.numel()
    if n_img == 0 or n_rows % n_img:
        return None
    return images.repeat_interleave(n_rows // n_img)


def nonlinear_label(info: LayerInfo, stats: Mapping[str, Any]) -> str:
    """report["method"] of a layer the nonlinear case was asked for."""
    if stats["method"] == "nonlinear":
        return f"nonlinear({info.act})"
    return "linear (nonlinear did not lower the held-out error)"
