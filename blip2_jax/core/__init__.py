"""The leaf layer: what every other layer uses and nothing of the package below it (name tables,
meshes and shardings, compiler presets, progress bars, Hub ids, errors, FLOP counting, chip figures)."""
