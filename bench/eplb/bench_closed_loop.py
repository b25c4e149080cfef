"""The EPLB loop closed through a real engine, on CPU: does the balancedness the engine measures
after applying a placement match what the rebalance predicted?

One `fireflyer serve` unit of N ranks (expert parallel, tiny preset by default, FP32, gloo) with
`--placement-dir`. Skewed traffic (prompts drawn from a narrow slice of the vocabulary, so the
router favours a few experts), in two phases:
1. even split (no placement): the unit's load window (tokens per logical expert) is collected, as
   the operator's EPLB controller does, and `fireflyer.eplb.rebalance` builds a placement with
   redundant experts; its predicted balancedness on that load is recorded;
2. the placement is written where the operator mounts it, the unit switches, and the same kind of
   traffic runs again. The engine's per-rank counts (`gpuTokens`: (token, expert) pairs each
   rank's experts computed) give the measured balancedness (mean GPU load / max GPU load, per
   layer, averaged), beside the prediction (on phase 1's load, what the controller knows) and the
   placement's balancedness on phase 2's own logical load.

    python -m bench.eplb.bench_closed_loop [--ranks 4] [--redundant 4] [--requests 96] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fireflyer.eplb.algorithm import rebalance
from fireflyer.eplb.metrics import balancedness as placement_balancedness
from fireflyer.eplb.metrics import table_balancedness as balancedness  # [layers, ranks] tables
from fireflyer.workloads.model.init import init_checkpoint


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load(url: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/v1/eplb/load", timeout=30).json())


def traffic(url: str, rng: random.Random, requests: int, vocab: tuple[int, int]) -> None:
    def one(seed: int) -> None:
        local = random.Random(seed)
        prompt = [local.randrange(*vocab) for _ in range(local.randrange(32, 160))]
        body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        httpx.post(url + "/v1/completions", json=body, timeout=300).raise_for_status()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, [rng.randrange(1 << 30) for _ in range(requests)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--redundant", type=int, default=4)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--vocab", type=int, nargs=2, default=(2, 40), help="the narrow token range")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-eplb-loop-"))
    model = init_checkpoint(work / "tiny", preset="tiny", dtype="bf16", seed=0)
    experts = json.loads((model / "config.json").read_text())["n_routed_experts"]
    placement_dir = work / "placement"
    placement_dir.mkdir()
    port = free_port()
    cmd = [sys.executable, "-m", "fireflyer.cli", "serve", "--model", str(model), "--device", "cpu"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--num-kv-blocks", "256"]
    cmd += ["--nnodes", "1", "--gpus-per-node", str(args.ranks), "--expert-parallel", str(args.ranks)]
    cmd += ["--data-parallel", str(args.ranks), "--dist-init-addr", f"127.0.0.1:{free_port()}"]
    cmd += ["--placement-dir", str(placement_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = work / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(log.read_text()[-4000:])
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        rng = random.Random(0)
        vocab = (args.vocab[0], args.vocab[1])

        # Phase 1: the even split.
        start = load(url)
        traffic(url, rng, args.requests, vocab)
        time.sleep(1.5)  # the window publishes within a second of the engine going idle
        first = load(url)
        logical = np.array(first["tokens"]) - np.array(start["tokens"])
        gpu_even = np.array(first["gpuTokens"]) - np.array(start["gpuTokens"])
        even = np.tile(np.arange(experts), (logical.shape[0], 1))
        slots = experts + args.redundant
        placed = rebalance(logical, slots, 1, 1, args.ranks)
        predicted = placement_balancedness(logical, placed.phy2log, args.ranks)
        body = {
            "generation": 1,
            "layers": int(logical.shape[0]),
            "logicalExperts": experts,
            "gpus": args.ranks,
            "slotsPerGpu": slots // args.ranks,
            "phy2log": placed.phy2log.tolist(),
        }
        staged = placement_dir / ".placement.tmp"
        staged.write_text(json.dumps(body))
        staged.rename(placement_dir / "placement.json")
        deadline = time.monotonic() + 60
        while load(url)["generation"] != 1:
            if time.monotonic() > deadline:
                raise SystemExit("the placement was not applied:\n" + log.read_text()[-4000:])
            time.sleep(0.5)

        # Phase 2: the same kind of traffic on the new placement.
        before = load(url)
        traffic(url, rng, args.requests, vocab)
        time.sleep(1.5)
        after = load(url)
        logical2 = np.array(after["tokens"]) - np.array(before["tokens"])
        gpu_placed = np.array(after["gpuTokens"]) - np.array(before["gpuTokens"])
        result = {
            "ranks": args.ranks,
            "redundant": args.redundant,
            "requests_per_phase": args.requests,
            "even_split_measured": balancedness(gpu_even),
            "even_split_predicted": placement_balancedness(logical, even, args.ranks),
            "placement_predicted": predicted,
            "placement_on_phase2_load": placement_balancedness(logical2, placed.phy2log, args.ranks),
            "placement_measured": balancedness(gpu_placed),
        }
        result["measured_vs_predicted"] = result["placement_measured"] / predicted - 1
        for key, value in result.items():
            print(f"{key:>26}: {value:.4f}" if isinstance(value, float) else f"{key:>26}: {value}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
