"""BLIP-2 training losses as pure functions (LAVIS 1.0.2 `blip2_qformer.py`, `blip2_opt.py`,
`blip2_t5.py`).

Stage 1 (`stage1_losses`): ITC + ITM + ITG of the Q-Former on a Blip2ForImageTextRetrieval.
Stage 2 (`stage2_loss`): the LLM's language-modelling loss on a Blip2ForConditionalGeneration,
with `build_stage2_batch` turning captions into its batch.

Every batch here is the GLOBAL batch: under `jax.jit` with the batch sharded over the data axes,
the similarity matrices and the hard-negative gather span all devices, as LAVIS's all-gathers do.
Softmax / cross-entropy run in float32 whatever the logits' dtype.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.data import processing
from blip2_jax.models import layers as L
from blip2_jax.models import qformer as Q
from blip2_jax.models import t5

IGNORE = L.IGNORE_INDEX  # label id that carries no loss (torch / HF ignore_index)
STAGE1_RNG_STREAMS = ("negatives", "image", "text", "itm", "itg")


# torch's F.cross_entropy (HF's LM loss with the defaults); written once, in the models' shared layers
cross_entropy = L.cross_entropy


# ----------------------------------------------------------------------------------------
# stage 1


def hard_negative_probs(sim, row_offset=0) -> jax.Array:
  """LAVIS 1.0.2 hard-negative weights for similarity rows whose positive sits on the diagonal: row
  i's positive is column i + row_offset (a square (N, N) matrix: offset 0; one device's rows of the
  global matrix: its first row's global index). softmax(sim) + 1e-4, the positive set to 0,
  renormalised (torch.multinomial normalises)."""
  p = jax.nn.softmax(jax.lax.stop_gradient(sim).astype(jnp.float32), axis=-1) + 1e-4
  rows = jnp.arange(sim.shape[0]) + row_offset
  p = jnp.where(rows[:, None] == jnp.arange(sim.shape[1])[None, :], 0.0, p)
  return p / p.sum(axis=-1, keepdims=True)


def _categorical_rows(key, logits, row_offset):
  """jax.random.categorical(key, full_logits) restricted to rows [row_offset, row_offset + R) of the
  square matrix `full_logits` whose rows these `logits` (R, N) are: the Gumbel noise of the whole
  (N, N) draw is generated and the same rows taken, so every device of a data-parallel step draws
  exactly what one device draws for the global batch (categorical is argmax(gumbel + logits))."""
  n = logits.shape[1]
  noise = jax.random.gumbel(key, (n, n), logits.dtype)
  noise = jax.lax.dynamic_slice_in_dim(noise, row_offset, logits.shape[0], axis=0)
  return jnp.argmax(noise + logits, axis=-1)


def sample_hard_negatives(rng, sim_i2t, sim_t2i, *, row_offset=0):
  """One negative image per text (from sim_t2i's rows) and one negative text per image (from
  sim_i2t's rows), drawn with `hard_negative_probs`. Deterministic in `rng`. -> (neg_image_idx,
  neg_text_idx), each (R,) int32 indices into the global batch of N. The rows may be a slice of the
  global (N, N) similarities starting at global row `row_offset` (one device's rows): the draws
  equal those of the same rows on the whole matrix."""
  k_img, k_txt = jax.random.split(rng)
  neg_image = _categorical_rows(k_img, jnp.log(hard_negative_probs(sim_t2i, row_offset)), row_offset)
  neg_text = _categorical_rows(k_txt, jnp.log(hard_negative_probs(sim_i2t, row_offset)), row_offset)
  return neg_image.astype(jnp.int32), neg_text.astype(jnp.int32)


def itc_logits(image_feats, text_feat, temp, *, full_gradient: bool = False, all_rows=None):
  """(sim_i2t, sim_t2i), each (R, N) float32: max over queries of the cosine similarity / temp, of
  the R given rows against all N rows of the batch (R = N on one device).

  LAVIS gathers the other side's features without gradient, so the image->text term is
  differentiated through the image features only and the text->image term through the text
  features only (the gathered copy of the local rows is detached too). DDP's mean over devices of
  per-device means over local rows equals this loss's mean over global rows, so stop_gradient on
  the gathered side reproduces LAVIS's gradient exactly. `full_gradient=True` lets both flow.
  all_rows: the global batch's rows from this device's (an all-gather inside a per-device step,
  see `stage1_losses(axis_name=...)`); None: the rows given are the whole batch."""
  gather = (lambda x: x) if all_rows is None else all_rows
  img = image_feats.astype(jnp.float32)
  txt = text_feat.astype(jnp.float32)
  sg = (lambda x: x) if full_gradient else jax.lax.stop_gradient
  temp = jnp.asarray(temp, jnp.float32)
  sim_i2t = jnp.einsum("iqe,je->ijq", img, sg(gather(txt))).max(axis=-1) / temp
  sim_t2i = jnp.einsum("ie,jqe->ijq", txt, sg(gather(img))).max(axis=-1) / temp
  return sim_i2t, sim_t2i


def itc_loss(image_feats, text_feat, temp, *, label_smoothing: float = 0.1,
             full_gradient: bool = False):
  """-> (ITC loss, (sim_i2t, sim_t2i)): label-smoothed CE both ways with targets arange(N),
  averaged (LAVIS); gradient as `itc_logits`."""
  sim_i2t, sim_t2i = itc_logits(image_feats, text_feat, temp, full_gradient=full_gradient)
  targets = jnp.arange(sim_i2t.shape[0])
  loss = (cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
          + cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2
  return loss, (sim_i2t, sim_t2i)


def _split(rng, n):
  return [None] * n if rng is None else list(jax.random.split(rng, n))


ROW_EXCHANGES = ("all_gather", "ragged")


def exchange_plan(wanted, me, rows_per_device: int):
  """How devices swap rows so that each gets the global-batch rows it asks for, and nothing else.

  wanted: (n, B) int, row d holds the global row indices device d needs (device s holds global rows
  s*B ... s*B + B-1); me: this device's index. -> dict of jax.lax.ragged_all_to_all's arguments for
  this device, all int32: send_rows (n*B,) local rows to put into the operand (first sum(send_sizes)
  of them matter), input_offsets / send_sizes / output_offsets / recv_sizes (n,), and back (B,): where
  in the received buffer each of this device's own requests landed. The chunk for device d holds
  d's requests for rows of `me` in d's order; d receives the chunks in source order."""
  wanted = jnp.asarray(wanted, jnp.int32)
  n, b = wanted.shape
  owner = wanted // rows_per_device
  mine = owner == me  # (n, b): what each device asks of me
  send_sizes = mine.sum(axis=1).astype(jnp.int32)
  input_offsets = (jnp.cumsum(send_sizes) - send_sizes).astype(jnp.int32)
  order = jnp.argsort(~mine.reshape(-1), stable=True)  # the asked-for entries first, in (d, j) order
  send_rows = jnp.clip(wanted.reshape(-1)[order] - me * rows_per_device, 0, rows_per_device - 1)
  output_offsets = (owner < me).sum(axis=1).astype(jnp.int32)  # d's rows from devices before me come first
  mine_asked = jax.nn.one_hot(owner[me], n, dtype=jnp.int32)  # (b, n): the owner of each of my requests
  recv_sizes = mine_asked.sum(axis=0)
  start = jnp.cumsum(recv_sizes) - recv_sizes
  rank = jnp.take_along_axis(jnp.cumsum(mine_asked, axis=0) - mine_asked, owner[me][:, None], axis=1)[:, 0]
  return dict(send_rows=send_rows.astype(jnp.int32), input_offsets=input_offsets, send_sizes=send_sizes,
              output_offsets=output_offsets, recv_sizes=recv_sizes.astype(jnp.int32),
              back=(start[owner[me]] + rank).astype(jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _ragged_take(x, idx, axis):
  """Rows `idx` of the global batch of `x` (rows split over `axis`), received through one ragged
  all-to-all: each device sends exactly the rows others asked of it. Its gradient (a trainable
  tower upstream) goes back through a reduce-scatter of the global batch's rows."""
  b = x.shape[0]
  plan = exchange_plan(jax.lax.all_gather(idx, axis), jax.lax.axis_index(axis), b)
  out = jnp.zeros((b,) + x.shape[1:], x.dtype)
  got = jax.lax.ragged_all_to_all(x[plan["send_rows"]], out, plan["input_offsets"], plan["send_sizes"],
                                  plan["output_offsets"], plan["recv_sizes"], axis_name=axis)
  return got[plan["back"]]


def _ragged_take_fwd(x, idx, axis):
  return _ragged_take(x, idx, axis), (idx, x.shape[0])


def _ragged_take_bwd(axis, res, ct):
  idx, b = res
  full = jnp.zeros((jax.lax.axis_size(axis) * b,) + ct.shape[1:], ct.dtype).at[idx].add(ct)
  return jax.lax.psum_scatter(full, axis, scatter_dimension=0, tiled=True), None


_ragged_take.defvjp(_ragged_take_fwd, _ragged_take_bwd)


class _Rows:
  """Where a stage-1 loss's rows sit: the whole global batch (axis None), or one device's share of
  it inside a per-device step (jax.shard_map) whose batch is split over the mesh axes `axis`, as
  `jax.lax.all_gather(..., tiled=True)` concatenates them."""

  def __init__(self, axis, n_local: int):
    self.axis = axis
    self.devices = 1 if axis is None else jax.lax.axis_size(axis)
    self.offset = 0 if axis is None else jax.lax.axis_index(axis) * n_local
    self.local = n_local
    self.global_n = n_local * self.devices

  def all_rows(self, x):
    """The global batch of a per-row array."""
    return x if self.axis is None else jax.lax.all_gather(x, self.axis, axis=0, tiled=True)

  def mine(self, idx):
    """This device's rows of a global (N,) vector."""
    idx = jnp.asarray(idx)
    return idx if self.axis is None else jax.lax.dynamic_slice_in_dim(idx, self.offset, self.local)

  def take(self, x, idx, exchange: str = "all_gather"):
    """Rows `idx` (indices into the global batch) of the global batch of `x`: from its all-gather,
    or (exchange "ragged") only those rows, through one ragged all-to-all."""
    if self.axis is None or self.devices == 1:
      return x[idx - self.offset]
    if exchange == "ragged":
      return _ragged_take(x, idx, self.axis)
    return self.all_rows(x)[idx]

  def total(self, x):
    return x if self.axis is None else jax.lax.psum(x, self.axis)

  def dropout_key(self, key):
    # each device draws its own masks for its own rows
    return key if self.axis is None or key is None else jax.random.fold_in(key, jax.lax.axis_index(self.axis))


def stage1_losses(model, params, lm_head_params, temp, batch, rng=None, *, bos_token_id: int,
                  deterministic: bool = True, label_smoothing: float = 0.1,
                  itc_full_gradient: bool = False, neg_image_idx=None, neg_text_idx=None,
                  temp_range: tuple[float, float] | None = None, axis_name=None,
                  row_exchange: str = "all_gather"):
  """BLIP-2 stage 1 loss -> (total, {"itc", "itm", "itg"}), total = itc + itm + itg (LAVIS).

  model: a `Blip2ForImageTextRetrieval`; params: its params (the HF layout, incl. `embeddings`,
  whose word table the ITG head is tied to); lm_head_params: a `qformer.QFormerLMHead` (tied) tree;
  temp: the learnable temperature (scalar, LAVIS init 0.07).
  batch: pixel_values (N, H, W, C), input_ids (N, T) BERT ids starting with [CLS] (right padded),
  attention_mask (N, T). bos_token_id: the [DEC] id that replaces [CLS] for ITG.
  rng: split into STAGE1_RNG_STREAMS: hard-negative sampling and one dropout stream per Q-Former
  pass (dropout only when not deterministic). It may be None when deterministic and both
  neg_image_idx / neg_text_idx ((N,) indices into the batch) are given.
  temp_range: LAVIS 1.0.2's BLIP-2 does NOT clamp temp (BLIP-1 clamps to (0.001, 0.5)); give a
  range to clip it here (no gradient outside the range) or clip the stored value after the update.

  axis_name: None: `batch` is the global batch (under jax.jit, the similarities and the
  hard-negative gather span every device through XLA's partitioner). A mesh axis name or tuple
  of names: this runs inside jax.shard_map on one device's rows of the global batch (split over
  those axes in order), gathers what spans the batch itself (ITC features, the hard negatives'
  rows) and returns this device's SHARE of each value: their psum over `axis_name` is the global
  loss, and so is the psum of their gradients (the gathered sides carry no gradient unless
  itc_full_gradient, whose all-gather transposes to the reduce-scatter that routes it). The hard
  negatives are the same draws as on the global batch; neg_image_idx / neg_text_idx, when given,
  are still the global (N,) vectors. Dropout masks are drawn per device (fold_in of its index).
  row_exchange: how the ViT rows of the hard-negative images reach the device that pairs them:
  "all_gather" (the whole global batch's rows, as LAVIS; any backend) or "ragged" (exactly the rows
  each device needs, one jax.lax.ragged_all_to_all: ~B rows per device instead of N; TPU, as
  XLA:CPU has no ragged all-to-all; train.step.row_exchange picks). The text rows are small and
  always all-gathered.

  ITC: label-smoothed CE both ways on the global similarity (see `itc_logits`). ITM: negatives
  from `sample_hard_negatives` on the ITC similarities; 3N pairs (pos, neg image, neg text),
  labels [1]*N + [0]*2N, no smoothing. ITG: [DEC] + text under the UniLM mask, shifted CE with
  label smoothing over the non-padding labels. The ViT runs once (its output feeds ITM and ITG).
  Differences from LAVIS: ITG recomputes the query states under the UniLM mask instead of reusing
  the ITC pass's cache (equal when deterministic; with dropout it draws its own mask), and its
  token mean is over the global batch (LAVIS: per-device means averaged).
  Freezing the ViT: differentiate w.r.t. the trainable params only; XLA then skips the ViT's
  backward pass.
  """
  ids = jnp.asarray(batch["input_ids"])
  mask = batch.get("attention_mask")
  mask = jnp.ones(ids.shape, jnp.int32) if mask is None else jnp.asarray(mask).astype(jnp.int32)
  n = ids.shape[0]
  if row_exchange not in ROW_EXCHANGES:
    raise ValueError(f"row_exchange must be one of {ROW_EXCHANGES}, got {row_exchange!r}")
  rows = _Rows(axis_name, n)
  k_neg, k_img, k_txt, k_itm, k_itg = _split(rng, len(STAGE1_RNG_STREAMS))

  def apply(method, *args, key=None):
    rngs = None if deterministic else {"dropout": rows.dropout_key(key)}
    return model.apply({"params": params}, *args, method=method, deterministic=deterministic,
                       rngs=rngs)

  if not deterministic and rng is None:
    raise ValueError("deterministic=False needs an rng for dropout")
  vis, _, image_feats = apply("image_features", batch["pixel_values"], key=k_img)
  _, text_feat = apply("text_features", ids, mask, key=k_txt)
  image_embeds = vis["last_hidden_state"]

  # ---- ITC: means over the global rows, as sums here over rows.global_n
  if temp_range is not None:
    temp = jnp.clip(temp, *temp_range)
  sim_i2t, sim_t2i = itc_logits(image_feats, text_feat, temp, full_gradient=itc_full_gradient,
                                all_rows=None if axis_name is None else rows.all_rows)
  targets = rows.offset + jnp.arange(n)
  itc = (cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing, reduction="sum") / rows.global_n
         + cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing, reduction="sum") / rows.global_n) / 2

  # ---- ITM
  if neg_image_idx is None or neg_text_idx is None:
    if k_neg is None:
      raise ValueError("give rng (hard-negative sampling) or both neg_image_idx and neg_text_idx")
    sampled_img, sampled_txt = sample_hard_negatives(k_neg, sim_i2t, sim_t2i, row_offset=rows.offset)
    neg_image_idx = sampled_img if neg_image_idx is None else rows.mine(neg_image_idx)
    neg_text_idx = sampled_txt if neg_text_idx is None else rows.mine(neg_text_idx)
  else:
    neg_image_idx, neg_text_idx = rows.mine(neg_image_idx), rows.mine(neg_text_idx)
  neg_embeds = rows.take(image_embeds, neg_image_idx, row_exchange)
  embeds_all = jnp.concatenate([image_embeds, neg_embeds, image_embeds], axis=0)
  ids_all = jnp.concatenate([ids, ids, rows.take(ids, neg_text_idx)], axis=0)
  mask_all = jnp.concatenate([mask, mask, rows.take(mask, neg_text_idx)], axis=0)
  itm_logits, _ = apply("itm_logits", embeds_all, ids_all, mask_all, key=k_itm)
  itm_labels = jnp.concatenate([jnp.ones((n,), jnp.int32), jnp.zeros((2 * n,), jnp.int32)])
  itm = cross_entropy(itm_logits, itm_labels, reduction="sum") / (3 * rows.global_n)

  # ---- ITG: a token mean over the global batch
  dec_ids = ids.at[:, 0].set(bos_token_id)
  hidden = apply("itg_hidden", image_embeds, dec_ids, mask, key=k_itg)
  table = params["embeddings"]["word_embeddings"]["embedding"]
  lm_logits = Q.QFormerLMHead(model.config.qformer).apply({"params": lm_head_params}, hidden, table)
  labels = jnp.where(mask > 0, dec_ids, IGNORE)[:, 1:]
  tokens = rows.total(jnp.sum(labels != IGNORE))
  itg = (cross_entropy(lm_logits[:, :-1], labels, label_smoothing=label_smoothing, reduction="sum")
         / jnp.maximum(tokens, 1).astype(jnp.float32))

  return itc + itm + itg, {"itc": itc, "itm": itm, "itg": itg}


