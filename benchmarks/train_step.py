"""Training-step speed: the project's train step against a PyTorch step on the same weights.

  PYTHONPATH=. python benchmarks/train_step.py --stage 1 --batch 16              # CPU, a few minutes
  PYTHONPATH=. python benchmarks/train_step.py --stage 2 --family opt --batch 16
  PYTHONPATH=. python benchmarks/train_step.py --stage 2 --family t5 --batch 16
  PYTHONPATH=. python benchmarks/train_step.py --stage 1 --size real --batch 128    # GPU
  PYTHONPATH=. python benchmarks/train_step.py --stage 2 --size opt6.7b --batch 64 --memory-only

Both sides start from one random transformers BLIP-2 (`save_pretrained` to a temporary directory,
loaded by `blip2_jax.from_pretrained`), and both train the same parameters with the same
optimizer: global-norm clipping at 1 then AdamW (0.9, 0.98, wd 0.05, no decay on biases / norms /
1-d leaves) over the trainable parameters only; the frozen towers carry no gradient and no
optimizer state on either side.

Ours: exactly what `python -m blip2_jax.train` runs -- `train.step.init_train_state` with the
recipe's frozen regexes, `make_train_step` over `stage1_loss_fn` / `stage2_loss_fn`,
`jit_train_step` on a (data, fsdp, tensor) mesh of the local devices (state donated).
PyTorch: HF modules (`Blip2ForImageTextRetrieval` + a BERT `cls.predictions` ITG head for stage 1,
`Blip2ForConditionalGeneration` for stage 2) with `requires_grad=False` on the ViT (and the LLM in
stage 2); stage 1 computes LAVIS 1.0.2's ITC / ITM (hard negatives by `torch.multinomial`) / ITG
formulas, stage 2 HF's own LM loss; `torch.optim.AdamW` (fused off) + `clip_grad_norm_`.
`--compile` wraps the PyTorch loss in `torch.compile` (inductor); `--dtype bfloat16` runs ours
with bf16 compute and bf16 frozen weights and torch under `autocast(bfloat16)`.
Dropout is off on both sides (deterministic steps), so the first step's losses agree and are
printed as a check.

Reported: images/s (batch / median step seconds, steps timed in turn: ours, torch, ours, ...),
the step's FLOPs and TFLOP/s, and MFU where the device's peak is known. FLOPs: the step's matmul
FLOPs counted on its jaxpr (`train.reporting.step_flops` -> `blip2_jax.core.flops`, what the training loop
logs; scanned layers count once per layer; the frozen ViT and LLM count forward only, plus the
LLM's input gradients in stage 2). The torch step does the same work, so its
TFLOP/s is the same FLOP count over its own time.
--size small: ViT 6 x 384 at 224 px, Q-Former 4 x 384, OPT 6 x 512 / T5 4+4 x 512 with real
vocabularies (CPU). real: ViT-g/14 + BERT-base Q-Former + OPT-2.7B / FlanT5-XL, bf16 (GPU).
opt6.7b: ViT-g + OPT-6.7B. `--memory-only`: no run, no PyTorch: the state's bytes from
`jax.eval_shape` and the compiled step's `memory_analysis()` (peak = arguments + outputs + temps -
aliased), works on a CPU for any size.
Estimate beside the measurement: each batch's step is compiled once (`lower().compile()`) and that
executable is timed; where the device's chip has published figures (`blip2_jax.core.hardware`,
`--chip` to name them) the roofline of the same compiled program (`aot.op_roofline`: per op the
slower of its matmuls at peak and its HBM bytes at bandwidth) is printed next to the measured step.
`--json PATH` writes every row (benchmarks/gpu_suite.sh builds its table from them). At bf16 the
random model is saved with its frozen towers in bf16 (half the bytes to write and read).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

FROZEN_VIT = r"model/vision_model/.*"
FROZEN_LLM = r"model/language_model/.*"
N_QUERY = 32
BOS = 30521  # [DEC]: LAVIS adds it to BERT's vocabulary; any id < vocab works for timing


# ----------------------------------------------------------------------------------------
# batches


def make_batch(stage: int, family: str, b: int, txt: int, image_size: int, seed: int = 0) -> dict:
  """Random numpy batch in our layout (NHWC pixels, text-only ids); rows of different lengths."""
  rng = np.random.default_rng(seed)
  px = rng.standard_normal((b, image_size, image_size, 3)).astype(np.float32)
  lens = rng.integers(txt // 2, txt + 1, size=b)
  mask = (np.arange(txt)[None] < lens[:, None]).astype(np.int32)
  if stage == 1:
    ids = rng.integers(1000, 30000, (b, txt)).astype(np.int32)
    ids[:, 0] = 101  # [CLS]
    ids = np.where(mask > 0, ids, 0)
    return {"pixel_values": px, "input_ids": ids, "attention_mask": mask}
  if family == "opt":
    ids = rng.integers(100, 50000, (b, txt)).astype(np.int32)
    ids[:, 0] = 2  # BOS
    ids = np.where(mask > 0, ids, 1)
    labels = np.where(mask > 0, ids, -100).astype(np.int32)
    return {"pixel_values": px, "input_ids": ids, "attention_mask": mask, "labels": labels}
  ids = np.where(mask > 0, rng.integers(100, 32000, (b, txt)), 0).astype(np.int32)
  out = np.where(mask > 0, rng.integers(100, 32000, (b, txt)), -100).astype(np.int32)
  return {"pixel_values": px, "input_ids": ids, "attention_mask": mask, "labels": out,
          "decoder_attention_mask": mask.copy()}


# ----------------------------------------------------------------------------------------
# ours


def stage_step_parts(stage: int, model):
  """(frozen regexes, loss fn, optimizer) of the stage's train step, as the training recipes set them."""
  from blip2_jax.train import optim
  from blip2_jax.train import step as step_lib
  if stage == 1:
    frozen, loss_fn = [FROZEN_VIT], step_lib.stage1_loss_fn(model, bos_token_id=BOS, deterministic=True)
  else:
    frozen, loss_fn = [FROZEN_VIT, FROZEN_LLM], step_lib.stage2_loss_fn(model, deterministic=True)
  return frozen, loss_fn, optim.make_optimizer(lr=1e-4, clip_norm=1.0)


