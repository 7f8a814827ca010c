"""The run machinery: configuration and presets, assembling components, training, checkpoints and
run directories, sampling pipelines and the fast path. Imports the sdk, never the applications."""
