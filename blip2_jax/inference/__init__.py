"""Inference on top of the composites: generation, captioning, zero-shot VQA, retrieval, CLIP scores.

    tokens = inference.generate(model, params, pixel_values, input_ids, attention_mask, num_beams=5)
    captions = inference.caption(model, params, tokenizer, ["cat.jpg", "dog.png"])
    answers = inference.answer(model, params, tokenizer, "cat.jpg", ["what colour is the cat?"])
    scores = inference.retrieval_scores(model, params, pixel_values, input_ids, attention_mask, k=128)
    cosines = inference.clip_scores(clip_model, clip_params, tokenizer, pixel_values, [[web, *captions]])
    captions = inference.blip_captions(blip_model, params, tokenizer, pixel_values, keys=keys, num_captions=10)
    probs = inference.blip_itm_scores(blip_filter, params, tokenizer, pixel_values, [[text, ...], ...])

Everything is batched with fixed shapes (the last batch is padded, `batching`), so each function
compiles once per model and batch size; BLIP's CapFilt functions (`blip`) take one batch as given.
"""
from blip2_jax.inference.blip import blip_captions, blip_image_embeds, blip_itm_scores, image_keys  # noqa: F401
from blip2_jax.inference.captioning import (  # noqa: F401
  CAPTION_DEFAULTS,
  VQA_DEFAULTS,
  answer,
  caption,
  caption_prompts,
  check_generation,
  task_defaults,
  vqa_prompts,
)
from blip2_jax.inference.clip import clip_scores  # noqa: F401
from blip2_jax.inference.generation import check_context, generate, position_limit  # noqa: F401
from blip2_jax.inference.retrieval import retrieval_scores  # noqa: F401
