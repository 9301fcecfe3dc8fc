"""Q-Former initialisation from a Hugging Face BERT checkpoint, as a BLIP-2 stage-1 run starts
(LAVIS initialises its Q-Former from bert-base-uncased)."""
from __future__ import annotations

import os
import re

import jax.numpy as jnp
import numpy as np

from blip2_jax.checkpoints import io
from blip2_jax.models.qformer import (
  QFormerConfig,
  QFormerLMHead,
  QFormerModel,
  QFormerTextEmbeddings,
  embeddings_hf_rules,
  hf_rules,
  init_args,
  lm_head_hf_rules,
)


def from_bert_state_dict(source, config: QFormerConfig, *, seed: int = 0,
                         new_token_init: str = "normal", fold_token_type: bool = False,
                         lm_head: bool = True, tie_word_embeddings: bool = True):
  """Q-Former params initialised from a HF BERT checkpoint (BertModel / BertForMaskedLM /
  BertForPreTraining, with or without the `bert.` prefix; a directory, file, reader or dict).

  Copied: word embeddings (+ `config.vocab_size - bert_vocab` new rows: "normal" N(0, init_range)
  as LAVIS-era `resize_token_embeddings`, or "mean"), position embeddings, embeddings.LayerNorm ->
  qformer layernorm, self-attention, text FFN; query FFN is a COPY of the text FFN; LM head from
  `cls.predictions` (bias grown with zeros). Fresh: cross-attention (N(0, init_range), zero bias,
  LayerNorm 1/0) and the LM head when BERT has none. BERT's token_type_embeddings are dropped as
  in LAVIS (fold_token_type=True adds row 0 to every position embedding instead, which makes the
  text path equal BERT's with token_type_ids = 0).
  Returns (params, report): params has "qformer", "embeddings" (blip2 layout) and "lm_head"
  (if lm_head); report has "copied", "initialised", "unused" lists (HF-style names).
  """
  if isinstance(source, (str, os.PathLike)):
    reader = io.open_checkpoint(source)
  elif isinstance(source, dict):
    reader = io.DictReader(source)
  else:
    reader = source
  b = _QFormerFromBert(reader, config, seed)
  word = b.embeddings(new_token_init, fold_token_type)
  b.layers()
  if lm_head:
    b.lm_head(word, tie_word_embeddings)
  return b.params(lm_head, tie_word_embeddings), b.report()


