"""Whole-MoE capture: the dynamo settings a hand-written MoE loop needs, in force exactly when moe_fuser compiles.

Why. A hand-written loop dispatches with data-dependent ops (``torch.where(ids == e)``, ``nonzero``, ``.tolist()``
counts). Under dynamo's defaults each is a graph break, and a break inside a ``for`` loop makes dynamo skip the
frame: the MoE reaches no backend at all. With ``capture_dynamic_output_shape_ops=True`` and
``capture_scalar_outputs=True`` the same code is captured as one graph (unbacked SymInts for the per-expert
token counts). The settings must hold while the frame is *traced*, i.e. on the compiled model's first call,
before any backend sees a graph.

How. Dynamo enters a backend's ``backend_ctx_ctor`` context around every call of the compiled function (tracing
included), but ``torch.compile`` wraps a named backend in ``_TorchCompileWrapper``, which hides that attribute
from dynamo. ``install()`` (run when ``moe_fuser.backend`` is imported, which dynamo does when it looks up the
entry point ``backend="moe_fuser"`` inside that very ``torch.compile`` call) wraps
``torch._dynamo.eval_frame.get_compiler_fn`` so that a ``_TorchCompileWrapper`` around a moe_fuser backend
(marked ``_moe_fuser_backend``) exposes its ``backend_ctx_ctor`` again. Only those wrappers are touched:
``backend="inductor"`` and every other backend go through unchanged, and the settings hold only during calls
of the moe_fuser-compiled model, so other compiled models in the process never see them (unless called from
inside it). Entering them costs ~1 us per call (see ``_CaptureSettings``).

Limits.
- Frames traced *under* a moe_fuser-compiled call (its whole model) are traced with the two settings. A frame
  without data-dependent ops traces identically (the settings are never consulted), so its graph and the code
  the inner compiler generates are exactly those of plain ``torch.compile``. A non-MoE frame *with* such ops is
  captured whole where plain dynamo would break it; it is still compiled by the inner compiler unchanged.
- Code that iterates a data-dependent tensor (transformers' own ``experts_implementation="eager"`` loop,
  ``for e in expert_hit:``) can never be captured whole under any setting; compile such models with their
  default ``grouped_mm`` implementation (the default for whole ``*ForCausalLM`` models).
- Where the settings make dynamo fail outright on code plain dynamo would only break the graph at (a
  ``.tolist()`` of a tensor whose length is data-dependent, e.g. ``torch.bincount(ids, minlength=E).tolist()``:
  a ``GuardOnDataDependentSymNode`` error), or make the inner compiler fail on a graph left unfused (inductor
  cannot lower an ``einsum`` over rows of an unbacked count), that frame is traced again without them, as plain
  ``torch.compile`` traces it (``install`` wraps dynamo's ``ConvertFrame.__call__`` for this; logged at INFO,
  and recorded for ``explain`` by ``recording_retries``).
  An MoE in such a frame is then not captured whole and stays unfused.
- ``options={"capture": False}`` turns the settings off (the loop then runs in eager, unfused).
- Settings given explicitly via ``torch._dynamo.config.patch(...)`` around the call are overridden during it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from typing import Any, Callable, Optional

import torch._dynamo.config as dynamo_config
import torch._dynamo.convert_frame as convert_frame
import torch._dynamo.eval_frame as eval_frame

__all__ = ["CAPTURE_SETTINGS", "capture_context", "install", "installed"]

log = logging.getLogger("moe_fuser")

#: The dynamo settings moe_fuser traces under.
CAPTURE_SETTINGS = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}


# Whether the current call runs under moe_fuser's capture settings (set by ``_CaptureSettings``).
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("moe_fuser_capture_active", default=False)
# Where frames traced again without the settings are recorded, while ``recording_retries`` is entered.
_RETRIES: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("moe_fuser_capture_retries", default=None)


@contextlib.contextmanager
def recording_retries():
    """A list that collects ``(frame name, "file:line", reason)`` for each frame traced again without the capture
    settings during the block (``explain`` reports them: an MoE in such a frame stays unfused)."""
    token = _RETRIES.set([])
    try:
        yield _RETRIES.get()
    finally:
        _RETRIES.reset(token)


class _CaptureSettings:
    """Sets CAPTURE_SETTINGS (or, with ``on=False``, their plain-dynamo values) for a ``with`` block.

    Dynamo enters this around *every* call of a moe_fuser-compiled function, cache hits included, so it must be
    cheap: ``torch._dynamo.config.patch`` costs ~25 us per call, this ~1 us. It sets the same per-context
    override dynamo's own ``config.patch`` sets (each config entry's ``user_override`` ContextVar) and falls
    back to ``config.patch`` if that internal layout ever changes."""

    __slots__ = ("_undo", "_on")

    def __init__(self, on: bool = True) -> None:
        self._on = on

    def __enter__(self) -> None:
        entries = _override_vars()
        active = _ACTIVE.set(self._on)
        if entries is None:
            patch = dynamo_config.patch(**{k: v and self._on for k, v in CAPTURE_SETTINGS.items()})
            patch.__enter__()

            def undo_patch() -> None:
                patch.__exit__(None, None, None)
                _ACTIVE.reset(active)
            self._undo = undo_patch
            return
        tokens = [(var, var.set(value and self._on)) for var, value in entries]
        tokens.append((_ACTIVE, active))

        def undo() -> None:
            for var, token in reversed(tokens):
                try:
                    var.reset(token)
                except ValueError:      # exited in another context than entered: restore the old value
                    var.set(token.old_value)
        self._undo = undo

    def __exit__(self, *exc) -> None:
        self._undo()


@functools.lru_cache(maxsize=None)
def _override_vars() -> Optional[tuple]:
    config = getattr(dynamo_config, "_config", None)
    if not isinstance(config, dict):
        return None
    out = []
    for name, value in CAPTURE_SETTINGS.items():
        var = getattr(config.get(name), "user_override", None)
        if not isinstance(var, contextvars.ContextVar):
            return None
        out.append((var, value))
    return tuple(out)


def capture_context() -> contextlib.AbstractContextManager:
    """The settings as a context manager (dynamo enters one per call of a moe_fuser-compiled function)."""
    return _CaptureSettings()


def _no_capture() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _wants_capture(wrapper: Any) -> bool:
    options = (getattr(wrapper, "kwargs", None) or {}).get("options") or {}
    return options.get("capture", True) is not False


def _expose_ctx(compiler_fn: Any) -> None:
    """Give a torch.compile wrapper the ``backend_ctx_ctor`` of the compiler it wraps (instance attribute, so
    dynamo's debug wrapper copies it along with the rest of the instance dict)."""
    inner = getattr(compiler_fn, "compiler_fn", None)
    if not getattr(inner, "_moe_fuser_backend", False) or "backend_ctx_ctor" in getattr(compiler_fn, "__dict__", {}):
        return
    ctor: Callable = inner.backend_ctx_ctor if _wants_capture(compiler_fn) else _no_capture
    try:
        compiler_fn.backend_ctx_ctor = ctor
    except AttributeError:
        log.debug("moe_fuser: cannot attach backend_ctx_ctor to %r", compiler_fn)


def installed() -> bool:
    return getattr(eval_frame.get_compiler_fn, "_moe_fuser_wrapped", False)


def _install_retry() -> None:
    """Wrap ``ConvertFrame.__call__`` (dynamo's per-frame entry) so that a frame whose compile under the capture
    settings fails on a data-dependent guard, in dynamo's tracing or in the inner compiler (an error raised from
    one), is traced again without them (see the module docstring). Frames compiled outside moe_fuser's calls
    are untouched. A no-op where this torch has no such class."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    cls = getattr(convert_frame, "ConvertFrame", None)
    original = getattr(cls, "__call__", None)
    if original is None or getattr(original, "_moe_fuser_wrapped", False):
        return

    def data_dependent(exc: Optional[BaseException]) -> bool:
        seen = set()
        while exc is not None and id(exc) not in seen:
            if isinstance(exc, GuardOnDataDependentSymNode):
                return True
            seen.add(id(exc))
            exc = exc.__cause__ or exc.__context__
        return False

    @functools.wraps(original)
    def __call__(self, frame, *args, **kwargs):
        try:
            return original(self, frame, *args, **kwargs)
        except Exception as exc:
            if not _ACTIVE.get() or not data_dependent(exc):
                raise
            reason = str(exc).splitlines()[0]
            log.info("moe_fuser: tracing %s with data-dependent capture failed (%s); tracing it again as plain "
                     "dynamo does (graph breaks at such ops; an MoE there stays unfused)", frame.f_code.co_name,
                     reason)
            retries = _RETRIES.get()
            if retries is not None:
                code = frame.f_code
                retries.append((code.co_name, f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno}",
                                reason))
            with _CaptureSettings(on=False):
                return original(self, frame, *args, **kwargs)

    __call__._moe_fuser_wrapped = True
    cls.__call__ = __call__


def install() -> None:
    """Make dynamo honour ``backend_ctx_ctor`` of backends wrapped by ``torch.compile``, and retry frames the
    capture settings cannot trace (idempotent)."""
    if installed():
        return
    _install_retry()
    original = eval_frame.get_compiler_fn

    @functools.wraps(original)
    def get_compiler_fn(compiler_fn):
        _expose_ctx(compiler_fn)
        return original(compiler_fn)

    get_compiler_fn._moe_fuser_wrapped = True
    eval_frame.get_compiler_fn = get_compiler_fn
    log.debug("moe_fuser: capture hook installed on torch._dynamo.eval_frame.get_compiler_fn")
