"""The model layer: `SCVI` (scvi.py, the face), the executor of its outputs' plans (plans.py), outputs of several
passes (analyses.py), training's set-up (training.py), query mapping (query.py), saving and loading (saving.py),
where its data comes from (sources.py) and the scvi-tools arguments it accepts without a use for them (compat.py)."""

from scvi_scale.model.scvi import SCVI

__all__ = ["SCVI"]
