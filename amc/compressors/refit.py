"""Least-squares reconstruction of a pruned layer: re-fit its kept weights so that the pruned inputs
reproduce the original outputs (ChannelPruning and the linear least-squares compressor share it)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["fit_layer", "relative_error"]


def fit_layer(xs: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, b0: Optional[torch.Tensor],
              ridge: float) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Ridge least squares: argmin ||X W^T + 1 b^T - Y||^2 + lam ||W - W0||^2 (b unpenalised, if any).

    lam = ridge * mean(diag(X^T X)). Solved for the correction D = W - W0 on the residual
    E = Y - X W0^T (centred when there is a bias), in the primal (d x d) or, with fewer rows than
    columns, the dual (R x R) form, in float64. Returns (W [out, d], b [out] or None).
    """
    x = xs.double()
    w0d = w0.double()
    e = y.double() - x @ w0d.T
    if b0 is not None:
        xm, em = x.mean(0, keepdim=True), e.mean(0, keepdim=True)
        x, e = x - xm, e - em
    r, d = x.shape
    lam = ridge * float(x.pow(2).sum()) / max(d, 1)
    lam = max(lam, 1e-12)
    if d <= r:
        a = x.T @ x
        a.diagonal().add_(lam)
        delta_t = torch.linalg.solve(a, x.T @ e)  # [d, out]
    else:
        k = x @ x.T
        k.diagonal().add_(lam)
        delta_t = x.T @ torch.linalg.solve(k, e)
    w = w0d + delta_t.T
    b = None
    if b0 is not None:
        b = (em - xm @ delta_t).flatten()  # intercept of the residual fit: b = mean(Y) - mean(X) W^T
    return w, b


def relative_error(pred: torch.Tensor, y: torch.Tensor) -> float:
    """||pred - y||^2 / ||y||^2."""
    return float((pred.float() - y.float()).pow(2).sum() / y.float().pow(2).sum().clamp_min(1e-30))
