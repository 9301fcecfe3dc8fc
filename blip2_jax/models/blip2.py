"""BLIP-2 composites: image -> ViT -> Q-Former -> projection -> LLM, and the retrieval heads.

Equivalents of HF `Blip2Model`, `Blip2ForConditionalGeneration` (OPT, T5, LLaMA),
`Blip2ForImageTextRetrieval`, `Blip2VisionModelWithProjection`, `Blip2TextModelWithProjection`
and `InstructBlipForConditionalGeneration`.

`input_ids` hold text tokens only: the projected query outputs are prepended to their
embeddings (equal to HF v5's `num_query_tokens` `<image>` placeholders before BOS).
`pixel_values` are NHWC.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from blip2_jax.core.naming import Rule, prefixed
from blip2_jax.models import layers as L
from blip2_jax.models import qformer, registry, vit


@dataclasses.dataclass(frozen=True)
class Blip2Config:
  """A BLIP-2 / InstructBLIP composite. `text` is None for the retrieval-only models.

  The eps of the norm between the ViT and the Q-Former is `vision.post_layernorm_eps`: None (HF
  checkpoints: the vision `layer_norm_eps`, 1e-6) or 1e-5 after `checkpoints.lavis.load_lavis` (LAVIS's
  `ln_vision`); `to_hf` / `from_hf` carry it in the vision config (see vit.VisionConfig)."""
  vision: vit.VisionConfig
  qformer: qformer.QFormerConfig
  text: Any = None
  num_query_tokens: int = 32
  image_text_hidden_size: int = 256
  image_token_index: int | None = None
  architecture: str = "Blip2ForConditionalGeneration"
  instruct: bool = False  # InstructBLIP: instruction text also enters the Q-Former
  initializer_range: float = 0.02

  @property
  def family(self) -> str | None:
    return None if self.text is None else registry.family(self.text).name

  @property
  def is_encoder_decoder(self) -> bool:
    return self.text is not None and registry.family(self.text).encoder_decoder

  @property
  def kind(self) -> str:
    """The composite (class name) implementing `architecture`."""
    return registry.architecture(self.architecture).composite

  @classmethod
  def from_hf(cls, hf_config, *, architecture: str | None = None, qformer_dtype: str | None = "float32",
              **runtime) -> "Blip2Config":
    """From a transformers Blip2Config / InstructBlipConfig. `runtime` (dtype, param_dtype, scan,
    remat, attn_impl) applies to every tower; the Q-Former computes in `qformer_dtype` (float32, as
    HF keeps it) unless that is None."""
    L.check_runtime(runtime)
    arch = architecture or (getattr(hf_config, "architectures", None) or ["Blip2ForConditionalGeneration"])[0]
    caps = registry.capabilities(arch)  # ValueError naming the supported ones
    instruct = hf_config.model_type == "instructblip"
    q_runtime = dict(runtime)
    if qformer_dtype is not None:
      q_runtime["dtype"] = qformer_dtype
      q_runtime["param_dtype"] = "float32"
    text = None
    if registry.LM in caps:
      tc = hf_config.text_config
      text = registry.family_of_model_type(tc.model_type).config_cls.from_hf(tc, **runtime)
    return cls(
        vision=vit.VisionConfig.from_hf(hf_config.vision_config, **runtime),
        qformer=qformer.QFormerConfig.from_hf(hf_config.qformer_config, **q_runtime),
        text=text,
        num_query_tokens=hf_config.num_query_tokens,
        image_text_hidden_size=getattr(hf_config, "image_text_hidden_size", 256),
        image_token_index=getattr(hf_config, "image_token_index", None),
        architecture=arch,
        instruct=instruct,
        initializer_range=getattr(hf_config, "initializer_range", 0.02),
    )

  def to_hf(self):
    import transformers
    kw = dict(vision_config=self.vision.to_hf().to_dict(), qformer_config=self.qformer.to_hf().to_dict(),
              num_query_tokens=self.num_query_tokens, initializer_range=self.initializer_range)
    if self.text is not None:
      kw["text_config"] = self.text.to_hf().to_dict()
    if self.instruct:
      cfg = transformers.InstructBlipConfig(**kw)
    else:
      cfg = transformers.Blip2Config(image_text_hidden_size=self.image_text_hidden_size, **kw)
    if self.image_token_index is not None:
      cfg.image_token_index = self.image_token_index
    cfg.architectures = [self.architecture]
    return cfg

  def replace_runtime(self, **runtime) -> "Blip2Config":
    """Changes dtype/scan/remat/... of every tower (the Q-Former keeps its own dtype)."""
    q = {k: v for k, v in runtime.items() if k not in ("dtype", "param_dtype")}
    return dataclasses.replace(
        self, vision=self.vision.replace_runtime(**runtime),
        qformer=self.qformer.replace_runtime(**q),
        text=None if self.text is None else self.text.replace_runtime(**runtime))


# ----------------------------------------------------------------------------------------
# shared pieces


def _normalize(x, eps=1e-12):
  """torch.nn.functional.normalize: x / max(||x||, eps), in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _query_tokens(module, cfg: Blip2Config):
  return module.param(
      "query_tokens", nn.with_logical_partitioning(L.normal_init(cfg.initializer_range), (None, None, "embed")),
      (1, cfg.num_query_tokens, cfg.qformer.hidden_size), jnp.float32)


