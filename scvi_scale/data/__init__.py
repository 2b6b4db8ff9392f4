"""Zarr count stores: lazy reading that proves each block (CountStore), converters (write_store), validation and the
field registry."""

from scvi_scale.data.convert import write_store
from scvi_scale.data.registry import Registry
from scvi_scale.data.store import CountStore, CountValidationError, StoreError
from scvi_scale.data.validate import validate_counts
from scvi_scale.data.writer import DEFAULT_CHUNK_ROWS, StoreWriter

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "CountStore",
    "CountValidationError",
    "Registry",
    "StoreError",
    "StoreWriter",
    "validate_counts",
    "write_store",
]
