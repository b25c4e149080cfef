"""One process per node: read the rendezvous environment, start this node's ranks, wait for them.

    MASTER_ADDR, MASTER_PORT   rank 0's host and port (tcp rendezvous)
    NNODES, NODE_RANK          nodes of the job and this node's index
    NPROC_PER_NODE             ranks started on this node (one per GPU)

World size = NNODES × NPROC_PER_NODE and RANK = NODE_RANK × NPROC_PER_NODE + local rank. With
none set: one node of one rank, run in this process. When any local rank fails the others are
stopped and the process exits non-zero, so the pod fails and the Job restarts the run, which then
resumes from its last checkpoint. SIGTERM and SIGUSR1 ask every rank to checkpoint and stop
(stopping.py); this process passes them on to its ranks, also when one arrives while it starts
them (then once they are started).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fireflyer.workloads.process_exit import exit_process
from fireflyer.workloads.train.config import TrainConfig, TrainError
from fireflyer.workloads.train.layout import Layout
from fireflyer.workloads.train.stopping import EXIT_CODES, STOP_SIGNALS, exit_code, signal_name


@dataclass(frozen=True)
class Rendezvous:
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    nnodes: int = 1
    node_rank: int = 0
    nproc_per_node: int = 1

    @property
    def world(self) -> int:
        return self.nnodes * self.nproc_per_node

    def rank(self, local_rank: int) -> int:
        return self.node_rank * self.nproc_per_node + local_rank

    @property
    def master(self) -> str:
        return f"{self.master_addr}:{self.master_port}"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Rendezvous:
        def number(name: str, default: int, low: int) -> int:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise TrainError(f"{name}={raw!r}: not an integer") from None
            if value < low:
                raise TrainError(f"{name}={value}: must be ≥ {low}")
            return value

        nnodes = number("NNODES", 1, 1)
        node_rank = number("NODE_RANK", 0, 0)
        if node_rank >= nnodes:
            raise TrainError(f"NODE_RANK={node_rank} is not below NNODES={nnodes}")
        addr = env.get("MASTER_ADDR", "").strip()
        if nnodes > 1 and not addr:
            raise TrainError(f"NNODES={nnodes}: set MASTER_ADDR to rank 0's host")
        return cls(
            master_addr=addr or "127.0.0.1",
            master_port=number("MASTER_PORT", 29500, 1),
            nnodes=nnodes,
            node_rank=node_rank,
            nproc_per_node=number("NPROC_PER_NODE", 1, 1),
        )


def run_rank(config: TrainConfig, rdv: Rendezvous, local_rank: int) -> int:
    """One rank: join the group, serve status (rank 0), train, leave the group; → the exit
    status (not 0 only when a stop signal ended the run before --steps, after its checkpoint)."""
    import torch

    from fireflyer.workloads.train import parallel, stopping
    from fireflyer.workloads.train.status import Status, StatusServer
    from fireflyer.workloads.train.trainer import Trainer

    stop = stopping.StopRequest()
    stop.install()

    device = parallel.pick_device(config.device, local_rank)
    if device.type == "cpu" and config.cpu_threads > 0:
        torch.set_num_threads(config.cpu_threads)
    elif device.type == "cpu" and rdv.nproc_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        # The node's cores are shared by its ranks; more threads than cores slows every rank.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // rdv.nproc_per_node))
    rank = parallel.init(rdv.rank(local_rank), rdv.world, local_rank, device, rdv.master)
    status = Status()
    server = None
    try:
        if rank.is_leader and config.status_port:
            server = StatusServer(status, config.status_host, config.status_port)
        trainer = Trainer(config, rank, status, stop)
        trainer.run()
        if rank.is_leader:
            write_termination_message(json.dumps(status.snapshot()))
        if trainer.stopped_by:
            stopping.barrier(rank)
        return stopping.exit_code(trainer.stopped_by)
    finally:
        if server is not None:
            server.close()
        parallel.close(rank)


# Kubernetes' default terminationMessagePath: what a container writes here ends up in its
# status (state.terminated.message), where the operator reads the final step and loss after
# rank 0, and with it the /status endpoint, is gone.
TERMINATION_LOG = Path("/dev/termination-log")


def write_termination_message(message: str, path: Path = TERMINATION_LOG) -> None:
    """Only where the file exists (a pod); a run outside Kubernetes writes nothing."""
    if path.is_file():
        path.write_text(message[:4096])


def _spawned(local_rank: int, config: TrainConfig, rdv: Rendezvous) -> None:
    """A local rank's process: user errors end as one line and exit code 2, like the CLI's."""
    from fireflyer.errors import user_errors

    try:
        code = run_rank(config, rdv, local_rank)
    except Exception as error:
        if not isinstance(error, user_errors()):
            raise
        print(f"fireflyer: error: rank {rdv.rank(local_rank)}: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    exit_process(code)  # forked ranks end without teardown anyway; spawned ones must too


def launch(config: TrainConfig, env: Mapping[str, str] | None = None) -> int:
    """Run this node's ranks; → the exit status (non-zero when any rank failed)."""
    rdv = Rendezvous.from_env(os.environ if env is None else env)
    # Refuses a --pipeline or --expert-parallel that does not divide the world.
    Layout(rdv.world, config.pipeline, config.schedule, config.expert_parallel)
    if rdv.nproc_per_node == 1:
        status = run_rank(config, rdv, 0)
        if rdv.world > 1:
            exit_process(status)  # this process ran collectives: see process_exit
        return status
    import torch.multiprocessing as mp

    method = "spawn"
    if config.device == "cpu":
        # CPU ranks fork from this process with the trainer already imported, so starting a rank
        # costs no second import of torch and the model code (seconds of CPU each). GPU ranks
        # are spawned: CUDA state does not survive a fork.
        import fireflyer.workloads.train.trainer  # noqa: F401

        method = "fork"
    forwarder = StopForwarder()
    forwarder.install()  # before the ranks exist: a signal while they start must not end this process
    try:
        ranks = mp.start_processes(
            _spawned, args=(config, rdv), nprocs=rdv.nproc_per_node, join=False, start_method=method
        )
        assert ranks is not None
        forwarder.started([p.pid for p in ranks.processes if p.pid is not None])
        while not ranks.join():
            pass
    except mp.ProcessExitedException as failed:
        if failed.exit_code in EXIT_CODES.values():
            return failed.exit_code  # stopped on request after the checkpoint: rank 0 said so
        if forwarder.received and failed.exit_code is not None and -failed.exit_code in EXIT_CODES:
            # A rank the signal reached before its own handler: no step can have run without it.
            print(
                f"fireflyer: stopped on request ({signal_name(forwarder.received)}) while the ranks "
                "were starting; no step was trained",
                file=sys.stderr,
            )
            return exit_code(forwarder.received)
        # The rank reported its own error; the others were stopped by spawn.
        print(
            f"fireflyer: error: rank {rdv.rank(failed.error_index)} exited with code {failed.exit_code}",
            file=sys.stderr,
        )
        return failed.exit_code if failed.exit_code and failed.exit_code > 0 else 1
    except mp.ProcessRaisedException as failed:
        print(f"fireflyer: error: rank {rdv.rank(failed.error_index)} failed:\n{failed}", file=sys.stderr)
        return 1
    return 0


