"""`python -m blip2_jax.caption` (installed: `blip2-caption`): blip2_jax/cli/caption.py."""
import sys

if __name__ == "__main__":
  from blip2_jax.cli.caption import main
  sys.exit(main())