# ----------------------------------------------------------------------------------------
# stage 2


def stage2_loss(model, params, batch, rng=None, *, deterministic: bool = True):
  """Stage 2 language-modelling loss of a Blip2ForConditionalGeneration -> (loss, aux).

  Decoder-only (OPT, LLaMA): batch = pixel_values, input_ids (text only, right padded; the
  projected queries are prepended inside the model), attention_mask, labels (N, T) with -100 on
  prompt and padding. The logit at sequence position p predicts token p + 1 (HF's shift), so the
  last query's logit predicts label 0 and the other query logits carry no loss; equal to LAVIS's
  [-100] * Q + labels on the full sequence.
  T5: batch = pixel_values, input_ids (encoder text: prompt + caption prefix), attention_mask,
  labels (decoder target: the caption suffix, -100 padding), optional decoder_attention_mask (LAVIS
  passes the target's mask); decoder_input_ids default to t5.shift_right(labels).
  InstructBLIP: also qformer_input_ids / qformer_attention_mask.
  loss: mean token CE over labelled positions (float32); aux: num_tokens, loss_sum (for
  token-weighted accumulation over micro-batches).
  """
  cfg = model.config
  labels = jnp.asarray(batch["labels"])
  kw = dict(attention_mask=batch.get("attention_mask"),
            qformer_input_ids=batch.get("qformer_input_ids"),
            qformer_attention_mask=batch.get("qformer_attention_mask"))
  if cfg.is_encoder_decoder:
    dec = batch.get("decoder_input_ids")
    if dec is None:
      dec = t5.shift_right(labels, cfg.text.decoder_start_token_id, cfg.text.pad_token_id)
    kw.update(decoder_input_ids=dec, decoder_attention_mask=batch.get("decoder_attention_mask"))
  if not deterministic and rng is None:
    raise ValueError("deterministic=False needs an rng for dropout")
  out = model.apply({"params": params}, batch["pixel_values"], batch["input_ids"],
                    deterministic=deterministic, rngs=None if deterministic else {"dropout": rng}, **kw)
  logits = out["logits"]
  if not cfg.is_encoder_decoder:
    start = logits.shape[1] - labels.shape[1] - 1  # the last query position
    logits = logits[:, start:start + labels.shape[1]]
  loss_sum = cross_entropy(logits, labels, reduction="sum")
  num = jnp.sum(labels != IGNORE)
  return loss_sum / jnp.maximum(num, 1).astype(jnp.float32), {"num_tokens": num, "loss_sum": loss_sum}


