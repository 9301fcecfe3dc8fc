"""`python -m blip2_jax.train` (installed: `blip2-train`): blip2_jax/cli/train.py."""
import sys

if __name__ == "__main__":
  from blip2_jax.cli.train import main
  sys.exit(main())
