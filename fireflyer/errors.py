"""Errors that the CLI reports as one line (the message says what to fix)."""

from __future__ import annotations


class FireflyerError(RuntimeError):
    """Base of errors that carry a complete, user-facing message."""


def _user_errors() -> tuple[type[BaseException], ...]:
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
    )


USER_ERRORS = _user_errors()
