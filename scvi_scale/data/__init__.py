"""Zarr count stores: lazy reading (CountStore), converters (write_store), validation and the field registry."""

from scvi_scale.data.store import CountStore, CountValidationError, StoreError

__all__ = ["CountStore", "CountValidationError", "StoreError"]
