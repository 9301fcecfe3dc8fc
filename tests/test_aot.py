"""python -m blip2_jax.aot: slice names, replica-group notations, the collective accounting and the
per-op HBM bytes / FLOPs against hand counts, local devices, bad input, and (with libtpu installed) a
real TPU compile of a tiny recipe.

The hand count: the tiny stage-2 recipe (OPT, 2 layers of width 40) compiled on the 8 host CPU devices
with mesh (1, 8, 1) all-gathers, inside the LLM's layer scan, every weight whose "embed" axis the rules
shard over fsdp: per layer, the bytes of those weights' shapes (float32), once per layer in the forward.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import pytest

from blip2_jax.core import hardware, hlo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name, libtpu, chips", [
    ("v5p-128", "v5p:4x4x4", 64), ("v5p-8", "v5p:2x2x1", 4), ("v4-64", "v4:2x4x4", 32), ("v4-8", "v4:2x2x1", 4),
    ("v5e-256", "v5e:16x16", 256), ("v5litepod-16", "v5e:4x4", 16), ("v6e-256", "v6e:16x16", 256),
    ("v5p:4x4x8", "v5p:4x4x8", 128), ("V5P-16", "v5p:2x2x2", 8)])
def test_topology_names(name, libtpu, chips):
  t = hardware.parse_topology(name)
  assert (t.libtpu_name, t.chips) == (libtpu, chips)
  assert ("chip_config_name" in t.kwargs()) == (t.family in ("v4", "v5p"))  # one device per chip (megacore)


@pytest.mark.parametrize("name", ["v5p-127", "v5p-6", "v5e-3", "v9-8", "tpu", "v5p:4x4", ""])
def test_topology_names_refused(name):
  with pytest.raises(ValueError):
    hardware.parse_topology(name)


def test_replica_group_notations():
  n = 8
  assert hlo.replica_groups("replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add", n) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert hlo.replica_groups("replica_groups={}, to_apply=%add", n) == [list(range(8))]
  assert hlo.replica_groups("replica_groups=[2,4]<=[8], dimensions={0}", n) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert hlo.replica_groups("replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}", n) == [[0, 4], [1, 5], [2, 6], [3, 7]]
  mesh = "replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {%s}, dimensions={0}"
  # device order [0,4,1,5,2,6,3,7] laid out as (4, 1, 2): axis_0 runs over 0..3 (and 4..7), axis_2 pairs i, i+4
  assert hlo.replica_groups(mesh % "'axis_0'", n) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert hlo.replica_groups(mesh % "'axis_2'", n) == [[0, 4], [1, 5], [2, 6], [3, 7]]
  assert hlo.replica_groups("replica_groups=mesh['a'=8] {'a':(2)2}", n) == [[0, 2], [1, 3], [4, 6], [5, 7]]
  assert hlo.replica_groups("source_target_pairs={{0,1},{1,0}}, channel_id=3", n) == [[0, 1], [1, 0]]
  assert hlo.spanned_axes([[0, 1, 2, 3], [4, 5, 6, 7]], (2, 4, 1), ("data", "fsdp", "tensor")) == ("fsdp",)
  assert hlo.spanned_axes([[0, 4], [1, 5]], (2, 4, 1), ("data", "fsdp", "tensor")) == ("data",)


_LOOP_HLO = """HloModule m

%async_collective_fusion.1 (q: bf16[8]) -> bf16[64] {
  %q = bf16[8]{0} parameter(0)
  ROOT %ag2 = bf16[64]{0} all-gather(%q), channel_id=7, replica_groups=[1,8]<=[8], dimensions={0}
}

