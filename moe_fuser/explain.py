"""``moe_fuser.explain(model, *args, **kwargs)``: what the backend would fuse, where, how, and what it refused.

It compiles ``model`` with the moe_fuser backend (its own compile: the user's compiled models are untouched; one
compiled in place is examined as written, ``_as_written``), runs it once on the given inputs, and records every
dynamo graph the backend saw. By default the rewritten graphs run through ``inner="eager"`` (no inductor
compile: explain is for looking); ``options=`` takes any backend option.

The ``Report``:
    num_fused     how many MoE regions were replaced
    fused         one ``FusedRow`` per match: module path, family, pattern, router kind, E, k, activation, dtype,
                  lowering, notes
    rejected      one ``RejectedRow`` per candidate left alone: module path, family, pattern, reason; and one
                  (pattern ``capture``) per frame dynamo could not trace with the capture settings, or did not
                  compile at all and ran in eager (a data-dependent ``if`` in an expert loop, for one)
    graphs        the (rewritten) GraphModules, one per dynamo graph
    str(report)   a readable table;  report.draw(path)  the before/after of each fused region, rendered by
                  Graphviz ``dot`` (format from the suffix: .svg, .png, .pdf; ``report.to_dot()`` gives the text)

Everything explain records is also logged on the ``moe_fuser`` logger (INFO: each fusion and refusal).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import shutil
import subprocess
import types
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.fx as fx

from . import capture
from .backend import BackendOptions, compile_graph
from .patterns.base import Match, Rejection, router_kind
from .rewrite import FuseResult, RegionPicture
from .spec import dtype_name

__all__ = ["FusedRow", "RejectedRow", "Report", "explain"]

log = logging.getLogger("moe_fuser")


@dataclass(frozen=True)
class FusedRow:
    module_path: str
    family: str
    pattern: str
    router: str
    num_experts: int
    top_k: int
    activation: str
    dtype: str
    lowering: str
    notes: tuple = ()

    @classmethod
    def of(cls, m: Match) -> "FusedRow":
        e = m.spec.experts
        act = e.activation + ("-glu" if e.gated else "")
        clamp = e.limit is not None and e.activation != "gpt_oss"
        extras = [x for x, on in (("bias", e.bias), ("shared", m.spec.shared is not None),
                                  ("capacity", m.spec.capacity is not None),
                                  (f"clamp {e.limit:g}" if clamp else "", clamp)) if on]
        if extras:
            act += f" [{', '.join(extras)}]"
        return cls(m.module_path or "<root>", m.family, m.pattern, router_kind(m.spec), e.num_experts,
                   m.spec.top_k, act, dtype_name(m.dtype), m.lowering or "?", tuple(m.notes))


@dataclass(frozen=True)
class RejectedRow:
    module_path: str
    family: str
    pattern: str
    reason: str

    @classmethod
    def of(cls, r: Rejection) -> "RejectedRow":
        return cls(r.module_path or "<root>", r.family, r.pattern, r.reason)


@dataclass
class Report:
    fused: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    graphs: list = field(default_factory=list)
    matches: list = field(default_factory=list)
    pictures: list = field(default_factory=list)      # (before, after) RegionPicture per match

    @property
    def num_fused(self) -> int:
        return len(self.fused)

    @property
    def num_graphs(self) -> int:
        return len(self.graphs)

    def _record(self, result: FuseResult, gm: fx.GraphModule) -> None:
        self.graphs.append(gm)
        self.matches.extend(result.matches)
        self.fused.extend(FusedRow.of(m) for m in result.matches)
        self.rejected.extend(RejectedRow.of(r) for r in result.rejections)
        self.pictures.extend(zip(result.before, result.after))

    def __str__(self) -> str:
        lines = [f"moe_fuser: {self.num_fused} MoE fused in {self.num_graphs} graph(s), "
                 f"{len(self.rejected)} candidate(s) rejected"]
        if not self.graphs:
            lines.append("  dynamo handed the backend no graph: nothing of this call was captured, so nothing was "
                         "examined (" + ("see the capture rows below)" if self.rejected else
                                         "is the model excluded with torch.compiler.disable?)"))
        if self.fused:
            head = ("module", "family", "router", "E", "k", "activation", "dtype", "lowering")
            rows = [(r.module_path, r.family, r.router, str(r.num_experts), str(r.top_k), r.activation, r.dtype,
                     r.lowering) for r in self.fused]
            lines += ["", "fused:"] + _table(head, rows)
            for r in self.fused:
                lines += [f"  note ({r.module_path}): {n}" for n in r.notes]
        if self.rejected:
            head = ("module", "pattern", "reason")
            rows = [(r.module_path, r.pattern, r.reason) for r in self.rejected]
            lines += ["", "rejected:"] + _table(head, rows)
        return "\n".join(lines)

    __repr__ = __str__

    def to_dot(self) -> str:
        """Graphviz DOT text: for each fused region a 'before' and an 'after' cluster."""
        out = ["digraph moe_fuser {", '  rankdir=TB; node [shape=box, fontname="Helvetica", fontsize=10];',
               '  edge [color="#555555"];']
        for i, ((before, after), row) in enumerate(zip(self.pictures, self.fused)):
            for tag, pic in (("before", before), ("after", after)):
                out.append(f'  subgraph "cluster_{i}_{tag}" {{')
                out.append(f'    label="{_esc(row.module_path)}: {tag}"; fontname="Helvetica"; style=rounded;')
                out += _dot_nodes(pic, f"m{i}{tag[0]}_")
                out.append("  }")
        out.append("}")
        return "\n".join(out)

    def draw(self, path: str, format: Optional[str] = None) -> Path:
        """Render the before/after of every fused region to ``path`` (format from its suffix) with ``dot``."""
        path = Path(path)
        fmt = format or path.suffix.lstrip(".") or "svg"
        if not self.pictures:
            raise ValueError("nothing was fused, so there is nothing to draw; print(report) shows why")
        dot = shutil.which("dot")
        if dot is None:
            raise RuntimeError("report.draw needs Graphviz's `dot` program: install it (apt install graphviz, "
                               "brew install graphviz, conda install graphviz) or use report.to_dot()")
        path.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([dot, f"-T{fmt}", "-o", str(path)], input=self.to_dot().encode(),
                              capture_output=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"dot failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[:500]}")
        return path


_COLORS = {"input": "#dbeafe", "region": "#fee2e2", "kept": "#fef9c3", "fused": "#bbf7d0", "user": "#e5e7eb"}


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def _dot_nodes(pic: RegionPicture, prefix: str) -> list:
    lines = []
    for name, label in pic.nodes.items():
        color = _COLORS.get(pic.role.get(name, "user"), "#ffffff")
        label = _esc(label).replace("\n", "\\n")
        lines.append(f'    "{prefix}{name}" [label="{label}", style=filled, fillcolor="{color}"];')
    for a, b in pic.edges:
        lines.append(f'    "{prefix}{a}" -> "{prefix}{b}";')
    return lines


def _table(head: tuple, rows: list) -> list:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    widths[-1] = min(widths[-1], 100)
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths)
    sep = "  " + "  ".join("-" * w for w in widths)
    return [fmt.format(*head), sep] + [fmt.format(*r) for r in rows]


class _ExplainBackend:
    """A moe_fuser backend that records into a Report (a distinct backend object per explain call)."""

    _moe_fuser_backend = True

    def __init__(self, report: Report, opts: BackendOptions):
        self.report, self.opts = report, opts
        self.__name__ = "moe_fuser_explain"
        self.backend_ctx_ctor = capture.capture_context if opts.capture else capture._no_capture

    def __call__(self, gm: fx.GraphModule, example_inputs: list, **_: Any):
        return compile_graph(gm, example_inputs, self.opts, record=self.report._record)


@contextlib.contextmanager
def _as_written(model: Any):
    """``model`` without the compile the user put on it in place, for the span of explain's run.

    ``module.compile()`` and ``module.forward = torch.compile(module.forward)`` (transformers' recipe for
    ``generate``) make the module call its own compiled code, which dynamo runs as is from inside explain's
    compile: explain's backend would see no graph. Both are restored afterwards; ``torch.compile(module)`` (a
    wrapper object) needs nothing, dynamo traces through it."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    saved = {}
    if model._compiled_call_impl is not None:
        saved["_compiled_call_impl"] = model._compiled_call_impl
        model._compiled_call_impl = None
    forward = model.__dict__.get("forward")
    if getattr(forward, "_torchdynamo_orig_callable", None) is not None:
        saved["forward"] = forward
        model.forward = forward._torchdynamo_orig_callable
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(model, name, value)


