"""model.init_scales: starting values scaled by path regex (train/setup.scale_init)."""
import numpy as np
import pytest

from blip2_jax.train import setup


def _tree():
  return {"qformer": {"layer_0": {"crossattention": {"query": {"kernel": np.ones((2, 2)), "bias": np.ones(2)},
                                                     "value": {"kernel": np.ones((2, 2))}}}},
          "vision_model": {"w": np.ones(3)}}


def test_scales_exactly_the_matching_parameters():
  out = setup.scale_init(_tree(), ((r"qformer/.*crossattention/(query|key)/kernel", 4.0), (r"vision_model/w", 0.5)))
  x = out["qformer"]["layer_0"]["crossattention"]
  assert (x["query"]["kernel"] == 4.0).all() and (x["query"]["bias"] == 1.0).all()
  assert (x["value"]["kernel"] == 1.0).all() and (out["vision_model"]["w"] == 0.5).all()
  assert setup.scale_init(_tree(), ())["vision_model"]["w"] is not None


def test_a_rule_that_matches_nothing_is_an_error():
  with pytest.raises(ValueError, match=r"model.init_scales: 'qformer/.*/kye/kernel' matches no parameter"):
    setup.scale_init(_tree(), ((r"qformer/.*/kye/kernel", 4.0),))
