"""`fireflyer preflight`: start this node's ranks (one process per GPU), join the unit, run the
checks; exit 0 when the unit may serve, 3 when it may not, with the reason on stderr and in the pod's
termination message. Importing this module imports no torch: the parser is built without it."""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fireflyer.errors import FireflyerError
from fireflyer.workloads.preflight.failure import (
    EXIT_FAILED,
    TERMINATION_LOG,
    PreflightError,
    exit_failed,
    write_termination_log,
)
from fireflyer.workloads.process_exit import exit_process

LINGER = 10.0  # at most this long rank 0 keeps the store up for the others once it is done


def add_arguments(parser: argparse.ArgumentParser) -> None:
    unit = parser.add_argument_group("the unit (as `fireflyer serve` gets it)")
    unit.add_argument("--nnodes", type=int, default=1, help="pods in the unit")
    unit.add_argument("--node-rank", type=int, default=0, help="this pod's index in the unit")
    unit.add_argument("--gpus-per-node", type=int, default=1, help="ranks started here (one per GPU)")
    unit.add_argument("--dist-init-addr", required=True, help="HOST:PORT where rank 0 hosts the rendezvous")
    check = parser.add_argument_group("checks")
    check.add_argument(
        "--min-gbps",
        type=float,
        default=None,
        help="all-to-all bandwidth floor per rank, in GB/s (default: measure and report only)",
    )
    check.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the unit to join, and for each check (default 300)",
    )
    check.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present"
    )
    check.add_argument(
        "--bandwidth-mb",
        type=float,
        default=None,
        help="all-to-all buffer per rank (default 256 on CUDA, 8 on CPU)",
    )
    out = parser.add_argument_group("reporting")
    out.add_argument("--name", default=None, help="this pod's name in messages (default: the host name)")
    out.add_argument(
        "--termination-log",
        default=str(TERMINATION_LOG),
        help="where a failure is written when the file exists (the pod's terminationMessagePath)",
    )


@dataclass(frozen=True)
class RankJob:
    addr: str
    rank: int
    world: int
    local_rank: int
    local_ranks: int
    name: str
    device: str
    min_gbps: float | None
    timeout: float
    bandwidth_bytes: int | None


@dataclass(frozen=True)
class Outcome:
    rank: int
    ok: bool
    text: str  # the summary, or the failure


def run_rank(job: RankJob, on_hang: Callable[[PreflightError], None]) -> Outcome:
    """One rank from join to verdict; never raises for a failed unit."""
    import torch
    import torch.distributed as dist

    from fireflyer.workloads.preflight.checks import check_unit
    from fireflyer.workloads.preflight.unit import Unit, join_unit, ranks_text

    unit: Unit | None = None
    try:
        unit = join_unit(job.addr, job.rank, job.world, timeout=job.timeout, name=job.name)
        roll = unit.roll()
        try:
            device = _device(job, torch)
        except PreflightError as error:
            roll.report_failure(str(error))
            raise
        # NCCL or gloo for all ranks: a pod without its GPUs must fail here, not in the group setup.
        kinds = unit.exchange("device", device.type, timeout=job.timeout, what="the device check")
        if len(set(kinds)) > 1:
            odd = [r for r, kind in enumerate(kinds) if kind != kinds[0]]
            raise PreflightError(
                f"the ranks do not use the same device: rank 0 uses {kinds[0]}, {ranks_text(odd)} do not: "
                + "; ".join(f"{roll.who(r)} uses {kinds[r]}" for r in odd)
            )
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.local_ranks))
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            store=unit.store,
            rank=job.rank,
            world_size=job.world,
            timeout=datetime.timedelta(seconds=job.timeout),
            device_id=device if device.type == "cuda" else None,
        )
        try:
            report = check_unit(
                dist.group.WORLD,
                job.rank,
                job.world,
                store=unit.store,
                device=device,
                min_gbps=job.min_gbps,
                timeout=job.timeout,
                bandwidth_bytes=job.bandwidth_bytes,
                on_hang=on_hang,
            )
        finally:
            dist.destroy_process_group()
        return Outcome(job.rank, True, report.summary())
    except PreflightError as error:
        return Outcome(job.rank, False, str(error))
    except Exception as exc:  # anything else still ends as a verdict that names this rank
        where = f"rank {job.rank} of {job.world} ({job.name})"
        first = str(exc).splitlines()[0] if str(exc) else ""
        return Outcome(job.rank, False, f"preflight failed: {where}: {type(exc).__name__}: {first}")
    finally:
        if unit is not None:
            unit.close(linger=min(job.timeout, LINGER))


