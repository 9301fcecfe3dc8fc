"""`python -m blip2_jax.retrieve` (installed: `blip2-retrieve`): blip2_jax/cli/retrieve.py."""
import sys

if __name__ == "__main__":
  from blip2_jax.cli.retrieve import main
  sys.exit(main())
