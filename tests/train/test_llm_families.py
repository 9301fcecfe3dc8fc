"""The stage-2 recipe with each LLM family that has no released BLIP-2 (Qwen2, Qwen3, Mistral, Gemma 2,
Gemma 3): `configs/stage2.py:llm=<LLM directory>` starts from a stage-1 directory (ViT + Q-Former) and
a tiny local LLM directory with its tokenizer (`model.init=towers`), trains a few steps with the
loss falling, and exports a directory that transformers' Blip2ForConditionalGeneration reads."""
import json
import os

import numpy as np
import pytest
import torch
import transformers

from blip2_jax.checkpoints import tiny
from blip2_jax.train import loop
from configs import common, instruct, stage2

FAMILIES = list(common.LLM_FAMILIES)
LM_CLASSES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
              "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory):
  return tiny.save_tiny(str(tmp_path_factory.mktemp("stage1")), "Blip2ForImageTextRetrieval")


def _llm_dir(root, family):
  torch.manual_seed(0)
  m = getattr(transformers, LM_CLASSES[family])(tiny.tiny_text_config(family)).eval()
  tiny.perturb_(m)
  m.save_pretrained(root)
  tiny.tiny_tokenizer(family).save_pretrained(root)
  return str(root)


@pytest.mark.parametrize("family", FAMILIES)
def test_stage2_recipe_trains_on_an_llm_directory(tmp_path, stage1_dir, family):
  llm = _llm_dir(tmp_path / "llm", family)
  c = stage2.get_config(f"llm={llm},tiny")
  assert c.model.language_model == llm and c.model.family == "" and c.model.preset == ""
  c.model.init, c.model.pretrained = "towers", stage1_dir
  c.tokenizer.llm = ""  # the LLM directory's own tokenizer
  # no in-training evaluation: captioning's generation is covered by tests/decoding
  c.total_steps, c.log_every, c.checkpoint_every, c.eval_every = 8, 1, 100, -1
  last = loop.train(c, str(tmp_path / "w"))
  assert last["step"] == 8
  loss = np.array([x["loss"] for x in map(json.loads, open(tmp_path / "w" / "metrics.jsonl")) if "loss" in x])
  assert np.isfinite(loss).all() and loss[-3:].mean() < loss[:3].mean(), loss
  hf = transformers.Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "w" / "hf"))
  assert hf.config.text_config.model_type == tiny.tiny_text_config(family).model_type


def test_recipe_llm_choices():
  c = stage2.get_config("llm=gemma3,tiny")
  assert c.model.family == "gemma3" and c.model.hf_config.text_config.model_type == "gemma3_text"
  c = instruct.get_config("llm=Qwen/Qwen2.5-7B-Instruct")
  assert (c.model.language_model, c.global_batch_size, c.model.preset) == ("Qwen/Qwen2.5-7B-Instruct", 128, "")
  c = stage2.get_config("llm=opt2.7b")
  assert (c.model.family, c.model.preset, c.model.language_model) == ("opt", "blip2-opt-2.7b", "")
  with pytest.raises(ValueError, match="LLM directory / Hub id"):
    stage2.get_config("llm=gpt2")
  assert os.path.basename(stage2.__file__) == "stage2.py"


def test_chat_template_prompts():
  """loss.chat_template: the instruction as a user turn of the tokenizer's chat template, one BOS, the
  response right after the assistant turn's opening, the same prompt tokens inference feeds."""
  from blip2_jax.data import processing
  from blip2_jax.train import batches
  tok = tiny.tiny_tokenizer("gemma2")
  tok.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
  tok.chat_template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>user\n{{ m['content'] }}"
                       "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
  p = processing.chat_prompt(tok, "what color is the cat")
  assert p == "<start_of_turn>user\nwhat color is the cat<end_of_turn>\n<start_of_turn>model\n"
  out = batches.prefix_lm_text(tok, "gemma2", [p], ["red"], 24, eos_token_id=(1, 106))
  ids = [int(i) for i, m in zip(out["input_ids"][0], out["attention_mask"][0]) if m]
  enc = processing.tokenize_prompts(tok, ["what color is the cat"], "gemma2", chat_template=True)
  head = list(enc["input_ids"][0])
  assert ids[:len(head)] == head and ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
  assert ids[len(head):] == [tok.convert_tokens_to_ids("red"), 1]  # the response, then the first stop id
  assert list(out["labels"][0][len(head):len(ids)]) == ids[len(head):]
  assert processing.chat_prompt(tiny.tiny_tokenizer("qwen2"), "hi") == "hi"  # no template: raw
