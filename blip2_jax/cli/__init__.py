"""Pieces shared by the command lines (`python -m blip2_jax.caption`, `vqa`, `retrieve`, `evaluate`,
`parity`, `finetune`, `data.convert`): see `options`."""
