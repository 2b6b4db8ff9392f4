"""The model layer: `SCVI` (scvi.py, the face, with its methods by area in training.py, latent.py, expression.py,
saving.py and query.py; the parameters they share described once in docs.py), the executor of its outputs' plans
(plans.py, output_plans.py), outputs of several passes (analyses.py), where its data comes from (sources.py) and the
scvi-tools arguments it accepts without a use for them (compat.py)."""

from scvi_scale.model.scvi import SCVI

__all__ = ["SCVI"]
