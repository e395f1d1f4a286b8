"""Choosing the next token from logits: greedy, or temperature with top-k, min-p and top-p filters.

The filters run in llama.cpp's order (top-k, then min-p, then top-p on what is left); temperature 0
is argmax, so greedy output never depends on the random generator.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import InputError


@dataclass
class SamplingParams:
    temperature: float = 0.0   # 0: greedy
    top_p: float = 1.0         # keep the most likely tokens whose probabilities sum to top_p
    top_k: int = 0             # keep the k most likely tokens (0: all)
    min_p: float = 0.0         # drop tokens less likely than min_p x the most likely one
    seed: int | None = None

    def __post_init__(self):
        checks = {"temperature": self.temperature >= 0, "top_p": 0 < self.top_p <= 1,
                  "top_k": self.top_k >= 0, "min_p": 0 <= self.min_p <= 1}
        for name, ok in checks.items():
            if not ok:
                raise InputError(f"invalid {name.replace('_', '-')} {getattr(self, name)}: "
                                 f"{RANGES[name]}")

    def replace(self, name: str, text: str) -> "SamplingParams":
        """A copy with one parameter set from user text (as `/set top_p 0.9` gives it)."""
        kinds = {f.name: f for f in fields(self)}
        key = name.replace("-", "_")
        if key not in kinds:
            raise InputError(f"unknown parameter {name!r}; parameters: {', '.join(kinds)}")
        try:
            value = None if key == "seed" and text == "none" else (int if key in ("top_k", "seed") else float)(text)
        except ValueError:
            raise InputError(f"invalid value {text!r} for {key}: {RANGES[key]}") from None
        return SamplingParams(**{**asdict(self), key: value})


RANGES = {"temperature": "must be >= 0 (0 = greedy)", "top_p": "must be in (0, 1]",
          "top_k": "must be an integer >= 0 (0 = off)", "min_p": "must be in [0, 1]",
          "seed": "must be an integer or none"}


class Sampler:
    """Samples token ids with fixed parameters and its own random generator (seeded for repeatability)."""

    def __init__(self, params: SamplingParams | None = None):
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature <= 0:
            return int(np.argmax(logits))
        probs = token_probabilities(logits, p)
        return int(self.rng.choice(len(probs), p=probs))


def token_probabilities(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The distribution sampled from: softmax(logits / T) restricted by top-k, min-p, top-p, renormalised."""
    z = logits.astype(np.float64) / p.temperature
    keep = np.ones(len(z), bool)
    if 0 < p.top_k < len(z):
        keep[np.argsort(-z, kind="stable")[p.top_k:]] = False
    probs = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    probs /= probs.sum()
    if p.min_p > 0:
        probs[probs < p.min_p * probs.max()] = 0.0
    if p.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]        # mass of the more likely tokens
        probs[order[before >= p.top_p * probs.sum()]] = 0.0
    return probs / probs.sum()
