"""Instance attributes that shadow a Keras object's methods for the length of ``fit`` and are removed
again: set with ``object.__setattr__`` so Keras' attribute tracking records nothing, restored to
exactly what was there (an own attribute put back, a class attribute uncovered)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

OWNER_ATTRIBUTE = "_bbdecoder_monitor"
"""Set on every installed function: the callback that installed it (to find stale installations)."""

_MISSING = object()


class Shadows:
    """The installed shadows, in installation order; :meth:`restore` removes them (idempotent)."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        self._saved.append((owner, name, vars(owner).get(name, _MISSING)))
        object.__setattr__(owner, name, value)

    def restore(self) -> None:
        while self._saved:
            owner, name, own = self._saved.pop()
            if own is not _MISSING:
                object.__setattr__(owner, name, own)
            elif name in vars(owner):
                object.__delattr__(owner, name)

    def __bool__(self) -> bool:
        return bool(self._saved)


def installed_by(owner: Any, name: str) -> Any:
    """The monitor that shadows ``owner.name``, or ``None``."""
    return getattr(vars(owner).get(name), OWNER_ATTRIBUTE, None)


_F = TypeVar("_F", bound=Callable[..., Any])


def closing_on_error(method: _F) -> _F:
    """A callback method that calls ``self._abort(error)`` (restore the model, close the store)
    before an error propagates (Keras does not call ``on_train_end`` when ``fit`` raises)."""

    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except BaseException as error:
            self._abort(error)
            raise

    return guarded  # type: ignore[return-value]


__all__ = ["OWNER_ATTRIBUTE", "Shadows", "closing_on_error", "installed_by"]
