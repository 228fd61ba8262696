"""Tiny transformers models built from configs (never downloaded), and the helpers that compile and compare them.

``build(family, dtype, impl)`` returns a one- or two-layer ``*ForCausalLM`` with hidden size 32, 8 experts, top-2,
every parameter and buffer freshly random (transformers initialises several router weights to zeros, which would
make every routing decision a tie), switched to ``experts_implementation=impl``.

``block(family, dtype, impl)`` is the family's MoE block alone (``MixtralSparseMoeBlock``, ...), built from the same
config with ``experts_implementation=impl`` (None leaves transformers' eager loop, as for any bare block): far
cheaper to compile than a whole model, for the dtype x implementation matrix.

``train_step(model, compiled, ids)`` runs forward and backward through both and returns the relative errors of
the logits, the router logits (kept for the aux loss), the aux loss and the gradients (worst parameter).

``FusedSpecs`` is an inner compiler that records the MoESpec of every fused node the backend left in a graph.
"""

from __future__ import annotations

import torch
import transformers

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
FAMILIES = ("mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "nemotron_h")
_COMMON = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, vocab_size=64, num_hidden_layers=1,
               max_position_embeddings=64)


def config(family: str, **overrides):
    c = dict(_COMMON)
    if family == "mixtral":
        c.update(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
        cls = transformers.MixtralConfig
    elif family == "qwen2_moe":
        c.update(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=8,
                 num_experts_per_tok=2, norm_topk_prob=False)
        cls = transformers.Qwen2MoeConfig
    elif family == "deepseek_v3":
        c.update(intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                 n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=0, routed_scaling_factor=2.5,
                 norm_topk_prob=True, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                 v_head_dim=16)
        cls = transformers.DeepseekV3Config
    elif family == "gpt_oss":
        c.update(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, head_dim=16)
        cls = transformers.GptOssConfig
    elif family == "nemotron_h":
        # Layers come from layers_block_type: each of num_hidden_layers becomes an attention + MoE pair (no Mamba
        # mixer). The experts are plain relu2 MLPs; the router is DeepSeek-V3's.
        pairs = overrides.pop("num_hidden_layers", c.pop("num_hidden_layers"))
        c.update(head_dim=16, layers_block_type=["full_attention", "moe"] * pairs, n_routed_experts=8,
                 num_experts_per_tok=2, moe_intermediate_size=24,
                 moe_shared_expert_intermediate_size=40, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                 norm_topk_prob=True)
        cls = transformers.NemotronHConfig
    else:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    c.update(overrides)
    return cls(**c)


_MODELS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
           "deepseek_v3": "DeepseekV3ForCausalLM", "gpt_oss": "GptOssForCausalLM",
           "nemotron_h": "NemotronHForCausalLM"}


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Fresh random values everywhere: matrices ~ N(0, 1/fan_in), norms ~ 1, biases and buffers small."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
            elif "norm" in name or "layernorm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if "correction_bias" in name:
                b.normal_(0.0, 0.1)
    return model


def build(family: str, dtype: torch.dtype = torch.float32, impl: str = "grouped_mm", **overrides):
    model = getattr(transformers, _MODELS[family])(config(family, **overrides))
    randomize(model).to(dtype)
    model.set_experts_implementation(impl)
    return model


_BLOCKS = {"mixtral": ("mixtral", "MixtralSparseMoeBlock"), "qwen2_moe": ("qwen2_moe", "Qwen2MoeSparseMoeBlock"),
           "deepseek_v3": ("deepseek_v3", "DeepseekV3MoE"), "gpt_oss": ("gpt_oss", "GptOssMLP"),
           "nemotron_h": ("nemotron_h", "NemotronHMoE")}


def block(family: str, dtype: torch.dtype = torch.float32, impl=None, **overrides):
    import importlib
    module, cls = _BLOCKS[family]
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    blk = getattr(mod, cls)(config(family, experts_implementation=impl, **overrides))
    return randomize(blk).to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def train_step(model, compiled, ids: torch.Tensor) -> dict:
    """Forward + backward (loss: mean square of the logits plus the aux loss) through eager and compiled."""
    results = []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        out = fn(ids, output_router_logits=True)
        loss = out.logits.float().pow(2).mean()
        if isinstance(getattr(out, "aux_loss", None), torch.Tensor):  # absent, None or a plain 0 in some models
            loss = loss + out.aux_loss.float()
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (ref, g_ref), (got, g_got) = results
    # Compiled autograd returns zeros where eager leaves a parameter that did not take part without a .grad
    # (plain torch.compile does the same: DeepSeek-V4's unused attention compressor).
    extra = set(g_got) - set(g_ref)
    assert set(g_ref) <= set(g_got) and not any(g_got[n].any() for n in extra), sorted(set(g_ref) ^ set(g_got))
    errs = {"logits": rel_err(got.logits, ref.logits), "grads": max(rel_err(g_got[n], g_ref[n]) for n in g_ref)}
    if getattr(ref, "router_logits", None):   # models (and transformers versions) that return them
        errs["router_logits"] = max(rel_err(a, b) for a, b in zip(got.router_logits, ref.router_logits))
        errs["first_router_logits"] = rel_err(got.router_logits[0], ref.router_logits[0])
    if isinstance(getattr(ref, "aux_loss", None), torch.Tensor):
        errs["aux_loss"] = rel_err(got.aux_loss, ref.aux_loss)
    return errs


