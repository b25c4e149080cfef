"""`fireflyer serve`: flags (the ones the operator renders, plus engine tuning), model loading,
and the HTTP server."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fireflyer.errors import FireflyerError

if TYPE_CHECKING:
    from fireflyer.workloads.serve.unit.topology import UnitShape

GIB = 1 << 30
KV_TRANSFER_PORT = 30001
BACKENDS = ("auto", "triton", "torch", "official")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    top = parser.add_argument
    top("--model", required=True, help="a Hugging Face DeepSeek-V3 checkpoint directory")
    top("--served-model-name", default=None, help="the `model` clients name (default: the directory name)")
    top("--host", default="0.0.0.0")
    top("--port", type=int, default=30000)
    top(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help="accepted API keys, one per line, re-read when it changes: every request but /health,"
        " /metrics and /v1/eplb/load needs `Authorization: Bearer KEY`; a decode unit sends the first"
        " key to prefill units (default: $FIREFLYER_API_KEY_FILE; none: no key asked)",
    )
    top(
        "--role",
        choices=("prefill", "decode", "both"),
        default="both",
        help="a unit's role in a disaggregated deployment; a one-rank unit serves whole requests",
    )
    unit = parser.add_argument_group("the unit (rendered by the operator)")
    unit.add_argument("--nnodes", type=int, default=1)
    unit.add_argument("--node-rank", type=int, default=0)
    unit.add_argument("--gpus-per-node", type=int, default=1)
    unit.add_argument("--tensor-parallel", type=int, default=1)
    unit.add_argument("--data-parallel", type=int, default=1)
    unit.add_argument("--expert-parallel", type=int, default=1)
    unit.add_argument("--dispatch-mode", choices=("normal", "lowLatency"), default="normal")
    unit.add_argument("--attention-backend", choices=(*BACKENDS, "gluon"), default="auto")
    unit.add_argument("--gemm-backend", choices=(*BACKENDS, "gluon", "cublas"), default="auto")
    unit.add_argument("--dispatch-backend", choices=BACKENDS, default="auto")
    unit.add_argument("--dist-init-addr", default=None, help="HOST:PORT of rank 0")
    unit.add_argument("--placement-dir", default=None, help="where the EPLB placement is mounted")
    unit.add_argument("--redundant-experts", type=int, default=0)
    unit.add_argument(
        "--preflight", action="store_true", help="check the unit's all-to-all and bandwidth before serving"
    )
    unit.add_argument("--preflight-min-gbps", type=float, default=None, help="the per-rank all-to-all floor")
    unit.add_argument("--preflight-timeout", type=float, default=300.0, help="seconds for the ranks to join")
    pd = parser.add_argument_group("prefill/decode hand-off")
    pd.add_argument(
        "--kv-transfer", choices=("auto", "tcp", "nixl"), default="auto", help="auto: nixl when installed"
    )
    pd.add_argument(
        "--kv-transfer-port",
        type=int,
        default=KV_TRANSFER_PORT,
        help="decode role: where KV blocks arrive (0: any)",
    )
    pd.add_argument(
        "--kv-transfer-host",
        default=None,
        help="decode role: the address prefill units send to ($POD_IP, else --host, else this host's)",
    )
    kv = parser.add_argument_group("KV cache")
    kv.add_argument(
        "--kv-cache-dir",
        default=None,
        help="on-disk prefix-cache tier (3FS in production) for blocks evicted from memory",
    )
    kv.add_argument("--kv-cache-dir-gb", type=float, default=64.0, help="capacity of --kv-cache-dir")
    kv.add_argument("--num-kv-blocks", type=int, default=None, help="blocks of 64 tokens (default: sized)")
    kv.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="KV cache size on CPU")
    kv.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    kv.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "bf16", "fp8"),
        default="auto",
        help="the latent cache: auto (--dtype's), bf16, or fp8 (e4m3 latent with a scale per 128"
        " values and a BF16 RoPE part: 656 bytes per token and layer, 0.57x BF16)",
    )
    eng = parser.add_argument_group("engine")
    eng.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    eng.add_argument(
        "--cpu-threads", type=int, default=0, help="intra-op threads on CPU (0: torch's default)"
    )
    eng.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="activations and KV cache (auto: the checkpoint's torch_dtype)",
    )
    eng.add_argument("--max-model-len", type=int, default=None)
    eng.add_argument("--max-num-seqs", type=int, default=None, help="default 256 on GPU, 32 on CPU")
    eng.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="default 8192 on GPU, 1024 on CPU"
    )
    eng.add_argument("--max-waiting", type=int, default=1024, help="queued requests before 503")
    eng.add_argument("--cuda-graph-max-batch", type=int, default=128, help="0 disables CUDA graphs")
    eng.add_argument(
        "--balance-decode",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode steps of unequal lengths attend length-balanced MLA runs (GPU kernels)",
    )
    eng.add_argument(
        "--eplb-window-seconds",
        type=float,
        default=600.0,
        help="the expert load window served at GET /v1/eplb/load (10-s buckets)",
    )
    eng.add_argument(
        "--ep-metrics",
        action="store_true",
        help="units with the experts split: export tokens per MoE layer and rank at /metrics "
        "(layers x ranks series), not only per rank",
    )
    eng.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def check_unit(args: argparse.Namespace) -> UnitShape:
    """The unit the flags describe; exits with the reason for one this engine cannot run."""
    from fireflyer.workloads.serve.unit.topology import UnitShapeError, unit_shape

    try:
        return unit_shape(
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            gpus_per_node=args.gpus_per_node,
            tensor_parallel=args.tensor_parallel,
            data_parallel=args.data_parallel,
            expert_parallel=args.expert_parallel,
            dist_init_addr=args.dist_init_addr,
        )
    except UnitShapeError as error:
        raise SystemExit(f"fireflyer serve: {error}") from error


def checkpoint_fingerprint(model_dir: Path, dtype: str) -> str:
    """Names the weights, not just the directory: KV blocks on a shared tier are only ever reused
    by the same config, the same weight files (names, sizes, modification times) and cache dtype."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update((model_dir / "config.json").read_bytes())
    digest.update(dtype.encode())
    for path in sorted(model_dir.glob("*.safetensors")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def resolve_device(args: argparse.Namespace, local_rank: int = 0) -> Any:
    import torch

    try:
        if args.device == "auto":
            device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        elif args.device == "cuda":
            device = torch.device(f"cuda:{local_rank}")
        else:
            device = torch.device(args.device)
    except RuntimeError as error:
        raise FireflyerError(f"--device {args.device}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FireflyerError(f"--device {args.device}: no CUDA device is available")
    if device.type != "cuda" and args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    return device


def load(args: argparse.Namespace, device: Any, parallel: Any = None) -> tuple[Any, Any]:
    """The model (this rank's experts only, under `parallel`) and the tokenizer."""
    import torch

    from fireflyer.workloads.model.loader import load_model
    from fireflyer.workloads.model.model import Backends
    from fireflyer.workloads.serve.tokenizer import ServeTokenizer

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"fireflyer serve: {model_dir} is not a checkpoint directory (no config.json)")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    logging.getLogger("fireflyer.serve").info("loading %s on %s", model_dir, device)
    model = load_model(
        model_dir,
        device=device,
        dtype=dtype,
        parallel=parallel,
        backends=Backends(attention=args.attention_backend, gemm=args.gemm_backend),
    )
    return model, ServeTokenizer.from_pretrained(model_dir)


def served_name(args: argparse.Namespace) -> str:
    return str(args.served_model_name or Path(args.model).resolve().name)


def engine_config(args: argparse.Namespace, model: Any, **overrides: Any) -> Any:
    from fireflyer.workloads.serve.engine import EngineConfig

    on_gpu = model.device.type == "cuda"
    config = EngineConfig(
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs or (256 if on_gpu else 32),
        max_num_batched_tokens=args.max_num_batched_tokens or (8192 if on_gpu else 1024),
        max_waiting=args.max_waiting,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory=int(args.kv_cache_memory_gb * GIB),
        gpu_memory_utilization=args.gpu_memory_utilization,
        cuda_graph_max_batch=args.cuda_graph_max_batch,
        balance_decode=args.balance_decode,
        eplb_window_seconds=args.eplb_window_seconds,
        kv_cache_dir=Path(args.kv_cache_dir) if args.kv_cache_dir else None,
        kv_cache_dir_bytes=int(args.kv_cache_dir_gb * GIB),
        namespace=f"{served_name(args)}/{checkpoint_fingerprint(Path(args.model), cache_name(args, model))}",
        kv_cache_dtype=args.kv_cache_dtype,
    )
    config = dataclasses.replace(config, receive_kv=args.role == "decode", kv_transfer=args.kv_transfer)
    return dataclasses.replace(config, **overrides)


def cache_name(args: argparse.Namespace, model: Any) -> str:
    """What the cached blocks hold, for the prefix-cache namespace: units whose caches differ never
    exchange blocks (BF16 names stay as they were, so existing tiers keep their blocks)."""
    if args.kv_cache_dtype == "fp8":
        return f"{model.dtype}/kv-fp8"
    return "torch.bfloat16" if args.kv_cache_dtype == "bf16" else str(model.dtype)


def advertised_host(args: argparse.Namespace) -> str:
    if args.kv_transfer_host:
        return str(args.kv_transfer_host)
    if os.environ.get("POD_IP"):
        return os.environ["POD_IP"]
    if args.host not in ("0.0.0.0", "::", ""):
        return str(args.host)
    import socket

    return socket.gethostbyname(socket.gethostname())


def api_keys(args: argparse.Namespace) -> Any:
    """The accepted API keys (api_keys.KeyFile), or None when no key is asked for."""
    from fireflyer.workloads.api_keys import KeyFile, flag_path

    path = flag_path(args.api_key_file)
    return KeyFile(path) if path else None


def decode_fetcher(args: argparse.Namespace, model: Any, namespace: str) -> Any:
    """Decode role: the receiver prefill units push KV blocks to, and the client that asks them
    (with this unit's own API key: prefill units accept the same keys)."""
    if args.role != "decode":
        return None
    from fireflyer.workloads.serve.handoff import DecodeFetcher
    from fireflyer.workloads.serve.kv_transfer import make_transport
    from fireflyer.workloads.serve.runner import kv_cache_layout
    from fireflyer.workloads.serve.types import BLOCK_TOKENS

    width, dtype = kv_cache_layout(model, args.kv_cache_dtype)
    shape = (BLOCK_TOKENS, model.config.num_hidden_layers, width)
    receiver = make_transport(args.kv_transfer).receiver(
        args.host,
        args.kv_transfer_port,
        advertise_host=advertised_host(args),
        block_shape=shape,
        dtype=dtype,
    )
    logging.getLogger("fireflyer.serve").info("KV hand-offs arrive at %s:%d", *receiver.address)
    keys = api_keys(args)
    return DecodeFetcher(receiver, namespace, auth=keys.authorization if keys else None)


def create_served_app(
    engine: Any,
    tokenizer: Any,
    args: argparse.Namespace,
    on_failure: Callable[[], None] | None,
    fetcher: Any = None,
) -> Any:
    """The API app over an engine (one rank's `LLMEngine`, or a unit's leader)."""
    from fireflyer.workloads.serve.api import create_app
    from fireflyer.workloads.serve.async_engine import AsyncEngine
    from fireflyer.workloads.serve.metrics import EngineMetrics

    served = AsyncEngine(
        engine,
        tokenizer,
        served_name(args),
        EngineMetrics(ep_layers=args.ep_metrics),
        on_failure=on_failure,
        fetcher=fetcher,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        served.start()
        try:
            yield
        finally:
            served.shutdown()
            if fetcher is not None:
                await fetcher.close()

    return create_app(served, lifespan=lifespan, api_keys=api_keys(args))


def build(args: argparse.Namespace, on_failure: Callable[[], None] | None = None) -> Any:
    """Model, engine and API app of a one-rank unit from the flags; `on_failure` runs if the
    engine loop dies."""
    from fireflyer.workloads.serve.engine import LLMEngine

    device = resolve_device(args)
    model, tokenizer = load(args, device)
    config = engine_config(args, model)
    engine = LLMEngine(model, tokenizer.eos_token_ids, config)
    return create_served_app(
        engine, tokenizer, args, on_failure, decode_fetcher(args, model, config.namespace)
    )


def serve_http(args: argparse.Namespace, make_app: Callable[[Callable[[], None]], Any]) -> int:
    """Serve the app until shutdown; 1 when the engine failed (so that the pod restarts)."""
    import uvicorn

    server: uvicorn.Server | None = None
    failed = threading.Event()

    def stop_serving() -> None:  # the engine died: exit non-zero so that Kubernetes restarts the pod
        failed.set()
        if server is not None:
            server.should_exit = True

    app = make_app(stop_serving)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=10
    )
    server = uvicorn.Server(config)
    server.run()
    if failed.is_set():
        print("fireflyer serve: the engine failed (see the log above); exiting", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    shape = check_unit(args)
    api_keys(args)  # a missing or empty key file fails now, not after the model has loaded
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if shape.world > 1:
        from fireflyer.workloads.serve.unit.launch import run_node

        return run_node(args, shape)
    log = logging.getLogger("fireflyer.serve")
    if args.dist_init_addr or args.placement_dir or args.redundant_experts:
        log.info(
            "one rank: --dist-init-addr, --dispatch-mode/--dispatch-backend, --placement-dir and"
            " --redundant-experts take effect in units of several ranks"
        )
    return serve_http(args, lambda on_failure: build(args, on_failure=on_failure))