def build_ours(args, hf_dir, head_sd, mesh):
  import jax.numpy as jnp

  import blip2_jax
  from blip2_jax.checkpoints import io
  from blip2_jax.models import qformer as Q
  from blip2_jax.train import step as step_lib
  dt = getattr(jnp, args.dtype)
  model, params = blip2_jax.from_pretrained(hf_dir, dtype=dt, param_dtype=jnp.float32, scan=args.scan,
                                            remat=args.remat)
  tree = {"model": params}
  if args.stage == 1:
    q = model.config.qformer
    head = Q.QFormerLMHead(q)
    tree["qformer_lm_head"] = io.load_params(io.DictReader(head_sd), Q.lm_head_hf_rules(q, prefix=""),
                                             io.abstract_params(head, jnp.zeros((1, 1, q.hidden_size))))
    tree["temp"] = jnp.float32(0.07)
  frozen, loss_fn, tx = stage_step_parts(args.stage, model)
  state = step_lib.init_train_state(tree, frozen, tx, frozen_dtype=None if args.dtype == "float32" else args.dtype,
                                    shardings=step_lib.tree_shardings(model, tree, mesh))
  step = step_lib.jit_train_step(step_lib.make_train_step(loss_fn, tx), mesh, state)
  n_train, n_frozen = step_lib.count_params(state.trainable), step_lib.count_params(state.frozen)
  return model, state, step, n_train, n_frozen


def flops_of(step, mesh, state, batch, key) -> float | None:
  import flax.linen as nn
  import jax

  from blip2_jax.core import sharding as shd
  from blip2_jax.train import reporting
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
    return reporting.step_flops(step.jitted, state, batch, key)


# ----------------------------------------------------------------------------------------
# PyTorch


def torch_head(cfg, seed: int = 1):
  """BERT cls.predictions transform + bias (the ITG head, tied to the Q-Former word embeddings)."""
  import torch
  import transformers as T
  qc = cfg.qformer_config
  torch.manual_seed(seed)
  transform = T.models.bert.modeling_bert.BertPredictionHeadTransform(T.BertConfig(
      hidden_size=qc.hidden_size, hidden_act=qc.hidden_act, layer_norm_eps=qc.layer_norm_eps))
  bias = torch.nn.Parameter(torch.randn(qc.vocab_size) * 0.02)
  return transform, bias


