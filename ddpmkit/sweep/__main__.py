"""``python -m ddpmkit.sweep SPEC.json``: one trial process (each rank under torchrun); see
:func:`ddpmkit.sweep.launch.main`."""

from ddpmkit.sweep.launch import main

main()
