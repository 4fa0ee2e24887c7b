"""Models that are not Hugging Face transformers: any nn.Module whose weights live in nn.Linear and that maps
token ids to logits can be pruned with every method, calibrated block by block."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsecraft
from sparsecraft.models import unprunable_weights
from sparsecraft.patterns import Pattern, is_nm_valid
from sparsecraft.registry import get_method

VOCAB = 64


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    """Embedding, a ModuleList of residual MLP blocks, a head: forward(ids) -> logits tensor."""

    def __init__(self, dim: int = 32, depth: int = 3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class SequentialLM(nn.Sequential):
    """No ModuleList at all: the whole model is one block."""

    def __init__(self, dim: int = 32):
        super().__init__(nn.Embedding(VOCAB, dim), nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, VOCAB))


def ids():
    return torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "ria", "sparsegpt"])
@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.6), ("2:4", None)])
def test_custom_module_list_model(method, pattern, sparsity):
    torch.manual_seed(0)
    model = TinyLM().eval()
    _, report = sparsecraft.prune(model, ids(), method=method, pattern=pattern, sparsity=sparsity, progress=False)
    names = {r.name for r in report.layers}
    assert names == {f"blocks.{i}.{n}" for i in range(3) for n in ("up", "down")}  # head is outside the blocks
    for r in report.layers:
        w = model.get_submodule(r.name).weight
        if pattern == "2:4":
            assert is_nm_valid(w, Pattern.parse("2:4"))
        assert int((w == 0).sum()) == r.zeros >= int(w.numel() * (sparsity or 0.5)) - w.shape[0]
    result = sparsecraft.evaluate(model, ids(), seqlen=16, progress=False)
    assert result["perplexity"] > 1 and result["sparsity"] > 0.4


def test_sequential_model_is_one_block():
    torch.manual_seed(0)
    model = SequentialLM().eval()
    _, report = sparsecraft.prune(model, ids(), method="sparsegpt", sparsity=0.5, targets=[r"^[13]$"],
                                  progress=False)
    assert {r.name for r in report.layers} == {"1", "3"}
    assert all(r.sparsity == pytest.approx(0.5) for r in report.layers)


def test_model_without_logits_is_refused():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])
            self.embed = nn.Embedding(VOCAB, 4)

        def forward(self, ids):
            return {"hidden": self.blocks[0](self.embed(ids))}

    from sparsecraft.errors import ModelError

    with pytest.raises(ModelError, match="logits"):
        sparsecraft.evaluate(Bad(), ids(), seqlen=16, progress=False)


class FusedBlock(Block):
    """A block that also holds a weight matrix outside any nn.Linear (an expert layout sparsecraft does not know)."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.fused = nn.Parameter(torch.randn(2, dim, dim) * 0.1)

    def forward(self, x):
        return super().forward(x) + x @ self.fused[0]


def test_weights_that_are_not_linear_layers_are_named_in_a_warning():
    """Weight tensors in the blocks that no nn.Linear owns (and that are not transformers' fused experts, which
    are pruned per expert, see test_moe.py): pruning says so instead of silently reporting a sparsity the model
    does not have."""
    torch.manual_seed(0)
    model = TinyLM().eval()
    model.blocks = nn.ModuleList(FusedBlock(32) for _ in range(3))
    with pytest.warns(UserWarning, match=r"not nn.Linear/Conv1D layers .* stay dense") as caught:
        sparsecraft.prune(model, ids(), method="wanda", sparsity=0.5, progress=False)
    left = dict(unprunable_weights(model))
    assert set(left) == {f"blocks.{i}.fused" for i in range(3)}
    message = str(caught[0].message)
    assert f"{len(left)} weight tensors" in message and f"{sum(left.values()):,} parameters" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every block weight is a Linear here: no warning
        sparsecraft.prune(TinyLM().eval(), ids(), method="wanda", sparsity=0.5, progress=False)


class SkippingBlock(Block):
    """A block with a layer the forward never calls: it sees no calibration input."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.unused = nn.Linear(dim, dim)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_layer_without_calibration_inputs_falls_back_to_magnitude(method):
    """No tokens reach a layer (an expert the router never picks): its statistics are empty, so the pruner
    cannot weigh its weights (SparseGPT would zero the whole matrix as 'dead inputs'). It is pruned by magnitude,
    to the exact sparsity, with a warning naming it."""
    torch.manual_seed(0)
    model = TinyLM().eval()
    model.blocks = nn.ModuleList(SkippingBlock(32) for _ in range(2))
    dense = model.blocks[1].unused.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"2 layers saw no calibration token \(e.g. blocks.0.unused.*magnitude"):
        _, report = sparsecraft.prune(model, ids(), method=method, sparsity=0.5, progress=False)
    pruned = model.blocks[1].unused.weight.detach()
    expected, _ = get_method("magnitude").prune(dense, None, 0.5, Pattern.parse("unstructured"), None)
    assert torch.equal(pruned, expected)
    layers = {r.name: r for r in report.layers}
    assert layers["blocks.1.unused"].sparsity == 0.5 and layers["blocks.1.up"].sparsity == 0.5