def lm_labels(input_ids, attention_mask, prompt_length: int = 0) -> np.ndarray:
  """LAVIS OPT targets: ids with padding and the first `prompt_length` tokens set to -100."""
  labels = np.where(np.asarray(attention_mask) > 0, np.asarray(input_ids), IGNORE)
  labels[:, :prompt_length] = IGNORE
  return labels


def split_caption(caption: str, prefix_ratio: float | None = 0.5, rng: np.random.Generator | None = None):
  """Prefix-LM split of a caption into (prefix, suffix) at a word boundary (paper Sec. 3.3: the
  prefix goes to the T5 encoder with the queries, the suffix is the decoder target; LAVIS 1.0.2
  ships no split, so this rule is ours): k = round(ratio * words) clipped to [1, words - 1] words
  go to the prefix, or k uniform in [1, words - 1] from `rng` when prefix_ratio is None. A
  one-word caption is all suffix."""
  words = caption.split()
  if len(words) < 2:
    return "", " ".join(words)
  if prefix_ratio is None:
    if rng is None:
      raise ValueError("prefix_ratio=None draws the split point: pass rng (np.random.Generator)")
    k = int(rng.integers(1, len(words)))
  else:
    k = min(max(int(round(prefix_ratio * len(words))), 1), len(words) - 1)
  return " ".join(words[:k]), " ".join(words[k:])


