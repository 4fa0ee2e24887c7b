"""Greedy-decode timing shared by `sparsecraft bench` and bench/decode.py."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_PROMPT = "The history of the Python programming language began in the late 1980s, when"


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # the generated ids, [new_tokens]
    seconds: float  # decode time of new_tokens - 1 tokens (the first token, with the prefill, is timed apart)
    prefill_seconds: float

    @property
    def tokens_per_s(self) -> float:
        return (len(self.tokens) - 1) / self.seconds if self.seconds > 0 else float("nan")


def _generate(model: nn.Module, ids: torch.Tensor, new_tokens: int, force: bool = True) -> torch.Tensor:
    """Greedy ids after `ids` [1, n]; `force`: exactly new_tokens (no stop at end-of-sequence)."""
    attention = torch.ones_like(ids)
    pad = getattr(model.generation_config, "pad_token_id", None)
    eos = getattr(model.generation_config, "eos_token_id", None)
    with torch.inference_mode():
        return model.generate(ids, attention_mask=attention, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens if force else None, do_sample=False, num_beams=1,
                              pad_token_id=pad if pad is not None else eos, temperature=None, top_p=None,
                              top_k=None)[0, ids.shape[1]:]


def greedy_decode(model: nn.Module, ids: torch.Tensor, new_tokens: int, repeats: int = 1) -> DecodeResult:
    """Generate `new_tokens` greedily after `ids` [1, n]; decode speed excludes the prefill (timed apart as the
    first token). The best of `repeats` runs after one warm-up."""
    if new_tokens < 2:
        raise ValueError("time at least 2 new tokens")
    _generate(model, ids, 2)  # warm-up
    best_first, best_all, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        _generate(model, ids, 1)
        t1 = time.perf_counter()
        out = _generate(model, ids, new_tokens)
        t2 = time.perf_counter()
        best_first, best_all = min(best_first, t1 - t0), min(best_all, t2 - t1)
    return DecodeResult(out, max(best_all - best_first, 1e-9), best_first)


def match(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int | None]:
    """(fraction of equal positions, index of the first difference or None)."""
    n = min(len(a), len(b))
    same = (a[:n] == b[:n]).tolist()
    first = next((i for i, s in enumerate(same) if not s), None)
    return (sum(same) / n if n else 1.0), first
