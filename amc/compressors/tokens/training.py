"""APT training (seed 000): the model and its token agents learn together, three forward passes per batch.

1. the plain model (every agent off): loss L0, trains the model;
2. the model with one pruning action: one agent (round robin) drops the tokens it would drop under the
   budget, drawn from its policy; per image, reward = L0 - L1 (pruning that lowers the loss is rewarded,
   pruning that raises it penalised); the agent learns by policy gradient. With `samples` = r > 1 each
   image gets r actions (the batch repeated, no gradient through the model) and each action's baseline is
   the mean reward of the image's other r - 1 (leave-one-out), which removes how hard the image is from
   the advantage; with r = 1 the baseline is the batch mean. `chain=True`: the agents before the acting
   one prune as at inference, so it acts on the tokens it will see;
3. the model with the agents' full pruning (batched top-k at the budget's counts): loss L2, trains the
   model to work on the tokens it will see at inference.

With `distill > 0`, pass 3 also matches pass 1's (detached) class distribution, KL(plain || pruned), as
DynamicViT distils the pruned ViT from the full one: the full model is the free teacher of pass 3.

The agents also get a budget term, (mean keep-probability - kept share)^2, so that thresholding their
probabilities at 0.5 (dynamic mode) keeps about what the MACs budget allows.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..._batches import class_rows, labels_of, logits_of
from ...errors import TrainingError
from ..base import batch_inputs
from .agent import TokenAgent
from .placement import arriving

logger = logging.getLogger("amc.compressors.tokens")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_sample_ce(out: Any, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per image of logits, or of a Hugging Face output's `logits`."""
    return F.cross_entropy(*class_rows(out, y), reduction="none")


def _kl(student: Any, teacher: Any) -> Optional[torch.Tensor]:
    """Mean KL(teacher || student) of two logit tensors (teacher detached); None for non-tensor outputs."""
    student, teacher = logits_of(student), logits_of(teacher)
    if not (isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor)) or student.shape != teacher.shape:
        return None
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher.detach(), -1), log_target=True,
                    reduction="batchmean")


def _finite(loss: torch.Tensor, what: str, step: int) -> None:
    if not math.isfinite(float(loss.detach())):
        raise TrainingError(f"token pruning: {what} became {float(loss.detach())} at step {step}; lower lr "
                            "(the network was not changed)")


class APTStep:
    """APT's three passes on one batch, for any training loop: `losses = step(x, y)`, then
    `losses["total_loss"].backward()` and step the optimizers (the agents' parameters included).

    `net` holds the agents (`insert_agents`); `keep` are their budgeted token counts, `tokens` the sequence
    length (CLS included) reaching the first one. `loss_fn(output, target)` must return per-sample losses.
    `samples` > 1 needs tensor inputs and targets (the batch is repeated); other inputs take one action."""

    def __init__(self, net: nn.Module, agents: Sequence[TokenAgent], keep: Sequence[int], tokens: int,
                 budget_weight: float = 1.0, loss_fn: Optional[LossFn] = None, distill: float = 0.0,
                 samples: int = 4, chain: bool = False):
        if len(agents) != len(keep) or not agents:
            raise TrainingError(f"APTStep needs one keep count per agent; got {len(agents)} agents, {len(keep)} counts")
        self.net, self.agents, self.keep = net, list(agents), [int(k) for k in keep]
        self.arriving = arriving(tokens, self.keep, any(a.fuse == "one" for a in self.agents))
        self.share = [k / n for k, n in zip(self.keep, self.arriving)]
        self.budget_weight, self.distill = float(budget_weight), float(distill)
        if not (math.isfinite(self.distill) and self.distill >= 0):
            raise TrainingError(f"distill must be a finite weight >= 0, got {distill!r}")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise TrainingError(f"samples must be an int >= 1 (actions per image in pass 2), got {samples!r}")
        self.samples, self.chain = samples, bool(chain)
        self.loss_fn = loss_fn or _per_sample_ce
        self.step = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        agents, net = self.agents, self.net
        for a in agents:
            a.mode = "off"
        out0 = net(x)
        l0 = self.loss_fn(out0, y)                                    # pass 1: plain
        j = self.step % len(agents)
        act = agents[j]
        if self.chain:  # the agents before j prune as at inference, so j acts on what it will see
            for a, k in zip(agents[:j], self.keep[:j]):
                a.mode, a.keep = "batched", k
        act.sample = self.arriving[j] - self.keep[j]
        r = self.samples if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else 1
        try:
            with torch.no_grad():                                     # pass 2: one agent's action(s)
                l1 = self.loss_fn(net(torch.cat([x] * r) if r > 1 else x), torch.cat([y] * r) if r > 1 else y)
        finally:
            act.sample = None
        log_prob = act._last_log_prob
        for a, k in zip(agents, self.keep):
            a.mode, a.keep = "batched", k
        out2 = net(x)
        l2 = self.loss_fn(out2, y)                                    # pass 3: full pruning
        kd = _kl(out2, out0) if self.distill else None
        reward = (l0.detach().repeat(r) - l1).view(r, -1)
        base = reward.mean() if r == 1 else (reward.sum(0, keepdim=True) - reward) / (r - 1)  # leave-one-out
        adv = (reward - base).flatten()
        adv = adv / (adv.std(unbiased=False) + 1e-6)
        pg = -(adv * log_prob).mean() if log_prob is not None else l0.new_zeros(())
        budget = sum(((torch.sigmoid(a._last_scores).mean() - s) ** 2 for a, s in zip(agents, self.share)
                      if a._last_scores is not None), l0.new_zeros(()))
        model_loss = l0.mean() + l2.mean() + (self.distill * kd if kd is not None else 0.0)
        _finite(model_loss, "the model loss", self.step)
        _finite(pg, "the agents' policy loss", self.step)
        self.step += 1
        return {"total_loss": model_loss + pg + self.budget_weight * budget, "loss_plain": l0.mean().detach(),
                "loss_pruned": l2.mean().detach(), "reward": reward.mean().detach(), "budget": budget.detach(),
                **({"distill": kd.detach()} if kd is not None else {})}


