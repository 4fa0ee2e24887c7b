"""Where decode time goes: per-token milliseconds in linear layers, in attention and in everything else, for
Hugging Face `generate` and for the lean loop, measured the same way.

Linear time is the wall time inside every linear layer's call (nn.Linear, Conv1D, SparseLinear, lm_head
included), attention time the wall time inside each block's attention module (HF) or the fast decoder's attention
step (RoPE, KV cache write, SDPA) minus the linear layers inside it; the native decoder's C step measures the
same two stages itself. Both come from one instrumented run (forward
hooks); "other" is the plain, uninstrumented run's time per token minus those two, so the hooks' own cost is not
counted anywhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

from torch import nn

from ..models import is_prunable


def _linear_modules(model: nn.Module) -> list[nn.Module]:
    from ..kernels.linear import SparseLinear

    seen, out = set(), []
    for m in model.modules():
        if (is_prunable(m) or isinstance(m, SparseLinear)) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in ("self_attn", "attn", "attention")
            and any(True for _ in m.children())]


class _Clock:
    """Accumulates wall time between pre- and post-hooks; nested linear calls inside attention are subtracted."""

    def __init__(self):
        self.linear = 0.0
        self.attention = 0.0
        self._starts: list[float] = []
        self._attn_start = 0.0
        self._linear_at_attn = 0.0

    def linear_pre(self, *_):
        self._starts.append(time.perf_counter())

    def linear_post(self, *_):
        self.linear += time.perf_counter() - self._starts.pop()

    def attn_pre(self, *_):
        self._attn_start, self._linear_at_attn = time.perf_counter(), self.linear

    def attn_post(self, *_):
        self.attention += time.perf_counter() - self._attn_start - (self.linear - self._linear_at_attn)


@contextmanager
def instrumented(model: nn.Module, decoder=None):
    """Hooks that time the linear layers and attention of `model` (and of a FastDecoder's attention step)."""
    clock = _Clock()
    handles = []
    for m in _linear_modules(model):
        handles.append(m.register_forward_pre_hook(clock.linear_pre))
        handles.append(m.register_forward_hook(clock.linear_post))
    if decoder is not None and hasattr(decoder, "clock"):  # NativeDecoder: the C step times itself
        decoder.clock = clock
    elif decoder is not None and hasattr(decoder, "attend"):
        plain = decoder.attend

        def timed(*args, **kwargs):
            clock.attn_pre()
            try:
                return plain(*args, **kwargs)
            finally:
                clock.attn_post()

        decoder.attend = timed
    else:
        for m in _attention_modules(model):
            handles.append(m.register_forward_pre_hook(clock.attn_pre))
            handles.append(m.register_forward_hook(clock.attn_post))
    try:
        yield clock
    finally:
        for h in handles:
            h.remove()
        if decoder is not None and hasattr(decoder, "clock"):
            decoder.clock = None
        elif decoder is not None and "attend" in vars(decoder):
            del decoder.attend  # back to the class's method


def split(generate: Callable[[int], None], model: nn.Module, new_tokens: int, decoder=None) -> dict:
    """{'ms_per_token', 'linear_ms', 'attention_ms', 'other_ms'} per decode step (prefill excluded).

    `generate(k)` must produce exactly k new tokens (no stop at end-of-sequence). Each quantity is the difference
    between a run of `new_tokens` and a run of 1 token (the prefill and the first token), over new_tokens - 1
    steps: plain runs for the total, instrumented runs for linear and attention."""
    if new_tokens < 2:
        raise ValueError("split needs at least 2 new tokens")

    def timed(k: int) -> float:
        t0 = time.perf_counter()
        generate(k)
        return time.perf_counter() - t0

    generate(2)  # warm-up
    steps = new_tokens - 1
    total = (timed(new_tokens) - timed(1)) / steps
    parts = []
    for k in (1, new_tokens):
        best = None
        for _ in range(2):  # the smaller of two instrumented runs (the first one warms the hooks up)
            with instrumented(model, decoder) as clock:
                generate(k)
            best = (clock.linear, clock.attention) if best is None else \
                (min(best[0], clock.linear), min(best[1], clock.attention))
        parts.append(best)
    linear = (parts[1][0] - parts[0][0]) / steps
    attention = (parts[1][1] - parts[0][1]) / steps
    return {"ms_per_token": total * 1e3, "linear_ms": linear * 1e3, "attention_ms": attention * 1e3,
            "other_ms": (total - linear - attention) * 1e3}