def _device(job: RankJob, torch: Any) -> Any:
    if job.device == "cpu" or (job.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    where = f"rank {job.rank} ({job.name})"
    if not torch.cuda.is_available():
        raise PreflightError(f"--device cuda: {where} sees no CUDA device")
    if job.local_rank >= torch.cuda.device_count():
        raise PreflightError(
            f"{where} is local rank {job.local_rank} but sees {torch.cuda.device_count()} GPUs"
        )
    device = torch.device("cuda", job.local_rank)
    torch.cuda.set_device(device)
    return device


def _child(job: RankJob, conn: Connection) -> None:
    def hang(error: PreflightError) -> None:
        conn.send(Outcome(job.rank, False, str(error)))  # a pipe send is done once it returns
        os._exit(EXIT_FAILED)

    outcome = run_rank(job, hang)
    conn.send(outcome)
    conn.close()
    exit_process(0 if outcome.ok else EXIT_FAILED)


def _spawn(jobs: list[RankJob]) -> list[Outcome]:
    ctx = multiprocessing.get_context("spawn")  # no fork: CUDA and the store's threads do not survive it
    started = []
    for job in jobs:
        reader, writer = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_child, args=(job, writer), name=f"preflight-rank-{job.rank}")
        process.start()
        writer.close()
        started.append((job, process, reader))
    outcomes = []
    for job, process, reader in started:
        # Every rank ends on its own (each wait has a deadline); this bound is for the unforeseen.
        process.join(timeout=8 * job.timeout + 120)
        if process.is_alive():
            process.kill()
            process.join()
        if reader.poll():
            outcomes.append(reader.recv())
        else:
            outcomes.append(
                Outcome(
                    job.rank,
                    False,
                    f"preflight failed: rank {job.rank} of {job.world} ({job.name}) ended"
                    f" (exit code {process.exitcode}) without a verdict",
                )
            )
    return outcomes


def run(args: argparse.Namespace) -> int:
    if args.nnodes < 1 or args.gpus_per_node < 1:
        raise FireflyerError("--nnodes and --gpus-per-node must be at least 1")
    if not 0 <= args.node_rank < args.nnodes:
        raise FireflyerError(f"--node-rank {args.node_rank} is not below --nnodes {args.nnodes}")
    if args.timeout <= 0:
        raise FireflyerError("--timeout must be positive")
    host, sep, port = args.dist_init_addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise FireflyerError(f"--dist-init-addr {args.dist_init_addr!r} is not HOST:PORT")
    termination_log = Path(args.termination_log)
    world = args.nnodes * args.gpus_per_node
    jobs = [
        RankJob(
            addr=args.dist_init_addr,
            rank=args.node_rank * args.gpus_per_node + local,
            world=world,
            local_rank=local,
            local_ranks=args.gpus_per_node,
            name=args.name or socket.gethostname(),
            device=args.device,
            min_gbps=args.min_gbps,
            timeout=args.timeout,
            bandwidth_bytes=int(args.bandwidth_mb * (1 << 20)) if args.bandwidth_mb else None,
        )
        for local in range(args.gpus_per_node)
    ]
    if len(jobs) == 1:  # one rank here: no second process to start
        outcomes = [run_rank(jobs[0], lambda error: exit_failed(str(error), termination_log))]
    else:
        outcomes = _spawn(jobs)
    failures = list(dict.fromkeys(o.text for o in sorted(outcomes, key=lambda o: o.rank) if not o.ok))
    if not failures:
        print(outcomes[0].text, flush=True)
        return 0
    for message in failures:
        print(message, file=sys.stderr, flush=True)
    write_termination_log(failures[0], termination_log)
    return EXIT_FAILED