def train_apt(net: nn.Module, agents: Sequence[TokenAgent], keep: Sequence[int], tokens: int,
              loader: Iterable, epochs: int = 5, lr: float = 1e-4, agent_lr: float = 1e-2,
              budget_weight: float = 1.0, accumulation_steps: int = 1, device: Any = "cpu",
              loss_fn: Optional[LossFn] = None, progress: Optional[Callable[[Iterable, str, int], Iterable]] = None,
              distill: float = 0.0, samples: int = 4, chain: bool = False) -> List[Dict[str, float]]:
    """Train `net` (a graph holding `agents`) in place with `APTStep`; one record per epoch (mean losses, reward).
    The model uses AdamW at `lr` with cosine decay, the agents Adam at `agent_lr`; gradients accumulate over
    `accumulation_steps` batches."""
    step = APTStep(net, agents, keep, tokens, budget_weight, loss_fn, distill, samples, chain)
    agent_params = {id(p) for a in agents for p in a.parameters()}
    model_params = [p for p in net.parameters() if p.requires_grad and id(p) not in agent_params]
    opt_model = torch.optim.AdamW(model_params, lr=lr, weight_decay=0.05)
    opt_agent = torch.optim.Adam([p for a in agents for p in a.parameters()], lr=agent_lr)
    steps = max(1, epochs * len(loader) // accumulation_steps)  # type: ignore[arg-type]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_model, T_max=steps)
    history: List[Dict[str, float]] = []
    for epoch in range(int(epochs)):
        net.train()
        sums: Dict[str, float] = {}
        seen = 0
        batches: Iterable = loader if progress is None else progress(loader, f"APT epoch {epoch + 1}/{epochs}",
                                                                     len(loader))  # type: ignore[arg-type]
        for i, batch in enumerate(batches):
            x, y = batch_inputs(batch)[0].to(device), labels_of(batch, "token pruning").to(device)
            losses = step(x, y)
            (losses["total_loss"] / accumulation_steps).backward()
            if (i + 1) % accumulation_steps == 0:
                opt_model.step()
                opt_agent.step()
                opt_model.zero_grad(set_to_none=True)
                opt_agent.zero_grad(set_to_none=True)
                sched.step()
            n = int(y.shape[0])
            seen += n
            for k, v in losses.items():
                if k != "total_loss":
                    sums[k] = sums.get(k, 0.0) + float(v) * n
        rec = {"epoch": float(epoch + 1), **{k: v / max(seen, 1) for k, v in sums.items()}}
        history.append(rec)
        logger.info("APT epoch %d: loss plain %.4f, pruned %.4f, mean reward %.4f, budget %.4f", epoch + 1,
                    rec.get("loss_plain", 0.0), rec.get("loss_pruned", 0.0), rec.get("reward", 0.0),
                    rec.get("budget", 0.0))
    for a in agents:
        a.sample = None
        a._last_scores = a._last_log_prob = None
    net.eval()
    return history


@torch.no_grad()
def calibrate_thresholds(net: nn.Module, agents: Sequence[TokenAgent], keep: Sequence[int], tokens: int,
                         batches: Iterable, device: Any = "cpu") -> List[float]:
    """Dynamic-mode thresholds: per agent, the keep-probability above which, on these images in batched mode,
    its budgeted share of the arriving tokens lies (so dynamic mode keeps that share on average). The
    quantile is taken over the logits and stored as a float64 probability: exact up to a logit of ~36.7."""
    reaching = arriving(tokens, keep, any(getattr(a, "fuse", "none") == "one" for a in agents))
    logits: List[List[torch.Tensor]] = [[] for _ in agents]
    for a, k in zip(agents, keep):
        a.mode, a.keep = "batched", k
    net.eval()
    for batch in batches:
        x = batch_inputs(batch)[0].to(device) if not isinstance(batch, torch.Tensor) else batch.to(device)
        net(x)
        for p, a in zip(logits, agents):
            if a._last_scores is not None:
                p.append(a._last_scores.flatten())
    out = []
    for a, p, k, n in zip(agents, logits, keep, reaching):
        if not p or k >= n:
            a.threshold = 0.0
        else:  # the quantile of the logits (float32 sigmoids of logits above ~16 are all 1: ties), then its
            # probability in float64, which keeps logits up to ~36 apart (dynamic mode compares logits)
            q = float(torch.quantile(torch.cat(p).double(), 1.0 - k / n))
            t = 1.0 / (1.0 + math.exp(-q)) if q > -700 else 0.0
            a.threshold = min(t, math.nextafter(1.0, 0.0))
            if t >= 1.0:
                logger.warning("agent %s: its calibrated logit threshold %.1f is beyond what a float64 "
                               "probability holds (logit 36.7); dynamic mode keeps more tokens than calibrated",
                               a.label, q)
        a._last_scores = None
        out.append(a.threshold)
    return out
