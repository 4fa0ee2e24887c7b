"""A lean decode loop: a static, preallocated KV cache and one decode step with as little Python per token as the
model allows, on whatever linear layers the model holds (sparsecraft's CPU kernels after `sparsify_model`, or
torch's nn.Linear).

Three implementations behind one call, `decoder_for(model)` (the first that can run the model):

* `NativeDecoder` (native.py) for the LLaMA family when the C kernels are built: the whole step in one C call.

* `FastDecoder` for the LLaMA family (LLaMA, Mistral, Qwen2, Qwen3 and their fine-tunes: pre-norm RMSNorm blocks,
  rotary attention with grouped KV heads, a gated MLP). It reads the model's own modules and parameters (nothing is
  copied), keeps K/V in one preallocated tensor per layer, and runs each block as a short straight line of torch
  ops and kernel calls: no module dispatch, no mask building, no cache objects, no logits processors. Its
  arithmetic is the Hugging Face forward's, op for op (RMSNorm in float32, RoPE from the model's own rotary
  module, SDPA), so greedy tokens equal `model.generate`'s on the same weights.
* `HFDecoder` for every other architecture: the model's own forward with its KV cache, driven by the same loop and
  sampler (no `generate` bookkeeping).

`Decoder.generate(ids, max_new_tokens, sampling=None)` is greedy by default, samples with temperature / top-k /
top-p (seeded) when asked, and stops at the model's end-of-sequence tokens unless `stop_at_eos=False`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError, ModelError

FAST_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class Sampling:
    """How the next token is chosen: greedy when temperature is 0, else sampled from the softmax of logits /
    temperature, restricted to the top_k most likely (0: all) and to the smallest set whose probability reaches
    top_p (1.0: all); `seed` makes it repeatable."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0.0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class _Sampler:
    def __init__(self, sampling: Sampling | None):
        self.s = sampling or Sampling()
        self.gen = None if self.s.greedy else torch.Generator().manual_seed(self.s.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token from logits [vocab]."""
        if self.gen is None:
            return int(logits.argmax())
        logits = logits.float() / self.s.temperature
        if self.s.top_k:
            kth = torch.topk(logits, min(self.s.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, -1)
        if self.s.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p >= self.s.top_p  # keep the smallest prefix reaching top_p
            probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
        return int(torch.multinomial(probs, 1, generator=self.gen))


@dataclass
class Generation:
    """What `generate` returns: the new token ids and how long prefill and each decode step took."""

    tokens: list[int]
    prefill_seconds: float
    step_seconds: list[float] = field(default_factory=list)  # one per token after the first

    @property
    def decode_seconds(self) -> float:
        return sum(self.step_seconds)

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first (which comes with the prefill) per second."""
        s = self.decode_seconds
        return len(self.step_seconds) / s if s > 0 else float("nan")


def eos_ids(model: nn.Module) -> set[int]:
    """The model's end-of-sequence token ids (generation config, then model config)."""
    ids: set[int] = set()
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else list(eos))
            break
    return ids


