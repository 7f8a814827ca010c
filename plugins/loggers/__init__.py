"""Built-in loggers plugins, one per module."""
