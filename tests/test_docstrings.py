"""Every public SCVI method has a numpydoc Parameters section naming each of its parameters (editor help and an
API reference read it), with the choices scvi-tools gives as Literal in the annotations; the shared descriptions
(model/docs.py) are filled in, as help() shows them."""

from __future__ import annotations

import inspect
import re
import typing

import pytest

from scvi_scale import SCVI
from scvi_scale.model import docs

METHODS = sorted(  # SCVI's, those bound from model/training.py, latent.py, expression.py, saving.py, query.py too
    name
    for name in {name for cls in SCVI.__mro__ for name in vars(cls)}
    if not name.startswith("_")
    and isinstance(inspect.getattr_static(SCVI, name), (staticmethod, classmethod, type(lambda: 0)))
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


def test_the_methods_scvi_tools_has_are_all_checked():
    assert {"train", "get_elbo", "get_normalized_expression", "save", "load", "load_query_data"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS + ["__init__"])
def test_no_placeholder_is_left_unfilled(name):
    doc = SCVI.__doc__ if name == "__init__" else getattr(SCVI, name).__doc__
    assert not docs.PLACEHOLDER.search(doc), (
        f"SCVI.{name}'s docstring has an unfilled {docs.PLACEHOLDER.search(doc)[0]}"
    )


def test_a_shared_entry_is_filled_in_whole_at_the_placeholder_indent():
    doc = inspect.getdoc(SCVI.get_elbo)
    entry = doc[doc.index("\nadata\n") + 1 :].splitlines()
    assert entry[0] == "adata"
    assert entry[1] == "    " + docs.PARAMETERS["adata"][1]
    assert entry[2] == "indices"
    help_text = inspect.getdoc(SCVI.get_latent_representation)
    write_to = help_text[help_text.index("\nwrite_to\n") + 1 :].splitlines()
    assert write_to[0] == "write_to" and write_to[1].startswith("    A key to write the output to")
    assert "    Here obsm/<key> (and with return_dist the variance, obsm/<key>_var)." in write_to[2:5]


def test_a_placeholder_without_a_shared_entry_is_refused_naming_it():
    def method(self, frobnicate=None):
        """Does it.

        Parameters
        ----------
        {frobnicate}
        """

    with pytest.raises(KeyError, match=re.escape("method's docstring names {frobnicate}")):
        docs.fill(method)


def test_filling_keeps_the_function_and_its_signature():
    def method(self, adata=None, silent: bool = True):
        """Does it.

        Parameters
        ----------
        {adata}
        {silent}
        """

    signature = inspect.signature(method)
    assert docs.fill(method) is method and inspect.signature(method) == signature
    assert "{" not in method.__doc__
