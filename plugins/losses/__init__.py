"""Built-in losses plugins, one per module."""
