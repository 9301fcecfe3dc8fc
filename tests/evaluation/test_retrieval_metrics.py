"""Retrieval recall (blip2_jax.evaluation.retrieval) on constructed similarity matrices."""
import numpy as np
import pytest

from blip2_jax.evaluation import coco_style_maps, retrieval, retrieval_recall

# 3 images x 6 texts, 2 captions per image: image i owns texts 2i, 2i+1. No ties.
SIM = np.array([
    # t0    t1    t2    t3    t4    t5
    [0.90, 0.10, 0.50, 0.20, 0.30, 0.40],  # img0: best caption t0 (0.90) is first        -> rank 0
    [0.80, 0.70, 0.10, 0.60, 0.20, 0.30],  # img1: best caption t3 (0.60); t0, t1 above   -> rank 2
    [0.95, 0.80, 0.70, 0.65, 0.10, 0.50],  # img2: best caption t5 (0.50); t0..t3 above   -> rank 4
])
# text -> image (columns): t0 gt img0 0.90, img2 0.95 above -> 1; t1 gt img0 0.10, two above -> 2;
# t2 gt img1 0.10 -> 2; t3 gt img1 0.60, img2 0.65 above -> 1; t4 gt img2 0.10 -> 2; t5 gt img2 0.50 -> 0


def test_hand_made():
  txt2img, img2txt = coco_style_maps([2, 2, 2])
  assert txt2img == [0, 0, 1, 1, 2, 2] and img2txt == [[0, 1], [2, 3], [4, 5]]
  assert retrieval.ranks_i2t(SIM, img2txt).tolist() == [0, 2, 4]
  assert retrieval.ranks_t2i(SIM, txt2img).tolist() == [1, 2, 2, 1, 2, 0]
  out = retrieval_recall(SIM, txt2img, img2txt, ks=(1, 2, 3, 5))
  assert out["txt_r1"] == pytest.approx(100 / 3) and out["txt_r2"] == pytest.approx(100 / 3)
  assert out["txt_r3"] == pytest.approx(200 / 3) and out["txt_r5"] == 100.0
  assert out["img_r1"] == pytest.approx(100 / 6) and out["img_r2"] == pytest.approx(300 / 6)
  assert out["img_r3"] == 100.0
  default = retrieval_recall(SIM, txt2img, img2txt)
  assert set(default) == {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10",
                          "img_r_mean", "r_mean"}
  assert default["txt_r_mean"] == pytest.approx((100 / 3 + 100 + 100) / 3)
  assert default["r_mean"] == pytest.approx((default["txt_r_mean"] + default["img_r_mean"]) / 2)


def _lavis_reference(scores_i2t, txt2img, img2txt):
  """LAVIS / ALBEF report_metrics (argsort based), in percent."""
  ranks = np.zeros(scores_i2t.shape[0])
  for index, score in enumerate(scores_i2t):
    inds = np.argsort(score)[::-1]
    rank = 1e20
    for i in img2txt[index]:
      tmp = np.where(inds == i)[0][0]
      rank = min(rank, tmp)
    ranks[index] = rank
  tr = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
  scores_t2i = scores_i2t.T
  ranks = np.zeros(scores_t2i.shape[0])
  for index, score in enumerate(scores_t2i):
    inds = np.argsort(score)[::-1]
    ranks[index] = np.where(inds == txt2img[index])[0][0]
  ir = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
  return tr, ir


def test_random_against_lavis():
  rng = np.random.default_rng(0)
  for n_img in (7, 25, 60):
    caps = rng.integers(1, 6, n_img)  # 1..5 captions per image
    txt2img, img2txt = coco_style_maps(caps)
    sim = rng.normal(size=(n_img, len(txt2img)))
    sim[np.array(txt2img), np.arange(len(txt2img))] += 2.0  # better than chance, not perfect
    tr, ir = _lavis_reference(sim, txt2img, img2txt)
    out = retrieval_recall(sim, txt2img, img2txt)
    assert [out["txt_r1"], out["txt_r5"], out["txt_r10"]] == pytest.approx(tr)
    assert [out["img_r1"], out["img_r5"], out["img_r10"]] == pytest.approx(ir)
    assert 0 < out["txt_r1"] < 100 and out["img_r1"] < out["img_r10"]


def test_shuffled_text_order_and_perfect_scores():
  # texts need not be grouped by image; a perfect similarity gives 100 everywhere
  rng = np.random.default_rng(1)
  txt2img = rng.permutation(np.repeat(np.arange(10), 5))
  img2txt = [np.flatnonzero(txt2img == i).tolist() for i in range(10)]
  sim = (np.arange(10)[:, None] == txt2img[None, :]).astype(np.float32) + 0.01 * rng.random((10, 50))
  out = retrieval_recall(sim, txt2img, img2txt)
  assert all(v == 100.0 for v in out.values())


def test_ties_count_against():
  txt2img, img2txt = coco_style_maps([1, 1, 1])
  out = retrieval_recall(np.zeros((3, 3)), txt2img, img2txt)
  assert out["txt_r1"] == 0.0 and out["img_r1"] == 0.0 and out["txt_r5"] == 100.0
  # ties between two captions of the same image do not hurt it
  txt2img, img2txt = coco_style_maps([2])
  assert retrieval_recall(np.ones((1, 2)), txt2img, img2txt, ks=(1,))["txt_r1"] == 100.0


def test_errors():
  with pytest.raises(ValueError, match="shape"):
    retrieval_recall(np.zeros((2, 3)), [0, 1], [[0], [1]])
  with pytest.raises(ValueError, match="out of range"):
    retrieval_recall(np.zeros((2, 2)), [0, 1], [[0], [5]])
  with pytest.raises(ValueError, match="no captions"):
    retrieval_recall(np.zeros((2, 2)), [0, 0], [[0, 1], []])
