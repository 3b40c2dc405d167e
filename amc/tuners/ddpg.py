"""DDPG as AMC does it (He et al., ECCV 2018): one episode walks the layers and picks each ratio.

Why a small torch actor-critic here and not stable-baselines3: AMC's agent is not a standard
episodic DDPG. Its reward exists only at the end of an episode and is copied onto every transition
of that episode, then a moving-average baseline is subtracted from each sampled batch; actions are
clamped so the remaining layers can still reach the budget, and the replay buffer must hold the
action that was *executed* (after the clamp and the budget repair), not the one the policy emitted.
SB3's DDPG steps an environment transition by transition with its own buffer and noise, so it can
do none of this without rewriting its training loop; the whole agent below is ~100 lines.

State (per layer, AMC's embedding): index, type, in channels, out channels, stride, kernel, params,
MACs reduced so far, MACs still to come, previous action; min-max normalised over the layers.
Action: the pruned fraction mapped from [0, 1] onto [min_ratio, max_ratio] of the layer.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from scipy.stats import truncnorm

from ..compressors.base import check_count, check_number
from ..errors import PruningError
from .base import Tuner, check_initial, check_initial_count, initial_vectors, start_config
from .registry import register_tuner
from .space import SearchSpace

REWARDS = ("score", "score_log_macs")


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


class _Replay:
    """Fixed-size ring buffer of (state, executed action, reward, next state, terminal)."""

    def __init__(self, capacity: int, state_dim: int):
        self.s = np.zeros((capacity, state_dim), np.float32)
        self.a = np.zeros((capacity, 1), np.float32)
        self.r = np.zeros((capacity, 1), np.float32)
        self.s2 = np.zeros((capacity, state_dim), np.float32)
        self.done = np.zeros((capacity, 1), np.float32)
        self.size = self.pos = 0

    def add(self, s: np.ndarray, a: float, r: float, s2: np.ndarray, done: bool) -> None:
        i = self.pos
        self.s[i], self.a[i], self.r[i], self.s2[i], self.done[i] = s, a, r, s2, float(done)
        self.pos = (i + 1) % len(self.s)
        self.size = min(self.size + 1, len(self.s))

    def sample(self, rng: np.random.Generator, n: int):
        idx = rng.integers(0, self.size, size=n)
        return self.s[idx], self.a[idx], self.r[idx], self.s2[idx], self.done[idx]


@register_tuner("ddpg")
class DDPG(Tuner):
    """AMC's DDPG agent (see the module docstring).

    episodes: evaluated policies in all; warmup: the first episodes take random actions.
    reward: "score" (accuracy-only, AMC's choice under a hard budget) or "score_log_macs"
      (-(1 - score) * log(MACs), AMC's FLOPs-aware reward; score read as an accuracy fraction).
    noise / noise_decay: initial std of the truncated-normal exploration noise and its decay per
      episode after warm-up. parallel_episodes: episodes rolled out per agent update (evaluated
      concurrently by executor="ray"; the history does not depend on the executor).
    initial: policies ({layer: ratio}, as `result.policy` gives) the first warm-up episodes execute
      instead of random actions (clamped to the budget like any action), so the critic first learns
      around a known good allocation (a uniform ratio, an earlier search); at most `warmup` of them.
      initial="uniform": every warm-up episode executes the uniform policy at the budget or a copy with
      every ratio moved by N(0, initial_sigma); initial_count=k: only the first k warm-up episodes
      (the rest random).
    """

    def __init__(self, episodes: int = 300, warmup: int = 100, seed: int = 0, reward: str = "score",
                 hidden: int = 300, lr_actor: float = 1e-4, lr_critic: float = 1e-3, tau: float = 0.01,
                 discount: float = 1.0, batch_size: int = 64, replay_size: int = 2000, noise: float = 0.5,
                 noise_decay: float = 0.95, moving_alpha: float = 0.5, parallel_episodes: int = 1,
                 initial: Union[str, Sequence[Mapping[str, float]]] = (), initial_sigma: float = 0.1,
                 initial_count: Optional[int] = None, **unknown: Any):
        super().__init__(seed, **unknown)
        if reward not in REWARDS:
            raise PruningError(f"reward must be one of {REWARDS}, got {reward!r}")
        self.episodes, self.warmup = check_count(episodes, "episodes"), check_count(warmup, "warmup", minimum=0)
        self.reward_kind, self.hidden = reward, check_count(hidden, "hidden")
        self.lr_actor = check_number(lr_actor, "lr_actor", low=0.0, low_open=True)
        self.lr_critic = check_number(lr_critic, "lr_critic", low=0.0, low_open=True)
        self.tau = check_number(tau, "tau (soft target update)", low=0.0, high=1.0, low_open=True)
        self.discount = check_number(discount, "discount", low=0.0, high=1.0)
        self.batch_size = check_count(batch_size, "batch_size")
        self.replay_size = check_count(replay_size, "replay_size")
        self.noise0 = check_number(noise, "noise (exploration std)", low=0.0)
        self.noise_decay = check_number(noise_decay, "noise_decay", low=0.0, high=1.0, low_open=True)
        self.moving_alpha = check_number(moving_alpha, "moving_alpha (reward baseline)", low=0.0, high=1.0)
        self.parallel_episodes = check_count(parallel_episodes, "parallel_episodes")
        self.initial = check_initial(initial, self.warmup, f"warmup={self.warmup}")
        self.initial_sigma = check_number(initial_sigma, "initial_sigma", low=0.0)
        self.initial_count = check_initial_count(initial_count, self.initial, self.warmup, f"warmup={self.warmup}")

    def config(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in ("seed", "episodes", "warmup", "reward_kind", "hidden", "lr_actor",
                                              "lr_critic", "tau", "discount", "batch_size", "replay_size",
                                              "noise0", "noise_decay", "moving_alpha", "parallel_episodes")} \
            | start_config(self.initial, self.initial_sigma, count=self.initial_count)

    @property
    def total_evaluations(self) -> int:
        return self.episodes

    # -- state embedding ----------------------------------------------------------------------------
    def setup(self, space: SearchSpace) -> None:
        self.space = space
        n = len(space.variables)
        static = np.array([[i, *v.features] for i, v in enumerate(space.variables)], dtype=np.float64)
        span = static.max(0) - static.min(0)
        self.static = (static - static.min(0)) / np.where(span > 0, span, 1.0)
        ones = np.ones(n)
        full = space.model(ones)
        # MACs that depend on variables >= t (zero their kept fraction: what is left does not)
        self.rest = np.array([full - space.model(np.r_[ones[:t], np.zeros(n - t)]) for t in range(n)]) / space.base_macs
        self.state_dim = self.static.shape[1] + 3
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.actor = nn.Sequential(_mlp(self.state_dim, self.hidden, 1), nn.Sigmoid())
            self.critic = _mlp(self.state_dim + 1, self.hidden, 1)
        self.actor_t, self.critic_t = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.opt_a = torch.optim.Adam(self.actor.parameters(), lr=self.lr_actor)
        self.opt_c = torch.optim.Adam(self.critic.parameters(), lr=self.lr_critic)
        self.memory = _Replay(self.replay_size, self.state_dim)
        self.rng = np.random.default_rng(self.seed)
        self.initial_x = initial_vectors(space, self.initial, self.warmup, self.initial_sigma, self.seed,
                                         self.initial_count)
        self.episode, self.noise, self.moving_average = 0, float(self.noise0), None

    def _state(self, t: int, x: np.ndarray, prev_u: float) -> np.ndarray:
        """Embedding of step t given the ratios chosen for variables < t (later ones at 0)."""
        sp = self.space
        kept = np.ones(len(x))
        kept[:t] = 1.0 - x[:t]
        reduced = (sp.model(np.ones(len(x))) - sp.model(kept)) / sp.base_macs
        return np.r_[self.static[t], reduced, self.rest[t], prev_u].astype(np.float32)

    def _to_u(self, t: int, r: float) -> float:
        lo, hi = self.space.lo[t], self.space.hi[t]
        return 0.0 if hi <= lo else float((r - lo) / (hi - lo))

    # -- episodes -------------------------------------------------------------------------------------
    def _rollout(self) -> np.ndarray:
        sp = self.space
        n = len(sp.variables)
        x = np.zeros(n)
        prev_u = 0.0
        for t in range(n):
            if self.episode < len(self.initial_x):
                u = None
            elif self.episode < self.warmup:
                u = float(self.rng.uniform(0.0, 1.0))
            else:
                with torch.no_grad():
                    mu = float(self.actor(torch.from_numpy(self._state(t, x, prev_u))[None])[0, 0])
                sigma = max(self.noise, 1e-6)
                a, b = (0.0 - mu) / sigma, (1.0 - mu) / sigma
                u = float(truncnorm.rvs(a, b, loc=mu, scale=sigma, random_state=self.rng))
            r = self.initial_x[self.episode][t] if u is None else sp.lo[t] + u * (sp.hi[t] - sp.lo[t])
            r = max(r, sp.min_ratio_at(x, t))  # the remaining layers can still reach the budget
            x[t] = r
            prev_u = self._to_u(t, r)
        return x

    def propose(self) -> List[np.ndarray]:
        n = min(self.parallel_episodes, self.episodes - self.episode)
        out = []
        for _ in range(n):
            out.append(self._rollout())
            self.episode += 1
        return out

    def reward(self, record: Dict[str, Any]) -> Optional[float]:
        if record["status"] != "ok":
            return None
        if self.reward_kind == "score":
            return float(record["score"])
        return float(-(1.0 - record["score"]) * np.log(record["macs"]))

    def observe(self, xs: List[np.ndarray], records: List[Dict[str, Any]]) -> None:
        n = len(self.space.variables)
        for x, rec in zip(xs, records):
            rew = self.reward(rec)
            if rew is None:  # a failed candidate teaches nothing about the layers
                continue
            states = [self._state(t, x, self._to_u(t - 1, x[t - 1]) if t else 0.0) for t in range(n)]
            for t in range(n):  # the end-of-episode reward, given to every transition, with the executed action
                s2 = states[t + 1] if t + 1 < n else states[t]
                self.memory.add(states[t], self._to_u(t, x[t]), rew, s2, t == n - 1)
        if self.episode > self.warmup:
            for _ in range(n * len(xs)):
                self._update()
            self.noise *= self.noise_decay ** len(xs)

    def _update(self) -> None:
        if self.memory.size < self.batch_size:
            return
        s, a, r, s2, done = (torch.from_numpy(v) for v in self.memory.sample(self.rng, self.batch_size))
        mean = float(r.mean())
        self.moving_average = mean if self.moving_average is None else \
            self.moving_average + self.moving_alpha * (mean - self.moving_average)
        r = r - self.moving_average
        with torch.no_grad():
            q_next = self.critic_t(torch.cat([s2, self.actor_t(s2)], 1))
            target = r + self.discount * (1.0 - done) * q_next
        loss_c = nn.functional.mse_loss(self.critic(torch.cat([s, a], 1)), target)
        self.opt_c.zero_grad()
        loss_c.backward()
        self.opt_c.step()
        loss_a = -self.critic(torch.cat([s, self.actor(s)], 1)).mean()
        self.opt_a.zero_grad()
        loss_a.backward()
        self.opt_a.step()
        with torch.no_grad():
            for net, tgt in ((self.actor, self.actor_t), (self.critic, self.critic_t)):
                for p, pt in zip(net.parameters(), tgt.parameters()):
                    pt.mul_(1.0 - self.tau).add_(self.tau * p)

    def done(self) -> bool:
        return self.episode >= self.episodes

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        nets = {k: getattr(self, k).state_dict() for k in ("actor", "critic", "actor_t", "critic_t", "opt_a", "opt_c")}
        mem = {k: getattr(self.memory, k).copy() for k in ("s", "a", "r", "s2", "done")}
        mem.update(size=self.memory.size, pos=self.memory.pos)
        return {"nets": nets, "memory": mem, "rng": self.rng.bit_generator.state, "episode": self.episode,
                "noise": self.noise, "moving_average": self.moving_average}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for k, v in state["nets"].items():
            getattr(self, k).load_state_dict(v)
        for k, v in state["memory"].items():
            setattr(self.memory, k, v.copy() if isinstance(v, np.ndarray) else v)
        self.rng.bit_generator.state = state["rng"]
        self.episode, self.noise, self.moving_average = state["episode"], state["noise"], state["moving_average"]


DDPGTuner = DDPG
