"""ddpmkit's version: one place, read by the package, by pyproject.toml and by run metadata."""

__version__ = "0.1.0"