class _VisionQueries(nn.Module):
  """Shared body: ViT -> Q-Former queries cross-attending to the image (+ instruction text).

  Not a module of its own in the tree: composites inherit it so their parameters keep HF's
  flat names (`vision_model`, `query_tokens`, `qformer`)."""

  def _vision(self, pixel_values, interpolate_pos_encoding, deterministic):
    return self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                             deterministic=deterministic)

  def _queries(self, image_embeds, deterministic, qformer_input_ids=None, qformer_attention_mask=None):
    b = image_embeds.shape[0]
    q = jnp.broadcast_to(self.query_tokens, (b,) + self.query_tokens.shape[1:])
    mask = None
    if qformer_input_ids is not None:  # InstructBLIP: [queries; instruction] attend jointly
      if qformer_attention_mask is None:
        qformer_attention_mask = jnp.ones(qformer_input_ids.shape, jnp.int32)
      mask = jnp.concatenate([jnp.ones(q.shape[:2], jnp.int32), qformer_attention_mask.astype(jnp.int32)], 1)
    return self.qformer(q, input_ids=qformer_input_ids, attention_mask=mask,
                        encoder_hidden_states=image_embeds, deterministic=deterministic)


# ----------------------------------------------------------------------------------------
# composites


@registry.composite
class Blip2ForConditionalGeneration(_VisionQueries):
  """HF Blip2ForConditionalGeneration / Blip2Model / InstructBlipForConditionalGeneration.

  Returns logits (B, Q+T, V) for decoder-only LLMs (queries first) or decoder logits (B, Td, V) for
  T5, plus vision_outputs, qformer_outputs and language_model_inputs (the projected queries).
  """
  config: Blip2Config

  def setup(self):
    cfg = self.config
    if cfg.text is None:
      raise ValueError(f"{cfg.architecture} has no language model; use Blip2ForImageTextRetrieval")
    self.vision_model = vit.VisionModel(cfg.vision)
    self.query_tokens = _query_tokens(self, cfg)
    self.qformer = qformer.QFormerModel(cfg.qformer)
    self.language_projection = L.dense(cfg.text, cfg.text.hidden_size, (None, "embed"),
                                       init_std=cfg.initializer_range)
    self.language_model = registry.family(cfg.text).lm_cls(cfg.text)

  def get_image_features(self, pixel_values, qformer_input_ids=None, qformer_attention_mask=None,
                         interpolate_pos_encoding=False, deterministic=True):
    """Projected query outputs (B, Q, D_llm): the soft visual prompt."""
    cfg = self.config
    if cfg.instruct and qformer_input_ids is None:
      raise ValueError("InstructBLIP needs qformer_input_ids (the instruction text for the Q-Former)")
    if not cfg.instruct and qformer_input_ids is not None:
      raise ValueError("qformer_input_ids are for InstructBLIP; this is a BLIP-2 model")
    vis = self._vision(pixel_values, interpolate_pos_encoding, deterministic)
    qf = self._queries(vis["last_hidden_state"], deterministic, qformer_input_ids, qformer_attention_mask)
    q = qf["last_hidden_state"][:, :cfg.num_query_tokens]
    proj = self.language_projection(q)
    return {"vision_outputs": vis, "qformer_outputs": qf, "language_model_inputs": proj}

  def __call__(self, pixel_values, input_ids, attention_mask=None, decoder_input_ids=None,
               decoder_attention_mask=None, qformer_input_ids=None, qformer_attention_mask=None,
               interpolate_pos_encoding=False, deterministic=True):
    cfg = self.config
    feats = self.get_image_features(pixel_values, qformer_input_ids, qformer_attention_mask,
                                    interpolate_pos_encoding, deterministic)
    lm = self.language_model
    text = lm.embed_tokens(input_ids)
    queries = feats["language_model_inputs"].astype(text.dtype)
    if queries.shape[-1] != text.shape[-1]:
      raise ValueError(f"projected queries have width {queries.shape[-1]} but the LLM's input embeddings "
                       f"have {text.shape[-1]} (OPT word_embed_proj_dim != hidden_size is not a BLIP-2 layout)")
    embeds = L.constrain(jnp.concatenate([queries, text], axis=1), (L.BATCH, L.LENGTH, L.EMBED))
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    mask = jnp.concatenate([jnp.ones(queries.shape[:2], jnp.int32), attention_mask.astype(jnp.int32)], 1)
    if cfg.is_encoder_decoder:
      if decoder_input_ids is None:
        raise ValueError("T5 models need decoder_input_ids (e.g. t5.shift_right(labels, ...))")
      out = lm(attention_mask=mask, decoder_input_ids=decoder_input_ids,
               decoder_attention_mask=decoder_attention_mask, inputs_embeds=embeds,
               deterministic=deterministic)
    else:
      if decoder_input_ids is not None:
        raise ValueError("decoder_input_ids are only for encoder-decoder (T5) language models")
      out = lm(attention_mask=mask, inputs_embeds=embeds, deterministic=deterministic)
    return dict(feats, logits=out["logits"], language_model_outputs=out)


