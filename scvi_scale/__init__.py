"""scvi-scale: scVI trained and applied out of core on AnnData-Zarr stores.

    >>> from scvi_scale import SCVI, settings
"""

__version__ = "0.1.0"

from scvi_scale.model import SCVI  # noqa: E402  (the version is read by model.save)
from scvi_scale.settings import settings  # noqa: E402

__all__ = ["SCVI", "settings", "__version__"]
