"""Built-in predictors plugins, one per module."""
