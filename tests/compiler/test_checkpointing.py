"""Activation checkpointing: dynamo puts a checkpointed block in its own subgraph (a ``tag_activation_checkpoint``
call), so an MoE inside it is matched there. Hand-written loops and transformers models with
``gradient_checkpointing_enable()`` fuse and train eager-equal at two token counts."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moe_fuser

from moe_models import TOL, LoopMoE, Variant, check_train_step, load_example, rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "patterns"))
import tiny_hf  # noqa: E402


class Checkpointed(torch.nn.Module):
    """A block run under torch.utils.checkpoint, as training scripts wrap their layers."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


def _fused_in_bodies(report) -> int:
    return sum(1 for gm in report.graphs for _, body in gm.named_children() for n in body.graph.nodes
               if n.op == "call_function" and hasattr(n.target, "spec"))


@pytest.mark.parametrize("make", [lambda: LoopMoE(Variant(ffn="swiglu")),
                                  lambda: load_example("switch_transformer").SwitchLayer(16, 32)],
                         ids=["loop", "switch"])
def test_checkpointed_handwritten_block_fuses(make):
    model = Checkpointed(make())
    report = moe_fuser.explain(model, torch.randn(2, 5, 16))
    assert report.num_fused == 1 and _fused_in_bodies(report) == 1, report
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": "aot_eager"}, dynamic=True)
    for B, S in ((2, 5), (3, 7)):
        check_train_step(model, compiled, torch.randn(B, S, 16), TOL[torch.float32])


def test_transformers_gradient_checkpointing_fuses_every_layer():
    model = tiny_hf.build("mixtral", num_hidden_layers=2).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    report = moe_fuser.explain(model, input_ids=torch.randint(0, 64, (2, 7)))
    assert report.num_fused == 2, report
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": "aot_eager"})
    for T in (7, 5):
        ids = torch.randint(0, 64, (2, T))
        results = []
        for fn in (model, compiled):
            model.zero_grad(set_to_none=True)
            logits = fn(input_ids=ids).logits
            logits.pow(2).mean().backward()
            results.append((logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        (ref, g_ref), (got, g_got) = results
        assert rel_err(got, ref) <= TOL[torch.float32]
        assert g_ref.keys() == g_got.keys()
        assert max(rel_err(g_got[n], g_ref[n]) for n in g_ref) <= TOL[torch.float32]
