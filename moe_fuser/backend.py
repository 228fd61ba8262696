"""The torch.compile backend: ``torch.compile(model, backend="moe_fuser", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point (``pyproject.toml``), so the name works without
importing moe_fuser and ``torch._dynamo.list_backends()`` lists it. Per dynamo graph it

1. runs the rewrite (``moe_fuser.rewrite.fuse_graph``): every enabled pattern family, every match checked and
   proven closed before its region is replaced by one fused-op call;
2. hands the graph to the *inner* compiler. A graph with nothing fused is handed over untouched, so it compiles
   exactly as under that compiler alone (``inner="inductor"``: as under plain ``torch.compile``);
3. with ``verify``, compiles the original graph as well and compares both on the first call.

Capture: the backend function carries ``backend_ctx_ctor = capture.capture_context`` (whole-MoE capture
settings, see ``moe_fuser.capture``); importing this module installs the hook that lets dynamo see it through
``torch.compile``.

Options (``torch.compile(..., options={...})``; unknown keys raise ValueError):

    inner           "inductor" (default) | "aot_eager" | "eager" | "npu" (torchair; needs torch_npu) | a callable
                    backend ``(gm, example_inputs) -> callable``: compiles the graph after the rewrite
    inner_options   dict for the inner compiler: inductor config patches, or torchair options for "npu"
    verify          False (default) | True: on the first call run the original graph too and compare (fp32 1e-4,
                    bf16/fp16 2e-2 relative, and 2e-2 throughout where the fused experts compute in bf16/fp16, as
                    under autocast); on a mismatch warn and use the original graph from then on (run eagerly
                    where the inner compiler fails on it)
    patterns        {family or pattern name: bool}: switch pattern families off (all on by default), e.g.
                    {"handwritten": False}; names: ``moe_fuser.patterns.registered_patterns()``
    impl            None/"auto" (best lowering for the device) | "cpu" | "triton" | "npu" | "reference":
                    force the fused op's lowering (an impossible request raises at compile time)
    capture         True (default) | False: trace with dynamo's capture settings (``moe_fuser.capture``)

``mode=`` (e.g. "max-autotune") is passed to inductor as its mode options.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.fx as fx

from . import capture
from .fx.dag import mutated_arg, storage_key
from .fx.graph import val
from .rewrite import FuseResult, fuse_graph

__all__ = ["BackendOptions", "compile_graph", "moe_fuser_backend"]

log = logging.getLogger("moe_fuser")

INNER_COMPILERS = ("inductor", "aot_eager", "eager", "npu")
# Relative tolerance of ``verify`` per output dtype (norm of the difference over norm of the reference).
VERIFY_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@dataclass(frozen=True)
class BackendOptions:
    inner: Union[str, Callable] = "inductor"
    inner_options: Mapping[str, Any] = field(default_factory=dict)
    verify: bool = False
    patterns: Mapping[str, bool] = field(default_factory=dict)
    impl: Optional[str] = None
    capture: bool = True

    @classmethod
    def from_dict(cls, options: Optional[Mapping[str, Any]]) -> "BackendOptions":
        options = dict(options or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown moe_fuser option(s) {unknown}; valid options are {sorted(known)}")
        opts = cls(**options)
        if not callable(opts.inner) and opts.inner not in INNER_COMPILERS:
            raise ValueError(f"options['inner']={opts.inner!r} is unknown; use one of {INNER_COMPILERS} or a "
                             "callable backend")
        if not isinstance(opts.patterns, Mapping) or not all(isinstance(v, bool) for v in opts.patterns.values()):
            raise ValueError("options['patterns'] must map family or pattern names to True/False, e.g. "
                             "{'handwritten': False}")
        if not isinstance(opts.verify, bool) or not isinstance(opts.capture, bool):
            raise ValueError("options['verify'] and options['capture'] must be True or False")
        return opts

    def rewrite_options(self) -> dict:
        return {"patterns": dict(self.patterns), "impl": self.impl}


def _inner_compiler(opts: BackendOptions, mode: Optional[str]) -> Callable:
    inner = opts.inner
    if callable(inner):
        return inner
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        patches = dict(opts.inner_options)
        if mode and mode != "default":
            from torch._inductor import list_mode_options
            patches = {**list_mode_options(mode), **patches}
        return lambda gm, example_inputs: compile_fx(gm, example_inputs, config_patches=patches)
    if inner == "npu":
        from .lowering import npu
        return npu.get_inner_compiler(dict(opts.inner_options))
    from torch._dynamo.backends.registry import lookup_backend
    return lookup_backend(inner)


def _clone(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def _mutates_inputs(gm: fx.GraphModule) -> bool:
    inputs = {storage_key(n) for n in gm.graph.find_nodes(op="placeholder")}
    return any(mutated_arg(n) is not None and storage_key(mutated_arg(n)) in inputs for n in gm.graph.nodes)


def _mismatch(got: Any, want: Any, min_rtol: float = 0.0) -> Optional[str]:
    """Why ``got`` disagrees with ``want`` (None when it does not): per floating output, a relative error above
    the output dtype's tolerance, or above ``min_rtol`` (the tolerance of the lowest precision the replaced
    regions computed in: bf16 under autocast, whatever the outputs' dtype) when that is larger."""
    got_l = got if isinstance(got, (list, tuple)) else [got]
    want_l = want if isinstance(want, (list, tuple)) else [want]
    if len(got_l) != len(want_l):
        return f"{len(got_l)} outputs instead of {len(want_l)}"
    for i, (g, w) in enumerate(zip(got_l, want_l)):
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            continue
        if not isinstance(g, torch.Tensor) or g.shape != w.shape:
            return f"output {i} has shape {getattr(g, 'shape', None)}, expected {tuple(w.shape)}"
        g64, w64 = g.detach().double(), w.detach().double()
        if bool(torch.isnan(g64).ne(torch.isnan(w64)).any()):
            return f"output {i}: NaNs differ"
        g64, w64 = g64.nan_to_num(), w64.nan_to_num()
        err = float((g64 - w64).norm() / w64.norm().clamp_min(1e-30)) if w64.numel() else 0.0
        tol = max(VERIFY_RTOL.get(w.dtype, 1e-4), min_rtol)
        if err > tol and not math.isclose(err, 0.0):
            return f"output {i}: relative error {err:.2e} > {tol:.0e} ({w.dtype})"
    return None


