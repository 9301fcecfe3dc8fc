"""`python -m blip2_jax.vqa` (installed: `blip2-vqa`): blip2_jax/cli/vqa.py."""
import sys

if __name__ == "__main__":
  from blip2_jax.cli.vqa import main
  sys.exit(main())
