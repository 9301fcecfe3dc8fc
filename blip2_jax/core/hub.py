"""Hugging Face Hub ids wherever a checkpoint directory is expected.

    hub.resolve("Salesforce/blip2-opt-2.7b")    # .../hub/models--Salesforce--blip2-opt-2.7b/snapshots/<commit>
    hub.resolve("Salesforce/blip2-opt-2.7b", revision="v1")   # a branch, tag or commit
    hub.resolve("runs/s1/hf")                    # an existing local path: returned as it is

`from_pretrained`, the tokenizer and image-processor loaders, `checkpoints.towers` and every `--model` of
the command lines call `resolve`. It goes through `huggingface_hub.snapshot_download`, as transformers
does: the files land in (and are read from) huggingface_hub's cache (HF_HUB_CACHE, default
HF_HOME/hub), HF_HUB_OFFLINE=1 uses the cache only, and the token is the logged-in one or HF_TOKEN
(gated and private models). Only what loading reads is fetched: config and tokenizer files,
safetensors weights (pytorch_model*.bin only when a repository has no safetensors file), the
InstructBLIP Q-Former tokenizer; a repository's other formats (TF, Flax, ONNX) are left out.

A local path always wins over a Hub id of the same spelling. A name that is neither an existing path
nor a valid Hub id is returned unchanged, so that the caller reports the missing directory as before.
Nothing heavy is imported here (huggingface_hub only when a Hub id is resolved).
"""
from __future__ import annotations

import os
import re

# What loading a BLIP-2 / tower checkpoint reads (fnmatch patterns over repository paths).
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "qformer_tokenizer/*")
TORCH_FILES = ("pytorch_model*.bin",)

# owner/name or a bare legacy name ("bert-base-uncased"); the Hub's rules, checked again by huggingface_hub
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class HubError(FileNotFoundError):
  """A Hub id that cannot be resolved to a local directory; the message says why and what to do."""


def is_hub_id(name: str) -> bool:
  """Whether `name` is spelled like a Hub model id (it may still not exist)."""
  name = os.fspath(name)
  return (len(name) <= 96 and bool(_REPO_ID.match(name)) and ".." not in name and "--" not in name
          and not name.endswith((".git", ".")))


def offline() -> bool:
  """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it."""
  try:
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
      return True
  except ImportError:
    pass
  # also when the variable was set after huggingface_hub was imported
  return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
             for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve(name, *, revision: str | None = None, cache_dir: str | None = None, token=None) -> str:
  """A local path as given; a Hub id -> its snapshot directory in the huggingface_hub cache (downloaded
  unless offline; `revision`, `cache_dir` and `token` apply to Hub ids only). Raises HubError (one line:
  why, and how to fetch it) when a Hub id cannot be had."""
  name = os.fspath(name)
  if os.path.exists(name) or not is_hub_id(name):
    return name
  return _snapshot(name, revision, cache_dir, token)


def _snapshot(repo_id: str, revision, cache_dir, token) -> str:
  try:
    import huggingface_hub
    from huggingface_hub import errors
  except ImportError:
    raise HubError(f"{repo_id}: no such local directory (a Hugging Face Hub id needs huggingface_hub: "
                   "pip install huggingface_hub)") from None
  rev = f" (revision {revision})" if revision else ""
  kw = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=offline())
  try:
    path = huggingface_hub.snapshot_download(repo_id, allow_patterns=list(MODEL_FILES), **kw)
    if not kw["local_files_only"] and not _has_safetensors(path):
      path = huggingface_hub.snapshot_download(repo_id, allow_patterns=list(MODEL_FILES + TORCH_FILES), **kw)
    return path
  except getattr(errors, "IncompleteSnapshotError", ()) as e:  # newer huggingface_hub: a cut-short download
    raise HubError(f"{repo_id}{rev}: its cached snapshot is incomplete ({_first_line(e)})") from e
  except errors.LocalEntryNotFoundError as e:
    if kw["local_files_only"]:
      raise HubError(f"{repo_id}{rev}: no such local directory, and not in the Hugging Face cache "
                     f"({_cache_name(cache_dir)}) while HF_HUB_OFFLINE is set: fetch it first with "
                     f"`hf download {repo_id}{' --revision ' + revision if revision else ''}` "
                     "(or unset HF_HUB_OFFLINE)") from e
    raise HubError(f"{repo_id}{rev}: no such local directory, not in the Hugging Face cache, and the Hub cannot "
                   f"be reached ({_first_line(e)})") from e
  except errors.RevisionNotFoundError as e:
    raise HubError(f"{repo_id}: the Hugging Face Hub has no revision {revision!r} of it (a branch, tag or "
                   "commit)") from e
  except errors.GatedRepoError as e:
    raise HubError(f"{repo_id}: a gated model on the Hugging Face Hub: accept its terms on "
                   f"https://huggingface.co/{repo_id}, then log in (`hf auth login`) or set HF_TOKEN") from e
  except errors.RepositoryNotFoundError as e:
    raise HubError(f"{repo_id}: no such local directory, and no such model on the Hugging Face Hub (a private one "
                   "needs `hf auth login` or HF_TOKEN)") from e
  except errors.HFValidationError as e:
    raise HubError(f"{repo_id}{rev}: no such local directory, and not a valid Hub id ({_first_line(e)})") from e
  except (errors.HfHubHTTPError, OSError) as e:  # other Hub errors, a full disk
    raise HubError(f"{repo_id}{rev}: fetching it from the Hugging Face Hub failed: {_first_line(e)}") from e


def _has_safetensors(path: str) -> bool:
  return any(f.endswith(".safetensors") and f != "qformer_lm_head.safetensors" for f in os.listdir(path))


def _cache_name(cache_dir) -> str:
  if cache_dir:
    return os.fspath(cache_dir)
  from huggingface_hub import constants
  return constants.HF_HUB_CACHE


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__
