"""The optional `report` extra: which of its packages are missing, said before any work is done."""

from __future__ import annotations

import importlib.util

EXTRA_INSTALL = "pip install 'scvi-scale[report]'"
# import name -> distribution name on PyPI
REPORT_PACKAGES = {"matplotlib": "matplotlib", "umap": "umap-learn", "scib_metrics": "scib-metrics"}


def missing_extra(modules: tuple[str, ...] = tuple(REPORT_PACKAGES)) -> str | None:
    """None when every module in `modules` (import names of the report extra) can be imported, else a sentence
    naming the missing distributions and the install command. Looks the modules up without importing them."""
    missing = [REPORT_PACKAGES[module] for module in modules if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return f"the report needs {', '.join(missing)}, not installed here: {EXTRA_INSTALL}"


def require_extra(*modules: str) -> None:
    """Raise ImportError naming the extra when any of `modules` (default: all of the extra) is missing."""
    message = missing_extra(modules or tuple(REPORT_PACKAGES))
    if message is not None:
        raise ImportError(message)
