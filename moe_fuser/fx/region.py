"""Proving a region closed: the checks a match passes before its nodes are replaced.

A pattern claims: "the nodes in ``region`` compute the MoE output ``output`` from ``inputs`` (hidden states,
router logits, weights), and I modelled every one of them". ``check_region`` proves what can be proved from the
graph alone, using the mutation-aware networkx view (``moe_fuser.fx.dag``):

1. *Inputs outside.* No declared input lies in the region, and all precede the region's last node.
2. *Nothing unmodelled influences the output.* Every node the output's final value depends on (data and
   in-place updates) is either in the region or an ancestor-or-self of a declared input. A node that feeds the
   output but belongs to neither (``y = expert(x) * 2`` where the pattern ignored the ``* 2``) rejects the match.
3. *The region reads only what it declared.* Tensor values read from outside are declared inputs
   (non-tensor values, SymInt shape arithmetic, are allowed).
4. *Nothing escapes that is not re-provided.* A region node read outside the region is either the output (its
   readers are redirected to the fused op; all of them must come after the region) or is *kept*: it stays in the
   graph with its region ancestors, unchanged, which is only sound when none of them writes or reads a buffer the
   region writes in place.
5. *Side effects stay inside.* In-place writes in the region go to storage allocated in the region; a node
   outside the region that writes memory between the region's first and last node writes storage the region
   neither reads nor writes (a statistics buffer updated in the middle of an MoE block).
6. *One grad mode.* The fused op runs where the region ends, so every region node must have been traced under
   the grad mode in force there: routing computed under ``torch.no_grad()`` gives the router no gradient, which
   a differentiable fused op would.

On success it returns the set of region nodes to keep; on failure the reason, in words explain() can print.
``absorb_plumbing`` adds the shape plumbing dynamo emits around data-dependent ops (``sym_size``, range asserts)
to a region, so patterns need not list it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import networkx as nx
import torch
import torch.fx as fx

from .dag import mutated_arg, storage_key
from .graph import val

__all__ = ["RegionCheck", "absorb_plumbing", "check_region", "final_node", "grad_modes", "is_tensor_node",
           "kept_closure"]


def is_tensor_node(node: fx.Node) -> bool:
    v = val(node)
    if isinstance(v, (tuple, list)):
        return any(isinstance(t, torch.Tensor) for t in v)
    return isinstance(v, torch.Tensor) or (v is None and node.op != "output")


def _is_plumbing(node: fx.Node) -> bool:
    """Shape arithmetic and runtime asserts: no tensor value, no memory effect."""
    if node.op not in ("call_function", "call_method"):
        return False
    if mutated_arg(node) is not None:
        return False
    v = val(node)
    if isinstance(v, (torch.SymInt, torch.SymBool, torch.SymFloat, int, bool, float)):
        return True
    return v is None and node.op == "call_function" and "assert" in getattr(node.target, "__name__", "")


def _is_shape_reader(node: fx.Node, region: set) -> bool:
    """``where(...)[0]`` read only for its size (dynamo's range asserts on unbacked sizes), or a size query."""
    if node.op != "call_function" and node.op != "call_method":
        return False
    name = getattr(node.target, "__name__", node.target)
    if name in ("sym_size", "size", "numel", "dim", "sym_numel"):
        return True
    return name == "getitem" and node.args[0] in region and isinstance(val(node.args[0]), (tuple, list))


def absorb_plumbing(region: Iterable[fx.Node]) -> frozenset:
    """``region`` plus every plumbing tree hanging off it: shape arithmetic, range asserts and the size reads
    that feed them, when all their users are plumbing or in the region."""
    region = set(region)
    changed = True
    while changed:
        changed = False
        for n in list(region):
            for u in n.users:
                if u in region or not (_is_plumbing(u) or _is_shape_reader(u, region)):
                    continue
                stack, tree = [u], set()
                ok = True
                while stack and ok:
                    m = stack.pop()
                    if m in tree:
                        continue
                    tree.add(m)
                    for w in m.users:
                        if w in region or w in tree:
                            continue
                        if _is_plumbing(w) or _is_shape_reader(w, region | tree):
                            stack.append(w)
                        else:
                            ok = False
                if ok:
                    region |= tree
                    changed = True
    return frozenset(region)


def final_node(dag: nx.DiGraph, output: fx.Node, position: dict) -> fx.Node:
    """The last in-place write to ``output``'s storage (or ``output`` itself): where its final value is made."""
    key = storage_key(output)
    last = output
    for n in nx.descendants(dag, output):
        m = mutated_arg(n)
        if m is not None and storage_key(m) == key and position[n] > position[last]:
            last = n
    return last


@dataclass
class RegionCheck:
    ok: bool
    reason: str = ""
    keep: frozenset = frozenset()
    last: Optional[fx.Node] = None


def _fail(reason: str) -> RegionCheck:
    return RegionCheck(False, reason)


def check_region(dag: nx.DiGraph, position: dict, region: frozenset, output: fx.Node,
                 inputs: Iterable[fx.Node]) -> RegionCheck:
    inputs = [i for i in inputs if isinstance(i, fx.Node)]
    if output not in region:
        return _fail(f"the output node {output.name} is not inside the matched region")
    inside = [n for n in inputs if n in region]
    if inside:
        return _fail(f"declared inputs {[n.name for n in inside]} lie inside the region")
    last = max(region, key=position.__getitem__)
    first = min(region, key=position.__getitem__)
    late = [n.name for n in inputs if position[n] > position[last]]
    if late:
        return _fail(f"inputs {late} are defined after the region ends")

    # 2. Influence: everything the output's final value depends on is modelled.
    fin = final_node(dag, output, position)
    if fin not in region:
        return _fail(f"{fin.name} updates the MoE output in place but is not part of the recognised MoE")
    upstream = set()
    for i in inputs:
        upstream |= nx.ancestors(dag, i)
        upstream.add(i)
    influencers = (nx.ancestors(dag, fin) | {fin}) - upstream
    stray = sorted((n for n in influencers - region if n.op != "get_attr" and is_tensor_node(n)),
                   key=position.__getitem__)
    if stray:
        names = ", ".join(n.name for n in stray[:4])
        return _fail(f"{names} affect{'s' if len(stray) == 1 else ''} the MoE output but are not part of the "
                     "recognised MoE (an unmodelled op)")

    # 3. Reads from outside are declared.
    declared = set(inputs)
    for n in region:
        for i in n.all_input_nodes:
            if i not in region and i not in declared and is_tensor_node(i) and i.op != "get_attr":
                return _fail(f"{n.name} reads {i.name}, a tensor the match did not declare as an input")

    # 5. Side effects.
    region_storages = {storage_key(n) for n in region if mutated_arg(n) is None}
    region_storages.discard(None)
    for n in region:
        m = mutated_arg(n)
        if m is not None and storage_key(m) not in region_storages:
            return _fail(f"{n.name} writes in place into {m.name}, which lives outside the region")
    touched = {storage_key(i) for n in region for i in (n, *n.all_input_nodes)} - {None}
    for n in list(position):
        if position[first] < position[n] < position[last] and n not in region and mutated_arg(n) is not None:
            key = storage_key(mutated_arg(n))
            if key is None or key in touched:
                return _fail(f"{n.name} (outside the MoE) writes memory the MoE reads, in the middle of the MoE "
                             "region")

    # 6. Grad mode.
    modes = grad_modes(position)
    differ = sorted((n for n in region if modes[n] != modes[last]), key=position.__getitem__)
    if differ:
        return _fail(f"{differ[0].name} runs with grad mode {'on' if modes[differ[0]] else 'off'} (torch.no_grad() "
                     f"or enable_grad() inside the MoE), {last.name} with it {'on' if modes[last] else 'off'}; the "
                     "fused op computes the whole MoE under one grad mode")

    # 4. Escapes.
    escaping = [n for n in region if n is not output and any(u not in region for u in n.users)]
    for u in output.users:
        if u not in region and position[u] < position[last]:
            return _fail(f"{u.name} reads the MoE output before the MoE has finished computing it")
    keep = kept_closure(dag, region, output, escaping)
    if isinstance(keep, str):
        return _fail(keep)
    return RegionCheck(True, keep=keep, last=last)


def grad_modes(position: dict) -> dict:
    """node -> whether grad mode is on where it runs: ``torch._C._set_grad_enabled`` nodes (dynamo's record of
    ``torch.no_grad()`` and friends) switch it; before the first, the mode the graph is being compiled under."""
    mode, out = torch.is_grad_enabled(), {}
    for n in sorted(position, key=position.__getitem__):
        if n.op == "call_function" and n.target is torch._C._set_grad_enabled and isinstance(n.args[0], bool):
            mode = n.args[0]
        out[n] = mode
    return out


def kept_closure(dag: nx.DiGraph, region: Iterable[fx.Node], output: fx.Node,
                 nodes: Iterable[fx.Node]) -> frozenset | str:
    """``nodes`` of the region with their region ancestors, to stay in the graph unchanged after the rewrite; or
    why that is unsound: one of them writes memory in place, exposes the output buffer, or reads a buffer the
    region updates in place."""
    region = set(region)
    keep: set = set()
    for n in nodes:
        keep.add(n)
        keep |= nx.ancestors(dag, n) & region
    out_key = storage_key(output)
    written = {storage_key(mutated_arg(n)) for n in region if mutated_arg(n) is not None}
    for n in keep:
        if mutated_arg(n) is not None:
            return f"{n.name} is still needed outside the MoE but writes memory in place"
        if n is output or storage_key(n) == out_key:
            return f"{n.name} exposes the MoE output buffer before it is complete"
        if storage_key(n) in written or any(storage_key(i) in written for i in n.all_input_nodes):
            return f"{n.name} is still needed outside the MoE but reads a buffer the MoE updates in place"
    return frozenset(keep)
