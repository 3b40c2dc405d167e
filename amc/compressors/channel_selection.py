"""Which units of a channel group to keep, from the units' response Gram matrix (He et al., ICCV 2017).

The contribution of unit u to a consumer's output is Z_u = X_u W_u^T; every rule here sees only
G[u, v] = <Z_u, Z_v>: LASSO ("lasso", by LARS on G), the k largest responses ("max_response") or the
first k ("first_k", the naive baseline).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

SELECTIONS = ("lasso", "first_k", "max_response")

__all__ = ["SELECTIONS", "unit_gram", "lasso_select", "choose_units"]


def unit_gram(xs: torch.Tensor, w: torch.Tensor, unit_index: np.ndarray, n_units: int, kk: int) -> torch.Tensor:
    """G[u, v] = <Z_u, Z_v> summed over rows and outputs, Z_u = X[:, cols(u)] W[:, cols(u)]^T.

    xs: [R, C * kk] input rows, w: [out, C * kk]; unit_index: channel -> unit (or -1).
    """
    ui = torch.as_tensor(unit_index, dtype=torch.long)
    cols = torch.nonzero(ui >= 0).flatten()
    c = len(unit_index)
    xs3, w3 = xs.reshape(-1, c, kk)[:, cols], w.reshape(-1, c, kk)[:, cols]
    xs2, w2 = xs3.reshape(xs3.shape[0], -1).float(), w3.reshape(w3.shape[0], -1).float()
    d = xs2.shape[1]
    if xs2.shape[0] * w2.shape[0] <= (xs2.shape[0] + w2.shape[0]) * kk * kk and d > 0:
        # few rows x outputs: Z directly is cheaper than the (C kk)^2 second moments
        z = torch.einsum("rck,ock->rco", xs3.float(), w3.float())  # [R, C', out]
        zc = z.permute(1, 0, 2).reshape(len(cols), -1).double()
        gc = zc @ zc.T
    else:
        s = xs2.T @ xs2  # [d, d]
        m = w2.T @ w2
        gc = (s * m).reshape(len(cols), kk, len(cols), kk).sum((1, 3)).double()
    onehot = torch.zeros(len(cols), n_units, dtype=torch.float64)
    onehot[torch.arange(len(cols)), ui[cols]] = 1.0
    return onehot.T @ gc @ onehot


def lasso_select(gram: torch.Tensor, k: int, alpha_init: float = 1e-4) -> Tuple[np.ndarray, np.ndarray]:
    """Keep k units: LASSO on ||sum_u Z_u - sum_u b_u Z_u||^2 given only G = <Z_u, Z_v>.

    LARS (lasso path) from the Gram matrix; the first point of the path with >= k nonzeros gives the
    kept units (top-k |beta| if more). If the path stalls before k, sklearn Lasso on a Cholesky factor
    of G (an n x n design with the same Gram) with an alpha search starting at `alpha_init`.
    Returns (kept unit indices, beta).
    """
    from sklearn.linear_model import lars_path_gram

    g = gram.double().numpy()
    n = g.shape[0]
    if k >= n:
        return np.arange(n), np.ones(n)
    scale = float(np.trace(g)) / n or 1.0
    g = g / scale
    xy = g.sum(1)  # target sum_u Z_u: <Z_u, target> = (G 1)_u
    beta = None
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, _, coefs = lars_path_gram(xy, g, n_samples=n, method="lasso", max_iter=8 * n)
        nnz = (np.abs(coefs) > 0).sum(0)
        hit = np.flatnonzero(nnz >= k)
        if len(hit):
            beta = coefs[:, hit[0]]
    except (ValueError, np.linalg.LinAlgError, FloatingPointError):  # numerically stuck
        beta = None
    if beta is None:
        beta = _lasso_fallback(g, xy, k, alpha_init)
    order = np.argsort(-np.abs(beta), kind="stable")
    kept = np.sort(order[:k])
    return kept, beta


def _lasso_fallback(g: np.ndarray, xy: np.ndarray, k: int, alpha_init: float) -> np.ndarray:
    import warnings

    from sklearn.linear_model import Lasso

    n = g.shape[0]
    scale = max(float(np.trace(g)) / n, 1e-12)
    for rel in (1e-8, 1e-6, 1e-4, 1e-2):  # a Gram matrix of few, collinear samples is only semi-definite
        try:
            lchol = np.linalg.cholesky(g + rel * scale * np.eye(n))
            break
        except np.linalg.LinAlgError:
            continue
    else:
        raise np.linalg.LinAlgError("response Gram matrix is not positive definite even with 1% jitter")
    xd = lchol.T  # xd^T xd = g
    yd = np.linalg.solve(lchol, xy)  # xd^T yd = xy
    alpha = float(alpha_init) if alpha_init and alpha_init > 0 else 1e-4
    best, lo, hi = None, 0.0, None
    for _ in range(40):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            coef = Lasso(alpha=alpha, fit_intercept=False, max_iter=5000).fit(xd, yd).coef_
        nnz = int((np.abs(coef) > 0).sum())
        if nnz <= k:
            best, hi = coef, alpha
            if nnz == k:
                break
            alpha = (lo + hi) / 2
        else:
            if best is None:
                best = coef
            lo = alpha
            alpha = alpha * 2 if hi is None else (lo + hi) / 2
    return best


def choose_units(selection: str, gram: torch.Tensor, k: int, alpha_init: float) -> np.ndarray:
    n = gram.shape[0]
    if k >= n:
        return np.arange(n)
    if selection == "first_k":
        return np.arange(k)
    if selection == "max_response":
        resp = torch.diagonal(gram).numpy()
        return np.sort(np.argsort(-resp, kind="stable")[:k])
    return lasso_select(gram, k, alpha_init)[0]