def pad_id(tokenizer) -> int:
  """The tokenizer's pad id, else its EOS (Mistral's and LLaMA's tokenizers have no pad token), else
  0: padded positions carry mask 0, so the id never matters."""
  if tokenizer.pad_token_id is not None:
    return tokenizer.pad_token_id
  return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def _pad(seqs: Sequence[list], pad_id: int):
  width = max(1, max(len(s) for s in seqs))
  ids = np.full((len(seqs), width), pad_id, np.int32)
  mask = np.zeros((len(seqs), width), np.int32)
  for i, s in enumerate(seqs):
    ids[i, :len(s)] = s
    mask[i, :len(s)] = 1
  return ids, mask


def _tokenize(tokenizer, texts, max_len, append_eos=False):
  seqs = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
  if append_eos:
    seqs = [s + [tokenizer.eos_token_id] for s in seqs]
  return [list(s)[:max_len] for s in seqs]


PROMPT_MASKS = ("lavis", "exact")


def _check_prompt_mask(prompt_mask: str) -> None:
  if prompt_mask not in PROMPT_MASKS:
    raise ValueError(f"prompt_mask must be one of {PROMPT_MASKS}, got {prompt_mask!r}")


def prompt_length(tokenizer, prompt: str, prompt_mask: str = "lavis") -> int:
  """How many leading tokens of a decoder-only stage-2 row carry no loss as the prompt's.

  "lavis": LAVIS 1.0.2 Blip2OPT's `prompt_length`, the prompt tokenised alone exactly as given
    (BOS included). LAVIS keeps two prompt strings: its text processor prepends "a photo of " (with
    a space) to each caption, and the model's own prompt ("a photo of" in LAVIS's caption configs)
    gives prompt_length. Given WITH a trailing space, byte-level BPE (OPT) makes that space a token
    of its own, so LAVIS masks one token more: the caption's first token then carries no loss.
  "exact": the prompt without trailing whitespace, so every caption token carries loss.
  Both agree for a prompt without trailing whitespace ("a photo of", this repo's default); no
  prompt masks nothing (LAVIS: `if self.prompt`).
  """
  _check_prompt_mask(prompt_mask)
  if not prompt:
    return 0
  text = prompt if prompt_mask == "lavis" else prompt.rstrip()
  return len(tokenizer([text], add_special_tokens=True)["input_ids"][0])


