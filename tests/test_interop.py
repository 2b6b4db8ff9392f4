"""scvi-tools model interchange, against outputs that scvi-tools 1.4.2 itself recorded (tests/fixtures/scvi_tools,
made by benchmarks/make_scvi_tools_fixture.py); scvi-tools is not needed to run these tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scvi_scale import SCVI
from scvi_scale.data import write_store
from scvi_scale.module import to_tensors
from scvi_scale.sampler import SequentialSampler
from scvi_scale.scvi_tools_format import UnsupportedScviToolsModel

FIXTURE = Path(__file__).parent / "fixtures" / "scvi_tools"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(FIXTURE / "data.h5ad", tmp_path_factory.mktemp("interop") / "cells.zarr")


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(FIXTURE / "expected.npz"))


def _generative_at_means(model) -> dict[str, np.ndarray]:
    """px_rate, px_scale, theta, zi_logits at z = E[q(z)] and library = E[q(l)], as the fixture recorded them."""
    parts = {"px_rate": [], "px_scale": [], "zi_logits": []}
    with torch.no_grad():
        for minibatch in SequentialSampler(model.store, obs_arrays=model.obs_arrays):
            tensors = to_tensors(minibatch, model.device)
            inference = model.module.inference(tensors)
            outputs = model.module.generative(inference["qz"].loc, inference["ql"].loc, tensors)
            for key in parts:
                parts[key].append(outputs[key].numpy())
    result = {key: np.concatenate(values) for key, values in parts.items()}
    result["theta"] = outputs["theta"].numpy()
    return result


def test_scvi_tools_model_gives_scvi_tools_latent_and_likelihood_parameters(store, expected):
    model = SCVI.load(FIXTURE / "model", store)
    assert model.init_params["n_layers"] == 2 and model.registry.label_categories == [f"type_{i}" for i in range(4)]
    np.testing.assert_allclose(model.get_latent_representation(), expected["latent"], rtol=1e-5, atol=1e-6)
    ours = _generative_at_means(model)
    for key in ("px_rate", "px_scale", "zi_logits"):
        np.testing.assert_allclose(ours[key], expected[key], rtol=1e-5, atol=1e-6 * np.abs(expected[key]).max())
    np.testing.assert_allclose(np.broadcast_to(ours["theta"], expected["theta"].shape), expected["theta"], rtol=1e-6)


def test_save_in_scvi_tools_format_and_load_back(store, tmp_path):
    model = SCVI.load(FIXTURE / "model", store)
    model.save(tmp_path / "out", format="scvi-tools")
    payload = torch.load(tmp_path / "out" / "model.pt", weights_only=False)
    original = torch.load(FIXTURE / "model" / "model.pt", weights_only=False)
    # the same keys and shapes as scvi-tools' own file (the l_encoder and heads it always builds included)
    assert {k: tuple(v.shape) for k, v in payload["model_state_dict"].items() if k != "pyro_param_store"} == {
        k: tuple(v.shape) for k, v in original["model_state_dict"].items() if k != "pyro_param_store"
    }
    assert payload["attr_dict"]["init_params_"]["non_kwargs"] == original["attr_dict"]["init_params_"]["non_kwargs"]
    reloaded = SCVI.load(tmp_path / "out", store)
    np.testing.assert_array_equal(reloaded.get_latent_representation(), model.get_latent_representation())
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "out", format="scvi-tools")


def test_save_without_labels_records_what_scvi_tools_setup_records(tmp_path):
    """scvi-tools' load re-runs setup_anndata from the saved registry; without a labels_key, scvi-tools 1.4.2's
    setup_anndata records one category, 0, in a column "_scvi_labels" of its own (its registry printed on this
    machine), and its load fails on a field without that mapping. Ours must record the same, and load back."""
    from scvi_scale.datasets import synthetic_atlas

    path = synthetic_atlas(tmp_path / "atlas.zarr", 300, n_genes=200, n_batches=2, seed=0)
    SCVI.setup_zarr(path, batch_key="batch")
    model = SCVI(path)
    model.save(tmp_path / "model", format="scvi-tools")
    fields = torch.load(tmp_path / "model" / "model.pt", weights_only=False)["attr_dict"]["registry_"][
        "field_registries"
    ]
    labels = fields["labels"]
    assert labels["data_registry"] == {"attr_key": "_scvi_labels", "attr_name": "obs"}
    assert labels["state_registry"]["original_key"] == "_scvi_labels"
    assert labels["state_registry"]["categorical_mapping"].tolist() == [0]
    assert labels["summary_stats"] == {"n_labels": 1}
    assert fields["batch"]["state_registry"]["categorical_mapping"].tolist() == ["batch_0", "batch_1"]
    reloaded = SCVI.load(tmp_path / "model", path)
    assert reloaded.registry.labels_key is None
    np.testing.assert_array_equal(reloaded.get_latent_representation(), model.get_latent_representation())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a["init_params_"]["kwargs"]["kwargs"].update(use_size_factor_key=True), "use_size_factor_key"),
        (lambda a: a["init_params_"]["kwargs"]["kwargs"].update(unknown_option=1), "unknown_option"),
        (lambda a: a["registry_"]["setup_args"].update(size_factor_key="sf"), "size_factor_key"),
        (lambda a: a["registry_"].update(model_name="SCANVI"), "SCANVI"),
    ],
)
def test_options_we_cannot_map_are_refused_by_name(store, tmp_path, change, message):
    payload = torch.load(FIXTURE / "model" / "model.pt", weights_only=False)
    change(payload["attr_dict"])
    (tmp_path / "model").mkdir()
    torch.save(payload, tmp_path / "model" / "model.pt")
    with pytest.raises(UnsupportedScviToolsModel, match=message):
        SCVI.load(tmp_path / "model", store)
