"""Checkpoint-and-stop on request.

SIGTERM is what the kubelet sends when a pod is deleted (a preempted TrainingJob, a drained
node); SIGUSR1 asks a run by hand to save and stop. Either way the trainer finishes the step it
is in, saves a checkpoint through the normal atomic path, says so in its log and termination
message, and exits 128 + the signal's number (143 after SIGTERM, 138 after SIGUSR1, as a shell
reports a process that signal ended). Never 0: exit 0 means the run did its --steps, and a rank
that stopped early must not count as a finished rank of its Job (a TrainingJob whose ranks all
exit 0 is Succeeded); under a TrainingJob the attempt fails and resumes from this checkpoint.

Every rank must stop after the same step, or their checkpoints would not belong together: at
each step's end the ranks all-reduce the signal they saw (the largest wins, so SIGTERM beats
SIGUSR1), one tiny collective per step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the launcher imports this module before torch
    from fireflyer.workloads.train.parallel import Rank

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_CODES = {int(sig): 128 + int(sig) for sig in STOP_SIGNALS}


class StopRequest:
    """The stop signal this process received (0: none). Installed in the main thread."""

    def __init__(self) -> None:
        self.received = 0

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # run embedded in another thread: Python lets only the main thread handle signals
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = max(self.received, signum)

    def agreed(self, rank: Rank) -> int:
        """The signal any rank received (0: none); the same answer on every rank."""
        if not rank.distributed:
            return self.received
        import torch

        seen = torch.tensor([self.received], dtype=torch.int32, device=rank.device)
        torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MAX)
        return int(seen.item())


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_code(signum: int) -> int:
    """The process's exit status after stopping on `signum` (0 when nothing asked it to)."""
    return EXIT_CODES.get(signum, 0)


def barrier(rank: Rank) -> None:
    """Every rank has finished its checkpoint shard before any process exits: a launcher that
    sees one rank exit stops the others."""
    from fireflyer.workloads.train import parallel

    parallel.barrier(rank)