@registry.composite
class Blip2ForImageTextRetrieval(_VisionQueries):
  """HF Blip2ForImageTextRetrieval: ITC (max over queries of cosine similarity) or ITM scores.

  Outputs as HF (logits_per_image, logits_per_text, image_embeds, text_embeds, vision_outputs,
  text_model_output) plus qformer_outputs: the query pass (ITC) or the joint pass (ITM)."""
  config: Blip2Config

  def setup(self):
    cfg = self.config
    q = cfg.qformer
    self.vision_model = vit.VisionModel(cfg.vision)
    self.query_tokens = _query_tokens(self, cfg)
    self.embeddings = qformer.QFormerTextEmbeddings(q)
    self.qformer = qformer.QFormerModel(q)
    std = cfg.initializer_range
    self.vision_projection = L.dense(q, cfg.image_text_hidden_size, ("embed", None), init_std=std)
    self.text_projection = L.dense(q, cfg.image_text_hidden_size, ("embed", None), init_std=std)
    self.itm_head = L.dense(q, 2, ("embed", None), init_std=std)

  def image_features(self, pixel_values, interpolate_pos_encoding=False, deterministic=True):
    """(vision_outputs, qformer_outputs, normalised projected queries (B, Q, E))."""
    vis = self._vision(pixel_values, interpolate_pos_encoding, deterministic)
    qf = self._queries(vis["last_hidden_state"], deterministic)
    return vis, qf, _normalize(self.vision_projection(qf["last_hidden_state"]))

  def text_features(self, input_ids, attention_mask=None, deterministic=True):
    """(qformer_outputs of the text-only pass, normalised projected [CLS] (B, E))."""
    out = self.qformer(None, text_embeds=self.embeddings(input_ids), attention_mask=attention_mask,
                       deterministic=deterministic)
    return out, _normalize(self.text_projection(out["last_hidden_state"][:, 0]))

  def itm_logits(self, image_embeds, input_ids, attention_mask=None, deterministic=True):
    """ITM logits (B, 2): queries and text attend jointly, itm_head averaged over the queries."""
    b = image_embeds.shape[0]
    q = jnp.broadcast_to(self.query_tokens, (b,) + self.query_tokens.shape[1:])
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    mask = jnp.concatenate([jnp.ones(q.shape[:2], jnp.int32), attention_mask.astype(jnp.int32)], 1)
    out = self.qformer(q, text_embeds=self.embeddings(input_ids), attention_mask=mask,
                       encoder_hidden_states=image_embeds, deterministic=deterministic)
    h = out["last_hidden_state"][:, :q.shape[1]]
    return self.itm_head(h).astype(jnp.float32).mean(axis=1), out

  def itg_hidden(self, image_embeds, input_ids, attention_mask=None, deterministic=True):
    """ITG (image-grounded generation) pass: [queries; text] under the UniLM mask (queries see
    queries, text sees every query and earlier text). Returns the text positions' hidden states
    (B, T, H) for the Q-Former LM head (`qformer.QFormerLMHead`, kept outside the HF layout).
    `input_ids` start with [DEC] (the tokenizer's bos), as LAVIS."""
    b = image_embeds.shape[0]
    q = jnp.broadcast_to(self.query_tokens, (b,) + self.query_tokens.shape[1:])
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    mask = qformer.itg_mask(q.shape[1], attention_mask)
    out = self.qformer(q, text_embeds=self.embeddings(input_ids), attention_mask=mask,
                       encoder_hidden_states=image_embeds, deterministic=deterministic)
    return out["last_hidden_state"][:, q.shape[1]:]

  def __call__(self, pixel_values, input_ids, attention_mask=None, use_image_text_matching_head=False,
               interpolate_pos_encoding=False, deterministic=True):
    if use_image_text_matching_head or self.is_initializing():
      vis = self._vision(pixel_values, interpolate_pos_encoding, deterministic)
      logits, text_out = self.itm_logits(vis["last_hidden_state"], input_ids, attention_mask, deterministic)
      itm = dict(logits_per_image=logits, logits_per_text=logits.T, vision_outputs=vis,
                 qformer_outputs=text_out, text_model_output=text_out)
      if not self.is_initializing():
        return itm
    vis, query_out, image_embeds = self.image_features(pixel_values, interpolate_pos_encoding, deterministic)
    text_out, text_embeds = self.text_features(input_ids, attention_mask, deterministic)
    sim = jnp.einsum("iqe,te->iqt", image_embeds, text_embeds)
    logits = sim.max(axis=1)
    return dict(logits_per_image=logits, logits_per_text=logits.T, image_embeds=image_embeds,
                text_embeds=text_embeds, vision_outputs=vis, qformer_outputs=query_out,
                text_model_output=text_out)


