"""blip2_jax.core.flops: matmul FLOPs counted on the jaxpr, scan bodies times their length (XLA's cost
analysis counts them once, which made the training loop's MFU ~num_layers too low with scan=True)."""
import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.core.flops import count_flops


def _stack(x, w):
  return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]


def test_scan_counts_every_layer_and_grad_counts_what_runs():
  x, w = jnp.ones((16, 32)), jnp.ones((5, 32, 32))
  one = 2 * 16 * 32 * 32
  assert count_flops(_stack, x, w) == 5 * one
  unrolled = lambda x, w: [x := jnp.tanh(x @ w[i]) for i in range(5)][-1]
  assert count_flops(unrolled, x, w) == 5 * one
  # d/dw through the scan: forward + dW + dx (the carry) per layer; d/dx alone skips dW
  assert count_flops(jax.grad(lambda x, w: _stack(x, w).sum(), argnums=1), x, w) == 15 * one
  assert count_flops(jax.jit(jax.grad(lambda x, w: _stack(x, w).sum())), x, w) == 10 * one


def test_batched_dot_and_convolution():
  a, b = jnp.ones((3, 4, 5)), jnp.ones((3, 5, 6))
  assert count_flops(jnp.matmul, a, b) == 2 * 3 * 4 * 5 * 6
  img, k = jnp.ones((2, 3, 32, 32)), jnp.ones((16, 3, 4, 4))
  conv = lambda i, k: jax.lax.conv_general_dilated(i, k, (4, 4), "VALID")
  assert count_flops(conv, img, k) == 2 * (2 * 16 * 8 * 8) * (3 * 4 * 4)


def test_scanned_and_unrolled_model_count_the_same():
  from blip2_jax.checkpoints import tiny
  from blip2_jax.models import blip2
  hf = tiny.tiny_blip2_config("opt")
  counts = []
  for scan in (False, True):
    cfg = blip2.Blip2Config.from_hf(hf, scan=scan)
    model = blip2.build(cfg)
    inputs = blip2.dummy_inputs(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **inputs))["params"]
    counts.append(count_flops(lambda p: model.apply({"params": p}, **inputs), params))
  assert counts[0] > 0
  np.testing.assert_allclose(counts[1], counts[0])
