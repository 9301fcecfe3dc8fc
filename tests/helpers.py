"""Helpers the test files share (fixtures are in conftest.py)."""
from __future__ import annotations

import contextlib
import struct
import zlib

import jax
import jax.numpy as jnp

_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # jax records one per traced jit function


@contextlib.contextmanager
def count_traces(fun_name: str | None = None):
  """Counts the jit traces inside the block (of functions called `fun_name`, or all): yields a list
  that holds one name per trace once the block ends. Through jax.monitoring, so the library keeps no
  test counters."""
  names: list[str] = []

  def listen(event, _duration, **kw):
    if event == _TRACE_EVENT and (fun_name is None or kw.get("fun_name") == fun_name):
      names.append(kw.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def fresh(tree):
  """Fresh device buffers of a tree: a train step donates its state."""
  return jax.tree.map(jnp.array, tree)


def run_cli(main, argv, capsys):
  """-> (exit status, stdout, non-blank stderr lines) of a command's in-process run."""
  capsys.readouterr()  # what came before (building a checkpoint prints progress bars)
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, [ln for ln in err.splitlines() if ln.strip()]


def usage_error(main, argv, capsys, *needles):
  """Asserts exit status 2 and one stderr line "error: ..." holding every needle; returns the line."""
  code, out, err = run_cli(main, argv, capsys)
  assert code == 2, (code, out, err)
  assert len(err) == 1 and err[0].startswith("error: "), err
  for n in needles:
    assert str(n) in err[0], (n, err[0])
  return err[0]


def png_header(path, w: int, h: int):
  """A PNG file whose header claims w x h greyscale pixels (its pixel data is a stub): enough for the
  image-size guard, which reads the header only, without decoding gigabytes. Returns `path`."""
  body = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
  ihdr = struct.pack(">I", len(body)) + b"IHDR" + body + struct.pack(">I", zlib.crc32(b"IHDR" + body))
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + b"\x00\x00\x00\x00IEND\xaeB`\x82")
  return path