def build_stage2_batch(tokenizer, captions: Sequence[str], family: str, *, prompt: str = "",
                       max_len: int = 32, prefix_ratio: float | None = 0.5,
                       rng: np.random.Generator | None = None, prompt_mask: str = "lavis") -> dict:
  """Text part of a stage 2 batch (numpy; add pixel_values) from captions, right padded to the
  longest row and truncated to max_len as LAVIS.

  opt: tokens of prompt + caption + "\\n" (BOS first; "\\n" is id 50118 in OPT's BPE); labels
    -100 on padding and on the first `prompt_length(tokenizer, prompt, prompt_mask)` tokens (BOS
    included): by default LAVIS's count, which for a prompt with a trailing space ("a photo of ")
    also masks the caption's first token; "exact" masks the prompt only. Without a prompt LAVIS
    masks nothing but padding, so BOS is a target, predicted by the last query.
  llama and the other decoder-only families (qwen2, qwen3, mistral, gemma2, gemma3): as opt but
    caption + the tokenizer's EOS instead of "\\n" (LAVIS's Vicuna models append eos).
  t5: `split_caption` (prefix_ratio / rng); input_ids = prompt + prefix (+ </s> by the
    tokenizer), labels = suffix (+ </s>), -100 padding, decoder_attention_mask as LAVIS (the
    prompt is encoder input, so prompt_mask changes nothing).
  """
  _check_prompt_mask(prompt_mask)
  if family in processing.DECODER_ONLY:
    end = "\n" if family == "opt" else ""
    # LAVIS's text processor holds the prompt with its trailing space ("a photo of "); a prompt
    # given without one ("a photo of", as at generation time) gets it here, not "a photo ofa cat"
    sep = " " if prompt and not prompt[-1].isspace() else ""
    seqs = _tokenize(tokenizer, [prompt + sep + c + end for c in captions], max_len,
                     append_eos=family != "opt")
    ids, mask = _pad(seqs, pad_id(tokenizer))
    plen = prompt_length(tokenizer, prompt, prompt_mask)
    return {"input_ids": ids, "attention_mask": mask, "labels": lm_labels(ids, mask, plen)}
  if family == "t5":
    parts = [split_caption(c, prefix_ratio, rng) for c in captions]
    ids, mask = _pad(_tokenize(tokenizer, [" ".join(x for x in (prompt.strip(), p) if x) for p, _ in parts],
                               max_len), pad_id(tokenizer))
    out, out_mask = _pad(_tokenize(tokenizer, [s for _, s in parts], max_len), pad_id(tokenizer))
    return {"input_ids": ids, "attention_mask": mask, "labels": lm_labels(out, out_mask),
            "decoder_attention_mask": out_mask}
  raise ValueError(f"family must be one of {processing.FAMILIES}, got {family!r}")
