"""Defaults of the Python API, read from the signatures that define them, so the commands never restate them."""

from __future__ import annotations

import inspect


def default(function, name: str):
    """The default value of parameter `name` of `function`."""
    value = inspect.signature(function).parameters[name].default
    if value is inspect.Parameter.empty:
        raise KeyError(f"{function.__qualname__} has no default for {name!r}")
    return value
