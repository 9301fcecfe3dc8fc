"""`python -m blip2_jax.parity` (installed: `blip2-parity`): blip2_jax/cli/parity.py."""
import sys

if __name__ == "__main__":
  from blip2_jax.cli.parity import main
  sys.exit(main())
