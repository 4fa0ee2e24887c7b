"""Activation (contextual) sparsity: per token, zero the activations whose magnitude is below a calibrated threshold,
so that the weight columns they multiply need not be read (TEAL, CATS, CHESS, WINA).

    model, report = sparsecraft.activate(model, "builtin", method="teal", sparsity=0.4, allocation="greedy")

Methods (one file each, registered in registry.py): `teal` (|x| on every linear layer's input), `wina` (|x_i| times
the column norm of the consuming weights), `cats` (|SiLU(gate(x))| in gated MLPs), `chess` (channel-wise MLP
thresholds from a_i^2 E[up_i^2], q/o-only attention). Allocation: `uniform` or `greedy` (TEAL's block-wise greedy);
the byte-weighted sparsity is the requested one either way (calibrate.py).

**The installed thresholds, for kernel authors.** Everything a kernel needs is two plain dicts keyed by the full
module name (`model.named_modules()`):

* `installed(model) -> dict[str, torch.Tensor]`: the threshold of each masked module, float32, either a 0-d tensor
  (one threshold for the tensor) or a 1-d tensor of one threshold per feature (WINA, CHESS's MLP);
* `installed_sites(model) -> dict[str, str]`: `"input"` — the module is an nn.Linear (or Conv1D) and its *input* x is
  masked before the matmul, `x[..., i] = 0 where |x[..., i]| < t[i]` (a 0-d t applies to every i), so its weight
  column i is not needed; `"output"` — the module is a gated MLP's activation (`mlp.act_fn`) and its *output*
  a = SiLU(gate(x)) is masked the same way, so up_proj's row i and down_proj's column i are not needed.

Values equal to the threshold are kept; a threshold of 0 masks nothing (0-valued inputs are zero anyway); inf masks
everything. Layers that read one tensor (q/k/v, gate/up) get the same threshold object values under each name.
The masking is a forward pre-hook (input sites) or forward hook (output sites) per module
(`hooks.ThresholdMask`, `module._sparsecraft_activation`); the weights and the state_dict are untouched. A kernel
takes over a module by reading its threshold, calling `hooks.detach(module)` (or `remove(model)` for all) and running
the fused threshold + column-skipping GEMV instead; `install(model, thresholds, sites, policy)` puts hooks back.
`policy` "all" masks every token (what `eval` and `activate` measure); "decode" masks only single-token forwards
(x.shape[-2] == 1), leaving prefill dense, as TEAL's speed path does.

Storage: `activation/thresholds.safetensors` (the `installed(model)` dict as is) in the model directory, and
`sparsecraft.json` → "activation" (recipe, module_sites, features, per-site target and measured sparsity, bytes).
`sparsecraft.load(dir)` installs them; a plain transformers load ignores them and gives the dense model.
"""

from .api import ActivationReport, activate, check_thresholds, install_saved, read_thresholds, save_activation
from .hooks import POLICIES, counting, install, installed, installed_sites, remove
from .recipe import ALLOCATIONS, ActivationRecipe
from .registry import get_method, method_names

__all__ = ["ALLOCATIONS", "POLICIES", "ActivationRecipe", "ActivationReport", "activate", "check_thresholds",
           "counting", "get_method", "install", "install_saved", "installed", "installed_sites", "method_names",
           "read_thresholds", "remove", "save_activation"]
