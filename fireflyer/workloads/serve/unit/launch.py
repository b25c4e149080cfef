"""Start a node's ranks of a multi-rank unit: one process per GPU (the node process is local rank
0 and spawns the others), the unit's process groups, this rank's experts, and then either the
leader's HTTP API or a follower's step loop."""

from __future__ import annotations

import argparse
import datetime
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from fireflyer.workloads.process_exit import exit_process
from fireflyer.workloads.serve.unit.topology import UnitShape

log = logging.getLogger("fireflyer.serve")

# How long a rank waits for the others at start (loading a checkpoint takes a while) and inside a
# collective; a rank that dies is noticed at once (its connections close), this is the backstop.
UNIT_TIMEOUT = datetime.timedelta(minutes=10)
RANK_LOSS_GRACE_S = 20.0
TRANSPORTS = {"auto": "auto", "triton": "nvlink", "torch": "portable", "official": "official"}


def run_node(args: argparse.Namespace, shape: UnitShape) -> NoReturn:
    """This node's ranks; ends the node process with its exit status (non-zero when any rank
    of this node failed, so that the pod restarts)."""
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=_child_main, args=(args, shape, local), name=f"rank-{shape.rank(local)}")
        for local in range(1, shape.gpus_per_node)
    ]
    for child in children:
        child.start()

    def watch(child: Any) -> None:
        child.join()
        if child.exitcode not in (0, None):
            # One rank gone breaks the unit. This process notices in its next collective and ends
            # its requests with an error; the deadline is for a rank stuck elsewhere.
            print(f"fireflyer serve: {child.name} exited with {child.exitcode}", file=sys.stderr)
            time.sleep(RANK_LOSS_GRACE_S)
            for other in children:
                if other.is_alive():
                    other.terminate()
            print("fireflyer serve: the unit lost a rank; exiting", file=sys.stderr)
            os._exit(1)

    for child in children:
        threading.Thread(target=watch, args=(child,), daemon=True).start()
    status = run_rank(args, shape, 0)
    for child in children:
        child.join(timeout=30 if status == 0 else 0)  # a failed unit's ranks may be blocked
        if child.is_alive():
            child.terminate()
    # No interpreter teardown: not of a process group that is no longer in step, nor after
    # gloo collectives (process_exit says why).
    exit_process(status)


def _child_main(args: argparse.Namespace, shape: UnitShape, local_rank: int) -> None:
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s [rank {shape.rank(local_rank)}]: %(message)s",
    )
    exit_process(run_rank(args, shape, local_rank))


def init_groups(shape: UnitShape, rank: int, backend: str, args: argparse.Namespace, device: Any) -> Any:
    """Join the unit's process group (NCCL on GPUs, gloo on CPU) through a TCP store hosted by
    rank 0, after the preflight when asked (a unit that fails it never serves: the message names
    the rank or link, goes to the pod's termination message, and the process exits 3); returns
    the gloo group the leader's commands travel on."""
    import socket

    import torch.distributed as dist

    host, port = shape.init_address()
    if not args.preflight:
        store = dist.TCPStore(
            host, port, shape.world, is_master=rank == 0, timeout=UNIT_TIMEOUT, wait_for_workers=False
        )
        dist.init_process_group(backend, store=store, rank=rank, world_size=shape.world, timeout=UNIT_TIMEOUT)
        return dist.new_group(backend="gloo", timeout=UNIT_TIMEOUT)
    from fireflyer.workloads.preflight import PreflightError, check_unit, join_unit
    from fireflyer.workloads.preflight.failure import EXIT_FAILED, report_failure

    name = f"{os.environ.get('POD_NAME') or socket.gethostname()}/rank{rank}"
    try:
        unit = join_unit(f"{host}:{port}", rank, shape.world, timeout=args.preflight_timeout, name=name)
        dist.init_process_group(
            backend, store=unit.store, rank=rank, world_size=shape.world, timeout=UNIT_TIMEOUT
        )
        report = check_unit(
            dist.group.WORLD,
            rank,
            shape.world,
            store=unit.store,
            device=device,
            min_gbps=args.preflight_min_gbps,
            timeout=args.preflight_timeout,
        )
    except PreflightError as error:
        report_failure(str(error))
        os._exit(EXIT_FAILED)
    log.info("preflight passed: %s", report.summary())
    return dist.new_group(backend="gloo", timeout=UNIT_TIMEOUT)


