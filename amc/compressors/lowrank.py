"""Low-rank decomposition: one k x k conv (or Linear) becomes two thinner layers.

    C --[k x k conv, C->N]--> N      becomes      C --[k x k conv, C->r, no bias]--> r --[1x1 conv, r->N]--> N
    in --[Linear in->out]--> out     becomes      in --[Linear in->r, no bias]--> r --[Linear r->out]--> out

A pass over a ReconstructedNetwork that returns a NEW network (the input is never edited): the first
factor is inserted as node ``<name>.lr0`` reading the original node's inputs, and the second factor
keeps the original node's NAME (and module key), so every consumer's ``Ref`` stays valid.

Three ways to find the factors (``method`` / ``nonlinear_case``):

- ``method="svd"``: truncated SVD of the weight reshaped to ``[N, C*k*k]`` (no data).
- ``method="data"`` (linear case of Zhang et al. 2015, "Efficient and Accurate Approximations of
  Nonlinear Convolutional Networks"): PCA of the layer's sampled output responses ``y``; with ``U_r``
  the top-r eigenvectors of their covariance, ``M = U_r U_r^T`` and ``y' = M y + (I - M) ybar``:
  first factor ``U_r^T W``, second ``U_r`` with bias ``M b + (I - M) ybar``.
- ``nonlinear_case=True``: where the layer feeds a ReLU/ReLU6, minimise
  ``sum ||act(y) - act(M y + b)||^2`` over rank-r ``M`` by the paper's relaxation (auxiliary ``z``,
  alternating a reduced-rank regression for ``(M, b)`` with a closed-form per-element ``z`` update
  while the penalty ``lambda`` grows), started from the linear solution, on 80% of the calibration
  images; the best iterate there is kept only if its post-ReLU error on the other 20% (held out) is
  below the linear solution's, else the layer gets exactly the linear solution: per layer, nonlinear is
  never worse than linear on held-out samples. Layers not followed by a ReLU use the linear case (logged).

A conv whose only user is a BatchNorm2d gets the BN folded into it first (``fold_bn=True``, the default,
for every method), so the approximated response is the BN output; the BN node disappears and its users
read the second factor. With ``fold_bn=False`` the BN stays and a nonlinear request falls back to the
linear case for that layer (logged).

Sampling: ``sampled_pixels_per_img`` output positions per calibration image, or (None, the default) as
many as 16 rows per output channel N need (the fit is an N x N covariance / regression), at least 10
per image; calibration images and positions come from ``seed`` alone.

Rank per layer: from ``compress_ratio`` (the fraction of that layer's weight MACs removed, the seed's
meaning, shared with ChannelPruning): ``r = floor((1 - ratio) * C k^2 N / (C k^2 + N))`` (Linear:
``k = 1``); a float decomposes every eligible layer but the one writing the network output
(``decompose_output_layer``); or explicit ``ranks={name: r}``;
or ENC-style selection (Kim et al. 2019, "Efficient Neural Network Compression") under a global MACs
budget: ``rank_selection="energy"`` (PCA energy of the kept components), ``"accuracy"`` (validation
accuracy of the network with only that layer decomposed, measured on a few val batches on a grid of
ranks), ``"combined"`` (their product); the per-layer ranks maximise the product of the per-layer
metrics under the budget (Lagrangian sweep over the convex hull, then a greedy fill).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DataError, PruningError
from ..graph.network import ReconstructedNetwork
from ..graph.node import Node
from ..graph.ops import FunctionOp
from ..graph.template import Ref, iter_refs, rename_refs
from .base import BaseCompressor, Ratio, batch_inputs, check_count, check_names, check_target_macs
from .calibration import DEFAULT_SEED, positions_per_image, warn_underdetermined

logger = logging.getLogger("amc.compressors.lowrank")

__all__ = ["LowRankDecomposition", "LowRankDecompostion", "LayerInfo", "lowrank_rank", "decompose",
           "eligible_layers", "output_layers", "RANK_SELECTIONS", "METHODS"]

METHODS = ("data", "svd")
RANK_SELECTIONS = (None, "energy", "accuracy", "combined")

_RELU_FNS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.relu_: "relu", torch.relu_: "relu"}


# ------------------------------------------------------------------------------------------------
# The layers a low-rank pass can split, and what it needs to know about each.

@dataclass
class LayerInfo:
    """One decomposable layer: a Conv2d (groups=1) or a Linear node, plus its folded BN and activation."""

    name: str  # the conv / linear node
    kind: str  # "conv" | "linear"
    C: int  # input channels (features)
    k2: int  # kernel area (1 for Linear)
    N: int  # output channels (features)
    positions: int  # output positions per sample (H*W for a conv)
    bn: Optional[str] = None  # BatchNorm2d node folded into this layer
    act: Optional[str] = None  # "relu" / "relu6" when the (folded) output feeds only that activation
    has_bias: bool = False
    bn_macs: int = 0  # MACs of the folded BN (removed with it)
    weight: Optional[torch.Tensor] = field(default=None, repr=False)  # [N, C*k2] float64, BN folded
    bias: Optional[torch.Tensor] = field(default=None, repr=False)  # [N] float64 (zeros if none)

    @property
    def fan_in(self) -> int:
        return self.C * self.k2

    @property
    def max_rank(self) -> int:
        """Largest rank that still saves weight MACs: floor(C k^2 N / (C k^2 + N))."""
        return max(1, (self.fan_in * self.N) // (self.fan_in + self.N))

    @property
    def full_rank(self) -> int:
        return min(self.N, self.fan_in)

    def macs_before(self) -> int:
        """MACs of the layer (and its folded BN) as `amc.count` measures them, per sample."""
        return self.positions * (self.fan_in * self.N + (self.N if self.has_bias else 0)) + self.bn_macs

    def macs_after(self, r: int, bias: bool = True) -> int:
        return self.positions * (r * self.fan_in + r * self.N + (self.N if bias else 0))

    def rank_for_ratio(self, ratio: float) -> int:
        return lowrank_rank(self.C, self.k2, self.N, ratio)


def lowrank_rank(C: int, k2: int, N: int, ratio: float) -> int:
    """Rank that removes at least `ratio` of a C->N layer's weight MACs (k2: kernel area; >= 1)."""
    return max(1, int(math.floor((1.0 - float(ratio)) * C * k2 * N / (C * k2 + N) + 1e-9)))