def block_step(blk, compiled, x: torch.Tensor) -> dict:
    """Forward + backward through a bare block (eager and compiled): relative errors of the floating outputs
    (nested ones too: the router logits a block returns for its losses), the input gradient and the worst
    parameter gradient."""
    results = []
    for fn in (blk, compiled):
        blk.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        outs = [o for o in torch.utils._pytree.tree_leaves(fn(xi)) if o.is_floating_point()]
        weight = torch.linspace(0.5, 1.5, outs[0].numel()).view_as(outs[0])
        loss = (outs[0].float() * weight).sum() + sum(o.float().pow(2).sum() for o in outs[1:])
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in blk.named_parameters() if p.grad is not None}
        results.append((outs, xi.grad, grads))
    (o_ref, x_ref, g_ref), (o_got, x_got, g_got) = results
    assert g_ref.keys() == g_got.keys(), sorted(set(g_ref) ^ set(g_got))
    assert len(o_got) == len(o_ref)
    return {"outputs": max(rel_err(a, b) for a, b in zip(o_got, o_ref)), "x_grad": rel_err(x_got, x_ref),
            "grads": max(rel_err(g_got[n], g_ref[n]) for n in g_ref)}


# Ops that only an unfused transformers experts region contains.
_EXPERT_OPS = ("grouped_mm", "bmm")


class FusedSpecs:
    """An inner compiler (aot_eager underneath) that records, per graph it receives after the rewrite, the
    MoESpec of each fused call and any expert op left unfused."""

    def __init__(self, inner: str = "aot_eager"):
        self.per_graph: list = []
        self.leftover: list = []
        self.inner = inner

    def __call__(self, gm, example_inputs):
        from moe_fuser.fx.graph import op
        self.per_graph.append([n.target.spec for n in gm.graph.nodes
                               if n.op == "call_function" and hasattr(n.target, "spec")])
        self.leftover += [n.name for n in gm.graph.nodes if op(n) in _EXPERT_OPS]
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend(self.inner)(gm, example_inputs)

    @property
    def specs(self) -> list:
        return [s for g in self.per_graph for s in g]


# ------------------------------------------------------------------------------------------- Switch Transformers
def switch_config(**overrides):
    c = dict(d_model=32, d_ff=48, num_experts=4, expert_capacity=3, num_layers=1, num_sparse_encoder_layers=1,
             num_decoder_layers=0, vocab_size=64, num_heads=2, d_kv=16, router_jitter_noise=0.0, dropout_rate=0.0)
    c.update(overrides)
    return transformers.SwitchTransformersConfig(**c)


def switch_v4_block(dtype: torch.dtype = torch.float32, **overrides):
    """transformers' own SwitchTransformersSparseMLP (its Top1Router, its ModuleDict of DenseActDense experts)
    running the sparse MLP forward as transformers 4 wrote it: ``next = x.clone()``, each expert overwrites its
    tokens, ``out = router_probs * next``, so a token dropped by the capacity keeps its input, scaled."""
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    class SwitchV4SparseMLP(SwitchTransformersSparseMLP):
        def forward(self, hidden_states):
            router_mask, router_probs, router_logits = self.router(hidden_states)
            next_states = hidden_states.clone()
            for idx, expert in enumerate(self.experts.values()):
                token_indices = router_mask[:, :, idx].bool()
                next_states[token_indices] = expert(hidden_states[token_indices]).to(next_states.dtype)
            hidden_states = router_probs * next_states
            return hidden_states, (router_logits, router_mask.argmax(-1))

    return randomize(SwitchV4SparseMLP(switch_config(**overrides))).to(dtype)


def switch_v5_block(dtype: torch.dtype = torch.float32, **overrides):
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP
    return randomize(SwitchTransformersSparseMLP(switch_config(**overrides))).to(dtype)