class StopForwarder:
    """Passes stop signals on to this node's ranks: the kubelet signals the container's first
    process only, and the ranks agree among themselves on the step to stop after. Installed before
    the ranks are started; a signal that arrives while they start is remembered and passed on once
    their process ids are known."""

    def __init__(self, kill: Callable[[int, int], None] = os.kill) -> None:
        self.received = 0  # the largest stop signal seen (0: none)
        self._kill = kill
        self._owner = os.getpid()
        self._pids: list[int] | None = None  # None: the ranks are still being started
        self._pending: list[int] = []

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            for sig in STOP_SIGNALS:
                signal.signal(sig, self.handle)

    def handle(self, signum: int, frame: object = None) -> None:
        if os.getpid() != self._owner:
            # A forked rank that has not installed its own handler yet: end as the signal would,
            # which the launcher reports as stopped before any step.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = max(self.received, signum)
        if self._pids is None:
            self._pending.append(signum)
        else:
            self._send(signum)

    def started(self, pids: list[int]) -> None:
        self._pids = list(pids)
        pending, self._pending = self._pending, []
        for signum in pending:
            self._send(signum)

    def _send(self, signum: int) -> None:
        for pid in self._pids or ():
            with contextlib.suppress(ProcessLookupError):  # a rank that already ended
                self._kill(pid, signum)
