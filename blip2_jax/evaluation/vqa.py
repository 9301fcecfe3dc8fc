"""VQAv2 accuracy with the official answer normalisation (GT-Vision-Lab/VQA vqaEval.py).

Per question, with the (10) human answers a_1..a_m: acc = mean over the m leave-one-out subsets of
min(1, #matches among the other m-1 answers / 3). So with 10 answers: 4 or more matches -> 1.0,
3 -> 0.9, 2 -> 0.6, 1 -> 0.3, 0 -> 0 (not the simplified min(#matches / 3, 1)).

Normalisation exactly as the official code: the prediction is stripped (newlines / tabs to spaces),
then `process_punctuation` and `process_digit_article`; the human answers get `process_punctuation`
only, and only when they are not all identical (the official quirk; VQAv2 annotations are already
normalised, so it rarely matters).
"""
from __future__ import annotations

import re
from typing import Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# verbatim from the official code, including "(?!<=\d)" (a mistyped look-behind: it is a look-ahead
# that never fails before a period) and re.UNICODE passed as sub()'s *count* (32).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def process_punctuation(text: str) -> str:
  out = text
  for p in PUNCT:
    if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out, re.UNICODE)


def process_digit_article(text: str) -> str:
  words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in ARTICLES]
  return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
  """The official normalisation of a predicted answer ("Two." -> "2", "a dog" -> "dog", "isnt" -> "isn't")."""
  a = answer.replace("\n", " ").replace("\t", " ").strip()
  return process_digit_article(process_punctuation(a))


def question_accuracy(pred: str, answers: Sequence[str]) -> float:
  """One question: mean over leave-one-out subsets of min(1, matches / 3), in [0, 1]."""
  answers = list(answers)
  if not answers:
    raise ValueError("a question needs at least one human answer")
  res = normalize_answer(pred)
  if len(set(answers)) > 1:
    answers = [process_punctuation(a) for a in answers]
  accs = []
  for i in range(len(answers)):
    matches = sum(a == res for j, a in enumerate(answers) if j != i)
    accs.append(min(1.0, matches / 3.0))
  return sum(accs) / len(accs)


def vqa_accuracy(preds: Sequence[str], answers_list: Sequence[Sequence[str]], *, return_per_question: bool = False):
  """VQAv2 accuracy in percent (the number papers print) over questions.

  preds: one predicted answer string per question; answers_list: per question the human answers
  (VQAv2: 10 strings, the annotation's `answers[i]["answer"]`). With return_per_question, also the
  list of per-question accuracies in [0, 1].
  """
  preds, answers_list = list(preds), list(answers_list)
  if len(preds) != len(answers_list):
    raise ValueError(f"{len(preds)} predictions but {len(answers_list)} answer lists")
  if not preds:
    raise ValueError("no predictions")
  for a in answers_list:
    if isinstance(a, str):
      raise TypeError("answers_list must hold a list of human answers per question, not a string")
  per = [question_accuracy(p, a) for p, a in zip(preds, answers_list)]
  acc = 100.0 * sum(per) / len(per)
  return (acc, per) if return_per_question else acc
