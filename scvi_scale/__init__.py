"""scvi-scale: scVI trained and applied out of core on AnnData-Zarr stores."""

__version__ = "0.1.0"
