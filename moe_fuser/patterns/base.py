"""The pattern interface and registry: how an MoE recogniser plugs into moe_fuser.

A *pattern* reads one dynamo FX graph (torch-level ops; parameters and buffers are placeholders) and reports each
MoE it recognises as a ``Match`` and each near miss as a ``Rejection``. Patterns never edit the graph. The driver
(``moe_fuser.rewrite``) offers the graph to every enabled pattern, best ``priority`` first, then checks each match
(spec validity, shapes and dtypes from the nodes' fake values, region closure, no overlap with an accepted match)
and only then replaces the region by one call of the fused op. A match that fails a check becomes a rejection
with the reason, so ``explain()`` shows why an MoE was left alone.

Entry points
    register_pattern(p, *, name, family, priority)  add a pattern object or a ``find(ctx)`` function (public as
                                                    ``moe_fuser.register_pattern``; usable as a decorator)
    unregister_pattern(name)                        remove it again
    patterns_for(switches)                          enabled patterns, best first (``switches`` is the backend
                                                    option ``patterns``: ``{family or pattern name: bool}``)
    MatchContext                                    what ``find`` receives: the graph plus cached helpers

Writing a pattern
    class MyBlock:
        name = "mylib.block"      # unique; also a switch key
        family = "custom"         # switch key shared by related patterns ("handwritten", "transformers", ...)
        priority = 0              # higher is offered the graph first
        def find(self, ctx: MatchContext) -> Iterable[Match | Rejection]: ...

    register_pattern(MyBlock())
    # or:  @register_pattern(name="mylib.block", family="custom")
    #      def my_block(ctx): ...

The Match contract (the rewrite relies on it; the driver re-checks what it can)
    x             node of the hidden states, value [T, D] or [..., D] (e.g. [B, S, D]: the op sees the leading
                  dims flattened to T, router logits / top-k likewise, and its result is viewed back), defined
                  outside ``region``
    output        node inside ``region`` whose *final* value (after every in-place update in the region, e.g. the
                  ``zeros_like`` buffer an ``index_add_`` loop fills) is the MoE output, shaped like ``x``; every
                  use of it after the region is redirected to the fused op's result
    region        every node the fused op replaces: routing after the logits, dispatch, expert FFNs, combine
    router_logits [T, E] node outside the region, when the op should route (``spec.router.external`` False)
    topk_weights, topk_ids
                  [T, K] nodes outside the region, when ``spec.router.external`` (the user's router is kept);
                  with ``dense_weights`` topk_weights is a dense [T, E] gate and the op takes its values at the
                  ids, which must then name no expert twice per token (a top-k, max or argmax)
    weights       ``MoEWeights`` whose fields hold a node (a stacked [E, ...] tensor), a list of E nodes (one
                  per expert, e.g. ModuleList Linear weights: passed as is, never stacked) or None
    spec          the ``MoESpec``: everything static the op needs
    capacity_groups  int, or a node holding a SymInt (Switch: one capacity group per sequence)
    op_kwargs     further keyword arguments for the fused op (constants or nodes), for families that need more
    transposed    names of ``weights`` fields ("w1", "w2", "w3") whose nodes hold the transposed ``[E, in, out]``
                  layout (transformers' ``is_transposed`` experts, GPT-OSS); the op reads ``.transpose(-2, -1)``
    router_outputs  optional, for a recognised router (the op routes): its top-k weights and ids nodes inside the
                  region, the values the combine reads. When the rest of the graph keeps part of the router anyway
                  (an auxiliary loss reading its probabilities or ids), the driver keeps these too and hands them
                  to the op (``reuse_routing``), so the routing is computed once
Values inside the region that the rest of the graph still reads (probabilities for a load-balancing loss,
top-k ids for statistics) are *kept*, unchanged, when they are pure and do not read a buffer the region
mutates; anything else escaping the region makes the driver reject the match.

Helpers for pattern writers: ``moe_fuser.fx.graph`` (canonical op names, fake values, parameter and module
paths), ``moe_fuser.fx.dag`` (a networkx view with mutation edges), ``moe_fuser.patterns.routers``
(``recognise_router``: the RouterSpec behind a pair of top-k weights/ids nodes, or an external router).
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Union, runtime_checkable

import torch
import torch.fx as fx

from ..fx import graph as fxg
from ..spec import MoESpec, MoEWeights

__all__ = [
    "Match",
    "MatchContext",
    "Pattern",
    "Rejection",
    "patterns_for",
    "register_pattern",
    "registered_patterns",
    "router_kind",
    "unregister_pattern",
]

log = logging.getLogger("moe_fuser")

def router_kind(spec: MoESpec) -> str:
    """Short router description for reports: "softmax-topk+renorm", "sigmoid-topk(groups 2/4)", "external"."""
    head = spec.summary().split(" ", 2)[2]  # "<router> <activation>[ extras]"; the router may hold a space
    act = spec.experts.activation + ("-glu" if spec.experts.gated else "")
    return head[: head.index(" " + act)]


@dataclass
class Match:
    """One recognised MoE: what to call and what it replaces (see the module docstring for the contract)."""

    family: str
    pattern: str
    spec: MoESpec
    x: fx.Node
    output: fx.Node
    region: frozenset
    weights: MoEWeights
    router_logits: Optional[fx.Node] = None
    topk_weights: Optional[fx.Node] = None
    topk_ids: Optional[fx.Node] = None
    capacity_groups: Union[int, fx.Node] = 1
    op_kwargs: Mapping[str, Any] = field(default_factory=dict)
    transposed: frozenset = frozenset()
    module_path: str = ""
    notes: tuple = ()
    router_outputs: Optional[tuple] = None
    reuse_routing: bool = False
    dense_weights: bool = False   # topk_weights is a dense [T, E] gate, read at topk_ids (see the contract)
    # Filled in by the driver when the match is rewritten.
    lowering: Optional[str] = None
    dtype: Optional[torch.dtype] = None

    @property
    def router_kind(self) -> str:
        return router_kind(self.spec)

    def input_nodes(self) -> list[fx.Node]:
        """Every node the fused op reads (all must be defined outside the region)."""
        out: list[fx.Node] = []
        fx.node.map_arg((self.x, self.router_logits, self.topk_weights, self.topk_ids, tuple(self.weights),
                         self.capacity_groups, dict(self.op_kwargs)), out.append)
        return out


@dataclass
class Rejection:
    """A candidate MoE a pattern (or the driver) decided not to rewrite, and why."""

    family: str
    pattern: str
    reason: str
    module_path: str = ""
    region: frozenset = frozenset()


@runtime_checkable
class Pattern(Protocol):
    name: str
    family: str
    priority: int

    def find(self, ctx: "MatchContext") -> Iterable[Union[Match, Rejection]]:
        """Yield a Match per recognised MoE and a Rejection per candidate it gives up on; never edit the graph."""


class MatchContext:
    """One graph as patterns see it: nodes in order, fake values, parameter paths, a networkx view.

    ``claimed`` holds nodes of matches already accepted in this graph; patterns may skip candidates touching
    them (the driver rejects overlaps anyway). ``options`` are the backend options (read-only).
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Optional[list] = None,
                 options: Optional[Mapping[str, Any]] = None):
        self.gm = gm
        self.graph = gm.graph
        self.example_inputs = list(example_inputs or [])
        self.options = dict(options or {})
        self.claimed: set = set()

    @functools.cached_property
    def nodes(self) -> list[fx.Node]:
        return list(self.graph.nodes)

    @functools.cached_property
    def position(self) -> dict:
        """node -> index in graph order."""
        return {n: i for i, n in enumerate(self.nodes)}

    @functools.cached_property
    def dag(self):
        """networkx DiGraph of the graph with mutation edges (see ``moe_fuser.fx.dag``)."""
        from ..fx.dag import to_networkx
        return to_networkx(self.graph)

    @functools.cached_property
    def params(self) -> dict:
        """placeholder node -> dotted parameter/buffer path, for parameters and buffers only."""
        out = {}
        for n in self.graph.find_nodes(op="placeholder"):
            path = fxg.param_path(n)
            if path is not None:
                out[n] = path
        return out

    def param_path(self, node: Any) -> Optional[str]:
        return self.params.get(node) if isinstance(node, fx.Node) else None

    def val(self, node: Any) -> Any:
        return fxg.val(node)

    def invalidate(self) -> None:
        """Forget cached views after the graph changed (the driver calls this after each rewrite)."""
        for name in ("nodes", "position", "dag"):
            self.__dict__.pop(name, None)

    def nodes_of(self, *names: str) -> list[fx.Node]:
        """Nodes whose canonical op name (``moe_fuser.fx.graph.op``) is one of ``names``, in graph order."""
        return [n for n in self.nodes if fxg.op(n) in names]