@registry.composite
class Blip2VisionModelWithProjection(_VisionQueries):
  """HF Blip2VisionModelWithProjection: normalised projected query outputs (B, Q, E)."""
  config: Blip2Config

  def setup(self):
    cfg = self.config
    self.vision_model = vit.VisionModel(cfg.vision)
    self.query_tokens = _query_tokens(self, cfg)
    self.qformer = qformer.QFormerModel(cfg.qformer)
    self.vision_projection = L.dense(cfg.qformer, cfg.image_text_hidden_size, ("embed", None),
                                     init_std=cfg.initializer_range)

  def __call__(self, pixel_values, interpolate_pos_encoding=False, deterministic=True):
    vis = self._vision(pixel_values, interpolate_pos_encoding, deterministic)
    qf = self._queries(vis["last_hidden_state"], deterministic)
    return dict(image_embeds=_normalize(self.vision_projection(qf["last_hidden_state"])),
                last_hidden_state=vis["last_hidden_state"], vision_outputs=vis, qformer_outputs=qf)


@registry.composite
class Blip2TextModelWithProjection(nn.Module):
  """HF Blip2TextModelWithProjection: normalised projected text states (B, T, E)."""
  config: Blip2Config

  def setup(self):
    cfg = self.config
    self.query_tokens = _query_tokens(self, cfg)  # unused, as in HF, but part of the checkpoint
    self.embeddings = qformer.QFormerTextEmbeddings(cfg.qformer)
    self.qformer = qformer.QFormerModel(cfg.qformer)
    self.text_projection = L.dense(cfg.qformer, cfg.image_text_hidden_size, ("embed", None),
                                   init_std=cfg.initializer_range)

  def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic=True):
    if self.is_initializing():
      _ = self.query_tokens
    out = self.qformer(None, text_embeds=self.embeddings(input_ids, position_ids),
                       attention_mask=attention_mask, deterministic=deterministic)
    return dict(text_embeds=_normalize(self.text_projection(out["last_hidden_state"])),
                last_hidden_state=out["last_hidden_state"], qformer_outputs=out)


