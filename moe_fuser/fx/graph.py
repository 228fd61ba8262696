"""Reading a dynamo FX graph: canonical op names, fake values, parameter paths, module paths.

Dynamo graphs are torch-level: the same operation shows up as ``call_function`` (``torch.softmax``,
``torch._C._nn.linear``, ``F.silu``), as ``call_method`` (``x.softmax(-1)``) or, after another pass, as an ATen
overload (``torch.ops.aten._softmax.default``). Patterns should not care, so ``op(node)`` names all of them by one
canonical string ("softmax", "linear", "silu", "getitem", "index_add_", ...): the target's ``__name__`` for
functions and ATen packets, the method name for methods. In-place variants keep their trailing underscore.

Values: dynamo stores the fake tensor of every node in ``meta["example_value"]``; later passes use
``meta["val"]``. ``val(node)`` returns whichever is present (``None`` for nodes without one).

Parameters arrive as placeholders. ``param_path(node)`` returns the dotted ``named_parameters()`` path relative to
the compiled module ("experts.0.0.weight"): from dynamo's ``grapharg`` source when present (exact), else by
decoding the placeholder name (``l_self_modules_experts_modules_0_..._parameters_weight_``). ``module_path(node)``
returns the innermost ``nn_module_stack`` entry ("layers.0.mlp.experts.0"), or "" when there is none: the
metadata helps (explain prints it) but nothing depends on it being there.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx

__all__ = [
    "arg",
    "is_op",
    "is_param",
    "module_path",
    "op",
    "param_path",
    "scalar_arg",
    "squared_relu",
    "val",
]

# Python operators dynamo records as call_function, by the name patterns use.
_OPERATORS = {
    operator.getitem: "getitem", operator.setitem: "setitem", operator.add: "add", operator.iadd: "iadd",
    operator.mul: "mul", operator.imul: "imul", operator.truediv: "div", operator.itruediv: "itruediv",
    operator.sub: "sub", operator.eq: "eq", operator.floordiv: "floordiv", operator.neg: "neg",
    operator.matmul: "matmul", operator.lt: "lt", operator.ge: "ge", operator.le: "le", operator.gt: "gt",
    operator.pow: "pow",
}
# The same operators as tensor methods: older dynamo (torch 2.11) records `ids == e` as call_method "__eq__".
_DUNDERS = {f"__{fn.__name__}__": name for fn, name in _OPERATORS.items()}
# Functions whose __name__ differs from the name patterns use.
_ALIASES = {"_softmax": "softmax", "true_divide": "div", "divide": "div", "multiply": "mul", "subtract": "sub",
            "index_select": "index_select", "argwhere": "nonzero", "matmul": "matmul", "mm": "matmul",
            "_grouped_mm": "grouped_mm", "grouped_mm_fallback": "grouped_mm"}


def op(node: fx.Node) -> Optional[str]:
    """Canonical name of what ``node`` computes, or None for placeholders/outputs/get_attr/modules."""
    if node.op == "call_method":
        return _DUNDERS.get(node.target) or _ALIASES.get(node.target, node.target)
    if node.op != "call_function":
        return None
    target = node.target
    if target in _OPERATORS:
        return _OPERATORS[target]
    if isinstance(target, torch._ops.OpOverload):
        name = target._opname
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name.split("::")[-1]
    else:
        name = getattr(target, "__name__", None)
    if name is None:
        return None
    return _ALIASES.get(name, name)


def is_op(node: Any, *names: str) -> bool:
    return isinstance(node, fx.Node) and op(node) in names


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node (method calls count ``self`` as index 0)."""
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def scalar_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Like ``arg`` but only for plain Python scalars; a Node (a traced SymInt) yields ``default``."""
    a = arg(node, index, name, default)
    return default if isinstance(a, fx.Node) else a


def squared_relu(node: Any) -> Optional[fx.Node]:
    """The ``relu`` node whose square ``node`` computes (``square(r)``, ``r ** 2``, ``r * r``; transformers'
    ``relu2`` activation), or None. The relu must be out of place and read by nothing else."""
    if is_op(node, "square") or (is_op(node, "pow") and scalar_arg(node, 1, "exponent") == 2):
        r = node.args[0]
    elif is_op(node, "mul") and len(node.args) == 2 and node.args[0] is node.args[1]:
        r = node.args[0]
    else:
        return None
    if not is_op(r, "relu") or arg(r, 1, "inplace", False) is True or len(r.users) != 1:
        return None
    return r


def val(node: Any) -> Any:
    """The fake value dynamo (``example_value``) or a later pass (``val``) recorded for ``node``."""
    if not isinstance(node, fx.Node):
        return node
    v = node.meta.get("val")
    return node.meta.get("example_value") if v is None else v


_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]")


def _path_from_source(name: str) -> Optional[str]:
    """"L['self']._modules['experts']._modules['0']._parameters['weight']" -> "experts.0.weight"."""
    m = re.match(r"^L\['[^']+'\]", name)
    if m is None:
        return None
    rest, parts, pos = name[m.end():], [], 0
    while pos < len(rest):
        p = _SOURCE_PART.match(rest, pos)
        if p is None:
            return None
        parts.append(next(g for g in p.groups() if g is not None))
        pos = p.end()
    return ".".join(parts)


_NAME_PART = re.compile(r"_(modules|parameters|buffers)_(.+?)(?=_(?:modules|parameters|buffers)_|_$)")


def _path_from_placeholder_name(name: str) -> Optional[str]:
    """"l_self_modules_experts_modules_0_parameters_weight_" -> "experts.0.weight" (best effort)."""
    parts = [m.group(2) for m in _NAME_PART.finditer(name)]
    return ".".join(parts) if parts else None


def is_param(node: Any) -> bool:
    """A placeholder holding a parameter or buffer of the compiled module (not a user input)."""
    if not isinstance(node, fx.Node) or node.op != "placeholder":
        return False
    ga = node.meta.get("grapharg")
    if ga is not None and getattr(ga, "source", None) is not None:
        return "._parameters[" in ga.source.name or "._buffers[" in ga.source.name
    return isinstance(val(node), torch.nn.Parameter) or "_parameters_" in node.name or "_buffers_" in node.name


def param_path(node: Any) -> Optional[str]:
    """Dotted path of the parameter/buffer a placeholder holds, relative to the compiled module."""
    if not is_param(node):
        return None
    ga = node.meta.get("grapharg")
    if ga is not None and getattr(ga, "source", None) is not None:
        path = _path_from_source(ga.source.name)
        if path is not None:
            return path
    return _path_from_placeholder_name(node.name)


def _clean_module_path(path: str) -> str:
    path = re.sub(r"^L\['[^']+'\]\.?", "", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.lstrip(".")


def module_path(node: fx.Node) -> str:
    """Innermost module path of ``node`` from ``nn_module_stack`` ("" when absent)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean_module_path(path)


def module_stack(node: fx.Node) -> list[str]:
    """All module paths of ``node``, outermost first (empty when the metadata is absent)."""
    return [_clean_module_path(v[0]) for v in (node.meta.get("nn_module_stack") or {}).values()]


def common_prefix(paths: Iterable[str]) -> str:
    """Longest dotted prefix shared by ``paths`` ("layers.0.moe" from its experts' paths)."""
    split = [p.split(".") for p in paths if p]
    if not split:
        return ""
    out = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        out.append(parts[0])
    return ".".join(out)
