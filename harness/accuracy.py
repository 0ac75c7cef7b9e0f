"""Accuracy of one model's output distributions against another's, over the same token stream."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(candidate: np.ndarray, reference: np.ndarray) -> dict:
    """Per-position KL(reference || candidate), top-1 agreement, logits error. [positions, vocab]."""
    log_p, log_q = log_softmax(reference), log_softmax(candidate)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    err = np.abs(candidate.astype(np.float64) - reference)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "kl_per_token": kl.tolist(),
            "top1": float((candidate.argmax(-1) == reference.argmax(-1)).mean()),
            "max_logits_error": float(err.max()), "mean_logits_error": float(err.mean())}


def perplexity(logits: np.ndarray, tokens: list[int]) -> float:
    """exp(mean negative log-likelihood of tokens[1:]) given the logits at positions [:-1]."""
    logp = log_softmax(logits[:-1])
    nll = -logp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]
    return float(np.exp(nll.mean()))