class _Verified:
    """Runs the rewritten and the original compiled graph on the first call; keeps the fused one if they agree."""

    def __init__(self, fused: Callable, original: Callable, where: str, min_rtol: float):
        self.fn, self.original, self.where, self.checked = fused, original, where, False
        self.min_rtol = min_rtol

    def __call__(self, *args):
        if self.checked:
            return self.fn(*args)
        self.checked = True
        out = self.fn(*args)
        with torch.no_grad():
            ref = self.original(*args)
        problem = _mismatch(out, ref, self.min_rtol)
        if problem is None:
            log.info("moe_fuser: verify passed for %s", self.where)
            self.original = None
            return out
        warnings.warn(f"moe_fuser: the fused graph ({self.where}) disagrees with the original: {problem}; "
                      "falling back to the original graph", RuntimeWarning, stacklevel=2)
        self.fn = self.original
        return self.fn(*args)


def compile_graph(gm: fx.GraphModule, example_inputs: list, opts: BackendOptions, mode: Optional[str] = None,
                  record: Optional[Callable[[FuseResult, fx.GraphModule], None]] = None) -> Callable:
    """Rewrite ``gm`` and compile it with the inner compiler (the backend's body; explain() passes ``record``)."""
    inner = _inner_compiler(opts, mode)
    original = _clone(gm) if opts.verify else None
    result = fuse_graph(gm, example_inputs, opts.rewrite_options())
    if record is not None:
        record(result, gm)
    compiled = inner(gm, example_inputs)
    if not result.matches or original is None:
        return compiled
    where = ", ".join(m.module_path or m.pattern for m in result.matches)
    if _mutates_inputs(original):
        log.warning("moe_fuser: verify skipped for %s: the graph updates its inputs in place, so running it "
                    "twice would apply the updates twice", where)
        return compiled
    return _Verified(compiled, _compile_original(inner, original, example_inputs, where), where,
                     _regions_rtol(result))


