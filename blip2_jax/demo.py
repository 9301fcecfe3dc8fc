"""`python -m blip2_jax.demo` (installed: `blip2-demo`): blip2_jax/cli/demo.py."""
import sys

if __name__ == "__main__":
  from blip2_jax.cli.demo import main
  sys.exit(main())
