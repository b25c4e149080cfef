"""Before the operator is uninstalled: delete every ThreeFSCluster and wait until they are gone.

A ThreeFSCluster keeps a finalizer until the operator has wiped its disks (reclaimPolicy Delete)
or let them be (Retain). Once the operator is gone nobody removes it, and the cluster, its
namespace and the CRD hang in deletion. The chart runs this as a Helm pre-delete hook, while the
operator still runs (docs/threefs.md, "Uninstalling").

    python -m fireflyer.operator.threefs.uninstall [--namespace NS] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import sys
import time

from fireflyer.operator import kube

KIND = "ThreeFSCluster"
POLL_SECONDS = 2.0


def names(namespace: str | None) -> list[tuple[str, str]]:
    """(namespace, name) of the ThreeFSClusters in `namespace` (None: everywhere)."""
    return sorted((c["metadata"]["namespace"], c["metadata"]["name"]) for c in kube.list_(KIND, namespace))


def delete_all(namespace: str | None, timeout: float) -> list[tuple[str, str]]:
    """Delete them all and wait up to `timeout` seconds; → those still there."""
    for ns, name in names(namespace):
        print(f"deleting ThreeFSCluster {ns}/{name}", flush=True)
        kube.delete(KIND, name, ns)
    deadline = time.monotonic() + timeout
    while (left := names(namespace)) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    return left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", default=None, help="only this namespace (the chart's watchNamespace)")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    left = delete_all(args.namespace, args.timeout)
    if left:
        print(
            "still being deleted (the operator has not finished their cleanup): "
            + ", ".join(f"{ns}/{name}" for ns, name in left),
            file=sys.stderr,
        )
        return 1
    print("no ThreeFSCluster left", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
