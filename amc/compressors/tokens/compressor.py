"""`TokenPruning`: APT (seed 000) as a seed-style compressor, plus the training-free token baselines."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...errors import PruningError
from ...graph.network import ReconstructedNetwork
from ..base import BaseCompressor, check_count, check_names, check_number, check_target_macs
from .agent import SCORES, TokenAgent, fuse_mode
from ...graph.counting import count
from ..base import batch_inputs
from .placement import agents_of, choose_layers, find_blocks, insert_agents, solve_keep
from .training import APTStep, calibrate_thresholds, train_apt


class TokenPruning(BaseCompressor):
    """Learned token pruning for ViTs: agents after chosen encoder blocks drop tokens; trained jointly.

    `target_macs`: fraction of the network's MACs kept (agents included), met exactly in batched mode.
    `layers`: block-output node names to put agents after (default: the seed's 2/5/8 of 12, scaled).
    `epochs`: APT training epochs over `trainloader` (0: no training). `score` other than "agent" gives the
    training-free baselines: "cls_attention" (EViT's rule), "norm", "random", "tome" (ToMe-style merging).
    `lr` / `agent_lr`: AdamW learning rate of the model, Adam learning rate of the agents (1e-2: on the
    Fashion ViT at 0.8x MACs, 1e-3 and one epoch left APT below random token dropping, 84.4% vs 86.2%;
    1e-2 and two epochs put it above every training-free rule, 86.8%).
    `fuse`: what becomes of the dropped tokens: "none" (False) discards them, "one" (True) averages them
    into one extra token (EViT's fusion), "merge" averages each into its most similar kept token.
    `distill`: weight of the KL term that distils pass 3 (pruned) from pass 1 (plain) during training.
    `samples`: actions drawn per image in pass 2, each judged against the mean reward of the others
    (leave-one-out baseline; on the Fashion ViT at 0.6x MACs, 4 instead of 1 took APT from 84.96% to 85.71%
    and its lead over random token choice on the same trained model from 1.0 to 2.5 points).
    `chain`: in pass 2 the agents before the acting one prune as at inference.
    The result, `compressed_net`, runs in batched mode (`amc.compressors.tokens.set_mode(net, "dynamic")`
    switches to per-image thresholds); `keep` holds the per-agent token counts.
    """

    name = "token_pruning"

    def __init__(self, origin_net: nn.Module, trainloader: Iterable, valloader: Optional[Iterable] = None,
                 target_macs: float = 0.6, epochs: int = 5, layers: Optional[Sequence[str]] = None,
                 score: str = "agent", lr: float = 1e-4, agent_lr: float = 1e-2, budget_weight: float = 1.0,
                 accumulation_steps: int = 1, hidden: Optional[int] = None, fuse: Any = "none",
                 distill: float = 0.0, samples: int = 4, chain: bool = False, **kwargs: Any):
        target = check_target_macs(target_macs)
        if target is None:
            raise PruningError("TokenPruning needs target_macs, a fraction in (0, 1] of the MACs to keep")
        kwargs.setdefault("compress_ratio", 1.0 - target if target < 1.0 else 0.0)
        super().__init__(origin_net, trainloader, valloader, **kwargs)
        self.target_macs = target
        self.epochs = check_count(epochs, "epochs", minimum=0)
        self.layers = None if layers is None else check_names(layers, "layers")
        if score not in SCORES + ("tome",):
            raise PruningError(f"score must be one of {SCORES + ('tome',)}, got {score!r}")
        self.score = score
        self.lr = check_number(lr, "lr", low=0.0, low_open=True)
        self.agent_lr = check_number(agent_lr, "agent_lr", low=0.0, low_open=True)
        self.budget_weight = check_number(budget_weight, "budget_weight", low=0.0)
        self.accumulation_steps = check_count(accumulation_steps, "accumulation_steps")
        self.hidden = None if hidden is None else check_count(hidden, "hidden")
        self.fuse = fuse_mode(fuse)
        if not isinstance(chain, bool):
            raise PruningError(f"chain must be True or False, got {chain!r}")
        self.samples, self.chain = check_count(samples, "samples"), chain
        if score == "tome" and self.fuse != "none":
            raise PruningError(f"fuse={fuse!r} keeps the dropped tokens; score='tome' merges them already")
        self.distill = check_number(distill, "distill (a loss weight)", low=0.0)
        self.blocks = find_blocks(self.origin_graph)
        self.chosen = choose_layers(self.blocks, self.layers)
        self.keep: List[int] = []
        self.train_history: List[Dict[str, float]] = []

    def validate_ratio(self, ratio: Any) -> None:
        if isinstance(ratio, dict):
            raise PruningError("TokenPruning takes target_macs (a float), not a per-layer dict")
        super().validate_ratio(ratio)

    def agent_network(self, target_macs: Optional[float] = None) -> Tuple[ReconstructedNetwork, APTStep]:
        """A copy of the network with agents at the budget's token counts, and the `APTStep` that trains it
        (for your own loop or `APTTrainer`); `compress()` runs this and then `train_apt`."""
        target = self.target_macs if target_macs is None else float(target_macs)
        net, _ = insert_agents(self.origin_graph, self.chosen, score=self.score, hidden=self.hidden, fuse=self.fuse)
        net.to(self.device)
        x = tuple(t[:1] if isinstance(t, torch.Tensor) else t for t in self.example_inputs)
        base = count(self.origin_graph, *x)[0]
        self.keep = solve_keep(net, self.blocks[0].tokens, target, base, x)
        self.log("token pruning: keep %s of %d tokens after %s (%.3f of the MACs)", self.keep,
                 self.blocks[0].tokens - 1, [b.output for b in self.chosen], count(net, *x)[0] / base)
        agents = [a for a in agents_of(net) if isinstance(a, TokenAgent)]
        step = APTStep(net, agents, self.keep, self.blocks[0].tokens, self.budget_weight, distill=self.distill,
                       samples=self.samples, chain=self.chain) if agents else None
        return net, step  # type: ignore[return-value]

    def _compress(self, ratio: Any) -> ReconstructedNetwork:
        target = 1.0 - float(ratio)
        net, step = self.agent_network(target)
        tokens = self.blocks[0].tokens
        agents = agents_of(net)
        if self.epochs and self.score == "agent":
            self.train_history = train_apt(net, agents, self.keep, tokens, self.trainloader, epochs=self.epochs,
                                           lr=self.lr, agent_lr=self.agent_lr, budget_weight=self.budget_weight,
                                           accumulation_steps=self.accumulation_steps, device=self.device,
                                           progress=self.progress if self.verbose else None, distill=self.distill,
                                           samples=self.samples, chain=self.chain)
        if self.score != "tome":
            calibrate_thresholds(net, agents, self.keep, tokens, self.calibration_batches(), self.device)
        for a, k in zip(agents, self.keep):
            a.keep = k
            if isinstance(a, TokenAgent):
                a.mode = "batched"
        net.eval()
        net.meta["token_pruning"] = {"keep": list(self.keep), "tokens": tokens, "target_macs": target,
                                     "layers": [b.output for b in self.chosen], "score": self.score,
                                     "fuse": self.fuse}
        return net


def dynamic_macs(net: ReconstructedNetwork, loader: Iterable, limit: int = 256) -> float:
    """Mean MACs per image of `net` in dynamic token mode, each image run alone (batch 1) over `loader`."""
    agents = [a for a in agents_of(net) if isinstance(a, TokenAgent)]
    modes = [a.mode for a in agents]
    for a in agents:
        a.mode = "dynamic"
    total, seen = 0, 0
    try:
        for batch in loader:
            x = batch_inputs(batch)[0]
            for i in range(x.shape[0]):
                total += count(net, x[i:i + 1])[0]
                seen += 1
                if seen >= limit:
                    return total / seen
    finally:
        for a, m in zip(agents, modes):
            a.mode = m
    if not seen:
        raise PruningError("dynamic_macs: the loader yielded no images")
    return total / seen


__all__ = ["TokenPruning", "TokenAgent", "dynamic_macs"]
