"""The package version, recorded in the model files and outputs it writes."""

__version__ = "0.1.0"
