"""Built-in processes plugins, one per module."""
