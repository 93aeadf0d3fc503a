"""Loading the compiled fast paths (the C modules ``make install`` builds) with their fallback.

Each compiled module declares the version of its functions' signatures as ``INTERFACE``; its
Python caller names the version it was written for. A module that was not built, or was built
from another version of its source (a stale ``.so`` beside newer code), is not used: the caller
then runs its pure-Python path, slower, with the same results::

    >>> compiled_function("state._no_such_module", 1, "anything") is None
    True
"""

from __future__ import annotations

import importlib
from typing import Callable


def compiled_function(module: str, interface: int, name: str) -> Callable | None:
    """``module.name`` when ``module`` is built at ``interface``; None otherwise (not built,
    or another version)."""
    try:
        built = importlib.import_module(module)
    except ImportError:
        return None
    return getattr(built, name) if getattr(built, "INTERFACE", None) == interface else None
