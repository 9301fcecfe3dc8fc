"""PyTorch computations of LAVIS 1.0.2's training losses, written out with HF transformers modules,
for the parity tests (tests/train/test_losses.py, tests/checkpoints/test_lavis.py).

  stage1_losses   Blip2Qformer.forward (blip2_models/blip2_qformer.py): ITC, ITM, ITG
  opt_loss        Blip2OPT.forward (blip2_models/blip2_opt.py), prompt_length included
  itc             the ITC term on simulated devices (gathered copies detached, DDP-averaged)

The ViT is `hf.vision_model`: its post_layernorm plays LAVIS's `ln_vision`, so set its `eps` to
1e-5 to compute what LAVIS computes. Single device unless `itc(ranks=...)`.
"""
import torch
import torch.nn.functional as F


def itc(image_feats, text_feat, temp, ranks=1, detach=True):
  """LAVIS ITC on `ranks` simulated devices (local rows with grad, gathered copies detached),
  DDP-averaged; detach=False: the single-device loss with gradient through both sides."""
  gather = (lambda x: x.detach()) if detach else (lambda x: x)
  img_all, txt_all = gather(image_feats), gather(text_feat)
  b = image_feats.shape[0] // ranks
  out = 0
  for r in range(ranks):
    img, txt = image_feats[r * b:(r + 1) * b], text_feat[r * b:(r + 1) * b]
    sim_i2t, sim_t2i = _sims(img, txt, img_all, txt_all, temp)
    targets = torch.arange(r * b, r * b + b)
    out = out + (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
                 + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2
  return out / ranks


def _sims(img, txt, img_all, txt_all, temp):
  """(sim_i2t, sim_t2i): max over queries of the query-text similarity, / temp."""
  sim_i2t = torch.matmul(img.unsqueeze(1), txt_all.unsqueeze(-1)).squeeze(-1).max(-1)[0] / temp
  sim_t2i = torch.matmul(txt.unsqueeze(1).unsqueeze(1), img_all.permute(0, 2, 1)).squeeze(2).max(-1)[0] / temp
  return sim_i2t, sim_t2i


def itg_keep(q_len, tmask):
  """LAVIS BertModel.get_extended_attention_mask(is_decoder=True, has_query=True), 0/1."""
  b, t = tmask.shape
  seq = torch.arange(t)
  causal = (seq[None, None, :].repeat(b, t, 1) <= seq[None, :, None]).float()
  causal = torch.cat([torch.zeros(b, q_len, t), causal], dim=1)
  causal = torch.cat([torch.ones(b, q_len + t, q_len), causal], dim=-1)
  return causal * torch.cat([torch.ones(b, q_len), tmask.float()], dim=1)[:, None, :]


def features(hf, px, ids, mask):
  """(image_embeds = ln_vision(ViT), normalised query features, normalised [CLS] text feature)."""
  img = hf.vision_model(pixel_values=px).last_hidden_state
  q = hf.query_tokens.expand(px.shape[0], -1, -1)
  qo = hf.qformer(query_embeds=q, encoder_hidden_states=img).last_hidden_state
  image_feats = F.normalize(hf.vision_projection(qo), dim=-1)
  to = hf.qformer(query_embeds=hf.embeddings(input_ids=ids), query_length=0,
                  attention_mask=mask).last_hidden_state
  return img, image_feats, F.normalize(hf.text_projection(to[:, 0]), dim=-1)


def hard_negatives(sim_i2t, sim_t2i, generator):
  """LAVIS's draws: a negative image per text from softmax(sim_t2i) + 1e-4 and a negative text per
  image from softmax(sim_i2t) + 1e-4, positives zeroed, torch.multinomial."""
  def draw(sim):
    w = F.softmax(sim, dim=1) + 1e-4
    w.fill_diagonal_(0)
    return [int(torch.multinomial(w[b], 1, generator=generator)) for b in range(sim.shape[0])]
  with torch.no_grad():
    return draw(sim_t2i), draw(sim_i2t)


def stage1_losses(hf, lm_head, px, ids, mask, *, temp, bos_token_id, neg_img=None, neg_txt=None,
                  generator=None):
  """-> {"itc", "itm", "itg", "neg_img", "neg_txt"} of Blip2Qformer.forward on one device.

  hf: a transformers Blip2ForImageTextRetrieval; lm_head: (B, T, D) -> vocab logits (BERT
  cls.predictions tied to the word embeddings). Hard negatives: the given indices, or LAVIS's
  draws (`hard_negatives`) from `generator`. ITG recomputes the queries under the UniLM mask
  instead of reusing the ITC pass's cache (equal without dropout)."""
  img, image_feats, text_feat = features(hf, px, ids, mask)
  sim_i2t, sim_t2i = _sims(image_feats, text_feat, image_feats, text_feat, temp)
  targets = torch.arange(px.shape[0])
  itc_loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
              + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2
  if neg_img is None or neg_txt is None:
    neg_img, neg_txt = hard_negatives(sim_i2t, sim_t2i, generator)
  return {"itc": itc_loss, "itm": _itm(hf, img, ids, mask, neg_img, neg_txt),
          "itg": _itg(hf, lm_head, img, ids, mask, bos_token_id), "neg_img": neg_img, "neg_txt": neg_txt}


def _itm(hf, img, ids, mask, neg_img, neg_txt):
  """Pairs (pos, neg image, neg text); queries and text attend to each other."""
  b, nq = ids.shape[0], hf.query_tokens.shape[1]
  ids_all = torch.cat([ids, ids, ids[neg_txt]])
  mask_all = torch.cat([mask, mask, mask[neg_txt]])
  img_all = torch.cat([img, img[neg_img], img])
  q = hf.query_tokens.expand(3 * b, -1, -1)
  out = hf.qformer(query_embeds=hf.embeddings(input_ids=ids_all, query_embeds=q), query_length=nq,
                   attention_mask=torch.cat([torch.ones(3 * b, nq, dtype=torch.long), mask_all], 1),
                   encoder_hidden_states=img_all).last_hidden_state
  logits = hf.itm_head(out[:, :nq]).mean(1)
  return F.cross_entropy(logits, torch.cat([torch.ones(b), torch.zeros(2 * b)]).long())


def _itg(hf, lm_head, img, ids, mask, bos_token_id):
  """[DEC] start, UniLM mask, shifted label-smoothed CE over the non-padding tokens."""
  b, nq = ids.shape[0], hf.query_tokens.shape[1]
  dec = ids.clone()
  dec[:, 0] = bos_token_id
  labels = dec.masked_fill(mask == 0, -100)
  q = hf.query_tokens.expand(b, -1, -1)
  add = (1.0 - itg_keep(nq, mask)[:, None]) * torch.finfo(torch.float32).min
  h = hf.qformer(query_embeds=hf.embeddings(input_ids=dec, query_embeds=q), query_length=nq,
                 attention_mask=add, encoder_hidden_states=img).last_hidden_state[:, nq:]
  scores = lm_head(h)
  return F.cross_entropy(scores[:, :-1].reshape(-1, scores.shape[-1]), labels[:, 1:].reshape(-1),
                         label_smoothing=0.1)


def opt_loss(hf, px, text_input, tokenizer, prompt, max_len=32):
  """Blip2OPT.forward's loss. text_input: the captions as LAVIS's text processor gives them (its
  prompt, e.g. "a photo of ", already prepended); prompt: the model's prompt, whose tokens alone
  (BOS included) give `prompt_length`. hf: a transformers Blip2ForConditionalGeneration (OPT)."""
  img = hf.vision_model(pixel_values=px).last_hidden_state
  q = hf.query_tokens.expand(px.shape[0], -1, -1)
  inputs_opt = hf.language_projection(hf.qformer(query_embeds=q, encoder_hidden_states=img).last_hidden_state)
  atts_opt = torch.ones(inputs_opt.shape[:-1], dtype=torch.long)
  tokenizer.padding_side = "right"
  tok = tokenizer([t + "\n" for t in text_input], return_tensors="pt", padding="longest",
                  truncation=True, max_length=max_len)
  targets = tok.input_ids.masked_fill(tok.input_ids == tokenizer.pad_token_id, -100)
  if prompt:
    prompt_length = int(tokenizer(prompt, return_tensors="pt").attention_mask.sum(1))
    targets[:, :prompt_length] = -100
  targets = torch.cat([torch.full_like(atts_opt, -100), targets], dim=1)
  embeds = torch.cat([inputs_opt, hf.language_model.get_input_embeddings()(tok.input_ids)], dim=1)
  return hf.language_model(inputs_embeds=embeds, attention_mask=torch.cat([atts_opt, tok.attention_mask], 1),
                           labels=targets).loss


def byte_level_tokenizer(texts):
  """OPT's special tokens (pad 1, BOS = EOS = </s> 2, BOS prepended) over the pieces of `texts` as
  GPT-2's byte-level pre-tokenizer cuts them, one id per piece: spaces and "\\n" tokenise as in
  OPT's BPE ("a photo of " -> </s> a Ġphoto Ġof Ġ, a trailing space its own token)."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
  pieces = sorted({p for t in texts for p, _ in pre.pre_tokenize_str(t)} | {"Ġ", "Ċ"})  # lone " ", "\n"
  vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{p: i + 4 for i, p in enumerate(pieces)}}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                              pad_token="<pad>", unk_token="<unk>")
