"""`fireflyer router`: flags (the ones the operator renders, plus tuning) and the HTTP server.

Importing this module stays light (no torch, no FastAPI): the CLI builds its parser from it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from fireflyer.workloads.api_keys import flag_path
from fireflyer.workloads.router.backends import Listed, parse_unit_flag
from fireflyer.workloads.router.policies import DEFAULT_LOAD_CAP, DEFAULT_PREFIX_CHARS, POLICIES, Role

if TYPE_CHECKING:
    from fireflyer.workloads.router.app import RouterConfig

log = logging.getLogger("fireflyer.router")


def _unit(value: str) -> tuple[str, str | None]:
    try:
        return parse_unit_flag(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    units = parser.add_argument_group("units (the leaders of `fireflyer serve` units)")
    for flag, what in (
        ("prefill", "a prefill unit"),
        ("decode", "a decode unit"),
        ("backends", "a role-less unit"),
    ):
        units.add_argument(
            f"--{flag}",
            action="append",
            default=[],
            type=_unit,
            metavar="URL[#REVISION]",
            help=f"{what}; units pair only within one revision",
        )
    units.add_argument(
        "--backends-file",
        default=None,
        metavar="PATH",
        help='JSON {"prefill": [units], "decode": [units]}, each unit a URL or {"url": URL, "revision":'
        " REVISION}; re-read when it changes (adds to the flags)",
    )
    routing = parser.add_argument_group("routing")
    routing.add_argument("--policy", choices=POLICIES, default="cache-aware")
    routing.add_argument(
        "--cache-aware-load-cap",
        type=_non_negative_int,
        default=DEFAULT_LOAD_CAP,
        metavar="N",
        help="cache-aware: leave a request's affine unit when it has more than this many requests in"
        " flight beyond the least-loaded one",
    )
    routing.add_argument(
        "--cache-aware-prefix",
        type=_positive_int,
        default=DEFAULT_PREFIX_CHARS,
        metavar="CHARS",
        help="cache-aware: prompt characters that decide a request's unit (token ids: a quarter as many)",
    )
    routing.add_argument(
        "--health-interval",
        type=_positive_float,
        default=2.0,
        metavar="SECONDS",
        help="between health checks of every unit",
    )
    routing.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=600.0,
        metavar="SECONDS",
        help="the longest wait for a unit's answer to begin, and between chunks of a stream",
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help="accepted API keys, one per line, re-read when it changes: every request but /health and"
        " /metrics needs `Authorization: Bearer KEY`; the first key goes to the units"
        " (default: $FIREFLYER_API_KEY_FILE; none: no key asked)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    from fireflyer.workloads.router.app import RouterConfig

    roles: tuple[tuple[str, Role], ...] = (("prefill", "prefill"), ("decode", "decode"), ("backends", "any"))
    backends = [Listed(url, role, rev) for flag, role in roles for url, rev in getattr(args, flag)]
    return RouterConfig(
        backends=backends,
        backends_file=Path(args.backends_file) if args.backends_file else None,
        policy=args.policy,
        health_interval=args.health_interval,
        request_timeout=args.request_timeout,
        load_cap=args.cache_aware_load_cap,
        prefix_chars=args.cache_aware_prefix,
        api_key_file=flag_path(args.api_key_file),
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One line per health check of every unit would drown the log; requests are logged by uvicorn.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    import uvicorn

    from fireflyer.workloads.router.app import create_app

    config = config_from_args(args)
    app = create_app(config)  # first: a bad --api-key-file ends the program here
    if not config.backends and config.backends_file is None:
        # The operator may render a router before any unit exists: serve 503 rather than crash-loop.
        log.warning("no units given (--prefill, --decode, --backends, --backends-file): answering 503")
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=10,
    )
    return 0
