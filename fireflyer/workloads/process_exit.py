"""Ending a process that ran gloo collectives.

Such a process can abort (SIGABRT, "terminate called without an active exception") in the
interpreter's own teardown: a gloo worker thread may still be releasing the last collective's
tensors, which takes the GIL, and a thread that asks for the GIL while the interpreter finalises
is unwound through C++ code that cannot be unwound. A rank that finished its work would then exit
134 and its pod would count as failed. Nothing these processes register for the teardown is
needed once their output is flushed, so they skip it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import NoReturn


def exit_process(status: int) -> NoReturn:
    """Flush logging and the standard streams, then end the process with `status` at once."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed stream has nothing to lose
            stream.flush()
    os._exit(status)
