"""`python -m blip2_jax.finetune` (installed: `blip2-finetune`): blip2_jax/cli/finetune.py."""
import sys

if __name__ == "__main__":
  from blip2_jax.cli.finetune import main
  sys.exit(main())