def lavis_itg_keep(q_len: int, tmask):
  """LAVIS BertModel.get_extended_attention_mask(is_decoder=True, has_query=True), 0/1."""
  import torch
  b, t = tmask.shape
  seq = torch.arange(t, device=tmask.device)
  causal = (seq[None, None, :].repeat(b, t, 1) <= seq[None, :, None]).float()
  causal = torch.cat([torch.zeros(b, q_len, t, device=tmask.device), causal], dim=1)
  causal = torch.cat([torch.ones(b, q_len + t, q_len, device=tmask.device), causal], dim=-1)
  return causal * torch.cat([torch.ones(b, q_len, device=tmask.device), tmask.float()], dim=1)[:, None, :]


def torch_stage1_loss(hf, transform, head_bias, temp, px, ids, mask, label_smoothing=0.1):
  """LAVIS 1.0.2 Blip2Qformer.forward (one device) written with HF modules: ITC + ITM + ITG."""
  import torch
  import torch.nn.functional as F
  b = px.shape[0]
  img = hf.vision_model(pixel_values=px).last_hidden_state  # frozen: no graph is recorded
  nq = hf.query_tokens.shape[1]
  q = hf.query_tokens.expand(b, -1, -1)
  qo = hf.qformer(query_embeds=q, encoder_hidden_states=img).last_hidden_state
  image_feats = F.normalize(hf.vision_projection(qo), dim=-1)
  to = hf.qformer(query_embeds=hf.embeddings(input_ids=ids), query_length=0, attention_mask=mask).last_hidden_state
  text_feat = F.normalize(hf.text_projection(to[:, 0]), dim=-1)
  # ITC: the gathered side is detached (concat_all_gather runs under no_grad)
  img_all, txt_all = image_feats.detach(), text_feat.detach()
  sim_i2t = torch.matmul(image_feats.unsqueeze(1), txt_all.unsqueeze(-1)).squeeze(-1).max(-1)[0] / temp
  sim_t2i = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), img_all.permute(0, 2, 1)).squeeze(2).max(-1)[0] / temp
  targets = torch.arange(b, device=px.device)
  itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
         + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2
  # ITM: hard negatives drawn from the softmax of the similarities
  with torch.no_grad():
    w_t2i = F.softmax(sim_t2i.float(), dim=1) + 1e-4
    w_t2i.fill_diagonal_(0)
    w_i2t = F.softmax(sim_i2t.float(), dim=1) + 1e-4
    w_i2t.fill_diagonal_(0)
    neg_img = torch.multinomial(w_t2i, 1).squeeze(1)
    neg_txt = torch.multinomial(w_i2t, 1).squeeze(1)
  ids_all = torch.cat([ids, ids, ids[neg_txt]])
  mask_all = torch.cat([mask, mask, mask[neg_txt]])
  img_all3 = torch.cat([img, img[neg_img], img])
  q3 = hf.query_tokens.expand(3 * b, -1, -1)
  out = hf.qformer(query_embeds=hf.embeddings(input_ids=ids_all, query_embeds=q3), query_length=nq,
                   attention_mask=torch.cat([torch.ones(3 * b, nq, dtype=mask.dtype, device=mask.device), mask_all], 1),
                   encoder_hidden_states=img_all3).last_hidden_state
  logits = hf.itm_head(out[:, :nq]).mean(1)
  itm_labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(px.device)
  itm = F.cross_entropy(logits.float(), itm_labels)
  # ITG: [DEC] start, UniLM mask, BERT LM head tied to the word embeddings, shifted smoothed CE
  dec = ids.clone()
  dec[:, 0] = BOS
  labels = dec.masked_fill(mask == 0, -100)
  add = (1.0 - lavis_itg_keep(nq, mask)[:, None]) * torch.finfo(torch.float32).min
  h = hf.qformer(query_embeds=hf.embeddings(input_ids=dec, query_embeds=q), query_length=nq,
                 attention_mask=add, encoder_hidden_states=img).last_hidden_state[:, nq:]
  scores = transform(h) @ hf.embeddings.word_embeddings.weight.T + head_bias
  itg = F.cross_entropy(scores[:, :-1].reshape(-1, scores.shape[-1]).float(), labels[:, 1:].reshape(-1),
                        label_smoothing=label_smoothing)
  return itc + itm + itg


