"""Built-in samplers plugins, one per module."""
