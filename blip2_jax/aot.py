"""`python -m blip2_jax.aot` (installed: `blip2-aot`): blip2_jax/cli/aot.py."""
import sys

if __name__ == "__main__":
  from blip2_jax.cli.aot import main
  sys.exit(main())
