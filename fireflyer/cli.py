"""The `fireflyer` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Handler = Callable[[argparse.Namespace], int]


def _dev_up(args: argparse.Namespace) -> int:
    from fireflyer.dev import cluster

    state = cluster.up(Path(args.state_dir), args.topology, args.port_base)
    print(f"export KUBECONFIG={state.kubeconfig}")
    return 0


def _dev_down(args: argparse.Namespace) -> int:
    from fireflyer.dev import cluster

    return 0 if cluster.down(Path(args.state_dir)) else 1


def _dev_status(args: argparse.Namespace) -> int:
    from fireflyer.dev import cluster

    report = cluster.status(Path(args.state_dir))
    print(json.dumps(report, indent=2))
    return 0 if report.get("running") else 3


def _add_dev(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from fireflyer.dev.cluster import DEFAULT_PORT_BASE, DEFAULT_STATE_DIR

    dev = sub.add_parser("dev", help="a local control plane with simulated GPU/RDMA nodes")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    up = dev_sub.add_parser("up", help="build or reuse the binaries and start the cluster")
    up.add_argument("--topology", default="small", help="a name in hack/topologies or a file")
    up.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    up.add_argument(
        "--port-base",
        type=int,
        default=DEFAULT_PORT_BASE,
        help="first of the loopback ports the components use (API server: base+63)",
    )
    up.set_defaults(handler=_dev_up)
    down = dev_sub.add_parser("down", help="stop the processes `dev up` started; remove the state")
    down.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    down.set_defaults(handler=_dev_down)
    st = dev_sub.add_parser("status", help="show the components and ready nodes")
    st.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    st.set_defaults(handler=_dev_status)


def _crds(args: argparse.Namespace) -> int:
    from fireflyer.api import crd, docs

    outs = [Path(d) for d in (args.out or [str(p) for p in crd.DEFAULT_OUT_DIRS])]
    api_doc = crd.REPO_ROOT / "docs" / "api.md"
    if args.check:
        problems = crd.stale(outs)
        if not args.out and (not api_doc.is_file() or api_doc.read_text() != docs.render()):
            problems.append(f"{api_doc}: differs from the models")
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("CRDs are stale: run `fireflyer crds` and commit the result", file=sys.stderr)
            return 1
        return 0
    for path in crd.write(outs):
        print(path)
    if not args.out:
        api_doc.parent.mkdir(exist_ok=True)
        api_doc.write_text(docs.render())
        print(api_doc)
    return 0


def _add_crds(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("crds", help="generate the CRDs from the API models")
    p.add_argument(
        "--out",
        action="append",
        help="output directory (repeatable); default: crds/ and charts/fireflyer/crds/",
    )
    p.add_argument(
        "--check", action="store_true", help="exit 1 when the files differ from what the models generate"
    )
    p.set_defaults(handler=_crds)


def _operator(args: argparse.Namespace) -> int:
    from fireflyer.operator.main import run

    run(
        namespace=args.namespace,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        standalone=args.standalone,
    )
    return 0


def _add_operator(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("operator", help="run the operator (kopf)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", help="watch one namespace")
    scope.add_argument("--all-namespaces", action="store_true", help="watch every namespace (default)")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics (0: off)")
    p.add_argument("--health-port", type=int, default=8080, help="liveness probe /healthz (0: off)")
    p.add_argument(
        "--standalone", action="store_true", help="no peering (one replica; no KopfPeering objects needed)"
    )
    p.set_defaults(handler=_operator)


def _demo(args: argparse.Namespace) -> int:
    from fireflyer.dev import demo

    return demo.run(Path(args.state_dir), args.topology, args.timeout)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from fireflyer.dev.cluster import DEFAULT_STATE_DIR

    p = sub.add_parser("demo", help="local cluster + operator + small samples, with a live table")
    p.add_argument("--topology", default="small")
    p.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    p.add_argument("--timeout", type=float, default=180.0, help="stop watching after this many seconds")
    p.set_defaults(handler=_demo)


def _manifests(args: argparse.Namespace) -> int:
    from fireflyer.dev import manifests

    if args.check:
        if manifests.stale():
            print(f"{manifests.OPERATOR_YAML} is stale: run `fireflyer manifests`", file=sys.stderr)
            return 1
        return 0
    manifests.write()
    print(manifests.OPERATOR_YAML)
    return 0


def _add_manifests(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("manifests", help="render manifests/base/operator.yaml from the Helm chart")
    p.add_argument("--check", action="store_true", help="exit 1 when the file is stale")
    p.set_defaults(handler=_manifests)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fireflyer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_dev(sub)
    _add_crds(sub)
    _add_operator(sub)
    _add_demo(sub)
    _add_manifests(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # every user-facing error ends as one line, not a traceback
        from fireflyer.errors import USER_ERRORS

        if isinstance(exc, USER_ERRORS):
            print(f"fireflyer: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