_ISOLATE = "isolate_recompiles" in inspect.signature(torch.compile).parameters
_calls = itertools.count()


def _own_compile(model: Any, backend: Any) -> Any:
    """``torch.compile(model)`` whose compiled code the user's own compiles of ``model`` neither see nor reuse.

    Dynamo keeps compiled entries per code object and tries the newest first. torch >= 2.13 keeps one compile's
    entries apart (``isolate_recompiles``); before that, a wrapper with its own code object does it for the
    top frame (frames resumed after a graph break inside ``model`` still share entries there)."""
    if _ISOLATE:
        return torch.compile(model, backend=backend, isolate_recompiles=True)

    def run(*args: Any, **kwargs: Any) -> Any:
        return model(*args, **kwargs)

    code = run.__code__.replace(co_name=f"moe_fuser_explain_{next(_calls)}")
    return torch.compile(types.FunctionType(code, run.__globals__, code.co_name, None, run.__closure__),
                         backend=backend)


def _compilation_metrics() -> list:
    """Dynamo's records of its recent frame compilations (one per frame it tried), where this torch keeps them."""
    get = getattr(torch._dynamo.utils, "get_compilation_metrics", None)
    return list(get()) if get is not None else []


def _code_key(m: Any) -> tuple:
    return getattr(m, "co_filename", None), getattr(m, "co_firstlineno", None), getattr(m, "co_name", None)