def _act_of(net: ReconstructedNetwork, node: Node) -> Optional[str]:
    mod = net.network[node.module]
    if isinstance(mod, nn.ReLU6):
        return "relu6"
    if isinstance(mod, nn.ReLU):
        return "relu"
    if isinstance(mod, nn.Hardtanh) and float(mod.min_val) == 0.0 and float(mod.max_val) == 6.0:
        return "relu6"
    if isinstance(mod, FunctionOp):
        try:
            return _RELU_FNS.get(mod.fn)
        except TypeError:
            return None
    return None


def _single_input(node: Node) -> Optional[str]:
    refs = list(iter_refs((node.args, node.kwargs)))
    if len(node.args) != 1 or node.kwargs or len(refs) != 1 or refs[0].path:
        return None
    return refs[0].node


def output_layers(net: ReconstructedNetwork, infos: Mapping[str, LayerInfo]) -> List[str]:
    """The decomposable layers that write a network output, directly or through parameter-free
    single-input nodes (flatten, dropout, an activation, a folded BN): a classifier's last Linear."""
    by_name = {n.name: n for n in net.layer_nodes}
    found: List[str] = []
    for ref in iter_refs(net.outputs):
        name = ref.node
        for _ in range(len(by_name)):
            if name in infos:
                found.append(name)
                break
            node = by_name.get(name)
            src = _single_input(node) if node is not None else None
            if src is None:
                break
            mod = net.network[node.module]
            if type(mod) is not nn.BatchNorm2d and any(True for _ in mod.parameters()):
                break  # a layer with weights of its own sits between: that one writes the output
            name = src
    return list(dict.fromkeys(found))


def eligible_layers(net: ReconstructedNetwork, fold_bn: bool = True) -> Dict[str, LayerInfo]:
    """Every Conv2d (groups=1) / Linear node the pass can split, in graph order."""
    users = net.users()
    module_uses: Dict[str, int] = {}
    for n in net.layer_nodes:
        module_uses[n.module] = module_uses.get(n.module, 0) + 1
    out: Dict[str, LayerInfo] = {}
    for node in net.layer_nodes:
        mod = net.network[node.module]
        if type(mod) not in (nn.Conv2d, nn.Linear) or module_uses[node.module] != 1 or _single_input(node) is None:
            continue
        if isinstance(mod, nn.Conv2d) and mod.groups != 1:
            continue
        shape = (node.meta.get("out") or {}).get("shape") if isinstance(node.meta.get("out"), dict) else None
        if not shape:
            continue
        if isinstance(mod, nn.Conv2d):
            info = LayerInfo(node.name, "conv", mod.in_channels, int(np.prod(mod.kernel_size)), mod.out_channels,
                             int(np.prod(shape[2:])), has_bias=mod.bias is not None)
        else:
            info = LayerInfo(node.name, "linear", mod.in_features, 1, mod.out_features,
                             int(np.prod(shape[1:-1])) if len(shape) > 1 else 1, has_bias=mod.bias is not None)
        w = mod.weight.detach().double().reshape(info.N, -1).cpu()
        b = mod.bias.detach().double().cpu() if mod.bias is not None else torch.zeros(info.N, dtype=torch.float64)
        last = node
        u = users.get(node.name, [])
        if fold_bn and info.kind == "conv" and len(u) == 1 and type(net.network[u[0].module]) is nn.BatchNorm2d \
                and _single_input(u[0]) == node.name and module_uses[u[0].module] == 1:
            bn = net.network[u[0].module]
            if bn.track_running_stats and bn.running_mean is not None:
                scale = (bn.weight.detach().double().cpu() if bn.affine else torch.ones(info.N, dtype=torch.float64)) \
                    / torch.sqrt(bn.running_var.detach().double().cpu() + bn.eps)
                shift = bn.bias.detach().double().cpu() if bn.affine else torch.zeros(info.N, dtype=torch.float64)
                w = w * scale[:, None]
                b = (b - bn.running_mean.detach().double().cpu()) * scale + shift
                info.bn = u[0].name
                info.bn_macs = info.positions * info.N * (2 if bn.affine else 1)
                last = u[0]
        lu = users.get(last.name, [])
        if len(lu) == 1 and _single_input(lu[0]) == last.name:
            info.act = _act_of(net, lu[0])
        info.weight, info.bias = w, b
        out[node.name] = info
    return out


# ------------------------------------------------------------------------------------------------
# The factorisations. Each returns (A [r, C*k2], P [N, r], bias [N]) with y' = P (A x) + bias.

