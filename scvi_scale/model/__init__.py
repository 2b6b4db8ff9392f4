"""The model layer: `SCVI` (scvi.py), where its data comes from (sources.py) and the scvi-tools arguments it
accepts without a use for them (compat.py)."""

from scvi_scale.model.scvi import SCVI

__all__ = ["SCVI"]
