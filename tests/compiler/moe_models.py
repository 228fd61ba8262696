"""Hand-written MoE layers for the compiler tests, and the helpers that compile and compare them.

``LoopMoE(Variant(...))`` writes one MoE block the way research code does, with every style axis the
hand-written pattern family claims to cover (router, dispatch loop, combine, FFN, activation, bias, weight
position) plus *twists*: small departures the pattern must refuse (an extra scale, a skipped expert, an active
dropout), so tests can show "fused and eager-equal, or untouched and eager-equal; never wrong", experts that
switch autocast off (fused, in fp32) and a loop that weights the expert outputs in their own dtype before adding
them to the buffer (under autocast: bf16 products summed in fp32, which the op sums in bf16).

``MixtralV4Block`` is the transformers-4 Mixtral sparse block, written out as it was (one_hot(...).permute(2, 1,
0) + where loop). The seed article's Switch layer is the one in ``examples/switch_transformer.py``
(``load_example``), so the tests compile exactly what users run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTERS = ("softmax_topk_renorm", "softmax_topk", "mixtral_f32", "topk_softmax", "sigmoid_bias", "max_top1",
           "external")
# "any_*": the tokens with expert e in any slot, weighted by (w * (ids == e)).sum(-1), or ("any_dense") by column
# e of a dense [T, E] gate holding w at the ids (makeMoE's weights)
LOOPS = ("where", "one_hot_210", "one_hot_201", "nonzero", "any_nonzero", "any_where", "any_dense")
# in place, then functional (out = out.index_add(...)); an in-place scatter_reduce_ cannot train in eager (its
# backward needs the result it overwrites), so only inference tests take it
COMBINES = ("index_add_", "scatter_add_", "iadd", "index_put_", "index_add", "scatter_add", "scatter_reduce",
            "index_put")
# scatter_reduce forms that do not sum into the buffer: never fused
NOT_SUMS = ("scatter_amax", "scatter_excluding_self")
# Top-1 forms (1-D expert ids): more routers, token masks and column index vectors, assignment into the output
# (which sums the experts only when each token has one); not in the fuzz's axes (it draws k > 1 too).
TOP1_ROUTERS = ("max_top1", "argmax_top1", "topk1_squeezed")
TOP1_LOOPS = ("mask", "nonzero_squeeze")
ASSIGN = "assign"
# "stacked": [E, out, in] parameters through F.linear(x, W[e]); "stacked_kn": [E, in, out] ones as x @ W[e] + b[e];
# "param_kn": experts holding their own [in, out] parameters, x @ w + b
FFNS = ("sequential", "swiglu", "concat", "stacked", "stacked_kn", "param_kn")
ACTS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")
TWISTS = (None, "extra_scale", "skip_expert", "train_dropout", "expert_autocast_off", "weight_in_expert_dtype")

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Variant:
    E: int = 4
    k: int = 2
    D: int = 16
    F: int = 24
    router: str = "softmax_topk_renorm"
    loop: str = "where"
    combine: str = "index_add_"
    ffn: str = "sequential"
    act: str = "silu"
    bias: bool = False
    weight_first: bool = False        # w * expert(x) instead of expert(x) * w
    weight_on_input: bool = False     # expert(x * w): the routing weight scales the expert's input
    dtype: torch.dtype = torch.float32
    twist: Optional[str] = None

    def replace(self, **kw) -> "Variant":
        return dataclasses.replace(self, **kw)

    @property
    def top_k(self) -> int:
        return 1 if self.router in TOP1_ROUTERS else self.k


def _act(name: str) -> Callable:
    return {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu2": lambda t: F.relu(t) ** 2}[name]


class SwiGLU(nn.Module):
    """Mixtral-style expert: w2(act(w1 x) * w3 x)."""

    def __init__(self, D: int, F_: int, act: str, bias: bool):
        super().__init__()
        self.w1 = nn.Linear(D, F_, bias=bias)
        self.w3 = nn.Linear(D, F_, bias=bias)
        self.w2 = nn.Linear(F_, D, bias=bias)
        self.act = _act(act)

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class ConcatGLU(nn.Module):
    """Fused gate_up projection split in halves."""

    def __init__(self, D: int, F_: int, act: str, bias: bool):
        super().__init__()
        self.gate_up = nn.Linear(D, 2 * F_, bias=bias)
        self.down = nn.Linear(F_, D, bias=bias)
        self.act = _act(act)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


class MatmulFFN(nn.Module):
    """An expert that holds its weights as [in, out] parameters and projects with ``x @ w``; ``linear_layout``:
    [out, in] ones read as ``x @ w.t()`` and ``x @ w.T`` instead; ``einsum``: the same products as einsums."""

    def __init__(self, D: int, F_: int, act: str, bias: bool, linear_layout: bool = False, einsum: bool = False):
        super().__init__()
        self.linear_layout, self.einsum = linear_layout, einsum
        self.w1 = nn.Parameter(torch.randn(*((F_, D) if linear_layout else (D, F_))) / D ** 0.5)
        self.w2 = nn.Parameter(torch.randn(*((D, F_) if linear_layout else (F_, D))) / F_ ** 0.5)
        self.b1 = nn.Parameter(torch.randn(F_) * 0.1) if bias else None
        self.b2 = nn.Parameter(torch.randn(D) * 0.1) if bias else None
        self.act = _act(act)

    def forward(self, x):
        if self.einsum:
            up, down = ("nd,fd->nf", "nf,df->nd") if self.linear_layout else ("nd,df->nf", "nf,fd->nd")
            h = torch.einsum(up, x, self.w1)
            h = self.act(h if self.b1 is None else h + self.b1)
            y = torch.einsum(down, h, self.w2)
            return y if self.b2 is None else y + self.b2
        h = x @ (self.w1.t() if self.linear_layout else self.w1)
        h = self.act(h if self.b1 is None else h + self.b1)
        y = torch.matmul(h, self.w2.T if self.linear_layout else self.w2)
        return y if self.b2 is None else self.b2 + y


class _Act(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.fn = _act(name)

    def forward(self, x):
        return self.fn(x)


class LoopMoE(nn.Module):
    def __init__(self, v: Variant):
        super().__init__()
        self.v = v
        self.gate = nn.Linear(v.D, v.E, bias=False)
        if v.router == "sigmoid_bias":
            self.score_bias = nn.Parameter(torch.randn(v.E) * 0.1)
        if v.ffn in ("stacked", "stacked_kn"):
            kn = v.ffn == "stacked_kn"
            self.w_in = nn.Parameter(torch.randn(v.E, *((v.D, v.F) if kn else (v.F, v.D))) / v.D ** 0.5)
            self.w_out = nn.Parameter(torch.randn(v.E, *((v.F, v.D) if kn else (v.D, v.F))) / v.F ** 0.5)
            if v.bias:
                self.b_in = nn.Parameter(torch.randn(v.E, v.F) * 0.1)
                self.b_out = nn.Parameter(torch.randn(v.E, v.D) * 0.1)
        else:
            self.experts = nn.ModuleList([self._expert(v) for _ in range(v.E)])
        self.drop = nn.Dropout(0.5)

    @staticmethod
    def _expert(v: Variant) -> nn.Module:
        if v.ffn == "sequential":
            return nn.Sequential(nn.Linear(v.D, v.F, bias=v.bias), _Act(v.act), nn.Linear(v.F, v.D, bias=v.bias))
        if v.ffn == "swiglu":
            return SwiGLU(v.D, v.F, v.act, v.bias)
        if v.ffn == "param_kn":
            return MatmulFFN(v.D, v.F, v.act, v.bias)
        return ConcatGLU(v.D, v.F, v.act, v.bias)

    # ------------------------------------------------------------------ router
    def route(self, x):
        v = self.v
        logits = self.gate(x)
        r = v.router
        if r == "softmax_topk_renorm":
            probs = logits.float().softmax(dim=-1)
            w, ids = probs.topk(v.k, dim=-1)
            w = w / w.sum(dim=-1, keepdim=True)
        elif r == "softmax_topk":
            w, ids = torch.topk(F.softmax(logits, dim=-1), v.k, dim=-1)
        elif r == "mixtral_f32":
            probs = F.softmax(logits, dim=1, dtype=torch.float)
            w, ids = torch.topk(probs, v.k, dim=-1)
            w /= w.sum(dim=-1, keepdim=True)
        elif r == "topk_softmax":
            vals, ids = torch.topk(logits, v.k, dim=-1)
            w = F.softmax(vals, dim=-1, dtype=torch.float)
        elif r == "sigmoid_bias":
            scores = logits.float().sigmoid()
            ids = torch.topk(scores + self.score_bias.unsqueeze(0), v.k, dim=-1)[1]
            w = scores.gather(1, ids)
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) * 1.5
        elif r == "max_top1":
            probs = logits.softmax(dim=-1)
            w, ids = probs.max(dim=-1)
        elif r == "argmax_top1":
            probs = logits.softmax(dim=-1)
            ids = probs.argmax(dim=-1)
            w = probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        elif r == "topk1_squeezed":
            w, ids = logits.softmax(dim=-1).topk(1, dim=-1)
            w, ids = w.squeeze(-1), ids.squeeze(-1)
        elif r == "external":             # not a router moe_fuser models: kept, the op takes its top-k
            vals, ids = torch.topk(logits, v.k, dim=-1)
            w = torch.sigmoid(vals) * 0.5
        else:
            raise ValueError(r)
        return logits, w.to(x.dtype), ids

    # ------------------------------------------------------------------ experts
    def expert(self, e: int, xe):
        v = self.v
        if v.ffn == "stacked_kn":
            h = xe @ self.w_in[e]
            h = _act(v.act)(h + self.b_in[e] if v.bias else h)
            y = h @ self.w_out[e]
            return y + self.b_out[e] if v.bias else y
        if v.ffn != "stacked":
            return self.experts[e](xe)
        h = F.linear(xe, self.w_in[e], self.b_in[e] if v.bias else None)
        return F.linear(_act(v.act)(h), self.w_out[e], self.b_out[e] if v.bias else None)

    def dispatch(self, ids, e, mask):
        v = self.v
        if v.loop == "mask":
            return ids == e, None
        if v.loop == "nonzero_squeeze":
            return (ids == e).nonzero().squeeze(-1), None
        if v.loop == "any_nonzero":
            return (ids == e).any(-1).nonzero().squeeze(-1), None
        if v.loop in ("any_where", "any_dense"):
            return torch.where((ids == e).any(dim=-1))[0], None
        if v.loop == "where":
            if ids.dim() == 1:
                return torch.where(ids == e)[0], None
            return torch.where(ids == e)
        if v.loop in ("one_hot_210", "one_hot_201"):
            if ids.dim() == 1:
                return torch.where(mask[e])[0], None
            if v.loop == "one_hot_210":
                slot, tok = torch.where(mask[e])
                return tok, slot
            return torch.where(mask[e])
        nz = (ids == e).nonzero()
        if ids.dim() == 1:
            return nz[:, 0], None
        return nz[:, 0], nz[:, 1]

    def forward(self, hidden):
        v = self.v
        B, S, D = hidden.shape
        x = hidden.view(-1, D)
        logits, w, ids = self.route(x)
        mask = None
        if v.loop.startswith("one_hot"):
            oh = F.one_hot(ids, num_classes=v.E)
            mask = oh.permute(1, 0) if ids.dim() == 1 else oh.permute(*((2, 1, 0) if v.loop == "one_hot_210"
                                                                       else (2, 0, 1)))
        out = torch.zeros_like(x) if v.combine.endswith("_") else x.new_zeros(x.shape)
        if v.loop == "any_dense":   # ids as [T, K] (also for top-1 routers' [T] ids), w scattered into a dense gate
            ids = ids.view(x.shape[0], -1)
            gate = torch.zeros_like(logits, dtype=w.dtype).scatter(-1, ids, w.view(x.shape[0], -1))
        experts = range(v.E - 1) if v.twist == "skip_expert" else range(v.E)
        for e in experts:
            tok, slot = self.dispatch(ids, e, mask)
            if v.loop == "any_nonzero":
                we = (w * (ids == e)).sum(-1, keepdim=True)[tok]
            elif v.loop == "any_where":
                we = ((ids == e).to(w.dtype) * w).sum(dim=-1)[tok, None]
            elif v.loop == "any_dense":
                we = gate[tok, e].unsqueeze(1)
            else:
                we = (w[tok, slot, None] if slot is not None else w[tok, None])
            xe = x[tok]
            if v.weight_on_input:   # torchtitan's score_before_experts
                xe = we * xe if v.weight_first else xe * we
            if v.twist == "train_dropout":
                xe = self.drop(xe)
            if v.twist == "expert_autocast_off":   # the experts in the model's own precision, whatever autocast says
                with torch.autocast(xe.device.type, enabled=False):
                    y = self.expert(e, xe)
            else:
                y = self.expert(e, xe)
            if v.twist == "weight_in_expert_dtype":
                we = we.to(y.dtype)
            if v.weight_on_input:
                y = y.to(x.dtype)   # under autocast the expert's output is bf16, the buffer fp32
            else:
                y = we * y if v.weight_first else y * we
            if v.twist == "extra_scale":
                y = y * 2.0
            if v.combine == "index_add_":
                out.index_add_(0, tok, y.to(x.dtype))
            elif v.combine == "scatter_add_":
                out.scatter_add_(0, tok.unsqueeze(-1).expand(-1, D), y)
            elif v.combine == "iadd":
                out[tok] += y
            elif v.combine == ASSIGN:
                out[tok] = y
            elif v.combine == "index_put_":
                out.index_put_((tok,), y, accumulate=True)
            elif v.combine == "scatter_reduce_":
                out.scatter_reduce_(0, tok[:, None].expand_as(y), y, "sum")
            elif v.combine == "index_add":
                out = out.index_add(0, tok, y)
            elif v.combine == "scatter_add":
                out = torch.scatter_add(out, 0, tok.view(-1, 1).expand(-1, D), y)
            elif v.combine == "scatter_reduce":
                out = out.scatter_reduce(0, tok.unsqueeze(1).expand(-1, D), y, reduce="sum")
            elif v.combine in NOT_SUMS:
                out = out.scatter_reduce(0, tok.unsqueeze(1).expand(-1, D), y, reduce="sum" if "self" in v.combine
                                         else "amax", include_self="self" not in v.combine)
            else:
                out = out.index_put((tok,), y, accumulate=True)
        probs = logits.float().softmax(dim=-1)
        return out.view(B, S, D), probs.mean(0).pow(2).sum()


EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    """A fresh import of ``examples/<name>.py`` (registered in ``sys.modules``, where dynamo looks up the globals
    of the functions it inlines)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class MixtralV4Block(nn.Module):
    """transformers 4.x MixtralSparseMoeBlock, as it was written (experts: w1/w2/w3 SwiGLU modules)."""

    def __init__(self, hidden: int = 32, ffn: int = 48, num_experts: int = 4, top_k: int = 2):
        super().__init__()
        self.hidden_dim, self.num_experts, self.top_k = hidden, num_experts, top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList([SwiGLU(hidden, ffn, "silu", False) for _ in range(num_experts)])

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros((batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype,
                            device=hidden_states.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current = self.experts[expert_idx](current_state) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, current.to(hidden_states.dtype))
        final = final.reshape(batch_size, sequence_length, hidden_dim)
        return final, router_logits


class Recorder:
    """An inner compiler that records the graphs it receives (after the rewrite) and runs them eagerly or
    through aot_eager."""

    def __init__(self, inner: str = "aot_eager"):
        self.graphs: list = []
        self.inner = inner

    def __call__(self, gm, example_inputs):
        if any(n.op in ("call_function", "call_method", "call_module") for n in gm.graph.nodes):
            self.graphs.append(gm)          # dynamo also emits empty graphs (e.g. for tiny helper frames)
        if self.inner == "eager":
            return gm.forward
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend(self.inner)(gm, example_inputs)

    @property
    def num_fused(self) -> int:
        return sum(1 for gm in self.graphs for n in gm.graph.nodes
                   if n.op == "call_function" and hasattr(n.target, "spec"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_train_step(model: nn.Module, compiled, x: torch.Tensor, tol: float, autocast: bool = False) -> None:
    """Forward and backward through the compiled model equal eager: outputs, input grad, every parameter grad.
    ``autocast``: both forwards under ``torch.autocast`` (bf16), the backward outside it."""
    params = [p for p in model.parameters() if p.requires_grad]
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = []
    for fn, xi in ((model, xs[0]), (compiled, xs[1])):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = fn(xi)
        out = out if isinstance(out, tuple) else (out,)
        loss = sum(((o.float() * torch.linspace(0.5, 1.5, o.numel()).view_as(o)).sum() if o.dim() else o.float())
                   for o in out if o.is_floating_point())
        grads = torch.autograd.grad(loss, [xi] + params, allow_unused=True)
        outs.append((out, grads))
    (o_ref, g_ref), (o_got, g_got) = outs
    for a, b in zip(o_got, o_ref):
        if b.is_floating_point():
            assert rel_err(a, b) <= tol, f"output differs: {rel_err(a, b):.2e}"
    for i, (a, b) in enumerate(zip(g_got, g_ref)):
        if b is None:
            assert a is None or float(a.abs().max()) == 0.0
            continue
        assert a is not None, f"gradient {i} missing"
        assert rel_err(a, b) <= tol, f"gradient {i} differs: {rel_err(a, b):.2e}"