class _QFormerFromBert:
  """The Q-Former's tensors under HF Q-Former names (`sd`), each copied from BERT or freshly drawn and
  recorded as such; `params` loads them through the Q-Former's own name tables."""

  def __init__(self, reader, cfg: QFormerConfig, seed: int):
    self.reader, self.cfg = reader, cfg
    self.keys = set(reader.keys())
    self.pre = "bert." if "bert.embeddings.word_embeddings.weight" in self.keys else ""
    if self.pre + "embeddings.word_embeddings.weight" not in self.keys:
      raise io.CheckpointError("no BERT embeddings.word_embeddings.weight (with or without 'bert.')")
    self.rng = np.random.default_rng(seed)
    self.std = cfg.initializer_range
    self.used, self.copied, self.initialised, self.sd = set(), [], [], {}
    self.extra = 0  # rows added to BERT's vocabulary

  def get(self, k):
    self.used.add(k)
    return np.asarray(self.reader.get(k), np.float32)

  def copy(self, dst, src):
    self.sd[dst] = self.get(src)
    self.copied.append(f"{dst} <- {src}")

  def fresh(self, dst, shape, kind):
    std = self.std
    self.sd[dst] = {"normal": lambda: self.rng.normal(0.0, std, shape), "ones": lambda: np.ones(shape),
                    "zeros": lambda: np.zeros(shape)}[kind]().astype(np.float32)
    self.initialised.append(f"{dst} ({'N(0, %g)' % std if kind == 'normal' else kind})")

  def fresh_linear(self, dst, n_out, n_in):
    self.fresh(f"{dst}.weight", (n_out, n_in), "normal")
    self.fresh(f"{dst}.bias", (n_out,), "zeros")

  def fresh_norm(self, dst, n):
    self.fresh(f"{dst}.weight", (n,), "ones")
    self.fresh(f"{dst}.bias", (n,), "zeros")

  def embeddings(self, new_token_init: str, fold_token_type: bool) -> np.ndarray:
    """Word (grown to config.vocab_size) and position embeddings and their LayerNorm; -> the word table."""
    cfg, pre, d = self.cfg, self.pre, self.cfg.hidden_size
    word = self.get(pre + "embeddings.word_embeddings.weight")
    if word.shape[1] != d:
      raise io.CheckpointError(f"BERT hidden size {word.shape[1]} != config.hidden_size {d}")
    self.extra = extra = cfg.vocab_size - word.shape[0]
    if extra < 0:
      raise io.CheckpointError(f"config.vocab_size {cfg.vocab_size} < BERT vocab {word.shape[0]}")
    if new_token_init == "normal":
      new = self.rng.normal(0.0, self.std, (extra, d)).astype(np.float32)
    elif new_token_init == "mean":
      new = np.tile(word.mean(0, keepdims=True), (extra, 1))
    else:
      raise ValueError(f"new_token_init must be 'normal' or 'mean', got {new_token_init!r}")
    word = np.concatenate([word, new], axis=0)
    pos = self.get(pre + "embeddings.position_embeddings.weight")
    if pos.shape[0] < cfg.max_position_embeddings:
      raise io.CheckpointError(f"BERT has {pos.shape[0]} positions < {cfg.max_position_embeddings}")
    pos = pos[:cfg.max_position_embeddings]
    tt = pre + "embeddings.token_type_embeddings.weight"
    folded = fold_token_type and tt in self.keys
    if folded:
      pos = pos + self.get(tt)[0]
    emb = "embeddings." if cfg.layout == "blip2" else "qformer.embeddings."
    ln = "qformer.layernorm" if cfg.layout == "blip2" else "qformer.embeddings.layernorm"
    self.sd[emb + "word_embeddings.weight"] = word
    self.copied.append(f"{emb}word_embeddings.weight <- {pre}embeddings.word_embeddings.weight"
                       + (f" (+{extra} new rows, {new_token_init})" if extra else ""))
    self.sd[emb + "position_embeddings.weight"] = pos
    self.copied.append(f"{emb}position_embeddings.weight <- {pre}embeddings.position_embeddings.weight"
                       + (" (+ token_type_embeddings[0])" if folded else ""))
    for p in ("weight", "bias"):
      self.copy(f"{ln}.{p}", f"{pre}embeddings.LayerNorm.{p}")
    return word

  def layers(self) -> None:
    """Self-attention and FFNs (the query FFN a copy of the text one) from BERT; cross-attention fresh."""
    cfg, pre, d = self.cfg, self.pre, self.cfg.hidden_size
    layer_re = re.compile(re.escape(pre) + r"encoder\.layer\.(\d+)\.")
    n_bert = len({m.group(1) for m in map(layer_re.match, self.keys) if m})
    if n_bert != cfg.num_hidden_layers:
      raise io.CheckpointError(f"BERT has {n_bert} layers, config.num_hidden_layers is "
                               f"{cfg.num_hidden_layers}")
    for i in range(cfg.num_hidden_layers):
      q, b = f"qformer.encoder.layer.{i}", f"{pre}encoder.layer.{i}"
      for p in ("query", "key", "value"):
        for w in ("weight", "bias"):
          self.copy(f"{q}.attention.attention.{p}.{w}", f"{b}.attention.self.{p}.{w}")
      for w in ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias"):
        self.copy(f"{q}.attention.output.{w}", f"{b}.attention.output.{w}")
      for sfx in (("", "_query") if cfg.has_text_ffn else ("_query",)):
        for w in ("weight", "bias"):
          self.copy(f"{q}.intermediate{sfx}.dense.{w}", f"{b}.intermediate.dense.{w}")
        for w in ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias"):
          self.copy(f"{q}.output{sfx}.{w}", f"{b}.output.{w}")
      if i % cfg.cross_attention_frequency == 0:
        c = f"{q}.crossattention"
        self.fresh_linear(f"{c}.attention.query", d, d)
        self.fresh_linear(f"{c}.attention.key", d, cfg.encoder_hidden_size)
        self.fresh_linear(f"{c}.attention.value", d, cfg.encoder_hidden_size)
        self.fresh_linear(f"{c}.output.dense", d, d)
        self.fresh_norm(f"{c}.output.LayerNorm", d)

  def lm_head(self, word: np.ndarray, tie_word_embeddings: bool) -> None:
    """BERT's `cls.predictions` (bias grown with zeros), or a fresh head when BERT has none."""
    h, d, extra = "cls.predictions.", self.cfg.hidden_size, self.extra
    if h + "transform.dense.weight" in self.keys:
      for w in ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias"):
        self.copy(f"{h}transform.{w}", f"{h}transform.{w}")
      bias_key = h + "bias" if h + "bias" in self.keys else h + "decoder.bias"
      self.sd[h + "bias"] = np.concatenate([self.get(bias_key), np.zeros(extra, np.float32)])
      self.copied.append(f"{h}bias <- {bias_key}" + (f" (+{extra} zeros)" if extra else ""))
    else:
      self.fresh_linear(h + "transform.dense", d, d)
      self.fresh_norm(h + "transform.LayerNorm", d)
      self.fresh(h + "bias", (self.cfg.vocab_size,), "zeros")
    if not tie_word_embeddings:
      self.sd[h + "decoder.weight"] = word
      self.copied.append(f"{h}decoder.weight <- word embeddings (untied copy)")

  def _part(self, prefix):
    return io.DictReader({k[len(prefix):]: v for k, v in self.sd.items() if k.startswith(prefix)})

  def params(self, lm_head: bool, tie_word_embeddings: bool) -> dict:
    cfg = self.cfg
    args, kwargs = init_args(cfg)
    params = {"qformer": io.load_params(self._part("qformer."), hf_rules(cfg),
                                        io.abstract_params(QFormerModel(cfg), *args, **kwargs))}
    if cfg.layout == "blip2":
      params["embeddings"] = io.load_params(
          self._part("embeddings."), embeddings_hf_rules(cfg),
          io.abstract_params(QFormerTextEmbeddings(cfg), jnp.zeros((1, 1), jnp.int32)))
    if lm_head:
      params["lm_head"] = io.load_params(
          io.DictReader({k: v for k, v in self.sd.items() if k.startswith("cls.predictions.")}),
          lm_head_hf_rules(cfg, tie_word_embeddings),
          io.abstract_params(QFormerLMHead(cfg, tie_word_embeddings), args[0]))
    return params

  def report(self) -> dict:
    return {"copied": self.copied, "initialised": self.initialised, "unused": sorted(self.keys - self.used)}
