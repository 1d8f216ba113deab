"""One memo for ``estimate_at``: each estimate is made once per set of arguments.

A batch search, a plot sweep, the remedies and the verdict ask for the same estimate several times
(the ``memguard`` command estimates at ``--batch-size`` and its search tries it again; the pytest
plugin sees the same marker on several tests). Each used to keep its own ``dict``; they wrap their
estimator in :func:`cached` instead, like :func:`functools.cache`, but arguments that cannot be
hashed (a config object, an example batch) are passed through uncached instead of raising, and a
caller can file one answer under more keys (``seq_len=None`` and the length it stood for).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

__all__ = ["Cached", "cached"]

T = TypeVar("T")

Key = tuple[tuple[Any, ...], tuple[tuple[str, Any], ...]]
"""The positional arguments, and the keyword arguments sorted by name."""


class Cached(Generic[T]):
    """``fn`` remembered by its arguments; see :func:`cached`.

    Attributes:
        fn: the function whose answers are kept.
        calls: how many times ``fn`` itself ran (for tests and progress lines).
    """

    def __init__(self, fn: Callable[..., T],
                 aliases: Callable[[tuple[Any, ...], T], Iterable[tuple[Any, ...]]] | None = None) -> None:
        self.fn = fn
        self.calls = 0
        self._aliases = aliases
        self._memo: dict[Key, T] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> T:
        key: Key = (args, tuple(sorted(kwargs.items())))
        if not _hashable(key):
            self.calls += 1
            return self.fn(*args, **kwargs)
        if key not in self._memo:
            self.calls += 1
            value = self.fn(*args, **kwargs)
            self._memo[key] = value
            for more in self._aliases(args, value) if self._aliases else ():
                alias: Key = (tuple(more), key[1])
                if _hashable(alias):
                    self._memo.setdefault(alias, value)
        return self._memo[key]

    def __len__(self) -> int:
        return len(self._memo)


def cached(fn: Callable[..., T], *,
           aliases: Callable[[tuple[Any, ...], T], Iterable[tuple[Any, ...]]] | None = None) -> Cached[T]:
    """``fn`` that runs once per set of arguments and then answers from memory.

    Args:
        fn: an ``estimate_at(...)``: any function of hashable arguments whose answer depends on
            them alone. Calls with an argument that cannot be hashed run ``fn`` every time.
        aliases: given the positional arguments and the answer, more positional argument tuples
            the same answer stands for (same keyword arguments); e.g. ``estimate_at(8, None)`` at
            the model's maximum length is also ``estimate_at(8, 1024)``:
            ``aliases=lambda args, est: [(args[0], est.inputs.get("seq_len"))]``. A key already
            filed is not replaced.

    Returns:
        The remembering callable; an exception from ``fn`` is raised and nothing is kept.

    >>> calls = []
    >>> square = cached(lambda n: calls.append(n) or n * n)
    >>> square(3), square(3), calls
    (9, 9, [3])
    """
    return Cached(fn, aliases)


def _hashable(key: Hashable) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True
