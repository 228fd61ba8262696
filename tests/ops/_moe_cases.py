"""Random MoE configurations and their tensors, shared by the op tests."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass
class Case:
    T: int
    D: int
    F: int
    E: int
    k: int
    dtype: torch.dtype
    glu: str | None = "separate"  # None, "separate", "concat", "interleaved"
    activation: str = "silu"
    bias: bool = False
    as_list: bool = False
    limit: float | None = None  # gate/up clamp of a gated activation (GPT-OSS's, DeepSeek-V4's)

    def make(self, requires_grad: bool = False):
        """(hidden_states, router_logits, kwargs for fused_moe) on fresh random data."""
        H = 2 * self.F if self.glu in ("concat", "interleaved") else self.F
        scale_in, scale_hidden = self.D ** -0.5, self.F ** -0.5

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, dtype=torch.float32) * scale).to(self.dtype).requires_grad_(requires_grad)

        def experts(out, inp, scale):
            if self.as_list:
                return [rnd(out, inp, scale=scale) for _ in range(self.E)]
            return rnd(self.E, out, inp, scale=scale)

        x = rnd(self.T, self.D)
        logits = rnd(self.T, self.E)
        kw = dict(w1=experts(H, self.D, scale_in), w2=experts(self.D, self.F, scale_hidden), top_k=self.k,
                  activation=self.activation)
        if self.limit is not None:
            kw["limit"] = self.limit
        if self.glu == "separate":
            kw["w3"] = experts(self.F, self.D, scale_in)
        elif self.glu is not None:
            kw["gate_up"] = self.glu
        if self.bias:   # per-expert lists too with as_list (a ModuleList of biased Linears)
            def biases(n):
                return [rnd(n, scale=0.1) for _ in range(self.E)] if self.as_list else rnd(self.E, n, scale=0.1)

            kw["b1"] = biases(H)
            kw["b2"] = biases(self.D)
            if self.glu == "separate":
                kw["b3"] = biases(self.F)
        return x, logits, kw


def leaves(x, logits, kw):
    """Every tensor that can receive a gradient, in a fixed order."""
    out = [x, logits]
    for name in ("w1", "w2", "w3", "b1", "b2", "b3"):
        v = kw.get(name)
        if v is None:
            continue
        out.extend(v if isinstance(v, list) else [v])
    return out


def random_cases(n: int, seed: int, dtypes=(torch.float32, torch.bfloat16)) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        E = rng.choice([1, 2, 3, 5, 8, 16, 33, 64, 128])
        glu = rng.choice([None, "separate", "concat", "interleaved"])
        act = rng.choice(["silu", "gelu", "gelu_tanh", "relu", "relu2"] + (["gpt_oss"] if glu else []))
        cases.append(Case(T=rng.choice([0, 1, 7, 33, 97]), D=rng.choice([12, 40, 72]), F=rng.choice([20, 36, 56]),
                          E=E, k=rng.randint(1, min(E, 8)), dtype=rng.choice(dtypes), glu=glu, activation=act,
                          bias=rng.random() < 0.3, as_list=rng.random() < 0.25,
                          limit=1.0 if glu and rng.random() < 0.3 else None))  # h ~ N(0, 1): some clamped
    return cases


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-12}
