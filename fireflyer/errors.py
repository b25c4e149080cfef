"""Errors that the CLI reports as one line (the message says what to fix)."""

from __future__ import annotations


class FireflyerError(RuntimeError):
    """Base of errors that carry a complete, user-facing message."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Imported when the CLI reports an error, so that importing this module (as the workloads do)
    pulls in nothing else."""
    from fireflyer.dev.build import BuildError
    from fireflyer.dev.cluster import ClusterError
    from fireflyer.dev.processes import PortBusyError
    from fireflyer.dev.topology import TopologyError
    from fireflyer.eplb.algorithm import PlacementError

    return (
        FireflyerError,
        BuildError,
        ClusterError,
        PortBusyError,
        TopologyError,
        PlacementError,
        FileNotFoundError,
        FileExistsError,
    )
