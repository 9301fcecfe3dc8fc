"""Evaluation metrics for BLIP-2: captions (BLEU-4, CIDEr-D), VQAv2 accuracy, retrieval recall.

    from blip2_jax.evaluation import evaluate_captions, vqa_accuracy, retrieval_recall
    evaluate_captions(preds, refs)               # {"Bleu_1".."Bleu_4", "CIDEr"}, pycocoevalcap scale
    vqa_accuracy(preds, answers_list)            # percent, official VQAv2 normalisation
    retrieval_recall(sim, txt2img, img2txt)      # {"txt_r1", ..., "img_r10", "r_mean"}, percent

Pure python / numpy: no java (the COCO PTBTokenizer is replaced by `caption.tokenize`).
"""
from blip2_jax.evaluation.caption import bleu, cider, evaluate_captions, tokenize  # noqa: F401
from blip2_jax.evaluation.retrieval import coco_style_maps, retrieval_recall  # noqa: F401
from blip2_jax.evaluation.vqa import normalize_answer, vqa_accuracy  # noqa: F401

__all__ = ["evaluate_captions", "vqa_accuracy", "retrieval_recall", "bleu", "cider", "tokenize",
           "normalize_answer", "coco_style_maps"]
