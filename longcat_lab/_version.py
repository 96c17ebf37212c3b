"""The package version, in a module of its own so that code below the package's `__init__` (the checkpoint writer
records it in meta.json) can import it without importing the whole package."""

__version__ = "0.1.0"
