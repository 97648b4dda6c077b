"""Lazy re-exports for package ``__init__`` files (PEP 562), so that importing a package
(``import voxreg``, ``voxreg --help``) does not import torch, nibabel or SimpleITK.

A package declares ``{name: submodule}`` and binds the returned functions::

    __getattr__, __dir__ = lazy_exports(__name__, {"Grid": "voxreg.core.grid"})

``package.Grid`` then imports ``voxreg.core.grid`` on first use and caches the object in the
package's namespace; ``package.submodule`` imports the submodule, as an eager
``__init__`` that imported it used to make available.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package`` for ``exports``
    (public name -> module that defines it)."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        else:
            value = _submodule(package, name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__


def _submodule(package: str, name: str) -> Any:
    """``package.name`` imported as a submodule; AttributeError when there is none."""
    if name.startswith("__"):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    try:
        return importlib.import_module(f"{package}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{package}.{name}":
            raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
