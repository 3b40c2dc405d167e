"""Low-rank decomposition: one k x k conv (or Linear) becomes two thinner layers.

    C --[k x k conv, C->N]--> N      becomes      C --[k x k conv, C->r, no bias]--> r --[1x1 conv, r->N]--> N
    in --[Linear in->out]--> out     becomes      in --[Linear in->r, no bias]--> r --[Linear r->out]--> out

A pass over a ReconstructedNetwork that returns a NEW network (the input is never edited). One module
per job:

- `eligible`: which layers can be split (Conv1d/2d/3d with groups=1, Linear), with a sole BatchNorm user
  folded in (`fold_bn`) and the ReLU/ReLU6 after them;
- `responses`: the layers' sampled responses and their PCA (`amc.compressors.sampling` draws them);
- `factorize`: the maths: truncated SVD (`method="svd"`), response PCA (`method="data"`, the linear
  case of Zhang et al. 2015), the nonlinear case through the ReLU (`nonlinear_case=True`);
- `asymmetric`: the sequential fit against the original responses (Zhang et al. 2015, sec. 3.3);
- `rank_selection`: ranks from one ratio, or ENC strategies (`EnergyRanks`, `AccuracyRanks`,
  `CombinedRanks`) under a MACs budget;
- `edit`: the graph edit (`decompose`);
- `compressor`: `LowRankDecomposition`, the seed-style compressor that runs them.

Rank per layer from `compress_ratio` (the fraction of that layer's weight MACs removed, the seed's
meaning, shared with ChannelPruning): ``r = floor((1 - ratio) * C k^2 N / (C k^2 + N))`` (Linear: k = 1).
"""
from .asymmetric import activation_bytes, fit_in_order
from .compressor import METHODS, RANK_SELECTIONS, LowRankDecomposition, LowRankDecompostion
from .edit import decompose
from .eligible import LayerInfo, eligible_layers, lowrank_rank, output_layers
from .factorize import HOLDOUT_FRACTION, holdout_images, linear_factors, nonlinear_factors, rrr, svd_factors
from .rank_selection import (AccuracyRanks, CombinedRanks, EnergyRanks, RankMetric, ranks_under_budget, select_ranks,
                             uniform_ranks)
from .responses import Responses, collect_responses

#: above this estimated activation memory (`activation_bytes`) the asymmetric pass refuses (asymmetric=True)
#: or falls back to the per-layer fit (the default); read here when used, so setting it here takes effect
ASYMMETRIC_MAX_BYTES = 6 * 2**30

__all__ = ["LowRankDecomposition", "LowRankDecompostion", "LayerInfo", "lowrank_rank", "decompose",
           "eligible_layers", "output_layers", "RANK_SELECTIONS", "METHODS", "ASYMMETRIC_MAX_BYTES",
           "HOLDOUT_FRACTION", "holdout_images", "Responses", "collect_responses", "svd_factors", "linear_factors",
           "nonlinear_factors", "rrr", "activation_bytes", "fit_in_order", "RankMetric", "EnergyRanks",
           "AccuracyRanks", "CombinedRanks", "ranks_under_budget", "select_ranks", "uniform_ranks"]
