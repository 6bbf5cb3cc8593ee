"""Keyword arguments of every explainer call: the peers' names, and no silently ignored keyword.

Every ``attribute`` / ``saliency`` (and a CAM's ``__call__``) goes through :func:`checked_keywords`
(:class:`~bbdecoder.attribution.Explainer` applies it to each subclass), which:

* renames the peers' spelling of an argument with the same meaning: Captum's ``baselines=`` for our
  ``baseline=`` (and back, where a method's own name is ``baselines``), pytorch-grad-cam's
  ``input_tensor=`` / ``targets=`` for ``inputs`` / ``target``, the FullGrad reference's
  ``target_class=``;
* takes Captum's ``additional_forward_args=``: the model is called as ``model(x, *args)`` for the
  whole call. A tensor argument whose first dim is the batch size is per sample: every forward pass
  gets the rows of the samples it scores (path points, noisy copies, perturbed rows), as Captum
  expands it; other arguments are passed as they are;
* turns a list of per-sample target objects (pytorch-grad-cam's ``[ClassifierOutputTarget(3), ...]``)
  into :class:`~bbdecoder.targets.PerSampleTargets`;
* refuses any other unknown keyword with a ``TypeError`` naming the nearest valid one (and, for the
  peers' arguments that mean something else here, where their setting lives).

A subclass whose method reads keywords out of ``**kwargs`` itself names them in the class attribute
``extra_keywords`` (a tuple of names), or returns them from ``keywords_for(inputs)``
(:meth:`Explainer.keywords_for <bbdecoder.attribution.Explainer.keywords_for>`: the token options
at a layer); they are then let through.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from bbdecoder.targets import as_target

F = TypeVar("F", bound=Callable[..., Any])

ALIASES: dict[str, tuple[str, ...]] = {
    "baselines": ("baseline",),  # Captum
    "baseline": ("baselines",),
    "targets": ("target",),  # pytorch-grad-cam's __call__
    "target": ("targets",),
    "target_class": ("target",),  # the FullGrad reference
    "input_tensor": ("inputs",),  # pytorch-grad-cam's __call__
    "inputs": ("input_tensor",),
}
"""A peer's name -> our names with the same meaning, tried in order."""

FORWARD_ARGS = "additional_forward_args"

HINTS: dict[str, str] = {
    "abs": (
        "Captum's Saliency(abs=True) is Gradient(model).attribute(x, target).abs(); saliency() gives "
        "|gradient| summed over channels"
    ),
    "perturbations_per_eval": (
        "set batch_size= (perturbed rows per forward pass) on the constructor instead"
    ),
    "show_progress": "set progress=True on the constructor instead",
    "nt_type": "Captum's NoiseTunnel is SmoothGrad(explainer, n_samples=..., noise_level=..., kind=...)",
    "nt_samples": "Captum's NoiseTunnel is SmoothGrad(explainer, n_samples=..., noise_level=..., kind=...)",
    "nt_samples_batch_size": "set internal_batch_size= on SmoothGrad(...) instead",
    "aug_smooth": "pytorch-grad-cam's aug_smooth is not implemented; average maps of flipped inputs yourself",
    "eigen_smooth": "pytorch-grad-cam's eigen_smooth is not implemented; EigenCAM takes the first component",
    "return_input_shape": "attributions are always shaped like the inputs",
    "target_layers": "target_layers= is a constructor argument: GradCAM(model, target_layers=[...])",
    "layer": "layer= is a constructor argument: Gradient(model, layer=...), GradCAM(model, layer=...)",
}
"""The peers' arguments that have no same-meaning counterpart in a call: where to look instead."""

_Forwarder = Callable[[Any], Callable[..., Any]]

# (args, batch size) of the innermost call given additional_forward_args; read by Explainer.forward.
_FORWARD_ARGS: contextvars.ContextVar[tuple[tuple[Any, ...], int] | None] = contextvars.ContextVar(
    "bbdecoder_forward_args", default=None
)


def forwards_keywords(to: _Forwarder) -> Callable[[F], F]:
    """Mark a method whose ``**kwargs`` go on to ``to(self)`` (a bound method), checked against it."""

    def mark(method: F) -> F:
        method._forwards_keywords_to = to  # type: ignore[attr-defined]
        return method

    return mark


def _names(func: Callable[..., Any]) -> tuple[list[str], bool]:
    """Parameters that can be given by keyword (``self`` excluded), and whether it takes ``**kwargs``."""
    names: list[str] = []
    var_keyword = False
    for index, parameter in enumerate(inspect.signature(func).parameters.values()):
        if index == 0 and parameter.name == "self":
            continue
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.append(parameter.name)
    return names, var_keyword


def accepted_keywords(bound: Callable[..., Any]) -> list[str]:
    """Our keyword names a bound explainer method accepts, following methods that forward ``**kwargs``."""
    func = getattr(bound, "__func__", bound)
    func = getattr(func, "__wrapped__", func)
    names, _ = _names(func)
    forwarder = getattr(func, "_forwards_keywords_to", None)
    owner = getattr(bound, "__self__", None)
    if forwarder is not None and owner is not None:
        names += [name for name in accepted_keywords(forwarder(owner)) if name not in names]
    return names


