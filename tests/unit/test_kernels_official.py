"""Whether an official library may be measured: the child-process probe, version rules and the
autotune table's key (CPU only)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from fireflyer.kernels import autotune, official  # noqa: E402


def test_a_probe_that_succeeds_reports_nothing() -> None:
    assert official.probe_failure("print('ok')") is None


def test_a_probe_that_raises_reports_its_last_line() -> None:
    why = official.probe_failure("raise RuntimeError('no kernels for this arch')")
    assert why == "RuntimeError: no kernels for this arch"


def test_a_library_that_crashes_is_reported_not_fatal() -> None:
    # a null read kills the child with SIGSEGV, as a broken native extension does
    why = official.probe_failure("import ctypes\nctypes.string_at(0)")
    assert why == "crashed at its first call (SIGSEGV)"


def test_a_probe_that_hangs_is_stopped() -> None:
    why = official.probe_failure("import time\ntime.sleep(30)", timeout=0.5)
    assert why is not None and "did not finish" in why


@pytest.mark.parametrize(
    "module,version,distribution,excluded",
    [
        ("flash_mla", "1.0.0", "deepinfer-flashmla", True),
        ("flash_mla", "1.2", None, True),
        ("flash_mla", "0.9.1", "flash-mla", False),
        ("flash_mla", "unknown", None, False),
        # The SGLang fork keeps the Hopper dense decode in its legacy extension.
        ("flash_mla", "1.0.0", "sgl-flash-mla", False),
        ("flash_mla", "1.0.0", "sgl_flash_mla", False),
        ("deep_gemm", "2.8.2", "deepinfer-gemm", False),
    ],
)
def test_flashmla_from_1_0_cannot_run_our_decode_unless_it_keeps_the_legacy_kernels(
    module: str, version: str, distribution: str | None, excluded: bool
) -> None:
    why = official.version_failure(module, version, distribution)
    assert (why is not None) == excluded
    if excluded:
        assert "dense paged decode" in str(why) and "sgl-flash-mla" in str(why)


def test_nothing_official_runs_without_cuda() -> None:
    for module in official.MODULES:
        assert official.unavailable(module, torch.device("cpu")) == f"{module} needs a CUDA device"
    assert autotune._available("gemm", "official", torch.device("cpu")) == "deep_gemm needs a CUDA device"


def test_a_module_without_a_distribution_has_no_version() -> None:
    assert official.installed_version("no_such_module_for_fireflyer") is None


def test_the_table_key_changes_when_a_library_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    monkeypatch.setattr(official, "installed_version", lambda module: None)
    bare = autotune._device_key.__wrapped__(0)
    monkeypatch.setattr(official, "installed_version", lambda m: "2.8.2" if m == "deep_gemm" else None)
    with_deepgemm = autotune._device_key.__wrapped__(0)
    assert bare != with_deepgemm and with_deepgemm.endswith(f"-deep_gemm2.8.2-m{autotune.METHOD}")
    assert bare.startswith("NVIDIA_H200-sm90-torch")
    monkeypatch.setattr(autotune, "METHOD", autotune.METHOD + 1)
    assert autotune._device_key.__wrapped__(0) != with_deepgemm  # a new measuring method measures again


def test_auto_asks_the_installed_libraries_once_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # `resolve` runs per GEMM and decode call; reading package metadata takes hundreds of ms.
    from fireflyer.kernels import backend

    reads: list[str] = []
    probes: list[str] = []

    def packages_distributions() -> dict[str, list[str]]:
        reads.append("read")
        return {}

    def probe(module: str) -> None:
        probes.append(module)

    monkeypatch.setattr(official.importlib.metadata, "packages_distributions", packages_distributions)
    monkeypatch.setattr(official.importlib.util, "find_spec", lambda module: object())
    monkeypatch.setattr(official, "_probe", probe)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    monkeypatch.setattr(backend, "has_module", lambda module: module == "deep_gemm")
    monkeypatch.setenv("FIREFLYER_KERNEL_AUTOTUNE", "0")
    official.installed_version.cache_clear()
    official._unavailable_on_cuda.cache_clear()
    try:
        for _ in range(3):
            assert backend.resolve("auto", "gemm", torch.device("cuda", 0), rows=128) == "official"
        assert reads == ["read"] and probes == ["deep_gemm"]
        backend.resolve("auto", "gemm", torch.device("cuda", 1), rows=128)
        assert probes == ["deep_gemm", "deep_gemm"]  # another device is asked on its own
    finally:
        official.installed_version.cache_clear()
        official._unavailable_on_cuda.cache_clear()