def _svd_factors(info: LayerInfo, r: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(info.weight, full_matrices=False)
    return Vh[:r], U[:, :r] * S[:r], info.bias.clone()


@dataclass
class Responses:
    """Sampled responses y = W x + b (BN folded) of one layer, [n, N] float64, with their PCA."""

    Y: torch.Tensor
    mean: torch.Tensor
    evals: torch.Tensor  # descending
    evecs: torch.Tensor  # columns, same order


def _pca(Y: torch.Tensor) -> Responses:
    mean = Y.mean(0)
    Yc = Y - mean
    cov = Yc.T @ Yc / max(1, Y.shape[0])
    evals, evecs = torch.linalg.eigh(cov)
    return Responses(Y, mean, evals.flip(0).clamp_min(0), evecs.flip(1))


def _linear_factors(info: LayerInfo, resp: Responses, r: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U = resp.evecs[:, :r]
    M = U @ U.T
    bias = M @ info.bias + resp.mean - M @ resp.mean  # M b + (I - M) ybar
    return U.T @ info.weight, U, bias


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


def _rrr(Y: torch.Tensor, X: torch.Tensor, r: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _linear_start(Y: torch.Tensor, X: Optional[torch.Tensor], r: int
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The linear solution (P, Q, c) with y' = P Q x + c: response PCA (X None: x = y) or reduced-rank
    regression of Y on X (asymmetric)."""
    if X is None:
        resp = _pca(Y)
        U = resp.evecs[:, :r]
        return U, U.T.clone(), resp.mean - U @ (U.T @ resp.mean)
    return _rrr(Y, X, r)


def _nonlinear_factors(info: LayerInfo, resp: Responses, r: int, iters: int = 25, lam0: float = 0.01,
                       growth: float = 1.5, X: Optional[torch.Tensor] = None, raw: bool = False,
                       holdout: Optional[torch.Tensor] = None
                       ) -> Tuple[Tuple[torch.Tensor, torch.Tensor, torch.Tensor], Dict[str, Any]]:
    """Zhang et al. 2015 nonlinear case: min ||act(y) - act(M y + b)||^2 over rank(M) <= r, with a
    fallback to the linear solution where it does not generalise.

    Alternates (1) z-step: per element argmin (act(y) - act(z))^2 + lam (z - M y - b)^2, and (2) (M, b)-step:
    min ||z - M y - b||^2 s.t. rank(M) <= r, a reduced-rank regression (OLS, then project its fitted
    values on their top-r principal directions: the generalised-SVD solution). lam grows by `growth`.

    `holdout` (bool per row, whole images) splits the rows: the solver runs on the others, starting from
    their linear solution, and keeps its best iterate there; its post-activation error on the held-out
    rows is then compared with that of the linear solution fitted on ALL rows (what the linear case
    returns), and the linear solution is returned unless the nonlinear one is strictly better. So on
    held-out samples the layer's error is never above the linear case's. stats["method"] says which won.
    """
    kind = info.act or "relu"
    Y_all = resp.Y
    X_all = Y_all if X is None else X
    if X is None:  # the linear case's solution, from the PCA already computed on all rows
        U = resp.evecs[:, :r]
        lin = (U, U.T.clone(), resp.mean - U @ (U.T @ resp.mean))
    else:
        lin = _rrr(Y_all, X, r)
    n_all = Y_all.shape[0]
    use_holdout = holdout is not None and bool(holdout.any()) and bool((~holdout).any())
    fit = ~holdout if use_holdout else torch.ones(n_all, dtype=torch.bool)
    test = holdout if use_holdout else fit
    Y, Xf = Y_all[fit], X_all[fit]
    T = _act(Y, kind)
    n, N = Y.shape
    P, Q, b = _linear_start(Y, None if X is None else Xf, r) if use_holdout else lin
    xbar = Xf.mean(0)
    Xc = Xf - xbar
    Sxx = Xc.T @ Xc
    ridge = 1e-6 * float(Sxx.diagonal().mean()) + 1e-12
    Sxx_inv_chol = torch.linalg.cholesky(Sxx + ridge * torch.eye(N, dtype=Y.dtype))

    def objective(P: torch.Tensor, Q: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> float:
        Xr = X_all[rows]
        return float(((_act(Y_all[rows], kind) - _act(Xr @ Q.T @ P.T + b, kind)) ** 2).sum())

    best = (objective(P, Q, b, fit), P, Q, b)
    start = best[0]
    lam = lam0
    for _ in range(iters):
        pred = Xf @ Q.T @ P.T + b
        Z = _z_step(T, pred, lam, kind)
        zbar = Z.mean(0)
        Zc = Z - zbar
        # OLS B = Zc^T Xc Sxx^-1 ; fitted values F = Xc B^T
        B = torch.cholesky_solve((Zc.T @ Xc).T, Sxx_inv_chol).T
        Fit = Xc @ B.T
        evals, evecs = torch.linalg.eigh(Fit.T @ Fit)
        Ur = evecs[:, -r:].flip(1)
        P, Q = Ur, Ur.T @ B
        b = zbar - P @ (Q @ xbar)
        obj = objective(P, Q, b, fit)
        if obj < best[0]:
            best = (obj, P, Q, b)
        lam *= growth
    obj, P, Q, b = best
    n_test = max(int(test.sum()), 1)
    e_lin, e_non = objective(*lin, test) / n_test, objective(P, Q, b, test) / n_test
    won = e_non < e_lin
    stats: Dict[str, Any] = {"linear_obj": start / max(n, 1), "nonlinear_obj": obj / max(n, 1),
                             "heldout_linear": e_lin, "heldout_nonlinear": e_non, "heldout_rows": int(test.sum()),
                             "heldout": use_holdout, "method": "nonlinear" if won else "linear"}
    if not won:
        P, Q, b = lin
    if raw:  # y' = P Q y + b
        return (P, Q, b), stats
    # y' = P Q (W x + b0) + b
    return (Q @ info.weight, P, P @ (Q @ info.bias) + b), stats


#: share of the calibration images held out to check the nonlinear solution against the linear one
HOLDOUT_FRACTION = 0.2


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


def _row_mask(images: torch.Tensor, n_rows: int) -> Optional[torch.Tensor]:
    """Per-row mask from a per-image mask (rows are image-major, the same count per image)."""
    n_img = images.numel()
    if n_img == 0 or n_rows % n_img:
        return None
    return images.repeat_interleave(n_rows // n_img)


def _nonlinear_label(info: LayerInfo, stats: Mapping[str, Any]) -> str:
    """report["method"] of a layer the nonlinear case was asked for."""
    if stats["method"] == "nonlinear":
        return f"nonlinear({info.act})"
    return "linear (nonlinear did not lower the held-out error)"


#: above this estimated activation memory the asymmetric pass refuses (explicit) or falls back (default)
ASYMMETRIC_MAX_BYTES = 6 * 2**30


class _StopPass(Exception):
    """Raised by the last hook of the asymmetric pass: nothing after it needs to run."""


# ------------------------------------------------------------------------------------------------
# Collecting responses

def _available(kind: str, y: torch.Tensor) -> int:
    """Positions per image a layer's output offers: H*W of a conv map, T of a [B, T, F] linear output."""
    if kind == "conv":
        return int(y[0, 0].numel())
    return int(np.prod(y.shape[1:-1], dtype=np.int64)) if y.dim() > 2 else 1


def _positions(kind: str, y: torch.Tensor, k: int, gen: torch.Generator) -> Optional[torch.Tensor]:
    """Random sample positions per image: [B, min(k, H*W)] for a conv map; [B, k] of the T tokens of a
    [B, T, F] linear output when T > k, else None (every row kept)."""
    per = _available(kind, y)
    if kind == "conv":
        return torch.argsort(torch.rand(y.shape[0], per, generator=gen), dim=1)[:, :min(k, per)]
    if per <= k:
        return None
    return torch.argsort(torch.rand(y.shape[0], per, generator=gen), dim=1)[:, :k]


def _samples_per_image(info: LayerInfo, y: torch.Tensor, requested: Optional[int], n_images: int) -> int:
    """Positions per image for one layer: `requested`, or sized from its output dimension N (the
    covariance / regression the fit solves is N x N)."""
    return positions_per_image(requested, info.N, n_images, _available(info.kind, y))


def _rows(kind: str, y: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
    """The responses at `idx` as float64 CPU rows [n, N] (channels last)."""
    y = y.detach().double().cpu()
    if kind == "conv":
        flat = y.reshape(y.shape[0], y.shape[1], -1)
        return torch.gather(flat, 2, idx[:, None, :].expand(-1, y.shape[1], -1)).permute(0, 2, 1).reshape(-1, y.shape[1])
    y3 = y.reshape(y.shape[0], -1, y.shape[-1])
    if idx is not None:
        y3 = torch.gather(y3, 1, idx[:, :, None].expand(-1, -1, y3.shape[2]))
    return y3.reshape(-1, y.shape[-1])


def collect_responses(net: ReconstructedNetwork, infos: Sequence[LayerInfo], batches: Sequence[Tuple[Any, ...]],
                      samples_per_img: Optional[int], seed: int = 0) -> Dict[str, Responses]:
    """Sample output positions of every layer in `infos` (BN folded) on the calibration `batches`:
    `samples_per_img` per image, or (None) per layer as `_samples_per_image` sizes it."""
    watch = {(i.bn or i.name): i for i in infos}
    store: Dict[str, List[torch.Tensor]] = {i.name: [] for i in infos}
    gen = torch.Generator().manual_seed(int(seed))
    n_images = sum(int(b[0].shape[0]) if isinstance(b[0], torch.Tensor) and b[0].dim() else 1 for b in batches)

    def observe(node: Node, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        info = watch.get(node.name)
        if info is None or not isinstance(out, torch.Tensor):
            return
        k = _samples_per_image(info, out, samples_per_img, n_images)
        store[info.name].append(_rows(info.kind, out, _positions(info.kind, out, k, gen)))

    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            for inputs in batches:
                net.run_observed(tuple(inputs), {}, observe)
    finally:
        net.train(was)
    out = {}
    for name, rows in store.items():
        if not rows:
            raise DataError(f"layer {name!r} produced no responses on the calibration batches")
        out[name] = _pca(torch.cat(rows))
    return out


# ------------------------------------------------------------------------------------------------
# The graph edit

def decompose(net: ReconstructedNetwork, factors: Mapping[str, Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]],
              infos: Mapping[str, LayerInfo], copy: bool = True, extra_meta: Optional[Mapping[str, dict]] = None
              ) -> ReconstructedNetwork:
    """A new network where each layer in `factors` ({name: (A, P, bias)}) is split in two.

    `copy=False` shares the untouched modules with `net` (cheap; for throw-away evaluation only).
    """
    src = net.copy() if copy else net
    modules: Dict[str, nn.Module] = dict(src.network.items())
    rename: Dict[str, str] = {}
    drop = {infos[n].bn for n in factors if infos[n].bn}
    nodes: List[Node] = []
    for node in src.layer_nodes:
        if node.name in drop:
            modules.pop(node.module, None)
            continue
        args = rename_refs(node.args, rename) if rename else node.args
        kwargs = rename_refs(node.kwargs, rename) if rename else node.kwargs
        if node.name not in factors:
            nodes.append(dataclasses.replace(node, args=args, kwargs=dict(kwargs), meta=dict(node.meta)))
            continue
        info = infos[node.name]
        A, P, bias = factors[node.name]
        orig = src.network[node.module]
        dev = orig.weight.device
        dtype = orig.weight.dtype
        r = A.shape[0]
        if info.kind == "conv":
            first = nn.Conv2d(info.C, r, orig.kernel_size, stride=orig.stride, padding=orig.padding,
                              dilation=orig.dilation, bias=False, padding_mode=orig.padding_mode)
            first.weight.data = A.reshape(r, info.C, *orig.kernel_size).to(dev, dtype).contiguous()
            second = nn.Conv2d(r, info.N, 1, bias=bias is not None)
            second.weight.data = P.reshape(info.N, r, 1, 1).to(dev, dtype).contiguous()
        else:
            first = nn.Linear(info.C, r, bias=False)
            first.weight.data = A.to(dev, dtype).contiguous()
            second = nn.Linear(r, info.N, bias=bias is not None)
            second.weight.data = P.to(dev, dtype).contiguous()
        if bias is not None:
            second.bias.data = bias.to(dev, dtype).contiguous()
        first.train(orig.training)
        second.train(orig.training)
        key0 = node.module + "_lr0"
        while key0 in modules:
            key0 += "_"
        modules[key0] = first
        modules[node.module] = second
        out_desc = node.meta.get("out")
        if info.bn:
            out_desc = src.node(info.bn).meta.get("out", out_desc)
        out0 = None
        if isinstance(out_desc, dict) and "shape" in out_desc:
            shape = list(out_desc["shape"])
            shape[1 if info.kind == "conv" else -1] = r
            out0 = {**out_desc, "shape": shape}
        lr = {"rank": int(r), "factor": 0, "of": node.name, **(dict(extra_meta.get(node.name, {})) if extra_meta else {})}
        if info.bn:
            lr["folded_bn"] = info.bn
        meta0 = {**node.meta, "op": type(first).__name__, "out": out0, "lowrank": lr}
        if "target" in meta0:
            meta0["target"] = f"{meta0['target']}.lr0"
        meta1 = {**node.meta, "op": type(second).__name__, "out": out_desc, "lowrank": {**lr, "factor": 1}}
        nodes.append(Node(node.name + ".lr0", key0, args, dict(kwargs), meta0))
        nodes.append(Node(node.name, node.module, (Ref(node.name + ".lr0"),), {}, meta1))
        if info.bn:
            rename[info.bn] = node.name
    outputs = rename_refs(src.outputs, rename) if rename else src.outputs
    meta = dict(src.meta)
    new = ReconstructedNetwork(modules, src.input_nodes, nodes, outputs, meta)
    new.train(src.training)
    new.lint()
    return new


# ------------------------------------------------------------------------------------------------
# Rank selection under a MACs budget

def _select_ranks(options: Mapping[str, Tuple[np.ndarray, np.ndarray, np.ndarray]], budget: float) -> Dict[str, int]:
    """Maximise sum(log metric) s.t. sum(cost) <= budget; options[l] = (ranks, costs, metrics) with a
    rank of 0 meaning "keep the layer whole". Lagrangian sweep on the convex hull, then greedy fill."""
    names = list(options)
    logm = {n: np.log(np.clip(options[n][2], 1e-12, None)) for n in names}
    costs = {n: options[n][1].astype(np.float64) for n in names}

    def pick(lmb: float) -> Dict[str, int]:
        return {n: int(np.argmax(logm[n] - lmb * costs[n])) for n in names}

    def total(choice: Mapping[str, int]) -> float:
        return sum(costs[n][i] for n, i in choice.items())

    cheapest = {n: int(np.argmin(costs[n])) for n in names}
    if total(cheapest) > budget:
        raise PruningError(f"the MACs budget {budget:,.0f} is below what rank 1 everywhere costs "
                           f"({total(cheapest):,.0f}); ask for less compression")
    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget:
        hi *= 4
        if hi > 1e30:
            break
    for _ in range(100):
        mid = (lo + hi) / 2
        if total(pick(mid)) <= budget:
            hi = mid
        else:
            lo = mid
    choice = pick(hi)
    if total(choice) > budget:
        choice = cheapest
    # greedy fill: spend what is left on the best metric gain per MAC
    left = budget - total(choice)
    while True:
        best, best_gain = None, 0.0
        for n in names:
            i = choice[n]
            dc = costs[n] - costs[n][i]
            dm = logm[n] - logm[n][i]
            ok = (dc > 0) & (dc <= left) & (dm > 0)
            if not ok.any():
                continue
            ratio = np.where(ok, dm / np.where(dc > 0, dc, 1), -np.inf)
            j = int(np.argmax(ratio))
            if ratio[j] > best_gain:
                best, best_gain = (n, j), ratio[j]
        if best is None:
            break
        n, j = best
        left -= costs[n][j] - costs[n][choice[n]]
        choice[n] = j
    return {n: int(options[n][0][i]) for n, i in choice.items()}


# ------------------------------------------------------------------------------------------------
# The compressor

class LowRankDecomposition(BaseCompressor):
    """Seed-style low-rank compressor (see the module docstring for the math).

    Extra arguments beyond BaseCompressor's:
      nonlinear_case: reconstruct through the following ReLU/ReLU6 (Zhang et al. 2015 nonlinear case);
        per layer, the nonlinear solution is kept only where its post-ReLU error on held-out calibration
        images (HOLDOUT_FRACTION of them) is below the linear solution's, else the linear one is used
        (`report[layer]` has both errors), so nonlinear is never worse than linear per layer there.
      method: "data" (response PCA, default) or "svd" (weights only; `nonlinear_case` needs "data").
      rank_selection: None (ranks from the ratio per layer), "energy", "accuracy" or "combined" (ENC):
        `compress_ratio` (float) is then the fraction of the decomposed layers' total MACs removed.
      ranks: explicit {layer: rank}; overrides the ratio for those layers (ranks may reach full rank).
      target_macs: fraction of the whole network's MACs kept (<= 1), e.g. 1/1.5; overrides compress_ratio.
      layers / ignore: restrict the decomposed layers (default: every Conv2d with groups=1 and Linear but
        the layer that writes the network output, see `decompose_output_layer`).
      decompose_output_layer: also decompose, under a float `compress_ratio` or `target_macs`, the layer
        that writes the network output (a classifier's last Linear). Default False: its rank would bound
        the number of separable classes for a negligible share of the MACs (digits CNN at 0.5x: 94.9%
        with it, 98.7% without, scripts/results/robustness.md); channel pruning never shrinks that output either. Naming
        it in `layers`, a `compress_ratio` dict or `ranks` decomposes it anyway.
      fold_bn: fold a conv's sole BatchNorm2d user into it first (default True): the fit then approximates
        the BN output, the response the next layer sees, and the nonlinear case applies. Measured on the
        digits CNN (scripts/results/robustness.md) folding gives the lower logit error and the higher
        agreement with the original at 0.5x, 0.3x and 0.2x MACs; keep BN (False) to fine-tune afterwards
        (the BN-free network diverges at usual learning rates, see amc.jobs.compress).
      val_batches, acc_grid: cost of the "accuracy" metric (batches per evaluation, ranks measured per layer).
      nonlinear_iters: alternating iterations of the nonlinear solver. seed: calibration images, positions
        and the held-out split (see BaseCompressor).
      asymmetric: fit each layer, in network order, to the original responses from the inputs the
        already-decomposed layers before it produce (Zhang et al. 2015, sec. 3.3), so errors do not
        pile up with depth. One pass over the calibration images, held in memory as one batch.
        Default: on for method="data" (resnet20 at 2x: 88.6% instead of 45.2%); False fits every
        layer on the original network's inputs.
    A `compress_ratio` dict decomposes only the layers it names, each at its own ratio.
    """

    name = "lowrank"

    def __init__(self, origin_net: nn.Module, trainloader: Iterable, valloader: Optional[Iterable] = None,
                 trainset_ratio: float = 0.1, sampled_pixels_per_img: Optional[int] = None,
                 compress_ratio: Ratio = 0.5, checkpointfolder: Optional[str] = None, device: Any = "cpu",
                 verbose: bool = False,
                 drawgraph: bool = False, accuracy_first: bool = False, accuracy_threshold: float = 0.0,
                 nonlinear_case: bool = False, args: Any = None, example_inputs: Optional[Sequence[Any]] = None,
                 method: str = "data", rank_selection: Optional[str] = None,
                 ranks: Optional[Mapping[str, int]] = None, target_macs: Optional[float] = None,
                 layers: Optional[Sequence[str]] = None, ignore: Sequence[str] = (), fold_bn: bool = True,
                 val_batches: int = 4, acc_grid: int = 8, nonlinear_iters: int = 25, seed: int = DEFAULT_SEED,
                 asymmetric: Optional[bool] = None, decompose_output_layer: bool = False):
        if method not in METHODS:
            raise PruningError(f"method must be one of {METHODS}, got {method!r}")
        if rank_selection not in RANK_SELECTIONS:
            raise PruningError(f"rank_selection must be one of {RANK_SELECTIONS}, got {rank_selection!r}")
        if nonlinear_case and method != "data":
            raise PruningError("nonlinear_case=True reconstructs from data: use method='data'")
        if asymmetric and method != "data":
            raise PruningError("asymmetric=True reconstructs from data: use method='data'")
        self.asymmetric = (method == "data") if asymmetric is None else bool(asymmetric)
        self._asymmetric_by_default = asymmetric is None
        self.nonlinear_case = bool(nonlinear_case)
        self.decompose_output_layer = bool(decompose_output_layer)
        self.method = method
        self.rank_selection = rank_selection
        self.target_macs = check_target_macs(target_macs)
        self.fold_bn = bool(fold_bn)
        self.val_batches = check_count(val_batches, "val_batches")
        self.acc_grid = check_count(acc_grid, "acc_grid")
        self.nonlinear_iters = check_count(nonlinear_iters, "nonlinear_iters", minimum=0)
        layers = None if layers is None else check_names(layers, "layers")
        self._layers_arg, self._ignore_arg = layers, tuple(check_names(ignore, "ignore"))
        self._infos: Optional[Dict[str, LayerInfo]] = None
        self._responses: Optional[Dict[str, Responses]] = None
        self._metric_cache: Dict[str, Dict[str, np.ndarray]] = {}
        super().__init__(origin_net, trainloader, valloader, trainset_ratio, sampled_pixels_per_img, compress_ratio,
                         checkpointfolder, device, verbose, drawgraph, accuracy_first, accuracy_threshold, args,
                         example_inputs, seed=seed)
        self.infos = eligible_layers(self.origin_graph, self.fold_bn)
        for what, names in (("layers", layers or ()), ("ignore", self._ignore_arg)):
            bad = [n for n in names if n not in self.infos]
            if bad:
                raise PruningError(f"{what} names {bad[:5]} that are not decomposable layers; valid names include "
                                   f"{list(self.infos)[:5]} (Conv2d with groups=1, Linear)")
        if ranks is not None and not isinstance(ranks, Mapping):
            raise PruningError(f"ranks must be a dict {{layer_name: rank}}, got {ranks!r}")
        self.ranks = dict(ranks or {})
        for k, v in self.ranks.items():
            if k not in self.infos:
                raise PruningError(f"ranks names unknown layer {k!r}; valid names include {list(self.infos)[:5]}")
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= self.infos[k].full_rank:
                raise PruningError(f"ranks[{k!r}] must be an int in [1, {self.infos[k].full_rank}], got {v!r}")
        self.report: Dict[str, Dict[str, Any]] = {}

    # -- names --------------------------------------------------------------------------------
    def layer_names(self) -> List[str]:
        """Decomposable layers: Conv2d (groups=1) and Linear nodes."""
        return list(eligible_layers(self.origin_graph, getattr(self, "fold_bn", True)))

    def targets(self, ratio: Ratio) -> List[str]:
        if isinstance(ratio, Mapping):
            names = list(ratio)
        elif self._layers_arg:
            names = list(self._layers_arg)
        else:
            out = set() if self.decompose_output_layer else set(output_layers(self.origin_graph, self.infos))
            names = [n for n in self.infos if n not in out]
        names += [n for n in self.ranks if n not in names]
        skip = set(self._ignore_arg)
        return [n for n in self.infos if n in names and n not in skip]

    # -- data ---------------------------------------------------------------------------------
    def responses(self) -> Dict[str, Responses]:
        if self._responses is None:
            infos = [self.infos[n] for n in self.infos if n not in self._ignore_arg]
            self.log("lowrank: sampling %s positions/image of %d layers on %.0f%% of the training images",
                     self.sampled_pixels_per_img or "auto", len(infos), 100 * self.trainset_ratio)
            self._responses = collect_responses(self.origin_graph, infos, self.calibration_batches(),
                                                self.sampled_pixels_per_img, self.seed)
        return self._responses

    def _holdout_rows(self, n_images: int, n_rows: int) -> Optional[torch.Tensor]:
        """Rows of the calibration images held out to check the nonlinear fit (fixed by `seed`)."""
        return _row_mask(holdout_images(n_images, self.seed), n_rows)

    def _n_images(self) -> int:
        if getattr(self, "_n_calib", None) is None:
            self._n_calib = sum(int(b[0].shape[0]) if isinstance(b[0], torch.Tensor) and b[0].dim() else 1
                                for b in self.calibration_batches())
        return self._n_calib

    def energy(self, name: str) -> np.ndarray:
        """Fraction of energy kept at rank 1..full_rank (PCA of responses for "data", singular values for "svd")."""
        if self.method == "svd":
            s2 = torch.linalg.svdvals(self.infos[name].weight) ** 2
        else:
            s2 = self.responses()[name].evals
        c = torch.cumsum(s2, 0)
        e = (c / c[-1].clamp_min(1e-30)).numpy()
        out = np.ones(self.infos[name].full_rank)
        out[:min(len(e), len(out))] = e[:len(out)]
        return out

    # -- factors ------------------------------------------------------------------------------
    def factors(self, name: str, r: int, nonlinear: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        info = self.infos[name]
        nonlinear = self.nonlinear_case if nonlinear is None else nonlinear
        if self.method == "svd":
            self.report[name] = {"rank": r, "method": "svd"}
            return _svd_factors(info, r)
        resp = self.responses()[name]
        if nonlinear and info.act is not None and r < info.N:
            holdout = self._holdout_rows(self._n_images(), resp.Y.shape[0])
            f, stats = _nonlinear_factors(info, resp, r, iters=self.nonlinear_iters, holdout=holdout)
            self.report[name] = {"rank": r, "rows": int(resp.Y.shape[0]), **stats,
                                 "method": _nonlinear_label(info, stats)}
            return f
        if nonlinear and info.act is None:
            why = ("its BatchNorm was not folded (fold_bn=False)" if not self.fold_bn and
                   any(u.op.startswith("BatchNorm") for u in self.origin_graph.users()[name])
                   else "it is not followed by a ReLU/ReLU6")
            self.log("lowrank: %s uses the linear case: %s", name, why)
        self.report[name] = {"rank": r, "method": "linear", "rows": int(resp.Y.shape[0])}
        return _linear_factors(info, resp, r)

    def _bias_after(self, name: str) -> bool:
        info = self.infos[name]
        return self.method == "data" or info.has_bias or info.bn is not None

    # -- accuracy metric ----------------------------------------------------------------------
    def _val_batches(self) -> List[Tuple[Any, Any]]:
        if self.valloader is None:
            raise DataError("rank_selection='accuracy'/'combined' needs a valloader")
        out = []
        for batch in self.valloader:
            x = batch_inputs(batch)
            y = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
            out.append((tuple(t.to(self.device) if isinstance(t, torch.Tensor) else t for t in x), y))
            if len(out) >= self.val_batches:
                break
        if not out:
            raise DataError("valloader yielded no batches")
        return out

    def _accuracy(self, net: nn.Module, batches: List[Tuple[Any, Any]], ref: List[torch.Tensor]) -> float:
        """Top-1 accuracy on labelled batches; top-1 agreement with the original on unlabelled ones."""
        correct = total = 0
        was = net.training
        net.eval()
        with torch.no_grad():
            for (x, y), r in zip(batches, ref):
                pred = net(*x).argmax(-1).cpu()
                target = y.cpu() if isinstance(y, torch.Tensor) and y.dim() == 1 and not y.is_floating_point() else r
                correct += int((pred == target).sum())
                total += int(target.numel())
        net.train(was)
        return correct / max(total, 1)

    def accuracy_curve(self, name: str) -> np.ndarray:
        """Normalised val accuracy with only `name` decomposed (linear/svd factors), rank 1..full_rank."""
        batches = self._val_batches()
        if "_ref" not in self._metric_cache:
            g = self.origin_graph
            with torch.no_grad():
                was = g.training
                g.eval()
                ref = [g(*x).argmax(-1).cpu() for x, _ in batches]
                g.train(was)
            self._metric_cache["_ref"] = {"pred": ref, "acc": self._accuracy(g, batches, ref)}
        ref, base = self._metric_cache["_ref"]["pred"], self._metric_cache["_ref"]["acc"]
        info = self.infos[name]
        grid = np.unique(np.round(np.linspace(1, info.max_rank, max(2, self.acc_grid))).astype(int))
        accs = []
        for r in grid:
            f = self.factors(name, int(r), nonlinear=False)
            net = decompose(self.origin_graph, {name: f}, self.infos, copy=False)
            accs.append(self._accuracy(net, batches, ref))
        curve = np.interp(np.arange(1, info.full_rank + 1), grid, accs)
        curve[info.max_rank:] = max(curve[info.max_rank - 1], base)
        curve = np.maximum.accumulate(curve)
        return np.clip(curve / max(base, 1e-12), 1e-6, 1.0)

    def metric(self, name: str) -> np.ndarray:
        cache = self._metric_cache.setdefault(name, {})
        kind = self.rank_selection
        if kind in ("energy", "combined") and "energy" not in cache:
            cache["energy"] = self.energy(name)
        if kind in ("accuracy", "combined") and "accuracy" not in cache:
            cache["accuracy"] = self.accuracy_curve(name)
        if kind == "energy":
            return cache["energy"]
        if kind == "accuracy":
            return cache["accuracy"]
        return cache["energy"] * cache["accuracy"]

    # -- planning ranks -----------------------------------------------------------------------
    def plan_ranks(self, ratio: Ratio) -> Dict[str, int]:
        """{layer: rank} for `ratio` (or `target_macs`); a layer missing from the result stays whole."""
        names = self.targets(ratio)
        if not names:
            raise PruningError("no decomposable layer selected (Conv2d with groups=1 or Linear)")
        free = [n for n in names if n not in self.ranks]
        fixed = {n: self.ranks[n] for n in names if n in self.ranks}
        if self.target_macs is not None:
            from ..graph.counting import count

            total, _ = count(self.origin_graph, *self._one_example())
            fixed_delta = sum(self.infos[n].macs_before() - self.infos[n].macs_after(r, self._bias_after(n))
                              for n, r in fixed.items())
            need = total * (1.0 - self.target_macs) - fixed_delta  # MACs the free layers must remove
            before = sum(self.infos[n].macs_before() for n in free)
            if need <= 0:
                return fixed
            if need > before:
                raise PruningError(f"target_macs={self.target_macs:.4f} needs {need:,.0f} fewer MACs but the "
                                   f"decomposable layers only cost {before:,.0f}")
            budget = before - need
            if self.rank_selection is None:
                return {**fixed, **self._uniform_for_budget(free, budget)}
            return {**fixed, **self._select(free, budget)}
        if isinstance(ratio, Mapping) or self.rank_selection is None:
            out = dict(fixed)
            for n in free:
                r = float(ratio[n]) if isinstance(ratio, Mapping) else float(ratio)
                out[n] = self.infos[n].rank_for_ratio(r)
            return out
        budget = (1.0 - float(ratio)) * sum(self.infos[n].macs_before() for n in free)
        return {**fixed, **self._select(free, budget)}

    def _one_example(self) -> Tuple[Any, ...]:
        return tuple(x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in self.example_inputs)

    def _uniform_for_budget(self, names: List[str], budget: float) -> Dict[str, int]:
        def at(q: float) -> Dict[str, int]:
            return {n: self.infos[n].rank_for_ratio(q) for n in names}

        def cost(q: float) -> float:
            return sum(self.infos[n].macs_after(r, self._bias_after(n)) for n, r in at(q).items())

        lo, hi = 0.0, 1.0 - 1e-9
        if cost(hi) > budget:
            raise PruningError(f"cannot reach the MACs budget {budget:,.0f} even at rank 1 everywhere")
        for _ in range(60):
            mid = (lo + hi) / 2
            if cost(mid) <= budget:
                hi = mid
            else:
                lo = mid
        return at(hi)

    def _select(self, names: List[str], budget: float) -> Dict[str, int]:
        options = {}
        for n in self.progress(names, "rank metrics"):
            info = self.infos[n]
            m = self.metric(n)[: info.max_rank]
            ranks = np.arange(1, info.max_rank + 1)
            costs = np.array([info.macs_after(int(r), self._bias_after(n)) for r in ranks], dtype=np.float64)
            # rank 0 = keep the layer whole (metric 1)
            options[n] = (np.concatenate([ranks, [0]]), np.concatenate([costs, [info.macs_before()]]),
                          np.concatenate([m, [1.0]]))
        chosen = _select_ranks(options, budget)
        self.log("lowrank: %s selection kept %d of %d layers whole", self.rank_selection,
                 sum(1 for r in chosen.values() if r == 0), len(chosen))
        return {n: r for n, r in chosen.items() if r > 0}

    # -- the pass -----------------------------------------------------------------------------
    def _compress(self, ratio: Ratio) -> ReconstructedNetwork:
        ranks = self.plan_ranks(ratio)
        self.report = {}
        factors = {}
        if self.asymmetric:  # implies method == "data" (checked in __init__)
            factors = self._asymmetric_factors(ranks)
        for n in self.progress([n for n in ranks if n not in factors], "decomposing"):
            A, P, b = self.factors(n, ranks[n])
            factors[n] = (A, P, b if self._bias_after(n) else None)
        if self.method == "data":
            warn_underdetermined("LowRankDecomposition", [(n, int(self.report[n].get("rows", 0)), self.infos[n].N)
                                                          for n in factors if n in self.report],
                                 self.sampled_pixels_per_img)
        net = decompose(self.origin_graph, factors, self.infos, copy=True,
                        extra_meta={n: {"method": self.report[n]["method"]} for n in factors})
        self.chosen_ranks = ranks
        self.log("lowrank: decomposed %d layers (%s)", len(factors),
                 ", ".join(f"{n}:r={r}" for n, r in list(ranks.items())[:8]) + (" ..." if len(ranks) > 8 else ""))
        return net

    def _asymmetric_factors(self, ranks: Mapping[str, int]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
        """Factors fitted in network order against the original responses (see `asymmetric`).

        Pass 1 samples the original responses Y at fixed positions; pass 2 runs a copy of the network
        in which a forward hook on each layer's output (after its folded BN) fits y' = M x + c from the
        responses x to the approximated inputs, then hands y' on, so later layers see the error so far.
        """
        batches = self.calibration_batches()
        need = self._one_batch_bytes(batches)
        if need > ASYMMETRIC_MAX_BYTES:
            msg = (f"the asymmetric low-rank pass holds all {sum(int(b[0].shape[0]) for b in batches)} calibration "
                   f"images as one batch, about {need / 2**30:.1f} GiB of activations (limit "
                   f"{ASYMMETRIC_MAX_BYTES / 2**30:.0f} GiB); lower trainset_ratio")
            if not self._asymmetric_by_default:
                raise DataError(msg + ", or pass asymmetric=False")
            warnings.warn(msg + "; falling back to the per-layer fit (asymmetric=False) for this run", stacklevel=3)
            return {}
        inputs = tuple(torch.cat([b[i] for b in batches]) if isinstance(batches[0][i], torch.Tensor)
                       else batches[0][i] for i in range(len(batches[0])))
        infos = [self.infos[n] for n in ranks]
        watch = {(i.bn or i.name): i for i in infos}
        gen = torch.Generator().manual_seed(self.seed)
        positions: Dict[str, torch.Tensor] = {}
        targets: Dict[str, torch.Tensor] = {}
        n_images = int(inputs[0].shape[0]) if isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 1
        held = holdout_images(n_images, self.seed)

        def sample(node: Node, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            info = watch.get(node.name)
            if info is None or not isinstance(out, torch.Tensor):
                return
            k = _samples_per_image(info, out, self.sampled_pixels_per_img, n_images)
            positions[info.name] = _positions(info.kind, out, k, gen)
            targets[info.name] = _rows(info.kind, out, positions[info.name])

        was = self.origin_graph.training
        self.origin_graph.eval()
        try:
            with torch.no_grad():
                self.origin_graph.run_observed(inputs, {}, sample)
        finally:
            self.origin_graph.train(was)

        work = self.origin_graph.copy()
        work.eval()
        factors: Dict[str, Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = {}
        order = [n.name for n in work.layer_nodes if n.name in watch]
        bar = iter(self.progress(range(len(order)), "decomposing (asymmetric)", total=len(order)) or [])

        def make_hook(name: str):
            info = watch[name]

            def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
                r = ranks[info.name]
                X = _rows(info.kind, out, positions[info.name])
                Y = targets[info.name]
                nonlinear = self.nonlinear_case and info.act is not None and r < info.N
                if nonlinear:
                    (P, Q, c), stats = _nonlinear_factors(info, _pca(Y), r, iters=self.nonlinear_iters, X=X, raw=True,
                                                          holdout=_row_mask(held, Y.shape[0]))
                    self.report[info.name] = {"rank": r, "rows": int(Y.shape[0]), **stats,
                                              "method": _nonlinear_label(info, stats) + ", asymmetric"}
                else:
                    P, Q, c = _rrr(Y, X, r)
                    self.report[info.name] = {"rank": r, "method": "linear, asymmetric", "rows": int(Y.shape[0])}
                # y' = P Q (W x + b0) + c, i.e. M = P Q applied to this layer's observed output
                factors[info.name] = (Q @ info.weight, P, (P @ (Q @ info.bias) + c) if self._bias_after(info.name) else None)
                PQ, shift = P @ Q, c
                o = out.double()
                if info.kind == "conv":
                    new = torch.einsum("nm,bm...->bn...", PQ.to(o), o) + shift.to(o).reshape(1, -1, *([1] * (o.dim() - 2)))
                else:
                    new = o @ PQ.to(o).T + shift.to(o)
                next(bar, None)
                if name == order[-1]:
                    raise _StopPass
                return new.to(out.dtype)
            return hook

        handles = [work.module_of(name).register_forward_hook(make_hook(name)) for name in order]
        try:
            with torch.no_grad():
                work(*inputs)
        except _StopPass:
            pass
        finally:
            for h in handles:
                h.remove()
        return factors

    def _one_batch_bytes(self, batches: Sequence[Tuple[Any, ...]]) -> float:
        """Rough peak activation memory of one forward over all calibration images at once: the three
        largest node outputs (per image, from the capture) times the number of images."""
        n_img = sum(int(b[0].shape[0]) for b in batches if isinstance(b[0], torch.Tensor))
        trace_batch = 1
        for node in self.origin_graph.input_nodes:
            shape = (node.meta.get("out") or {}).get("shape") if isinstance(node.meta.get("out"), dict) else None
            if shape:
                trace_batch = max(1, int(shape[0]))
                break
        sizes = []
        for node in self.origin_graph.layer_nodes:
            out = node.meta.get("out")
            if isinstance(out, dict) and out.get("shape"):
                sizes.append(float(np.prod(out["shape"], dtype=np.float64)) / trace_batch * 4)
        return sum(sorted(sizes)[-3:]) * n_img

    def backoff(self, ratio: Ratio, attempt: int) -> Ratio:
        if self.target_macs is not None:
            self.target_macs = 1.0 - (1.0 - self.target_macs) * 0.8
        return super().backoff(ratio, attempt)


#: the seed's spelling
LowRankDecompostion = LowRankDecomposition
