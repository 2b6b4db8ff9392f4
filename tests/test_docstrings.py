"""Every public SCVI method has a numpydoc Parameters section naming each of its parameters (editor help and an
API reference read it), with the choices scvi-tools gives as Literal in the annotations."""

from __future__ import annotations

import inspect
import typing

import pytest

from scvi_scale import SCVI

METHODS = sorted(
    name
    for name, member in vars(SCVI).items()
    if not name.startswith("_") and isinstance(member, (staticmethod, classmethod, type(lambda: 0)))
)


def documented_parameters(doc: str) -> set[str]:
    """The names of a numpydoc Parameters section ("a, b : type" or "a, b" entries, **kwargs as kwargs)."""
    lines = inspect.cleandoc(doc).splitlines()
    start = lines.index("Parameters") + 2
    assert set(lines[start - 1]) == {"-"}, "the Parameters heading is underlined"
    names = set()
    for line in lines[start:]:
        if line and not line.startswith(" "):
            if set(line) == {"-"}:  # the next section's underline: its heading was the last entry read
                break
            names.update(name.strip().lstrip("*") for name in line.split(":")[0].split(","))
    return names


@pytest.mark.parametrize("name", METHODS + ["__init__"])
def test_each_parameter_is_documented(name):
    function = getattr(SCVI, name)
    doc = SCVI.__doc__ if name == "__init__" else function.__doc__
    parameters = [p.name for p in inspect.signature(function).parameters.values() if p.name not in ("self", "cls")]
    if not parameters:
        return
    missing = set(parameters) - documented_parameters(doc)
    assert not missing, f"SCVI.{name}'s docstring does not describe {sorted(missing)}"


def test_scvi_tools_choices_are_literal_annotations():
    hints = {
        name: typing.get_type_hints(getattr(SCVI, name))
        for name in (
            "__init__",
            "get_normalized_expression",
            "differential_expression",
            "get_feature_correlation_matrix",
        )
    }
    choices = {
        name: set(typing.get_args(hint))
        for method in hints.values()
        for name, hint in method.items()
        if typing.get_origin(hint) is typing.Literal
    }
    assert choices["gene_likelihood"] == {"zinb", "nb", "poisson", "normal"}
    assert choices["dispersion"] == {"gene", "gene-batch", "gene-label", "gene-cell"}
    assert choices["latent_distribution"] == {"normal", "ln"}
    assert choices["correlation_type"] == {"spearman", "pearson"}
    assert choices["mode"] == {"vanilla", "change"}
