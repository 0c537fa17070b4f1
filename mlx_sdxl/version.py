"""The package version (kept apart from __init__ so any module can import it without a cycle)."""

__version__ = "0.1.0"