def dispatcher_factory(model: Any, args: argparse.Namespace, max_tokens: int) -> Callable[[Any], Any]:
    """Builds one MoE layer's Dispatcher over the unit's group, for a placement row (None: the
    even split of the experts over the ranks)."""
    import torch.distributed as dist

    from fireflyer.kernels.ep import Dispatcher, Mode

    mode: Mode = "low_latency" if args.dispatch_mode == "lowLatency" else "normal"

    def make(phy2log: Any = None) -> Dispatcher:
        return Dispatcher(
            dist.group.WORLD,
            model.config.hidden_size,
            max_tokens,
            model.config.n_routed_experts,
            phy2log,
            mode=mode,
            transport=TRANSPORTS[args.dispatch_backend],  # type: ignore[arg-type]
            device=model.device,
        )

    return make


def attach_dispatchers(model: Any, make_dispatcher: Callable[[Any], Any]) -> None:
    """Route every MoE layer's tokens through the unit's expert-parallel group."""
    from fireflyer.workloads.model.moe import MoE

    for block in model.blocks:
        if isinstance(block.mlp, MoE):
            block.mlp.dispatcher = make_dispatcher(None)


def agreed_kv_blocks(model: Any, config: Any, group: Any) -> int:
    """Every rank sizes its KV cache the same (the smallest any rank can hold), so that limits
    such as the longest sequence, and warm-up runs, are the same on every rank."""
    import torch
    import torch.distributed as dist

    from fireflyer.workloads.serve.engine import plan_kv_blocks

    blocks = torch.tensor([plan_kv_blocks(model, config)], dtype=torch.long)
    dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=group)
    return int(blocks.item())


def run_rank(args: argparse.Namespace, shape: UnitShape, local_rank: int) -> int:
    import torch.distributed as dist

    from fireflyer.workloads.model.model import Parallel
    from fireflyer.workloads.serve import server
    from fireflyer.workloads.serve.engine import LLMEngine
    from fireflyer.workloads.serve.unit.follower import HealthServer, follow
    from fireflyer.workloads.serve.unit.leader import UnitEngine
    from fireflyer.workloads.serve.unit.placement import Placement, PlacementWatch, apply_placement
    from fireflyer.workloads.serve.unit.rank import RankEngine

    rank = shape.rank(local_rank)
    device = server.resolve_device(args, local_rank)
    control = init_groups(shape, rank, "nccl" if device.type == "cuda" else "gloo", args, device)
    parallel = Parallel(rank, shape.world) if shape.expert_parallel else None
    model, tokenizer = server.load(args, device, parallel)
    config = server.engine_config(args, model, cuda_graph_max_batch=0)
    make_dispatcher = dispatcher_factory(model, args, config.max_num_batched_tokens)
    if shape.expert_parallel:
        attach_dispatchers(model, make_dispatcher)
    config = server.engine_config(
        args, model, cuda_graph_max_batch=0, num_kv_blocks=agreed_kv_blocks(model, config, control)
    )
    engine = LLMEngine(model, tokenizer.eos_token_ids, config)
    log.info(
        "rank %d of %d ready (%s)",
        rank,
        shape.world,
        "experts split" if shape.expert_parallel else "all experts",
    )

    def switch(placement: Placement) -> None:
        apply_placement(model, Path(args.model), placement, rank, make_dispatcher)

    local = RankEngine(engine, rank, switch if shape.expert_parallel else None)
    if rank == 0:
        watch = None
        if args.placement_dir and shape.expert_parallel and engine.eplb_load is not None:
            watch = PlacementWatch(
                Path(args.placement_dir),
                layers=engine.eplb_load.layers,
                experts=model.config.n_routed_experts,
                gpus=shape.world,
            )
        elif args.placement_dir:
            log.info("--placement-dir: the experts are not split over this unit; placements do not apply")
        unit = UnitEngine(local, control, shape.world, watch)
        status = server.serve_http(
            args,
            lambda on_failure: server.create_served_app(
                unit, tokenizer, args, on_failure, server.decode_fetcher(args, model, config.namespace)
            ),
        )
        if status == 0 and not unit.broken:  # a broken group could block its own teardown
            dist.destroy_process_group()
        return status
    health = HealthServer(args.host, args.port, rank) if local_rank == 0 else None
    if health is not None:
        health.start()
    try:
        follow(local, control)
    except Exception as error:
        log.error("rank %d: the unit broke: %s", rank, error)
        return 1
    finally:
        if health is not None:
            health.stop()
        engine.close()
    dist.destroy_process_group()
    return 0


__all__ = ["run_node", "run_rank"]
