"""The launcher's stop signals (fireflyer/workloads/train/launch.py): a SIGTERM or SIGUSR1 that
arrives while the ranks are being started neither ends the launcher nor is lost, and every stop on
request exits non-zero (a TrainingJob counts ranks that exit 0 as finished)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from fireflyer.workloads.train import stopping
from fireflyer.workloads.train.launch import StopForwarder


class Kills:
    def __init__(self, gone: frozenset[int] = frozenset()) -> None:
        self.sent: list[tuple[int, int]] = []
        self.gone = gone

    def __call__(self, pid: int, signum: int) -> None:
        if pid in self.gone:
            raise ProcessLookupError(pid)
        self.sent.append((pid, signum))


@pytest.fixture
def restored_handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in stopping.STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_signal_while_the_ranks_start_reaches_them_once_started() -> None:
    kills = Kills(gone={11})
    forwarder = StopForwarder(kill=kills)
    forwarder.handle(signal.SIGTERM)
    assert kills.sent == []  # no rank exists yet
    forwarder.started([10, 11, 12])
    assert kills.sent == [(10, signal.SIGTERM), (12, signal.SIGTERM)]  # 11 already ended
    forwarder.handle(signal.SIGUSR1)
    assert kills.sent[2:] == [(10, signal.SIGUSR1), (12, signal.SIGUSR1)]
    assert forwarder.received == signal.SIGTERM  # the strongest request decides the exit status


def test_the_launcher_survives_a_signal_before_its_ranks_exist(restored_handlers: None) -> None:
    kills = Kills()
    forwarder = StopForwarder(kill=kills)
    forwarder.install()
    os.kill(os.getpid(), signal.SIGUSR1)  # the default action would end this process
    deadline = time.monotonic() + 5
    while not forwarder.received and time.monotonic() < deadline:
        time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
    forwarder.started([4242])
    assert kills.sent == [(4242, signal.SIGUSR1)]


def test_a_forked_rank_before_its_own_handler_ends_by_the_signal(restored_handlers: None) -> None:
    forwarder = StopForwarder(kill=Kills())
    forwarder.install()
    child = os.fork()
    if child == 0:  # inherits the forwarder, as a CPU rank forked by the launcher does
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(5)
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGUSR1
    assert forwarder.received == 0  # the launcher itself saw nothing


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138), (0, 0)])
def test_only_a_run_that_did_its_steps_exits_0(signum: int, code: int) -> None:
    assert stopping.exit_code(signum) == code
