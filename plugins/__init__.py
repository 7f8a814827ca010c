"""ddpmkit's built-in plugins (installed as ``ddpmkit_plugins``).

Each module is one plugin, registered through the ``ddpmkit`` entry-point group
in ddpmkit's pyproject.toml, the same way a third-party package registers its own.
Built-ins use only the public API (``import ddpmkit``).
"""
