"""The training tasks. A recipe's `config.task` names one; everything that differs between tasks is
read from its Task here, so the loop, the setup, the batches and the evaluation hold no task names:

  stage      1: the Q-Former against the frozen ViT (a Blip2ForImageTextRetrieval; ITC / ITM / ITG
             losses, train/losses.stage1_losses); 2: through the frozen LLM (LM loss,
             train/losses.stage2_loss), the fine-tuning tasks included
  records    the text a record holds: "caption", "vqa" ({"question", "answers"}) or "instruct"
             ({"instruction", "response"})
  text_fn    the data pipeline's per-record text function (None: the caption)
  metric     the headline eval metric (higher is better) the loop's best checkpoint tracks
  prompt     the caption prompt at evaluation when the recipe gives none
"""
from __future__ import annotations

import dataclasses
from typing import Callable

DEFAULT_INSTRUCTION = "Write a short description for the image."  # InstructBLIP captioning template


def vqa_fields(record: dict, rng) -> dict:
  """Pipeline text_fn for VQA data: {"question", "answer"}, the answer drawn uniformly from the
  "answers" list, i.e. each distinct answer with its annotator frequency (["red", "red", "crimson"]:
  "red" 2/3 of the time); eval (rng None) takes the most frequent one."""
  answers = record.get("answers")
  if isinstance(answers, str):
    answers = [answers]
  if not answers:
    raise ValueError(f"VQA record without answers: keys {sorted(record)}")
  if rng is None:
    a = max(set(answers), key=lambda x: (answers.count(x), -answers.index(x)))
  else:
    a = answers[int(rng.integers(len(answers)))]
  return {"question": str(record["question"]), "answer": str(a)}


def instruct_fields(record: dict, rng) -> dict:
  """Pipeline text_fn for instruction data: {"instruction", "response"}; a caption-only record
  becomes (DEFAULT_INSTRUCTION, caption) (InstructBLIP's captioning template)."""
  if "instruction" in record:
    return {"instruction": record["instruction"], "response": record["response"]}
  cap = record.get("caption")
  if isinstance(cap, (list, tuple)):
    cap = cap[int(rng.integers(len(cap)))] if rng is not None else cap[0]
  if not isinstance(cap, str):
    raise ValueError(f"record has neither instruction/response nor caption: keys {sorted(record)}")
  return {"instruction": DEFAULT_INSTRUCTION, "response": cap}


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  stage: int
  records: str = "caption"
  text_fn: Callable | None = None
  metric: str = ""
  prompt: str = ""

  @property
  def stage1(self) -> bool:
    return self.stage == 1


_ALL = (
    Task("stage1", 1),                       # BLIP-2 pre-training stage 1
    Task("retrieval", 1),                    # stage-1 fine-tuning for retrieval (COCO / Flickr)
    Task("stage2", 2),                       # BLIP-2 pre-training stage 2
    Task("caption", 2, metric="eval/cider"),
    Task("vqa", 2, "vqa", vqa_fields, "eval/vqa_acc"),
    # A plain BLIP-2 reads the instruction in its LLM only; an InstructBLIP in its Q-Former as well.
    Task("instruct", 2, "instruct", instruct_fields, "eval/exact_match", DEFAULT_INSTRUCTION),
)
TASKS = {t.name: t for t in _ALL}


def get(name: str) -> Task:
  """The Task of `config.task`; ValueError naming the choices for another name."""
  if name not in TASKS:
    raise ValueError(f"config.task {name!r}: choose one of {tuple(TASKS)}")
  return TASKS[name]
