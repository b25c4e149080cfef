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

    state = cluster.up(Path(args.state_dir), args.topology, args.port_base, args.local_nodes)
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
    up.add_argument(
        "--local-nodes",
        type=int,
        default=0,
        help="nodes whose pods run for real as processes here, beside the simulated ones (root)",
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
    p.add_argument("--timeout", type=float, default=300.0, help="stop watching after this many seconds")
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


def _plan(args: argparse.Namespace) -> int:
    import yaml

    from fireflyer.api.inference import InferenceDeployment
    from fireflyer.placement import UnitRequest, build_topology, plan_units

    doc = yaml.safe_load(Path(args.file).read_text())
    model = InferenceDeployment.model_validate(doc)
    spec = model.spec
    if args.topology:
        from fireflyer.dev import topology as dev_topology

        nodes = dev_topology.nodes(dev_topology.load(args.topology))
        for node in nodes:
            node["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        pods: list[dict[str, object]] = []
        source = f"topology {args.topology} (simulated, empty)"
    else:
        import os

        from fireflyer.operator import kube

        if args.kubeconfig:
            os.environ["KUBECONFIG"] = args.kubeconfig
        nodes, pods = kube.list_("Node"), kube.list_("Pod")
        source = f"the cluster in {os.environ.get('KUBECONFIG', '~/.kube/config')}"
    topo = build_topology(
        nodes,
        pods,
        spec.placement.topology_profile,
        spec.network.rdma_resource,
        spec.placement.custom_level_keys,
    )
    units = [
        UnitRequest(
            role,
            i,
            getattr(spec, role).nodes_per_unit,
            getattr(spec, role).gpus_per_node,
            spec.network.rdma_per_pod,
        )
        for role in ("prefill", "decode")
        for i in range(getattr(spec, role).units)
    ]
    plan = plan_units(
        units,
        topo,
        spec.placement.required_level,
        spec.placement.preferred_level,
        spec.placement.spread_units,
    )
    usable = len(topo.usable())
    print(f"# {model.metadata.name}: {len(units)} units on {source}: {usable}/{len(topo.nodes)} usable nodes")
    print(plan.explain())
    return 0 if plan.complete else 1


def _add_plan(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("plan", help="print the placement of an InferenceDeployment without applying it")
    p.add_argument("-f", "--file", required=True, help="InferenceDeployment YAML")
    p.add_argument("--kubeconfig", help="plan against this cluster's nodes and pods")
    p.add_argument("--topology", help="plan against an empty simulated topology instead (name or file)")
    p.set_defaults(handler=_plan)


def _serve(args: argparse.Namespace) -> int:
    from fireflyer.workloads.serve.server import run

    return run(args)


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from fireflyer.workloads.serve.server import add_arguments

    p = sub.add_parser(
        "serve",
        help="the inference engine: a DeepSeek-V3 checkpoint behind an OpenAI-compatible API",
        description="Serve a Hugging Face DeepSeek-V3 checkpoint directory over the OpenAI API"
        " (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).",
    )
    add_arguments(p)
    p.set_defaults(handler=_serve)


def _model_init(args: argparse.Namespace) -> int:
    from fireflyer.workloads.model.init import init_checkpoint

    out = init_checkpoint(
        Path(args.out),
        preset=args.preset,
        dtype=args.dtype,
        seed=args.seed,
        overwrite=args.force,
        progress=lambda line: print(line, file=sys.stderr),
    )
    print(out)
    return 0


def _add_model(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    model = sub.add_parser("model", help="DeepSeek-V3 checkpoints")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    init = model_sub.add_parser(
        "init", help="write a random-weight checkpoint in the Hugging Face layout (no downloads)"
    )
    init.add_argument("--preset", choices=("tiny", "small"), default="tiny")
    init.add_argument("--dtype", choices=("bf16", "fp8"), default="bf16")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--out", required=True, help="the checkpoint directory to create")
    init.add_argument("--force", action="store_true", help="replace an existing checkpoint at --out")
    init.set_defaults(handler=_model_init)


def _router(args: argparse.Namespace) -> int:
    from fireflyer.workloads.router.server import run

    return run(args)


def _add_router(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from fireflyer.workloads.router.server import add_arguments

    p = sub.add_parser(
        "router",
        help="the OpenAI API in front of an InferenceDeployment's units (policies, health, retries)",
        description="Route OpenAI API requests over the units that `fireflyer serve` runs"
        " (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).",
    )
    add_arguments(p)
    p.set_defaults(handler=_router)


def _preflight(args: argparse.Namespace) -> int:
    from fireflyer.workloads.preflight.launch import run

    return run(args)


def _add_preflight(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from fireflyer.workloads.preflight.launch import add_arguments

    p = sub.add_parser(
        "preflight",
        help="check a unit before it serves: all-to-all through the expert-parallel dispatcher, bandwidth",
        description="Start this pod's ranks, meet the unit's other ranks at --dist-init-addr, verify a"
        " dispatch/combine round between every pair of ranks and measure all-to-all bandwidth."
        " Exit 0 when the unit may serve; 3 with the failed ranks and links on stderr and in the"
        " termination message when it may not.",
    )
    add_arguments(p)
    p.set_defaults(handler=_preflight)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fireflyer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_dev(sub)
    _add_crds(sub)
    _add_operator(sub)
    _add_demo(sub)
    _add_manifests(sub)
    _add_plan(sub)
    _add_serve(sub)
    from fireflyer.workloads.train.cli import add_parser as _add_train

    _add_train(sub)
    from fireflyer.workloads.prepare.cli import add_parser as _add_prepare

    _add_prepare(sub)
    _add_router(sub)
    _add_preflight(sub)
    _add_model(sub)
    from fireflyer.eplb.cli import add_parser as _add_eplb

    _add_eplb(sub)
    from fireflyer.eplb.report_cli import add_report_parser as _add_eplb_report

    _add_eplb_report(sub)
    from fireflyer.threefs.cli import add_parser as _add_threefs

    _add_threefs(sub)
    from fireflyer.kernels.cli import add_parser as _add_kernels

    _add_kernels(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # every user-facing error ends as one line, not a traceback
        from fireflyer.errors import user_errors

        if isinstance(exc, user_errors()):
            print(f"fireflyer: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
