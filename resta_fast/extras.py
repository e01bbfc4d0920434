"""Optional dependencies: a missing one is one clear line naming the extra to install.

Example:
    >>> require("json", "eval", "the demo")  # present: nothing happens
"""

from __future__ import annotations

import importlib.util

from resta_fast.errors import RestaError


def require(module: str, extra: str, what: str) -> None:
    """Raise RestaError (exit 2) unless ``module`` can be imported.

    Args:
        module: the top-level module needed (``transformers``).
        extra: the pip extra that brings it (``eval``).
        what: what needs it, for the message (``the demo``).
    """
    if importlib.util.find_spec(module) is None:
        raise RestaError(f"{what} needs {module}, which is not installed: pip install 'resta-fast[{extra}]'")
