"""The library's version, in a module of its own so that ``io`` can record it without importing
the package ``__init__`` (which imports ``io``)."""

__version__ = "0.4.0"
