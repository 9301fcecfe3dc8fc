"""`python -m blip2_jax.evaluate` (installed: `blip2-evaluate`): blip2_jax/cli/evaluate.py."""
import sys

if __name__ == "__main__":
  from blip2_jax.cli.evaluate import main
  sys.exit(main())
