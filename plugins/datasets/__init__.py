"""Built-in datasets plugins, one per module."""
