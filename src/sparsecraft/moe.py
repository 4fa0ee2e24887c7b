"""Fused mixture-of-experts weights as one linear layer per expert, so that every pruner, criterion, refiner,
fine-tuning mask and sparsity count sees them.

transformers 5 stores the routed experts of Mixtral, Qwen-MoE, DeepSeek, OLMoE, GPT-OSS and ~60 other models as
3-D tensors (`gate_up_proj` [experts, 2 x intermediate, hidden], `down_proj` [experts, hidden, intermediate], or
transposed), in classes decorated with `use_experts_implementation`, which records the layout: `has_gate`,
`has_bias`, `is_transposed`, `has_post_expert_norm`, and the gating function `_apply_gate`.

`split_experts(model)` replaces each such module with `ExpertLinears`: one `Expert` per expert holding
`gate_up_proj` (or `up_proj`) and `down_proj` as `nn.Linear`, computing the same routed forward: tokens go only
to the experts the router picked, so calibration hooks see each expert's own inputs. (The logits agree to float
rounding: with several threads, separately allocated weights may take another matmul summation order.)
`merge_experts(model)` writes the (pruned) weights back into the original 3-D tensors, so `save_pretrained` files
keep the model's own format. `experts_split(model)` is the context manager the entry points use: it splits what
is fused and merges back on exit only what it split.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import ModelError

_LAYOUT = ("has_gate", "has_bias", "is_transposed")


def _up_name(fused: nn.Module) -> str:
    """The fused module's first projection: gate and up together, or up alone (experts without a gate)."""
    return "gate_up_proj" if fused.has_gate else "up_proj"


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module with 3-D expert tensors in a layout sparsecraft knows."""
    if isinstance(module, ExpertLinears) or not all(hasattr(module, a) for a in _LAYOUT):
        return False
    up = _up_name(module)
    params = dict(module.named_parameters(recurse=False))
    return all(name in params and params[name].dim() == 3 for name in (up, "down_proj"))


def expert_matrices(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(f"{expert}.{projection}", [out, in] weight view) for each expert of a fused module, named as in
    ExpertLinears, without copying."""
    up_name = _up_name(module)
    out = []
    for e in range(getattr(module, up_name).shape[0]):
        for name in (up_name, "down_proj"):
            w = getattr(module, name)[e]
            out.append((f"{e}.{name}", w.t() if module.is_transposed else w))
    return out


