"""Choosing the next token from a step's logits: greedy, or temperature, top-k and top-p (nucleus)
sampling with a seeded generator (the same seed gives the same tokens).

    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=0)   # ConfigError names the fix
    sampler = Sampler(params)
    token = sampler.pick(device_token, lambda: session.to_numpy(logits))

Greedy (temperature 0) takes the token the device's argmax returned and never reads the logits.
Otherwise the logits are divided by the temperature, cut to the k most likely tokens (top_k > 0),
then to the nucleus (the smallest set of the most likely tokens whose probability reaches top_p,
the most likely token always kept), renormalised, and one token is drawn with
numpy.random.default_rng(seed).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from engine.config import ConfigError


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0        # 1: off
    top_k: int = 0            # 0: off
    seed: int = 0

    def __post_init__(self) -> None:
        t, p, k, seed = self.temperature, self.top_p, self.top_k, self.seed
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"sampling.temperature must be a number >= 0, got {t!r}; set sampling.temperature=0 "
                              "for greedy decoding or e.g. sampling.temperature=0.8")
        if not _is_number(p) or not math.isfinite(p) or not 0 < p <= 1:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {p!r}; set sampling.top_p=1.0 to turn "
                              "nucleus sampling off or e.g. sampling.top_p=0.9")
        if not _is_int(k) or k < 0:
            raise ConfigError(f"sampling.top_k must be an integer >= 0, got {k!r}; set sampling.top_k=0 to turn "
                              "it off or e.g. sampling.top_k=50")
        if not _is_int(seed) or seed < 0:
            raise ConfigError(f"sampling.seed must be an integer >= 0, got {seed!r}; e.g. sampling.seed=0")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "top_k", int(k))
        object.__setattr__(self, "seed", int(seed))

    @staticmethod
    def from_config(cfg) -> "SamplingParams":
        """From a `sampling:` config block (a mapping; missing keys take the defaults)."""
        if cfg is None:
            return SamplingParams()
        known = {f.name for f in dataclasses.fields(SamplingParams)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"unknown sampling option(s) {', '.join(unknown)}; the options are "
                              f"{', '.join(sorted(known))}")
        return SamplingParams(**{k: cfg[k] for k in known if k in cfg})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mode": "greedy" if self.greedy else "sample"}


def top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    """True for the k largest logits (exactly k where k < len; ties broken by the lower index);
    all True for k == 0 or k >= len."""
    n = logits.shape[-1]
    if k == 0 or k >= n:
        return np.ones(n, dtype=bool)
    keep = np.zeros(n, dtype=bool)
    keep[np.argsort(-logits, kind="stable")[:k]] = True
    return keep


def top_p_mask(probs: np.ndarray, top_p: float) -> np.ndarray:
    """True for the nucleus: the smallest set of the most likely tokens whose probabilities sum to
    at least `top_p` (of their total), always the most likely token; all True for top_p == 1."""
    n = probs.shape[-1]
    if top_p >= 1.0:
        return np.ones(n, dtype=bool)
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    count = int(np.searchsorted(cumulative, top_p * cumulative[-1], side="left")) + 1
    keep = np.zeros(n, dtype=bool)
    keep[order[:min(max(count, 1), n)]] = True
    return keep


def softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The probabilities a token is drawn from (float64, summing to 1): temperature, then top-k,
    then top-p. `params` must not be greedy (its distribution is the argmax)."""
    if params.greedy:
        raise ValueError("greedy decoding has no distribution to draw from: take the argmax")
    x = np.asarray(logits, dtype=np.float64).reshape(-1) / params.temperature
    if not np.isfinite(x).any():
        raise ValueError("every logit is non-finite: nothing to sample from")
    x = np.where(np.isnan(x), -np.inf, x)
    x = np.where(top_k_mask(x, params.top_k), x, -np.inf)
    probs = softmax(x)
    probs = np.where(top_p_mask(probs, params.top_p), probs, 0.0)
    return probs / probs.sum()


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One index drawn with probability `probs` (zero-probability entries are never drawn)."""
    cumulative = np.cumsum(probs)
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return min(index, len(probs) - 1)


class Sampler:
    """Picks each next token of one generation; its generator is seeded once, so a generation's
    draws depend only on the seed and the logits."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def pick(self, device_token: int, read_logits: Callable[[], np.ndarray]) -> int:
        """The next token: the device's argmax when greedy (the logits are not read), else one
        drawn from `read_logits()` (a step's logits on the host, [vocab] or [1, vocab])."""
        if self.params.greedy:
            return int(device_token)
        return draw(distribution(read_logits(), self.params), self.rng)
