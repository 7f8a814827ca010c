"""Built-in metrics plugins, one per module."""