def build(config: Blip2Config) -> nn.Module:
  """The Flax module for `config.architecture`."""
  return registry.composite_class(config.architecture)(config)


def dummy_inputs(config: Blip2Config, batch: int = 1, text_len: int = 2) -> dict:
  """Keyword arguments that make `build(config).init` create every parameter."""
  kind = config.kind
  size = config.vision.image_size
  px = jnp.zeros((batch, size, size, config.vision.num_channels), jnp.float32)
  ids = jnp.ones((batch, text_len), jnp.int32)
  if kind == "Blip2TextModelWithProjection":
    return dict(input_ids=ids)
  if kind == "Blip2VisionModelWithProjection":
    return dict(pixel_values=px)
  if kind == "Blip2ForImageTextRetrieval":
    return dict(pixel_values=px, input_ids=ids)
  kw = dict(pixel_values=px, input_ids=ids)
  if config.instruct:
    kw["qformer_input_ids"] = ids
  if config.is_encoder_decoder:
    kw["decoder_input_ids"] = ids
  return kw


def hf_ignore(config: Blip2Config) -> list[str]:
  """Regexes of HF keys that may be present without a rule (buffers, tied copies)."""
  out = qformer.hf_ignore(config.qformer)  # position_ids buffers anywhere
  out += ["vision_model\\." + p for p in vit.hf_ignore(config.vision)]
  if config.text is not None:
    out += ["language_model\\." + p for p in registry.family(config.text).hf_ignore(config.text)]
  return out


def _linear(name: str, hf: str | None = None) -> list[Rule]:
  hf = hf or name
  return [Rule(f"{name}/kernel", f"{hf}.weight", "linear"), Rule(f"{name}/bias", f"{hf}.bias")]


def hf_rules(config: Blip2Config) -> list[Rule]:
  """The composite's HF <-> Flax name table, assembled from each tower's table."""
  kind = config.kind
  rules = [Rule("query_tokens", "query_tokens")]
  if kind != "Blip2TextModelWithProjection":
    rules += prefixed(vit.hf_rules(config.vision), "vision_model/", "vision_model.")
  rules += prefixed(qformer.hf_rules(config.qformer), "qformer/", "qformer.")
  if kind in ("Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection"):
    rules += prefixed(qformer.embeddings_hf_rules(config.qformer), "embeddings/", "embeddings.")
  if kind == "Blip2ForConditionalGeneration":
    rules += _linear("language_projection")
    rules += prefixed(registry.family(config.text).hf_rules(config.text), "language_model/",
                      "language_model.")
  if kind in ("Blip2ForImageTextRetrieval", "Blip2VisionModelWithProjection"):
    rules += _linear("vision_projection")
  if kind in ("Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection"):
    rules += _linear("text_projection")
  if kind == "Blip2ForImageTextRetrieval":
    rules += _linear("itm_head")
  return rules
