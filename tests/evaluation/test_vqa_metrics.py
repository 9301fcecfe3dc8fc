"""VQAv2 accuracy (blip2_jax.evaluation.vqa) on the official evaluation's semantics.

Official: GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py. Per question the
accuracy is the mean over the 10 leave-one-out subsets of 9 answers of min(1, #matches / 3).
"""
import random

import pytest

from blip2_jax.evaluation import normalize_answer, vqa, vqa_accuracy


def _answers(k, answer="2", other="3"):
  return [answer] * k + [other] * (10 - k)


@pytest.mark.parametrize("k,expected", [
    # k humans gave the predicted answer. Leaving out one of the k leaves k-1 matches, leaving out
    # one of the other 10-k leaves k matches:  acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),        # 0.3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
    (3, (3 * (2 / 3) + 7 * 1) / 10),        # 0.9, not 1.0
    (4, (4 * 1 + 6 * 1) / 10),              # 1.0
    (10, 1.0),
])
def test_leave_one_out(k, expected):
  assert vqa.question_accuracy("two", _answers(k)) == pytest.approx(expected, abs=1e-15)
  assert vqa_accuracy(["two"], [_answers(k)]) == pytest.approx(100 * expected, abs=1e-12)


def test_exact_values():
  assert vqa.question_accuracy("2", _answers(2)) == pytest.approx(0.6)
  assert vqa.question_accuracy("2", _answers(3)) == pytest.approx(0.9)
  acc, per = vqa_accuracy(["two", "Two.", "dog", "no"], [_answers(3), _answers(2), ["dog"] * 10, ["yes"] * 10],
                          return_per_question=True)
  assert per == pytest.approx([0.9, 0.6, 1.0, 0.0])
  assert acc == pytest.approx(100 * 2.5 / 4)


@pytest.mark.parametrize("raw,norm", [
    ("Two.", "2"), ("two", "2"), ("a dog", "dog"), ("The dog", "dog"), ("an apple", "apple"),
    ("isnt", "isn't"), ("dont", "don't"), ("None", "0"), ("ten", "10"), ("Yes!", "yes"), ("yes ", "yes"),
    ("  red\tand\nwhite ", "red and white"), ("1,000", "1000"), ("3.5", "3.5"), ("e.g.", "eg"),
    ("black/white", "black white"), ("black / white", "black  white"), ("t-shirt", "t shirt"),
    ("hot-dog, fries", "hot dog fries"), ("what's", "what's"), ("whats", "what's"),
])
def test_normalisation(raw, norm):
  # the official processPunctuation decides per mark: removed ("") when that mark sits next to a
  # space (or the text has a digit,digit comma), else replaced by " " ("hot-dog, fries": "-" -> " ",
  # ", " -> ""); periods not before a digit are removed. processDigitArticle then lower-cases, maps
  # number words, drops articles, restores contractions and joins on single spaces.
  assert normalize_answer(raw) == " ".join(norm.split())


def test_gt_answers_processed_only_when_they_differ():
  # differing human answers get processPunctuation (not processDigitArticle): "red, white" -> "red white"
  assert vqa.question_accuracy("red white", ["red, white"] * 4 + ["no"] * 6) == 1.0
  # identical human answers are compared raw
  assert vqa.question_accuracy("red white", ["red, white"] * 10) == 0.0
  # and processPunctuation alone does not strip: "yes!" -> "yes " (trailing space) never matches "yes"
  assert vqa.process_punctuation("yes!") == "yes "
  assert vqa.question_accuracy("yes", ["yes!"] * 4 + ["no"] * 6) == 0.0


def _official(res_ans, answers):
  """The official per-question loop, with answer dicts compared by value (answer_id makes them unique)."""
  gts = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]
  res_ans = res_ans.replace("\n", " ").replace("\t", " ").strip()
  res_ans = vqa.process_digit_article(vqa.process_punctuation(res_ans))
  if len(set(a["answer"] for a in gts)) > 1:
    for d in gts:
      d["answer"] = vqa.process_punctuation(d["answer"])
  acc = []
  for datum in gts:
    other = [item for item in gts if item != datum]
    acc.append(min(1, float(len([item for item in other if item["answer"] == res_ans])) / 3))
  return float(sum(acc)) / len(acc)


def test_random_against_official_loop():
  rng = random.Random(0)
  pool = ["2", "two", "yes", "no", "red", "dog", "a dog", "3", "blue", "isn't"]
  for _ in range(300):
    answers = [rng.choice(pool) for _ in range(10)]
    pred = rng.choice(pool + ["Two.", "Yes!", "isnt", "The dog"])
    assert vqa.question_accuracy(pred, answers) == pytest.approx(_official(pred, answers), abs=1e-15)


def test_errors():
  with pytest.raises(ValueError, match="2 predictions but 1"):
    vqa_accuracy(["a", "b"], [["a"] * 10])
  with pytest.raises(TypeError, match="not a string"):
    vqa_accuracy(["a"], ["a"])