def torch_adamw(named_params, lr=1e-4):
  import torch
  decay = [p for n, p in named_params if p.ndim >= 2 and not any(s in n.lower() for s in ("bias", "norm", "query_tokens"))]
  no_decay = [p for n, p in named_params if not (p.ndim >= 2 and not any(s in n.lower() for s in ("bias", "norm", "query_tokens")))]
  return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, betas=(0.9, 0.98), eps=1e-8, foreach=True)


def build_torch(args, cfg, hf_dir, transform, head_bias, batch):
  """-> (step() -> loss tensor, number of trainable parameters)."""
  import torch
  import transformers
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  pdtype = torch.bfloat16 if (args.dtype == "bfloat16" and dev == "cuda") else torch.float32
  if args.stage == 1:
    hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(hf_dir, attn_implementation=args.torch_attn)
  else:
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(hf_dir, attn_implementation=args.torch_attn)
  hf = hf.to(dev).eval()  # dropout off, as ours (deterministic)
  frozen_prefixes = ("vision_model.",) + (("language_model.",) if args.stage == 2 else ())
  for n, p in hf.named_parameters():
    if n.startswith(frozen_prefixes):
      p.requires_grad_(False)
      if pdtype != torch.float32:
        p.data = p.data.to(pdtype)  # frozen towers stored in bf16, as ours
  named = [(n, p) for n, p in hf.named_parameters() if p.requires_grad]
  tensors = {k: torch.from_numpy(np.asarray(v)).to(dev) for k, v in batch.items()}
  px = tensors["pixel_values"].permute(0, 3, 1, 2).contiguous()
  ids, mask = tensors["input_ids"].long(), tensors["attention_mask"].long()
  autocast = torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
  if args.stage == 1:
    transform.to(dev)
    head_bias = torch.nn.Parameter(head_bias.detach().to(dev))
    temp = torch.nn.Parameter(torch.tensor(0.07, device=dev))
    named += [(f"itg.{n}", p) for n, p in transform.named_parameters()] + [("itg.bias", head_bias), ("temp", temp)]

    def loss_fn():
      with autocast:
        return torch_stage1_loss(hf, transform, head_bias, temp, px, ids, mask)
  else:
    nq = cfg.num_query_tokens
    img_tok = torch.full((ids.shape[0], nq), cfg.image_token_index, dtype=torch.long, device=dev)
    kw = dict(pixel_values=px, input_ids=torch.cat([img_tok, ids], 1),
              attention_mask=torch.cat([torch.ones_like(img_tok), mask], 1))
    labels = tensors["labels"].long()
    if args.family == "t5":
      kw.update(labels=labels, decoder_attention_mask=tensors["decoder_attention_mask"].long())
    else:
      kw.update(labels=torch.cat([torch.full_like(img_tok, -100), labels], 1))

    def loss_fn():
      with autocast:
        return hf(**kw).loss
  if args.compile:
    loss_fn = torch.compile(loss_fn)
  opt = torch_adamw(named)
  params = [p for _, p in named]

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss
  return step, sum(p.numel() for p in params), sum(p.numel() for p in hf.parameters() if not p.requires_grad)


# ----------------------------------------------------------------------------------------
# memory estimate without running


