"""Count stores: lazy reading that proves each block (CountStore), collections of stores read as one
(StoreCollection), a live AnnData read the same way (AnnDataSource), a query in a reference's genes (AlignedStore),
converters (write_store), validation and the field registry."""

from scvi_scale.data.aligned import AlignedStore
from scvi_scale.data.anndata_source import AnnDataSource
from scvi_scale.data.collection import StoreCollection
from scvi_scale.data.convert import write_store
from scvi_scale.data.registry import Registry
from scvi_scale.data.store import CountStore, CountValidationError, StoreError
from scvi_scale.data.validate import validate_counts
from scvi_scale.data.writer import DEFAULT_CHUNK_ROWS, StoreWriter

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "AlignedStore",
    "AnnDataSource",
    "CountStore",
    "CountValidationError",
    "Registry",
    "StoreCollection",
    "StoreError",
    "StoreWriter",
    "validate_counts",
    "write_store",
]