class Decoder:
    """The loop both decoders share; subclasses provide `reset(max_length)`, `forward(ids [n], pos) -> logits [vocab]`
    (of the last of the n tokens, which are at positions pos .. pos + n - 1)."""

    name = "decoder"

    def __init__(self, model: nn.Module):
        self.model = model
        self.eos = eos_ids(model)

    def reset(self, max_length: int) -> None:
        raise NotImplementedError

    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        raise NotImplementedError

    def max_positions(self) -> int | None:
        return getattr(getattr(self.model, "config", None), "max_position_embeddings", None)

    @torch.inference_mode()
    def generate(self, ids, max_new_tokens: int, sampling: Sampling | None = None, *, stop_at_eos: bool = True,
                 on_token=None) -> Generation:
        """Up to `max_new_tokens` tokens after the prompt `ids` ([n] or [1, n] token ids); `on_token(id)` is
        called as each one is chosen (for streaming)."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ConfigError("the prompt has no tokens: give at least one token id")
        if max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        total = ids.numel() + max_new_tokens
        limit = self.max_positions()
        if limit is not None and total > limit:
            raise ConfigError(f"prompt ({ids.numel()} tokens) + {max_new_tokens} new tokens = {total} exceeds the "
                              f"model's {limit} positions: shorten the prompt or ask for fewer tokens")
        out = Generation([], 0.0)
        if max_new_tokens == 0:
            return out
        sample = _Sampler(sampling)
        self.reset(total)
        t0 = time.perf_counter()
        token = sample(self.forward(ids, 0))
        out.prefill_seconds = time.perf_counter() - t0
        pos = ids.numel()
        step_ids = torch.empty(1, dtype=torch.long)
        while True:
            out.tokens.append(token)
            if on_token is not None:
                on_token(token)
            if len(out.tokens) == max_new_tokens or (stop_at_eos and token in self.eos):
                break
            t0 = time.perf_counter()
            step_ids[0] = token
            token = sample(self.forward(step_ids, pos))
            out.step_seconds.append(time.perf_counter() - t0)
            pos += 1
        return out


class HFDecoder(Decoder):
    """Any causal LM through its own forward and KV cache (the loop and sampler are this module's)."""

    name = "hf"

    def reset(self, max_length: int) -> None:
        import inspect

        self.cache = None
        # transformers 5 names the cache argument and output `cache` (`past_key_values` before)
        self.cache_name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else \
            "past_key_values"

    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        out = self.model(input_ids=ids[None], **{self.cache_name: self.cache}, use_cache=True,
                         position_ids=torch.arange(pos, pos + ids.numel())[None], logits_to_keep=1)
        self.cache = getattr(out, self.cache_name)
        return out.logits[0, -1]


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm, op for op (float32 statistics, the weight applied in the input dtype)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def sliding_window(attn: nn.Module) -> int | None:
    """The attention module's sliding window (None: full attention). Qwen2/Qwen3 set it per layer (sliding layers
    only); Mistral's layers read it from the config."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None) if attn.config.model_type == "mistral" else None


class _Block:
    """One decoder block's modules and tensors, looked up once."""

    def __init__(self, layer: nn.Module, index: int):
        attn, mlp = layer.self_attn, layer.mlp
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate, self.up, self.down, self.act = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.ln1, self.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.ln2, self.eps2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.qn = (qn.weight, qn.variance_epsilon) if qn is not None else None
        self.kn = (kn.weight, kn.variance_epsilon) if kn is not None else None
        self.scale = attn.scaling
        self.window = sliding_window(attn)
        self.index = index


def fast_path_problem(model: nn.Module) -> str | None:
    """Why `FastDecoder` cannot run `model` (None when it can)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in FAST_MODEL_TYPES:
        return f"model type {kind!r} is not one of the fast path's ({', '.join(FAST_MODEL_TYPES)})"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb") or \
            not hasattr(model, "lm_head"):
        return "the model does not have the LLaMA layout (model.layers, model.rotary_emb, lm_head)"
    for layer in inner.layers:
        mlp = getattr(layer, "mlp", None)
        if not all(hasattr(getattr(layer, "self_attn", None), n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return f"block {type(layer).__name__} does not have the LLaMA attention/MLP layout"
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None):
        return "logit soft-capping is not implemented in the fast path"
    if any(p.device.type != "cpu" for p in model.parameters()):
        return "the fast path keeps its KV cache on the CPU; the model is on another device"
    return None


class LlamaFamilyDecoder(Decoder):
    """What the fast and native decoders share: the check that they can run the model, and its attention shape."""

    what = "fast decode path"

    @staticmethod
    def problem(model: nn.Module) -> str | None:
        return fast_path_problem(model)

    def __init__(self, model: nn.Module):
        problem = self.problem(model)
        if problem is not None:
            raise ModelError(f"the {self.what} cannot run this model: {problem}")
        super().__init__(model)
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.capacity = 0
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []

    def _grow_cache(self, max_length: int, layers: int, dtype: torch.dtype) -> None:
        """KV caches [kv_heads, max_length, head_dim] per layer; growing keeps the positions already written."""
        if max_length <= self.capacity:
            return
        shape = (self.kv_heads, max_length, self.head_dim)
        for caches in (self.k_cache, self.v_cache):
            old = list(caches)
            caches[:] = [torch.zeros(shape, dtype=dtype) for _ in range(layers)]
            for new, kept in zip(caches, old):
                new[:, :kept.shape[1]] = kept
        self.capacity = max_length


class FastDecoder(LlamaFamilyDecoder):
    """The LLaMA family's decode step as a straight line of tensor ops and kernel calls over a static KV cache."""

    name = "fast"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._bind()
        self.dtype = self.embed.dtype
        self.gqa = self.kv_heads != self.heads

    def _bind(self) -> None:
        """Look up the model's modules and tensors (again: `sparsify_model` may have swapped layers since)."""
        inner = self.model.model
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.norm, self.norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.lm_head = self.model.lm_head
        self.blocks = [_Block(layer, i) for i, layer in enumerate(inner.layers)]

    def reset(self, max_length: int) -> None:
        """Bind the model's current layers and make room for max_length positions (the cache grows, never
        shrinks; old entries are overwritten)."""
        self._bind()
        self._grow_cache(max_length, len(self.blocks), self.dtype)

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    def _mask(self, n: int, pos: int, window: int | None) -> torch.Tensor | None:
        """SDPA's boolean mask for n queries at pos.. over keys 0 .. pos + n - 1 (None when nothing is masked)."""
        end = pos + n
        if n == 1 and (window is None or end <= window):
            return None
        q = torch.arange(pos, end)[:, None]
        k = torch.arange(end)[None, :]
        allowed = k <= q
        if window is not None:
            allowed &= k > q - window
        return allowed

    def attend(self, b: _Block, q, k, v, cos, sin, pos: int, end: int, mask, causal: bool) -> torch.Tensor:
        """RoPE, the KV cache write and SDPA of block b for queries at pos .. end - 1: the attention output
        [n, heads * head_dim]."""
        q = _rotate(q, cos, sin).transpose(0, 1)
        kc, vc = self.k_cache[b.index], self.v_cache[b.index]
        kc[:, pos:end] = _rotate(k, cos, sin).transpose(0, 1)
        vc[:, pos:end] = v.transpose(0, 1)
        a = F.scaled_dot_product_attention(q[None], kc[None, :, :end], vc[None, :, :end], attn_mask=mask,
                                           is_causal=causal and mask is None, scale=b.scale, enable_gqa=self.gqa)
        return a[0].transpose(0, 1).reshape(end - pos, -1)

    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        n = ids.numel()
        end = pos + n
        if end > self.capacity:
            self.reset(end)
        h = F.embedding(ids, self.embed)  # [n, hidden]
        cos, sin = self.rotary(h, torch.arange(pos, end)[None])
        cos, sin = cos[0, :, None], sin[0, :, None]  # [n, 1, head_dim]
        H, G, D = self.heads, self.kv_heads, self.head_dim
        causal = pos == 0 and n > 1
        masks: dict[int | None, torch.Tensor | None] = {}
        attend = self.attend
        for b in self.blocks:
            r = _rms(h, b.ln1, b.eps1)
            q = b.q(r).view(n, H, D)
            k = b.k(r).view(n, G, D)
            v = b.v(r).view(n, G, D)
            if b.qn is not None:
                q = _rms(q, *b.qn)
                k = _rms(k, *b.kn)
            if b.window not in masks:
                masks[b.window] = None if causal and (b.window is None or end <= b.window) else \
                    self._mask(n, pos, b.window)
            h = h + b.o(attend(b, q, k, v, cos, sin, pos, end, masks[b.window], causal))
            r = _rms(h, b.ln2, b.eps2)
            h = h + b.down(b.act(b.gate(r)) * b.up(r))
        last = _rms(h[-1:], self.norm, self.norm_eps)
        return self.lm_head(last)[0]


KINDS = ("native", "fast", "hf")


def decoder_for(model: nn.Module, kind: str | None = None) -> Decoder:
    """The fastest decoder this model supports: NativeDecoder (runtime/native.py: one C call per token) for the
    LLaMA family when the kernels are built, else FastDecoder, else HFDecoder. `kind` ('native', 'fast', 'hf')
    insists on one (a ModelError says why it cannot run)."""
    from .native import NativeDecoder, native_problem

    if kind is not None and kind not in KINDS:
        raise ConfigError(f"unknown decoder {kind!r}: use one of {', '.join(KINDS)}")
    if kind == "native" or (kind is None and native_problem(model) is None):
        return NativeDecoder(model)
    if kind == "fast" or (kind is None and fast_path_problem(model) is None):
        return FastDecoder(model)
    return HFDecoder(model)