def memory_only(args, cfg):
  """The train state's bytes (eval_shape) and the compiled step's memory analysis, no run."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from blip2_jax.checkpoints import io
  from blip2_jax.core import sharding as shd
  from blip2_jax.models import blip2
  from blip2_jax.train import step as step_lib
  dt = args.dtype
  bcfg = blip2.Blip2Config.from_hf(cfg, architecture="Blip2ForImageTextRetrieval" if args.stage == 1 else None,
                                   dtype=dt, param_dtype="float32", scan=True, remat=args.remat)
  model = blip2.build(bcfg)
  unbox = lambda t: jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, t,
                                 is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  params = unbox(io.abstract_params(model, **blip2.dummy_inputs(bcfg)))
  tree = {"model": params}
  if args.stage == 1:
    from blip2_jax.models import qformer as Q
    q = bcfg.qformer
    tree["qformer_lm_head"] = unbox(io.abstract_params(Q.QFormerLMHead(q), jnp.zeros((1, 1, q.hidden_size))))
    tree["temp"] = jax.ShapeDtypeStruct((), jnp.float32)
  frozen, loss_fn, tx = stage_step_parts(args.stage, model)
  frozen_dtype = None if dt == "float32" else dt
  state = jax.eval_shape(lambda p: step_lib.init_train_state(p, frozen, tx, frozen_dtype=frozen_dtype), tree)
  nbytes = lambda t: sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(t))
  gib = 2.0 ** 30
  print(f"state: trainable {nbytes(state.trainable) / gib:.2f} GiB ({step_lib.count_params(state.trainable) / 1e6:.1f}M "
        f"float32), frozen {nbytes(state.frozen) / gib:.2f} GiB ({step_lib.count_params(state.frozen) / 1e6:.1f}M "
        f"{frozen_dtype or 'float32'}), optimizer {nbytes(state.opt_state) / gib:.2f} GiB")
  batch = make_batch(args.stage, args.family, 1, args.text_len, cfg.vision_config.image_size)
  batch = {k: jax.ShapeDtypeStruct((args.batch[0],) + v.shape[1:], v.dtype) for k, v in batch.items()}
  mesh = shd.make_mesh((-1, 1, 1))
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
    shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), state)
    step = step_lib.jit_train_step(step_lib.make_train_step(loss_fn, tx), mesh, shardings)
    t0 = time.perf_counter()
    lowered = step.jitted.lower(state, batch, jax.ShapeDtypeStruct((2,), jnp.uint32))
    print(f"lowered in {time.perf_counter() - t0:.1f}s; compiling for {jax.devices()[0].platform} ...", flush=True)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    print(f"compiled in {time.perf_counter() - t0:.1f}s")
  m = compiled.memory_analysis()
  if m is None:
    print("memory_analysis: not available on this backend")
    return
  peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  print(f"memory_analysis (batch {args.batch[0]}, {jax.devices()[0].platform}): arguments "
        f"{m.argument_size_in_bytes / gib:.2f} GiB, outputs {m.output_size_in_bytes / gib:.2f} GiB, aliased "
        f"{m.alias_size_in_bytes / gib:.2f} GiB, temporaries {m.temp_size_in_bytes / gib:.2f} GiB -> peak about "
        f"{peak / gib:.2f} GiB")


# ----------------------------------------------------------------------------------------


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--stage", type=int, choices=(1, 2), default=1)
  ap.add_argument("--family", choices=("opt", "t5"), default="opt", help="stage 2 LLM")
  ap.add_argument("--size", choices=("small", "real", "opt6.7b"), default="small")
  ap.add_argument("--batch", type=int, nargs="+", default=[16])
  ap.add_argument("--text-len", type=int, default=24, help="text tokens per row (stage 1: BERT, stage 2: LLM)")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                  help="default: float32 for small, bfloat16 for real sizes")
  ap.add_argument("--scan", action="store_true", help="ours with scanned layers (lax.scan over the blocks)")
  ap.add_argument("--remat", default=None, help="ours: none | full | dots ... (default none small, full real)")
  ap.add_argument("--compile", action="store_true", help="torch.compile the PyTorch loss")
  ap.add_argument("--torch-attn", default="sdpa", help="HF attn_implementation (eager | sdpa)")
  ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
  ap.add_argument("--skip-torch", action="store_true")
  ap.add_argument("--memory-only", action="store_true", help="eval_shape + compiled memory analysis, no run")
  ap.add_argument("--json", default=None, help="also write the rows as JSON here")
  ap.add_argument("--chip", default=None, help="published figures for the roofline estimate (h100, h200, ...); "
                  "default: from the device kind")
  ap.add_argument("--data", action="store_true",
                  help="also time the host pipeline (data.pipeline.make_train_loader over synthetic ShapesSource, "
                       "stage 1) and report its share of the step")
  args = ap.parse_args()
  real = args.size != "small"
  args.dtype = args.dtype or ("bfloat16" if real else "float32")
  args.remat = args.remat or ("full" if real else "none")
  if args.size == "opt6.7b" and (args.stage != 2 or args.family != "opt"):
    ap.error("--size opt6.7b is stage 2 with OPT")

  import jax
  import torch

  from blip2_jax.core import sharding as shd
  from blip2_jax.train import loop, reporting
  threads = common.set_torch_threads(args.threads)
  print(common.machine_line(threads), flush=True)
  cfg = common.blip2_config(args.size, None if args.stage == 1 else args.family, N_QUERY)
  if args.memory_only:
    memory_only(args, cfg)
    return

  arch = "Blip2ForImageTextRetrieval" if args.stage == 1 else "Blip2ForConditionalGeneration"
  import transformers
  torch.manual_seed(0)
  t0 = time.perf_counter()
  tmp = tempfile.TemporaryDirectory()
  with torch.device("cuda" if (real and torch.cuda.is_available()) else "cpu"):
    hf = getattr(transformers, arch)(cfg)
  if args.dtype == "bfloat16":  # both sides store the frozen towers in bf16: save them so
    for tower in ("vision_model", "language_model"):
      if hasattr(hf, tower):
        getattr(hf, tower).to(torch.bfloat16)
  hf.save_pretrained(tmp.name)
  del hf
  transform, head_bias = torch_head(cfg)
  head_sd = {f"transform.{k}": v.numpy() for k, v in transform.state_dict().items()}
  head_sd["bias"] = head_bias.detach().numpy()
  mesh = shd.make_mesh((-1, 1, 1))
  model, state, step, n_train, n_frozen = build_ours(args, tmp.name, head_sd, mesh)
  print(f"stage {args.stage} {args.size} {'' if args.stage == 1 else args.family} {args.dtype}: "
        f"{n_train / 1e6:.1f}M trainable + {n_frozen / 1e6:.1f}M frozen parameters; built and loaded in "
        f"{time.perf_counter() - t0:.1f}s", flush=True)
  peak = reporting.peak_flops(_NoConfig(peak_tflops=hardware_peak(args.chip)))
  rows = []
  for b in args.batch:
    if torch.cuda.is_available():
      torch.cuda.reset_peak_memory_stats()  # JAX's peak has no reset: give batch sizes in ascending order
    batch = make_batch(args.stage, args.family, b, args.text_len, cfg.vision_config.image_size)
    gbatch = loop.global_batch(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
    key = jax.random.PRNGKey(0)
    flops = flops_of(step, mesh, state, gbatch, key)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      compiled = step.jitted.lower(state, gbatch, key).compile()
    compile_s = time.perf_counter() - t0
    estimate = roofline_estimate(compiled, flops, args.chip)
    t0 = time.perf_counter()
    state, m = compiled(state, gbatch, key)
    ours_loss = float(m["loss"])
    first = time.perf_counter() - t0
    row = dict(batch=b, first=first, compile_s=compile_s, flops=flops, estimate=estimate)
    runs = {}

    def ours():
      nonlocal state
      state, m = compiled(state, gbatch, key)
      return m
    runs["ours"] = ours
    sync = {"ours": lambda out: jax.block_until_ready(out), "torch": lambda out: common.torch_sync()}
    if not args.skip_torch:
      tstep, t_train, t_frozen = build_torch(args, cfg, tmp.name, transform, head_bias, batch)
      t0 = time.perf_counter()
      torch_loss = float(tstep().detach())
      row["torch_first"] = time.perf_counter() - t0
      print(f"batch {b}: first-step loss ours {ours_loss:.5f} vs torch {torch_loss:.5f} (same weights and batch; "
            f"stage 1 hard negatives are drawn independently); trainable params ours {n_train} torch {t_train}; "
            f"first call ours {first:.1f}s torch {row['torch_first']:.1f}s", flush=True)
      runs["torch"] = tstep
    times = common.interleaved(runs, args.repeats, sync=lambda name, out: sync[name](out))
    for name, ts in times.items():
      row[name + "_s"], row[name + "_all"] = common.med(ts), ts
      row[name] = b / row[name + "_s"]
      if flops:
        row[name + "_tflops"] = flops / row[name + "_s"] / jax.device_count() / 1e12
    rows.append(row)
    msg = (f"batch {b}: ours {row['ours']:.2f} images/s (median {row['ours_s']:.3f}s of "
           f"{common.fmt_times(row['ours_all'])})")
    if flops:
      msg += f", {flops / 1e9:.1f} GFLOP/step, {row['ours_tflops']:.3f} TFLOP/s"
      if peak:
        row["mfu"] = row["ours_tflops"] * 1e12 / peak
        row["torch_mfu"] = row["torch_tflops"] * 1e12 / peak if "torch_tflops" in row else None
        msg += f", MFU {row['mfu'] * 100:.1f}%"
    if "torch" in row:
      msg += (f" | torch{' compiled' if args.compile else ''} {row['torch']:.2f} images/s (median "
              f"{row['torch_s']:.3f}s of {common.fmt_times(row['torch_all'])})")
      if flops:
        msg += f", {row['torch_tflops']:.3f} TFLOP/s"
      msg += f" | ratio ours/torch {row['ours'] / row['torch']:.2f}"
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      row["ours_peak"] = stats["peak_bytes_in_use"]
      msg += f" | peak memory ours {stats['peak_bytes_in_use'] / 2**30:.1f} GiB"
    if torch.cuda.is_available():
      row["torch_peak"] = torch.cuda.max_memory_allocated()
      msg += f", torch {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    if estimate:
      msg += (f" | roofline estimate of this compiled step on {estimate['chip']}: {estimate['step_s'] * 1e3:.1f} ms "
              f"(measured {row['ours_s'] * 1e3:.1f} ms, estimate / measured {estimate['step_s'] / row['ours_s']:.2f})")
    print(msg + f" | load average {common.loadavg()}", flush=True)
    if args.data:
      data_share(args, b, cfg, row["ours_s"])
    if args.json:
      write_json(args, rows, n_train, n_frozen)
  tmp.cleanup()


def write_json(args, rows, n_train, n_frozen):
  import json

  import jax
  d = jax.devices()[0]
  meta = dict(stage=args.stage, family=None if args.stage == 1 else args.family, size=args.size, dtype=args.dtype,
              remat=args.remat, scan=args.scan, text_len=args.text_len, device=d.device_kind, platform=d.platform,
              devices=jax.device_count(), trainable=n_train, frozen=n_frozen, compile_torch=args.compile)
  with open(args.json, "w") as f:
    json.dump(dict(meta, rows=rows), f, indent=1, default=float)


def roofline_estimate(compiled, flops, chip=None) -> dict | None:
  """The per-op roofline of a compiled step on this device's chip (None without published figures)."""
  import jax

  from blip2_jax.core import hardware
  from blip2_jax.train import aot
  key = chip or hardware.chip_for_kind(jax.devices()[0].device_kind)
  if key not in hardware.CHIPS or not flops:
    return None
  c = hardware.CHIPS[key]
  ops, _ = aot.op_roofline(compiled.as_text(), c, flops / jax.device_count())
  return dict(chip=c.name, peak_flops=c.bf16_flops, step_s=ops["op_s"], hbm_bytes=ops["hbm_bytes"],
              hlo_flops=ops["hlo_flops"], memory_s=ops["hbm_bytes"] / c.hbm_bw, compute_s=flops / jax.device_count()
              / c.bf16_flops)


