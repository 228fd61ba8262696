"""A networkx view of an FX graph in which in-place updates are ordinary dependencies.

In a dynamo graph an in-place op (``out.index_add_(0, idx, y)``, ``out[idx] += y``, ``x.mul_(2)``) does not
produce the value later code reads: later code keeps reading the *buffer's* node (``out = zeros_like(x)``). Data
edges alone would say the final ``out.view(...)`` depends only on ``zeros_like``, which would make the whole
expert loop look dead. ``to_networkx`` adds *mutation edges*: from each write of a storage to every later read of
that storage up to (and including) the next write. With them, ``nx.ancestors(dag, reader)`` is exactly what the
reader's value depends on.

Storage identity comes from the fake values (views share their base's storage, as in eager); without fake values
a syntactic view chain (view, reshape, getitem, transpose, ...) stands in.

Entry points: ``to_networkx(graph)``, ``mutated_arg(node)`` (the argument an in-place node writes, or None),
``storage_key(node)``, ``is_mutation(node)``.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import networkx as nx
import torch
import torch.fx as fx

from .graph import op, val

__all__ = ["is_mutation", "mutated_arg", "storage_key", "to_networkx"]

_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.imul, operator.isub, operator.itruediv,
                      operator.ifloordiv, operator.ipow, operator.iand, operator.ior}
# Ops whose result may alias their first argument (used only when fake values are missing).
_VIEW_OPS = {"view", "reshape", "getitem", "transpose", "permute", "unsqueeze", "squeeze", "expand", "narrow",
             "select", "slice", "t", "view_as", "flatten", "unflatten", "split", "chunk", "as_strided", "diagonal",
             "detach", "contiguous", "to", "type_as", "alias", "unbind", "movedim", "swapaxes", "T", "mT"}


def mutated_arg(node: fx.Node) -> Optional[fx.Node]:
    """The node an in-place operation writes into, or None if ``node`` writes nothing."""
    if node.op not in ("call_method", "call_function") or not node.args:
        return None
    first = node.args[0]
    if not isinstance(first, fx.Node):
        return None
    if node.kwargs.get("inplace") is True:
        return first
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        return first if isinstance(val(first), torch.Tensor) or val(first) is None else None
    if isinstance(node.target, torch._ops.OpOverload):
        schema = node.target._schema
        if schema.is_mutable and schema.arguments and schema.arguments[0].alias_info is not None \
                and schema.arguments[0].alias_info.is_write:
            return first
        return None
    name = op(node)
    if name and name.endswith("_") and not name.endswith("__") and name != "_":
        return first
    if node.op == "call_function" and node.kwargs.get("out") is not None:
        out = node.kwargs["out"]
        return out if isinstance(out, fx.Node) else None
    return None


def is_mutation(node: fx.Node) -> bool:
    return mutated_arg(node) is not None


def storage_key(node: Any) -> Any:
    """A hashable identity of the storage ``node``'s tensor value lives in (None for non-tensors)."""
    v = val(node)
    if isinstance(v, torch.Tensor):
        try:
            return ("storage", torch.multiprocessing.reductions.StorageWeakRef(v.untyped_storage()))
        except (RuntimeError, NotImplementedError, AttributeError):
            pass
    if not isinstance(node, fx.Node):
        return None
    # Syntactic fallback: follow view-like ops to their base.
    seen = set()
    while op(node) in _VIEW_OPS and node.args and isinstance(node.args[0], fx.Node) and node not in seen:
        seen.add(node)
        node = node.args[0]
    return ("node", node)


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """DiGraph over the graph's nodes: data edges (kind="data") plus mutation edges (kind="mutation")."""
    dag = nx.DiGraph()
    nodes = list(graph.nodes)
    dag.add_nodes_from(nodes)
    for n in nodes:
        for inp in n.all_input_nodes:
            dag.add_edge(inp, n, kind="data")
    # Per storage: the pending writer (last write) and its readers since.
    last_write: dict = {}
    for n in nodes:
        reads = {storage_key(i) for i in n.all_input_nodes}
        reads.discard(None)
        target = mutated_arg(n)
        for key in reads:
            writer = last_write.get(key)
            if writer is not None and writer is not n:
                dag.add_edge(writer, n, kind="mutation")
        if target is not None:
            key = storage_key(target)
            if key is not None:
                last_write[key] = n
    return dag
