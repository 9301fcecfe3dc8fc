"""The command lines, one module per command (`python -m blip2_jax.caption`, `vqa`, `retrieve`,
`evaluate`, `parity`, `finetune`, `train`, `demo`, `aot`, `data.convert`; installed as `blip2-*`).
What they share (model loading, generation options, output checks, the one-line error reporting) is
`options`; a command never imports another command."""