def data_share(args, b: int, cfg, step_s: float):
  """Seconds per batch of the training input pipeline (grain, synthetic scenes decoded, resized,
  augmented, tokenised; `worker_count` 0 as the tiny configs) and its share of a step if nothing
  overlapped: fetch / (fetch + step). The loop fetches batch s+1 while step s runs (dispatch is
  asynchronous), so on an accelerator the real wait is max(0, fetch - step); on this CPU both
  share the same cores."""
  from blip2_jax.checkpoints import tiny
  from blip2_jax.data import pipeline, synthetic
  size = cfg.vision_config.image_size
  src = synthetic.ShapesSource(max(256, 4 * b), split="train", seed=0, size=size)
  loader = pipeline.make_train_loader(src, global_batch_size=b, image_size=size, seed=0,
                                      tokenizer=tiny.tiny_tokenizer("bert"), max_txt_len=args.text_len)
  it = iter(loader)
  next(it)  # warm-up
  ts = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    raw = next(it)
    np.asarray(raw["image"])
    ts.append(time.perf_counter() - t0)
  f = common.med(ts)
  print(f"data pipeline (ShapesSource {size} px, batch {b}, worker_count 0): {f * 1e3:.1f} ms/batch (median of "
        f"{common.fmt_times(ts)}); share of step if not overlapped {f / (f + step_s) * 100:.1f}% "
        f"(ours' step {step_s:.3f}s)", flush=True)


class _NoConfig(dict):
  """reporting.peak_flops reads config.get("peak_tflops") (and config.peak_tflops when it is set)."""

  def __getattr__(self, name):
    return self[name]


def hardware_peak(chip: str | None) -> float | None:
  """--chip's peak in TFLOP/s (None: reporting.peak_flops reads the device kind)."""
  from blip2_jax.core import hardware
  return hardware.CHIPS[chip].bf16_flops / 1e12 if chip in hardware.CHIPS else None


if __name__ == "__main__":
  main()
