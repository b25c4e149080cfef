"""Which Triton releases our Gluon kernels run on. Gluon is Triton's experimental dialect and
changes its API between releases (Triton 3.9 removed the TMA copies the kernels call,
`tma.async_copy_global_to_shared` and `async_copy_shared_to_global`, for `async_load` and
`async_store`), so the kernels run only on the release they are written for and tested on; on
any other, `auto` and the grouped GEMMs run the Triton kernels instead."""

from __future__ import annotations

WRITTEN_FOR = (3, 6)  # Triton major.minor


def gluon_release_supported(triton_version: str) -> bool:
    """Whether this Triton version (as `triton.__version__` spells it) is the one the kernels are
    written for."""
    parts = triton_version.split(".")
    try:
        return (int(parts[0]), int(parts[1])) == WRITTEN_FOR
    except (IndexError, ValueError):
        return False


def missing_gluon_reason() -> str:
    """Why the Gluon kernels are off on this machine (called once they are known to be off)."""
    try:
        import triton
    except ImportError:
        return "Triton is not installed"
    if not gluon_release_supported(triton.__version__):
        major, minor = WRITTEN_FOR
        return (
            f"the Gluon kernels are written for Triton {major}.{minor}'s Gluon API; "
            f"this is Triton {triton.__version__}"
        )
    return "this Triton has no Gluon Hopper API"
