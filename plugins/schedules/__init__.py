"""Built-in schedules plugins, one per module."""