class Expert(nn.Module):
    """One expert's projections as linear layers (names as in the fused module: `gate_up_proj` or `up_proj`,
    then `down_proj`)."""

    def __init__(self, up_name: str, up: nn.Linear, down: nn.Linear, gated: str | None = None):
        super().__init__()
        self.up_name = up_name
        self.gated = gated  # None (up_proj only), "concatenated" ([gate; up] rows) or "interleaved" (gate0, up0, ...)
        self.add_module(up_name, up)
        self.down_proj = down


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> nn.Linear:
    w = (weight.t() if transposed else weight).detach().clone().contiguous()
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(w, requires_grad=weight.requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return layer


class ExpertLinears(nn.Module):
    """Routed experts as linear layers: forward(hidden_states [tokens, hidden], top_k_index, top_k_weights)
    like the fused module's eager forward. The fused module, emptied of its expert tensors, is kept as
    `fused` for its gating function, activation and optional post-expert norm."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.up_name = _up_name(fused)
        transposed = bool(fused.is_transposed)
        up_w, down_w = getattr(fused, self.up_name), fused.down_proj
        up_b = getattr(fused, f"{self.up_name}_bias") if fused.has_bias else None
        down_b = fused.down_proj_bias if fused.has_bias else None
        gated = None if not fused.has_gate else (
            "concatenated" if getattr(fused, "is_concatenated", True) else "interleaved")
        for e in range(up_w.shape[0]):
            self.add_module(str(e), Expert(
                self.up_name,
                _linear(up_w[e], None if up_b is None else up_b[e], transposed),
                _linear(down_w[e], None if down_b is None else down_b[e], transposed),
                gated,
            ))
        self.num_experts = up_w.shape[0]
        self.calibrate_all = False  # set while calibrating with moe_calibration=all (see calibrating_all_experts)
        self.requires_grad_flags = {n: getattr(fused, n).requires_grad for n in self._fused_names(fused)}
        for name in self._fused_names(fused):
            delattr(fused, name)  # the per-expert copies are the weights now (merge_experts puts them back)
        self.fused = fused

    def __getattr__(self, name: str):
        """Attributes the model's MoE block may read from its experts module (num_experts, act_fn, config, ...)
        come from the fused module; its expert tensors are gone while split (AttributeError)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            fused = self._modules.get("fused")
            if fused is None:
                raise
            return getattr(fused, name)

    def _fused_names(self, fused: nn.Module) -> list[str]:
        names = [self.up_name, "down_proj"]
        return names + [f"{n}_bias" for n in names] if fused.has_bias else names

    def expert(self, index: int) -> Expert:
        return self._modules[str(index)]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        if self.calibrate_all:  # every expert sees every token (for its statistics); only routed outputs count
            hit = list(range(self.num_experts))
        else:
            with torch.no_grad():
                hit = torch.unique(top_k_index[(top_k_index >= 0) & (top_k_index < self.num_experts)]).tolist()
        for e in hit:
            token_idx, top_k_pos = torch.where(top_k_index == e)
            if self.calibrate_all:
                h = self._expert_forward(e, hidden_states)[token_idx]
            else:
                h = self._expert_forward(e, hidden_states[token_idx])
            h = h * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out

    def _expert_forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        fused, expert = self.fused, self.expert(index)
        h = getattr(expert, self.up_name)(x)
        h = fused._apply_gate(h) if fused.has_gate else fused.act_fn(h)
        h = expert.down_proj(h)
        if getattr(fused, "has_post_expert_norm", False):
            h = fused.post_expert_norm(h)
        return h

    def merged(self) -> nn.Module:
        """The fused module again, its 3-D tensors rebuilt from the (possibly pruned) expert layers."""
        fused = self.fused
        transposed = bool(fused.is_transposed)
        experts = [self.expert(e) for e in range(self.num_experts)]
        for name in (self.up_name, "down_proj"):
            layers = [getattr(x, name) for x in experts]
            if not all(type(layer) is nn.Linear for layer in layers):
                raise ModelError(f"expert layers {name} are {type(layers[0]).__name__}, not nn.Linear: convert them "
                                "back (sparsecraft.kernels.densify_model) before saving the model")
            weight = torch.stack([(x.weight.t() if transposed else x.weight).detach() for x in layers])
            fused.register_parameter(name, nn.Parameter(weight, requires_grad=self.requires_grad_flags[name]))
            if fused.has_bias:
                bias = torch.stack([x.bias.detach() for x in layers])
                fused.register_parameter(f"{name}_bias", nn.Parameter(
                    bias, requires_grad=self.requires_grad_flags[f"{name}_bias"]))
        return fused


def split_experts(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace every fused experts module of `model` (or those named) by ExpertLinears, in place; returns their
    names."""
    found = [name for name, module in model.named_modules() if name and is_fused_experts(module)]
    chosen = found if names is None else [n for n in found if n in set(names)]
    for name in chosen:
        model.set_submodule(name, ExpertLinears(model.get_submodule(name)))
    return chosen


def merge_experts(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Put the fused experts modules back (all ExpertLinears, or those named); returns their names."""
    found = [name for name, module in model.named_modules() if isinstance(module, ExpertLinears)]
    chosen = found if names is None else [n for n in found if n in set(names)]
    for name in chosen:
        model.set_submodule(name, model.get_submodule(name).merged())
    return chosen


@contextlib.contextmanager
def _swapped(model: nn.Module, change, undo):
    """`change(model)` on entry; on exit `undo(model, names)` for exactly the modules it changed."""
    names = change(model)
    try:
        yield names
    finally:
        if names:
            undo(model, names)


def experts_split(model: nn.Module):
    """Within the block, fused experts are ExpertLinears; those this call split are merged back on exit."""
    return _swapped(model, split_experts, merge_experts)


@contextlib.contextmanager
def calibrating_all_experts(model: nn.Module, enabled: bool = True):
    """Within the block, every split expert runs on every token (its statistics cover all calibration tokens),
    while each block's output still combines only the experts the router picked."""
    experts = [m for m in model.modules() if isinstance(m, ExpertLinears)] if enabled else []
    for m in experts:
        m.calibrate_all = True
    try:
        yield
    finally:
        for m in experts:
            m.calibrate_all = False


def experts_merged(model: nn.Module):
    """Within the block (saving, for example), ExpertLinears are the model's own fused modules again."""
    return _swapped(model, merge_experts, split_experts)