class _FunctionPattern:
    """Adapts a plain ``find(ctx)`` function to the Pattern protocol."""

    def __init__(self, fn: Callable, name: str, family: str, priority: int):
        self.fn, self.name, self.family, self.priority = fn, name, family, priority
        functools.update_wrapper(self, fn)

    def find(self, ctx: MatchContext):
        return self.fn(ctx)

    def __call__(self, ctx: MatchContext):
        return self.fn(ctx)

    def __repr__(self) -> str:
        return f"<pattern {self.name} family={self.family} priority={self.priority}>"


_REGISTRY: dict[str, Pattern] = {}
_LOCK = threading.Lock()
# Built-in families (module names in this package), imported on first use; each registers its patterns at
# import. Add a family module here.
_BUILTIN_MODULES: tuple = ("handwritten", "sorted_experts", "slot_rows", "grouped_mm", "transformers_experts",
                           "llama4", "switch_transformers", "expert_parallel")
_builtins_loaded = False


def register_pattern(pattern: Any = None, *, name: Optional[str] = None, family: Optional[str] = None,
                     priority: Optional[int] = None, replace: bool = False):
    """Teach moe_fuser an MoE style: register a pattern object (with ``name``, ``family``, ``priority``,
    ``find``) or a function ``find(ctx) -> Iterable[Match | Rejection]``. Returns the registered pattern, so it
    works as a decorator (with or without arguments). ``replace=True`` overwrites a pattern of the same name;
    otherwise a duplicate name raises ValueError."""
    if pattern is None:
        return functools.partial(register_pattern, name=name, family=family, priority=priority, replace=replace)
    if callable(pattern) and not hasattr(pattern, "find"):
        pattern = _FunctionPattern(pattern, name or getattr(pattern, "__name__", None) or "custom",
                                   family or "custom", 0 if priority is None else priority)
    else:
        if not callable(getattr(pattern, "find", None)):
            raise ValueError(f"{pattern!r} is not a pattern: give an object with name, family, priority and "
                             "find(ctx), or a function find(ctx)")
        for attr, value in (("name", name), ("family", family), ("priority", priority)):
            if value is not None:
                setattr(pattern, attr, value)
        for attr, default in (("family", "custom"), ("priority", 0)):
            if not hasattr(pattern, attr):
                setattr(pattern, attr, default)
        if not isinstance(getattr(pattern, "name", None), str):
            raise ValueError(f"pattern {pattern!r} needs a string name (pass name=...)")
    if not isinstance(pattern.priority, int) or not isinstance(pattern.family, str):
        raise ValueError(f"pattern {pattern.name!r}: priority must be an int and family a string")
    with _LOCK:
        if pattern.name in _REGISTRY and not replace and _REGISTRY[pattern.name] is not pattern:
            raise ValueError(f"a pattern named {pattern.name!r} is already registered; choose another name or "
                             "pass replace=True")
        _REGISTRY[pattern.name] = pattern
    log.debug("registered pattern %s (family %s, priority %d)", pattern.name, pattern.family, pattern.priority)
    return pattern


def unregister_pattern(name: str) -> None:
    with _LOCK:
        if _REGISTRY.pop(name, None) is None:
            raise ValueError(f"no pattern named {name!r}; registered: {sorted(_REGISTRY)}")


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{mod}")


def registered_patterns() -> list[Pattern]:
    """All registered patterns (built-in and custom), best first."""
    _load_builtins()
    with _LOCK:
        pats = list(_REGISTRY.values())
    return sorted(pats, key=lambda p: (-p.priority, p.name))


def patterns_for(switches: Optional[Mapping[str, bool]] = None) -> list[Pattern]:
    """The enabled patterns, best first. ``switches`` maps a family or a pattern name to on/off; a pattern's
    own name wins over its family; anything not named is on. Unknown keys raise ValueError."""
    pats = registered_patterns()
    switches = dict(switches or {})
    known = {p.name for p in pats} | {p.family for p in pats}
    unknown = sorted(set(switches) - known)
    if unknown:
        raise ValueError(f"options['patterns'] names unknown families/patterns {unknown}; known: {sorted(known)}")
    return [p for p in pats if switches.get(p.name, switches.get(p.family, True))]
