"""Pure Flax modules, one file per model, each with its HF name table beside it."""