def _rename(kwargs: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The peers' names replaced by ours where ``names`` has the same-meaning one."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key not in names:
            ours = next((alias for alias in ALIASES.get(key, ()) if alias in names), None)
            if ours is not None:
                if ours in kwargs:
                    raise TypeError(f"give `{ours}=` or `{key}=` (the same argument), not both")
                key = ours
        out[key] = value
    return out


def unknown_keyword_error(owner: str, name: str, names: list[str], forward_args: bool = True) -> TypeError:
    """The ``TypeError`` for an unknown keyword: the nearest valid name, a hint, the accepted ones."""
    message = f"{owner}() got an unexpected keyword argument {name!r}"
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        message += f"; did you mean {close[0]!r}?"
    if name == FORWARD_ARGS and not forward_args:
        message += " (the Keras explainers call the model with the inputs only; wrap the model instead)"
    elif name in HINTS:
        message += f" ({HINTS[name]})"
    message += "." if not close else ""
    shown = [n for n in names if n not in ("inputs", "input_tensor")] + (
        [FORWARD_ARGS] if forward_args else []
    )
    message += f" It accepts: {', '.join(shown)}."
    return TypeError(message)


def _check(owner: str, kwargs: dict[str, Any], names: list[str], forward_args: bool = True) -> None:
    for key in kwargs:
        if key in names or (forward_args and key == FORWARD_ARGS):
            continue
        if any(alias in names for alias in ALIASES.get(key, ())):
            continue
        raise unknown_keyword_error(owner, key, names, forward_args)


def checked_keywords(method: F, *, torch_conventions: bool = True) -> F:
    """Wrap an explainer method: peers' names renamed, ``additional_forward_args`` taken, unknown refused.

    ``torch_conventions=False`` (the Keras explainers): only the renaming and the refusal; neither
    ``additional_forward_args`` nor per-sample target objects.
    """
    if getattr(method, "_checks_keywords", False):
        return method
    own, _ = _names(method)
    forwarder = getattr(method, "_forwards_keywords_to", None)
    target_keys = ("target", "targets", "target_class")

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        # A shared method on the Keras backend keeps the Keras conventions (``_torch_conventions``).
        conventions = torch_conventions and getattr(self, "_torch_conventions", True)
        if conventions and len(args) > 1:
            args = (args[0], as_target(args[1]), *args[2:])
        if not kwargs:
            return method(self, *args)
        kwargs = _rename(kwargs, own)
        owner = f"{type(self).__name__}.{method.__name__}"
        names = own if forwarder is None else list(dict.fromkeys(own + accepted_keywords(forwarder(self))))
        inputs = args[0] if args else kwargs.get("inputs", kwargs.get("input_tensor"))
        read_by_method = getattr(self, "keywords_for", None)
        extra = (
            read_by_method(inputs) if callable(read_by_method) else getattr(type(self), "extra_keywords", ())
        )
        names = names + [name for name in extra if name not in names]
        _check(owner, kwargs, names, conventions)
        if not conventions:
            return method(self, *args, **kwargs)
        for key in target_keys:
            if key in kwargs:
                kwargs[key] = as_target(kwargs[key])
        if FORWARD_ARGS not in kwargs:
            return method(self, *args, **kwargs)
        with forward_args(kwargs.pop(FORWARD_ARGS), inputs):
            return method(self, *args, **kwargs)

    wrapper._checks_keywords = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def forward_args(extra: Any, inputs: Any) -> Iterator[None]:
    """Call the model as ``model(x, *extra)`` inside the block (Captum's ``additional_forward_args``).

    ``None`` leaves the current setting; a non-tuple is one argument. Tensors whose first dim is the
    batch size of ``inputs`` are per sample (see :func:`expand_forward_args`).
    """
    if extra is None:
        yield
        return
    values = extra if isinstance(extra, tuple) else (extra,)
    batch = int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) and inputs.dim() > 0 else -1
    token = _FORWARD_ARGS.set((values, batch))
    try:
        yield
    finally:
        _FORWARD_ARGS.reset(token)


def expand_forward_args(rows: int, samples: torch.Tensor | None = None) -> tuple[Any, ...]:
    """The extra model arguments for a forward pass of ``rows`` rows (``()`` when none were given).

    ``samples`` (rows,) names the sample each row belongs to; ``None`` means rows ``0..rows-1`` of
    the batch, taken modulo the batch size (a probe of the first sample, concatenated copies).
    A per-sample tensor argument gives those samples' rows; anything else is passed as it is.
    """
    current = _FORWARD_ARGS.get()
    if current is None:
        return ()
    values, batch = current
    if batch < 1:
        return values
    out: list[Any] = []
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            if samples is None and rows == batch:
                out.append(value)
                continue
            index = torch.arange(rows) if samples is None else samples
            out.append(value[(index % batch).to(value.device)])
        else:
            out.append(value)
    return tuple(out)
