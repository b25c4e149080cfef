"""Time to first token with prefill/decode disaggregation against one engine, on CPU.

Three `fireflyer serve` processes on one checkpoint (made by `model init`, default the `tiny`
preset): a whole engine, a prefill engine and a decode engine (`--role decode`, TCP hand-off).
For each prompt length, sequential greedy requests of one token: to the whole engine directly, and
to the decode engine with `x-fireflyer-prefill` naming the prefill engine (what the router sends).
Reports median TTFT of each and the hand-off's overhead.

    python -m bench.serve.bench_handoff [--preset tiny] [--lengths 256 1024 2048] [--requests 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from fireflyer.workloads.model.init import init_checkpoint


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(model: Path, flags: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "fireflyer.cli", "serve", "--model", str(model), "--device", "cpu"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd} exited:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{cmd} not healthy:\n{log.read_text()[-4000:]}")


def ttft(client: httpx.Client, url: str, prompt: list[int], headers: dict[str, str]) -> float:
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "ignore_eos": True}
    started = time.perf_counter()
    response = client.post(url + "/v1/completions", json=body, headers=headers)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-handoff-"))
    model = init_checkpoint(work / args.preset, preset=args.preset, dtype="bf16", seed=0)
    blocks = ["--num-kv-blocks", "512"]
    procs = []
    try:
        whole_proc, whole = start(model, blocks, work / "whole.log")
        procs.append(whole_proc)
        prefill_proc, prefill = start(model, [*blocks, "--role", "prefill"], work / "prefill.log")
        procs.append(prefill_proc)
        decode_flags = [
            *blocks,
            "--role",
            "decode",
            "--kv-transfer",
            "tcp",
            "--kv-transfer-port",
            str(free_port()),
        ]
        decode_proc, decode = start(model, decode_flags, work / "decode.log")
        procs.append(decode_proc)
        rng = random.Random(0)
        rows: list[dict[str, Any]] = []
        with httpx.Client(timeout=300) as client:
            for length in args.lengths:
                single, handed = [], []
                for i in range(args.requests + 1):  # the first pair warms up
                    prompt = [rng.randrange(2, 1000) for _ in range(length)]
                    a = ttft(client, whole, prompt, {})
                    b = ttft(client, decode, prompt, {"x-fireflyer-prefill": prefill})
                    if i:
                        single.append(a)
                        handed.append(b)
                one, pd = statistics.median(single), statistics.median(handed)
                rows.append(
                    {
                        "prompt_tokens": length,
                        "ttft_single_s": one,
                        "ttft_handoff_s": pd,
                        "overhead": pd / one - 1,
                    }
                )
        print(f"{'prompt':>7} {'single (s)':>11} {'P/D (s)':>9} {'overhead':>9}")
        for row in rows:
            print(
                f"{row['prompt_tokens']:>7} {row['ttft_single_s']:>11.4f} {row['ttft_handoff_s']:>9.4f}"
                f" {row['overhead']:>8.1%}"
            )
        if args.json:
            Path(args.json).write_text(json.dumps({"preset": args.preset, "rows": rows}, indent=1))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
