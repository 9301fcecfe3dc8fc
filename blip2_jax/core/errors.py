"""The two kinds of error the command lines report in one line (cli/options.py turns them into exit
statuses): bad input (2) and a failure during the work (1). They live in the leaf layer because the
library checks that run before any work (train/validate.py, checkpoints/parity.py) raise them too."""
from __future__ import annotations


class UsageError(ValueError):
  """Bad input: a flag, a file or a checkpoint directory. The message names the input and the problem."""
  exit_status = 2


class Failure(RuntimeError):
  """The work failed (exit status 1); the message is the whole report."""
  exit_status = 1
