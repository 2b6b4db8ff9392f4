"""scvi-scale: scVI trained and applied out of core on AnnData-Zarr stores.

    >>> from scvi_scale import SCVI, settings

`SCVI` is imported on first use, so that importing a lower layer (scvi_scale.data, scvi_scale.sampler, ...)
does not import the whole package.
"""

from scvi_scale.settings import settings
from scvi_scale.version import __version__

__all__ = ["SCVI", "settings", "__version__"]


def __getattr__(name: str):
    if name == "SCVI":
        from scvi_scale.model import SCVI

        return SCVI
    raise AttributeError(f"module 'scvi_scale' has no attribute {name!r}")
