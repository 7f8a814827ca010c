"""Built-in timestep samplers plugins, one per module."""
