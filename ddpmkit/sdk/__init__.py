"""What plugin authors import: the kinds, hook specifications and registry, options, the contract
and its test helpers, validators, and helpers for data and metrics. Nothing here imports the run
machinery (``ddpmkit.run``) or the applications."""