%body (t: (s32[], bf16[8])) -> (s32[], bf16[8]) {
  %t = (s32[], bf16[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = bf16[8]{0} get-tuple-element(%t), index=1
  %piece = bf16[64]{0} fusion(%x), kind=kCustom, calls=%async_collective_fusion.1
  %layer = bf16[64]{0} all-gather(%x), channel_id=9, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %one = s32[] constant(1)
  %n = s32[] add(%i, %one)
  ROOT %r = (s32[], bf16[8]{0}) tuple(%n, %x)
}

%cond (t: (s32[], bf16[8])) -> pred[] {
  %t = (s32[], bf16[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %c = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (p: bf16[8]) -> (s32[], bf16[8]) {
  %p = bf16[8]{0} parameter(0)
  %ag = bf16[64]{0} all-gather(%p), channel_id=7, replica_groups=[1,8]<=[8], dimensions={0}
  %zero = s32[] constant(0)
  %init = (s32[], bf16[8]{0}) tuple(%zero, %p)
  ROOT %w = (s32[], bf16[8]{0}) while(%init), condition=%cond, body=%body
}
"""


def test_loop_counts_and_async_pieces():
  """A collective in a 5-trip loop counts 5 times; the loop's pieces of an async collective started
  outside (same channel id) count once."""
  mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:8])
  colls, notes = hlo.collectives(_LOOP_HLO, mesh)
  by_channel = {c.channel: c for c in colls}
  assert not notes and sorted(by_channel) == [7, 9]
  assert (by_channel[7].count, by_channel[7].in_loop, by_channel[7].bytes) == (1, False, 128)
  assert (by_channel[9].count, by_channel[9].in_loop, by_channel[9].axes) == (5, True, ("fsdp",))


def test_shared_channel_ids_with_async_pieces():
  """TPU numbers every shard_map collective channel 1: two different gathers started outside the
  loop with that id both count once, the loop's piece of one of them does not count again, nor
  does the copy of the collective inside its async done fusion."""
  done = ('%done_fusion (d: bf16[8]) -> bf16[32] {\n  %d = bf16[8]{0} parameter(0)\n'
          '  %ag5 = bf16[32]{0} all-gather(%d), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}\n'
          '  ROOT %cc = bf16[32]{0} custom-call(%ag5), custom_call_target="AsyncCollectiveDone"\n}\n\n')
  text = (_LOOP_HLO.replace("channel_id=9", "channel_id=1").replace("channel_id=7", "channel_id=1")
          .replace("ENTRY %main", done + "ENTRY %main")
          .replace("  %zero = s32[] constant(0)\n",
                   "  %ag4 = bf16[32]{0} all-gather(%p), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}\n"
                   "  %fin = bf16[32]{0} fusion(%p), kind=kCustom, calls=%done_fusion\n"
                   "  %zero = s32[] constant(0)\n"))
  mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:8])
  colls, _ = hlo.collectives(text, mesh)
  got = sorted((c.name, c.count, c.bytes) for c in colls)
  assert got == [("ag", 1, 128), ("ag4", 1, 64), ("layer", 5, 128)]


def test_traffic_per_kind():
  c = hlo.Collective("all-gather", 1024, 1.0, 4, ("fsdp",), 1, False, "", "ag")
  assert c.traffic() == 768
  assert hlo.Collective("all-reduce", 1024, 1.0, 4, ("data",), 1, False, "", "ar").traffic() == 1536
  assert hlo.Collective("collective-permute", 1024, 1.0, 2, ("data",), 1, False, "", "cp").traffic() == 1024


@pytest.fixture(scope="module")
def tiny_stage2_fsdp():
  from blip2_jax.train import aot, recipe_module
  if jax.device_count() < 8:
    pytest.skip("needs 8 host devices (tests/conftest.py)")
  c = recipe_module("stage2").get_config("llm=opt2.7b,tiny")
  c.mesh, c.global_batch_size = (1, 8, 1), 8
  return c, aot.compile_recipe(c, "v5p-16", devices=jax.devices()[:8])


def test_fsdp_all_gathers_equal_a_hand_count(tiny_stage2_fsdp):
  """Forward all-gathers in the LLM's layer loop = the bytes of one layer's fsdp-sharded weights, per layer."""
  from blip2_jax.checkpoints import tiny
  config, report = tiny_stage2_fsdp
  t = tiny.tiny_text_config("opt")
  h, f = t.hidden_size, t.ffn_dim
  assert h % 8 == 0 and f % 8 == 0
  # OPT layer weights with an "embed" axis (-> fsdp): q, k, v, out (h x h), fc1 (h x f), fc2 (f x h),
  # and the out / fc2 biases (h); every other bias and the norms are replicated. float32 (tiny recipe).
  per_layer = 4 * (4 * h * h + 2 * h * f + 2 * h)
  forward = [c for c in report.collectives if c.kind == "all-gather" and c.in_loop and "language_model" in c.op_name
             and "transpose(" not in c.op_name]
  assert all(c.axes == ("fsdp",) and c.group_size == 8 for c in forward)
  assert sum(c.bytes * c.count for c in forward) == per_layer * t.num_hidden_layers
  assert {c.count for c in forward} == {t.num_hidden_layers}  # each once per scanned layer


def test_report_numbers(tiny_stage2_fsdp):
  from blip2_jax.train import aot
  _, r = tiny_stage2_fsdp
  assert r.fits and r.memory["peak"] > 0 and r.model_flops > 0 and r.hw_flops >= r.model_flops
  rf = r.roofline()
  assert rf["overlapped_s"] == max(rf["ops_s"], rf["comm_s"])
  assert math.isclose(rf["serial_s"], rf["ops_s"] + rf["comm_s"])
  assert rf["ops_s"] >= max(rf["compute_s"], rf["memory_s"]) * (1 - 1e-9)  # per op the slower of the two
  text = aot.format_report(r)
  assert "memory per device" in text and "roofline" in text and "collectives per step" in text


def _cli(*args, env=None):
  e = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, "-m", "blip2_jax.aot", *args], capture_output=True, text=True, cwd=ROOT,
                        env=e, timeout=300)


@pytest.mark.parametrize("args, needle", [
    (["--config", "configs/stage1.py:tiny", "--topology", "v9-128"], "v9"),
    (["--config", "configs/stage1.py:tiny", "--topology", "v5p-8", "--mesh", "2,x"], "--mesh"),
    (["--config", "configs/nope.py", "--topology", "v5p-8"], "nope.py"),
    (["--config", "configs/stage1.py:vit=q", "--topology", "v5p-8"], "vit='q'"),
    (["--config", "configs/stage1.py:tiny", "--topology", "gpu"], "no GPU"),
    (["--config", "configs/stage1.py:tiny", "--topology", "local", "--chip", "h900"], "h900"),
    (["--config", "configs/stage1.py:tiny", "--topology", "v5p-8", "--chip", "h100"], "--chip"),
])
def test_bad_input_is_one_line_and_status_2(args, needle):
  p = _cli(*args)
  lines = [x for x in p.stderr.splitlines() if x.strip()]
  assert p.returncode == 2, p.stderr
  assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr, p.stderr


@pytest.mark.skipif(not hardware.libtpu_available(), reason="libtpu is not installed (pip install \"jax[tpu]\")")
@pytest.mark.parametrize("recipe", ["configs/stage2.py:llm=opt2.7b,tiny", "configs/stage1.py:tiny"])
def test_tiny_recipe_compiles_for_a_tpu_slice(tmp_path, recipe):
  """The real TPU compiler on this host: tiny recipes on a v5p-8 (4 chips). Stage 1 runs per device
  there (train/step.py), its hard negatives' rows exchanged by a ragged all-to-all."""
  out = tmp_path / "r.json"
  p = _cli("--config", recipe, "--topology", "v5p-8", "--json", str(out))
  assert p.returncode == 0, p.stderr[-2000:]
  assert "v5p-8 = 4 x TPU v5p" in p.stdout and "fits" in p.stdout
  import json
  d = json.loads(out.read_text())
  assert d["devices"] == 4 and d["fits"] and d["memory"]["hbm"] == hardware.CHIPS["v5p"].hbm_bytes
  assert d["collectives"] and all(set(c["axes"]) <= {"data"} for c in d["collectives"])  # mesh (4, 1, 1)
  assert d["ops"]["hbm_bytes"] > 0 and d["roofline"]["ops_s"] > 0
  if "stage1" in recipe:
    reduces = [c for c in d["collectives"] if c["kind"] == "all-reduce"]
    assert not any(c["in_loop"] for c in reduces)  # the gradients: once, after every pass
    assert any("ragged_all_to_all" in c["op_name"] for c in d["collectives"])


# ----------------------------------------------------------------------------------------
# HBM traffic and per-op roofline (core.hlo.op_costs), against a hand count

_OPS_HLO = """HloModule m

%layer (p0: f32[2,8], p1: f32[4,8,16], p2: s32[]) -> f32[2,16] {
  %p0 = f32[2,8]{1,0} parameter(0)
  %p1 = f32[4,8,16]{2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  %w = f32[1,8,16]{2,1,0} dynamic-slice(%p1, %p2, %z, %z), dynamic_slice_sizes={1,8,16}
  %wb = f32[8,16]{1,0} bitcast(%w)
  ROOT %d = f32[2,16]{1,0} dot(%p0, %wb), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%save (q0: f32[4,2,16], q1: f32[2,16], q2: s32[]) -> f32[4,2,16] {
  %q0 = f32[4,2,16]{2,1,0} parameter(0)
  %q1 = f32[2,16]{1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %u = f32[1,2,16]{2,1,0} bitcast(%q1)
  %z = s32[] constant(0)
  ROOT %dus = f32[4,2,16]{2,1,0} dynamic-update-slice(%q0, %u, %q2, %z, %z)
}

%body (t: (s32[], f32[2,8], f32[4,8,16], f32[4,2,16])) -> (s32[], f32[2,8], f32[4,8,16], f32[4,2,16]) {
  %t = (s32[], f32[2,8]{1,0}, f32[4,8,16]{2,1,0}, f32[4,2,16]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[2,8]{1,0} get-tuple-element(%t), index=1
  %ws = f32[4,8,16]{2,1,0} get-tuple-element(%t), index=2
  %acts = f32[4,2,16]{2,1,0} get-tuple-element(%t), index=3
  %y = f32[2,16]{1,0} fusion(%x, %ws, %i), kind=kOutput, calls=%layer
  %acts2 = f32[4,2,16]{2,1,0} fusion(%acts, %y, %i), kind=kLoop, calls=%save
  %one = s32[] constant(1)
  %n = s32[] add(%i, %one)
  ROOT %r = (s32[], f32[2,8]{1,0}, f32[4,8,16]{2,1,0}, f32[4,2,16]{2,1,0}) tuple(%n, %x, %ws, %acts2)
}

%cond (t: (s32[], f32[2,8], f32[4,8,16], f32[4,2,16])) -> pred[] {
  %t = (s32[], f32[2,8]{1,0}, f32[4,8,16]{2,1,0}, f32[4,2,16]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %c = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: f32[2,8], w: f32[4,8,16], h: f32[16,4]) -> f32[2,4] {
  %a = f32[2,8]{1,0} parameter(0)
  %w = f32[4,8,16]{2,1,0} parameter(1)
  %h = f32[16,4]{1,0} parameter(2)
  %zero = s32[] constant(0)
  %buf = f32[4,2,16]{2,1,0} broadcast(%zero), dimensions={}
  %init = (s32[], f32[2,8]{1,0}, f32[4,8,16]{2,1,0}, f32[4,2,16]{2,1,0}) tuple(%zero, %a, %w, %buf)
  %loop = (s32[], f32[2,8]{1,0}, f32[4,8,16]{2,1,0}, f32[4,2,16]{2,1,0}) while(%init), condition=%cond, body=%body
  %acts = f32[4,2,16]{2,1,0} get-tuple-element(%loop), index=3
  %last = f32[1,2,16]{2,1,0} slice(%acts), slice={[3:4], [0:2], [0:16]}
  %lb = f32[2,16]{1,0} bitcast(%last)
  ROOT %out = f32[2,4]{1,0} dot(%lb, %h), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""


def test_op_costs_equal_a_hand_count():
  """A 4-trip layer loop: each trip reads x and ONE layer's slice of the stacked weights, writes its
  output, and stores it into the saved-activations buffer in place (the update only); then a slice
  and a matmul outside the loop. Bytes and FLOPs by hand, float32 (scalars are 4 bytes)."""
  ops, notes = hlo.op_costs(_OPS_HLO)
  by = {o.name: o for o in ops}
  assert not notes and set(by) == {"y", "acts2", "buf", "last", "out", "n"}
  layer = by["y"]
  assert (layer.count, layer.in_loop) == (4, True)
  assert layer.flops == 2 * 2 * 16 * 8
  assert layer.bytes == 4 * (2 * 8 + 8 * 16 + 2 * 16) + 4  # x, one layer's weights (not all four), y; the index
  assert by["acts2"].bytes == 4 * (2 * 16 + 2 * 16) + 4  # reads the update, writes it in place; the index
  assert by["n"].bytes == 3 * 4  # the loop counter's add: two scalars in, one out
  assert by["buf"].bytes == 4 * 4 * 2 * 16 + 4  # a broadcast writes its output (and reads the scalar)
  assert by["last"].bytes == 2 * 4 * 2 * 16  # reads and writes the slice only
  assert (by["out"].flops, by["out"].bytes) == (2 * 2 * 4 * 16, 4 * (2 * 16 + 16 * 4 + 2 * 4))
  total_flops = sum(o.count * o.flops for o in ops)
  assert total_flops == 4 * 512 + 256
  peak, bw = 1e12, 1e9  # per op: the slower of its matmuls and its bytes
  assert math.isclose(sum(o.seconds(peak, bw) for o in ops),
                      sum(o.count * max(o.flops / peak, o.bytes / bw) for o in ops))


def test_tpu_layouts_pad_and_on_chip_arrays_are_not_hbm():
  # 257 x 257 float32 under an (8, 128) tile: 264 x 384 elements; S(1) (VMEM) is not HBM traffic
  assert hlo._hbm("f32[257,257]{1,0:T(8,128)}") == 4 * 264 * 384
  assert hlo._hbm("f32[2,257,257]{2,1,0:T(8,128)S(1)}") == 0
  assert hlo._hbm("bf16[3,5]{0,1:T(8,128)(2,1)}") == 2 * 128 * 8  # dimension 0 is the minor one here
  assert hlo._hbm("(f32[4]{0}, s32[2]{0})") == 16 + 8


def test_tpu_batched_matmul_convolution_flops():
  """TPU writes batch dimensions of a matmul as windows over an lhs-dilated input (one tap of each
  window lands on an element): the attention scores of ViT-g (26 rows, 16 heads, 257 x 257, head 88)."""
  text = """HloModule m

ENTRY %e (q: bf16[26,257,16,88], k: bf16[26,257,16,88]) -> f32[26,16,257,257] {
  %q = bf16[26,257,16,88]{3,1,2,0} parameter(0)
  %k = bf16[26,257,16,88]{3,1,2,0} parameter(1)
  ROOT %s = f32[26,16,257,257]{2,3,1,0} convolution(%q, %k), window={size=26x16 stride=25x15 lhs_dilate=26x16}, dim_labels=0b1f_0o1i->01bf
}
"""
  (op,), _ = hlo.op_costs(text)
  assert op.flops == 2 * 26 * 16 * 257 * 257 * 88


def test_report_ops_match_the_jaxpr_flops(tiny_stage2_fsdp):
  """The per-op FLOPs read from the compiled HLO equal the jaxpr count; the step time estimate is the
  per-op roofline plus the collectives."""
  _, r = tiny_stage2_fsdp
  assert math.isclose(r.ops["hlo_flops"], r.hw_flops / r.devices, rel_tol=1e-3)
  assert r.ops["hbm_bytes"] > 0 and r.ops["op_s"] >= r.ops["hbm_bytes"] / r.topology.chip.hbm_bw
  rf = r.roofline()
  assert rf["ops_s"] == r.ops["op_s"] and math.isclose(rf["serial_s"], rf["ops_s"] + rf["comm_s"])


def test_local_topology():
  devs = jax.devices()[:2]
  t = hardware.local_topology("local", devs, "h100")
  assert (t.family, t.chips, t.libtpu_name) == ("h100", 2, "local cpu")
  with pytest.raises(ValueError, match="no GPU"):
    hardware.local_topology("gpu", devs)
  with pytest.raises(ValueError, match="--chip"):
    hardware.local_topology("local", devs)  # a CPU has no figures in the table
  assert hardware.chip_for_kind("NVIDIA H100 80GB HBM3") == "h100" and hardware.chip_for_kind("NVIDIA H200") == "h200"
  assert hardware.chip_for_kind("NVIDIA H100 PCIe") is None and hardware.chip_for_kind("TPU v5 lite") == "v5e"