def _model_codes(model: Any, depth: int = 3) -> set:
    """(file, first line, name) of the code objects of ``model``'s forwards (each module's, or ``model`` itself)
    and of the functions and methods they call by name, to ``depth`` calls deep (a helper such as
    ``run_experts(self.experts, x, w, ids)`` is a frame of its own for dynamo)."""
    mods = list(model.modules()) if isinstance(model, torch.nn.Module) else [model]
    todo = []
    for mod in mods:
        cls = type(mod) if isinstance(mod, torch.nn.Module) else None
        fn = getattr(cls, "forward", None) if cls is not None else mod
        if fn is not None:
            todo.append((inspect.unwrap(fn), cls))
    codes, seen = set(), set()
    for _ in range(depth):
        called = []
        for fn, cls in todo:
            code = getattr(fn, "__code__", None)
            if code is None or code in seen:
                continue
            seen.add(code)
            codes.add(_code_key(code))
            scope = getattr(fn, "__globals__", {})
            for name in code.co_names:
                target = scope.get(name) if name in scope else getattr(cls, name, None)
                if isinstance(target, types.FunctionType):
                    called.append((inspect.unwrap(target), cls))
        todo = called
    return codes


def _skipped_frames(metrics: list, retried: set) -> list:
    """A ``capture`` row for each frame dynamo failed to compile and ran in eager (frames traced again without
    the capture settings, ``retried``, have their own row), with dynamo's reason and the line it stopped at."""
    rows = []
    for m in metrics:
        name, reason = getattr(m, "co_name", None), getattr(m, "fail_reason", None)
        if not getattr(m, "fail_type", None) or not reason or name in retried:
            continue
        where = f"{getattr(m, 'co_filename', '?')}:{getattr(m, 'co_firstlineno', '?')}"
        at = f"{getattr(m, 'fail_user_frame_filename', '?')}:{getattr(m, 'fail_user_frame_lineno', '?')}"
        why = f"dynamo did not compile this frame and ran it in eager ({reason.splitlines()[0]}, at {at})"
        if "data-dependent branching" in reason.lower():
            why += (": an `if` on a tensor's values or data-dependent size, as an expert loop's `if idx.numel() == "
                    "0: continue`; drop such a branch (an expert with no rows computes nothing without it)")
        rows.append(RejectedRow(f"<frame {name}, {where}>", "capture", "capture", why))
    return rows


def explain(model: Any, *args: Any, options: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> Report:
    """Compile ``model`` with moe_fuser, run it once on ``*args, **kwargs`` and report what was fused."""
    opts = BackendOptions.from_dict({"inner": "eager", **dict(options or {})})
    report = Report()
    earlier = {id(m) for m in _compilation_metrics()}
    with _as_written(model), capture.recording_retries() as retries:
        _own_compile(model, _ExplainBackend(report, opts))(*args, **kwargs)
    rows = [RejectedRow(
        f"<frame {name}, {where}>", "capture", "capture",
        f"dynamo could not trace this frame with the capture settings ({reason}): it was traced as plain dynamo "
        "does, with graph breaks at its data-dependent ops, so an MoE in it is not seen whole. The usual cause "
        "is .tolist() of a tensor of data-dependent length, such as bincount(ids, minlength=E).tolist(); count "
        "with zeros(T, E).scatter(1, ids, 1).sum(0), whose length is E") for name, where, reason in retries]
    metrics = _compilation_metrics()
    rows += _skipped_frames([m for m in metrics if id(m) not in earlier], {r[0] for r in retries})
    if not report.fused and not rows:
        # Dynamo runs a frame it once failed on in eager from then on, without trying again: a model compiled and
        # run before explain shows nothing new. Its earlier failure on the model's own code is the reason.
        codes = _model_codes(model)
        rows = [replace(r, reason=r.reason + "; dynamo failed on it in an earlier compile of this model and runs it "
                                  "in eager since (torch._dynamo.reset() lets it try again)")
                for r in _skipped_frames([m for m in metrics if id(m) in earlier and _code_key(m) in codes], set())]
        rows = list({r.module_path: r for r in rows}.values())
    report.rejected[:0] = rows   # listed first: they explain what follows
    if not report.graphs:
        log.warning("moe_fuser.explain: dynamo handed the backend no graph, so nothing was examined; %s",
                    "dynamo ran the call's frames in eager (see the report's capture rows)" if rows else
                    "is the model compiled in a way explain cannot see through, or excluded with "
                    "torch.compiler.disable?")
    for row in report.fused:
        log.info("moe_fuser.explain: fused %s (%s) E=%d k=%d %s %s -> %s", row.module_path, row.router,
                 row.num_experts, row.top_k, row.activation, row.dtype, row.lowering)
    for row in report.rejected:
        log.info("moe_fuser.explain: rejected %s (%s): %s", row.module_path, row.pattern, row.reason)
    return report