def _compile_original(inner: Callable, original: fx.GraphModule, example_inputs: list, where: str) -> Callable:
    """The original graph compiled with the inner compiler, to compare with and fall back to; the graph itself,
    run eagerly, where the inner compiler fails on it (where the fused op replaced the very code plain
    torch.compile cannot compile: transformers 5.17's grouped_mm fallback under autocast, for one)."""
    try:
        return inner(original, example_inputs)
    except Exception as exc:   # any compiler's failure; the fused graph compiled, so the model still runs
        log.warning("moe_fuser: verify for %s runs the original graph eagerly: the inner compiler fails on it "
                    "(%s: %s)", where, type(exc).__name__, str(exc).split("\n")[0])
        return original.forward


def _regions_rtol(result: FuseResult) -> float:
    """The tolerance of the lowest precision any replaced region computed in (its nodes' values: under autocast
    bf16 matmuls or routing weights rounded to bf16, even when the outputs are fp32)."""
    dtypes = {v.dtype for m in result.matches for n in m.region for v in [val(n)]
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    return max((VERIFY_RTOL.get(d, 1e-4) for d in dtypes), default=0.0)


def moe_fuser_backend(gm: fx.GraphModule, example_inputs: list, *, options: Optional[Mapping[str, Any]] = None,
                      mode: Optional[str] = None) -> Callable:
    """torch.compile backend: fuse MoE layers, then compile with the inner compiler (see the module docstring)."""
    return compile_graph(gm, example_inputs, BackendOptions.from_dict(options), mode)


def _fuses_before_ddp_split(compile_fn: Callable) -> Callable:
    """``DDPOptimizer.compile_fn``, fusing first when the backend it splits for is moe_fuser.

    ``torch.compile`` of a ``DistributedDataParallel`` model (dynamo's default ``optimize_ddp``) cuts each graph at
    DDP's gradient-bucket boundaries and hands the backend the pieces: an MoE layer whose weights fill more than
    a bucket (25 MB by default) arrives cut apart, and no pattern matches a piece. So the whole graph is rewritten
    first, with the backend's options; the split then cuts the rewritten graph (the fused op, one node, lands in
    one piece) and each piece reaches the backend, which finds nothing more to fuse and compiles it with the
    inner compiler. ``verify`` does not apply there (each piece has no match to check)."""
    @functools.wraps(compile_fn)
    def wrapped(self, gm: fx.GraphModule, example_inputs: list, **configs):
        backend = self.backend_compile_fn
        if getattr(getattr(backend, "compiler_fn", None), "_moe_fuser_backend", False):
            options = BackendOptions.from_dict((getattr(backend, "kwargs", None) or {}).get("options"))
            result = fuse_graph(gm, example_inputs, options.rewrite_options())
            if result.matches:
                log.info("moe_fuser: fused %d MoE region(s) before DDP's graph split", result.num_fused)
        return compile_fn(self, gm, example_inputs, **configs)
    wrapped._moe_fuser_wrapped = True
    return wrapped


def _counts_fused_weights(add_param_args: Callable) -> Callable:
    """``DDPOptimizer.add_param_args``, also counting the parameters a fused op takes in lists (the splitter reads
    only a node's direct arguments): a fused layer's weights then fill DDP buckets, and the graph is cut around
    it, so its gradients' all-reduce overlaps the backward of what precedes it, as with the unfused loop."""
    @functools.wraps(add_param_args)
    def wrapped(self, bucket, node: fx.Node) -> None:
        add_param_args(self, bucket, node)
        if not hasattr(node.target, "spec"):   # only moe_fuser's fused calls (rewrite._make_target) carry a spec
            return
        for arg in node.args:
            for n in arg if isinstance(arg, (list, tuple)) else ():
                p = n.meta.get("example_value") if isinstance(n, fx.Node) and n.op == "placeholder" else None
                if isinstance(p, torch.nn.Parameter) and p.requires_grad and not self._ignore_parameter(p):
                    self.add_param(bucket, p, str(n.target))
    wrapped._moe_fuser_wrapped = True
    return wrapped


def _install_ddp_hook() -> None:
    from torch._dynamo.backends import distributed

    ddp = distributed.DDPOptimizer
    if not getattr(ddp.compile_fn, "_moe_fuser_wrapped", False):
        ddp.compile_fn = _fuses_before_ddp_split(ddp.compile_fn)
    if not getattr(ddp.add_param_args, "_moe_fuser_wrapped", False):
        ddp.add_param_args = _counts_fused_weights(ddp.add_param_args)


moe_fuser_backend.backend_ctx_ctor = capture.capture_context
moe_fuser_backend._moe_fuser_backend = True
capture.install()
_install_ddp_hook()
