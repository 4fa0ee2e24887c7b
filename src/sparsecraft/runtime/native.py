"""NativeDecoder: the LLaMA family's whole decode step in one call into sparsecraft's C library.

Per token, Python makes one call (`_sparsekernels.decode_step`): the embedding row, every block (RMSNorm, the
q/k/v projections, q/k norms where the model has them, RoPE, the KV cache write, attention, the o projection, the
gated MLP, residuals), the final norm and lm_head run in C, the projections on the very kernels SparseLinear uses
(bitmask or dense, bf16/fp16/fp32 or int8 values). Activations, the KV cache and the elementwise arithmetic are
float32, so on a bfloat16 model it is more precise than the model's own bf16 forward, not bit-identical to it.
Only the inputs of projections with bf16 weights are rounded to bf16 (`round_inputs`, default), as the model's own
bf16 forward (and llama.cpp's BF16 path) feeds them: the AVX512_BF16 kernels then take one vdpbf16ps per 32 values
instead of two. With `round_inputs=False` the inputs stay float32 (the kernels split them into bf16 hi + lo) and
the greedy tokens equal transformers' generate on the same weights computed in float32 (tests/test_runtime.py).

Built from the model's modules at each `generate` (so `sparsify_model` may run in between); nn.Linear layers run on
the kernels' dense path over their own weight tensors (nothing is copied but the small norm weights and biases,
cast to float32).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError
from .decode import LlamaFamilyDecoder, fast_path_problem, sliding_window

LIN_FIELDS, STEP_HEADER, LAYER_FIELDS = 10, 12, 7 * 10 + 7


def native_problem(model: nn.Module) -> str | None:
    """Why NativeDecoder cannot run `model` (None when it can)."""
    from ..kernels.linear import available

    problem = fast_path_problem(model)
    if problem is not None:
        return problem
    if not available():
        return "sparsecraft's C kernels are not built"
    for layer in model.model.layers:
        act = layer.mlp.act_fn
        if type(act).__name__ not in ("SiLU", "SiLUActivation"):
            return f"the MLP activation is {type(act).__name__}, not SiLU"
    from ..activation.hooks import masks
    from ..kernels.colskip import ColumnSkipLinear

    if masks(model) or any(isinstance(m, ColumnSkipLinear) for m in model.modules()):
        return "activation thresholds are installed (the native step does not apply them; the fast decoder does)"
    if any(isinstance(m, nn.Linear) and m.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16)
           for m in model.modules()):
        return "a linear layer is not float32, bfloat16 or float16"
    return None


class NativeDecoder(LlamaFamilyDecoder):
    """One C call per token over a float32 KV cache (see the module docstring)."""

    name = "native"
    what = "native decode step"

    @staticmethod
    def problem(model: nn.Module) -> str | None:
        return native_problem(model)

    def __init__(self, model: nn.Module, round_inputs: bool = True):
        super().__init__(model)
        from ..kernels.linear import require

        self.round_inputs = bool(round_inputs)
        self.ext = require()
        self.clock = None  # a profile clock: the C step adds its linear / attention seconds to it
        self.timing = torch.zeros(2, dtype=torch.float64)

    def _linear(self, module: nn.Module, keep: list) -> list[int]:
        """The kernel job fields of a linear layer (a SparseLinear, or an nn.Linear run on the dense path)."""
        from ..kernels.linear import SparseLinear

        if not isinstance(module, SparseLinear):
            module = SparseLinear.from_module(module, "dense")  # shares the weight tensor
        keep.append(module)
        values = module._w_t
        bias = module._bias_t
        if bias is not None:
            bias = bias.detach().float().contiguous()
            keep.append(bias)
        def ptr(t):
            return t.data_ptr() if t is not None else 0

        bitmask = module._mask_t is not None
        return [int(bitmask), module._wt, module.out_features, module.in_features, ptr(module._mask_t),
                ptr(module._rowptr_t), values.data_ptr(), 0 if bitmask else values.stride(0), ptr(module._scale_t),
                ptr(bias)]

    def reset(self, max_length: int) -> None:
        """Describe the model's current layers to the C step and make a KV cache of max_length positions."""
        from ..kernels.linear import DTYPES

        model, inner = self.model, self.model.model
        keep: list = []  # tensors the C side points into: alive as long as this plan

        def f32(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().float().contiguous()
            keep.append(t)
            return t

        self._grow_cache(max_length, len(inner.layers), torch.float32)
        layers = []
        eps = {float(layer.input_layernorm.variance_epsilon) for layer in inner.layers} | \
            {float(layer.post_attention_layernorm.variance_epsilon) for layer in inner.layers}
        qk_eps = 0.0
        scale = None
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            fields = []
            for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                fields += self._linear(m, keep)
            qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
            if qn is not None:
                qk_eps = float(qn.variance_epsilon)
            fields += [f32(layer.input_layernorm.weight).data_ptr(),
                       f32(layer.post_attention_layernorm.weight).data_ptr(),
                       f32(qn.weight).data_ptr() if qn is not None else 0,
                       f32(kn.weight).data_ptr() if kn is not None else 0,
                       self.k_cache[i].data_ptr(), self.v_cache[i].data_ptr(), int(sliding_window(attn) or 0)]
            layers.append(fields)
            scale = float(attn.scaling)
        if len(eps) != 1:
            raise ModelError("the native decode step needs one RMSNorm epsilon for every block norm")
        embed = inner.embed_tokens.weight.detach()
        header = [len(layers), model.config.hidden_size, self.heads, self.kv_heads, self.head_dim,
                  inner.layers[0].mlp.gate_proj.out_features, embed.shape[0], self.capacity, embed.data_ptr(),
                  DTYPES[embed.dtype], f32(inner.norm.weight).data_ptr(), int(self.round_inputs)] + \
            self._linear(model.lm_head, keep)
        self.vocab = model.lm_head.out_features
        self.header = torch.tensor(header, dtype=torch.int64)
        self.layers = torch.tensor(layers, dtype=torch.int64)
        self.params = torch.tensor([eps.pop(), float(inner.norm.variance_epsilon), qk_eps, scale],
                                   dtype=torch.float64)
        self.keep = keep
        positions = torch.arange(self.capacity)[None]
        cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
        self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        self.logits = torch.empty(self.vocab)
        self.row = self.cos.shape[1] * 4  # bytes per position of the cos/sin tables

    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        from ..kernels.linear import _path_code

        if pos + ids.numel() > self.capacity:
            self.reset(pos + ids.numel())
        step, path, threads = self.ext.decode_step, _path_code(), torch.get_num_threads()
        h, lp, pp, out = self.header.data_ptr(), self.layers.data_ptr(), self.params.data_ptr(), self.logits.data_ptr()
        c, s = self.cos.data_ptr(), self.sin.data_ptr()
        clock = self.clock
        timing = self.timing.zero_().data_ptr() if clock is not None else 0
        for i, token in enumerate(ids.tolist()):
            p = pos + i
            step(h, lp, pp, token, p, c + p * self.row, s + p * self.row, out, path, threads, timing)
        if clock is not None:
            clock.linear += float(self.timing[0])
            clock.attention += float(self.timing[1])
        return self.logits
