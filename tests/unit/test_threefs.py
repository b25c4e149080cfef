"""3FS planning without a cluster: configuration, chain tables, admin output, replacement."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fireflyer.api.threefs import ThreeFSCluster, ThreeFSClusterSpec
from fireflyer.threefs import admin, replacement
from fireflyer.threefs.chaintable import ChainTableError, chain_id, plan_chain_table, target_id
from fireflyer.threefs.config import ConfigError, RenderInputs, key_paths, render_all, render_service

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "unit" / "golden"
REFERENCE = REPO.parent / "shared" / "reference" / "3fs-configs"
DOUBLE = REPO / "tests" / "doubles" / "admin_cli.py"
SAMPLE = yaml.safe_load((REPO / "manifests/samples/threefs-cluster.yaml").read_text())
SMALL = yaml.safe_load((REPO / "manifests/samples/small/threefs.yaml").read_text())


def _spec(doc: dict[str, Any] = SAMPLE) -> ThreeFSClusterSpec:
    return ThreeFSCluster.model_validate(doc).spec


def _inputs(**extra: Any) -> RenderInputs:
    return RenderInputs("threefs", ["10.0.0.1", "10.0.0.2", "10.0.0.3"], "10.96.0.10:10000", **extra)


def _reference_name(service: str, file: str) -> str:
    if file.startswith("app-"):
        return {
            "mgmtd": "mgmtd_main_app.toml",
            "meta": "meta_main_app.toml",
            "storage": "storage_main_app.toml",
        }[service]
    return file


def test_every_rendered_key_exists_in_3fs_templates() -> None:
    known = json.loads((GOLDEN / "threefs_template_keys.json").read_text())
    for spec in (_spec(), _spec(SMALL)):
        for service, files in render_all(spec, _inputs()).items():
            for file, text in files.items():
                reference = set(known[_reference_name(service, file)])
                unknown = key_paths(tomllib.loads(text)) - reference
                assert not unknown, f"{service}/{file} writes keys 3FS does not read: {sorted(unknown)}"


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="3FS reference templates are not beside this checkout")
def test_template_key_index_matches_the_reference() -> None:
    fresh = subprocess.run(
        [sys.executable, str(REPO / "hack/threefs/template_keys.py"), str(REFERENCE)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(fresh) == json.loads((GOLDEN / "threefs_template_keys.json").read_text())


def test_rendered_values() -> None:
    files = render_all(_spec(), _inputs(storage_node_ids={0: 10001, 1: 10007, 2: 10003, 3: 10004, 4: 10005}))
    storage = tomllib.loads(files["storage"]["storage_main.toml"])
    assert storage["server"]["mgmtd"]["mgmtd_server_addresses"] == [
        "RDMA://10.0.0.1:8000",
        "RDMA://10.0.0.2:8000",
        "RDMA://10.0.0.3:8000",
    ]
    assert storage["server"]["targets"]["target_paths"][:2] == ["/storage/data0", "/storage/data1"]
    assert len(storage["server"]["targets"]["target_paths"]) == 16
    assert (
        storage["common"]["monitor"]["reporters"][0]["monitor_collector"]["remote_ip"] == "10.96.0.10:10000"
    )
    assert tomllib.loads(files["storage"]["app-1.toml"])["node_id"] == 10007
    assert tomllib.loads(files["mgmtd"]["app-2.toml"])["node_id"] == 3
    assert tomllib.loads(files["meta"]["app-0.toml"])["node_id"] == 100
    launcher = tomllib.loads(files["fuse"]["hf3fs_fuse_main_launcher.toml"])
    assert launcher["mountpoint"] == "/3fs/stage" and launcher["ib_devices"]["device_filter"] == [
        "mlx5_0",
        "mlx5_1",
    ]
    mgmtd = tomllib.loads(files["mgmtd"]["mgmtd_main_launcher.toml"])
    assert mgmtd["cluster_id"] == "threefs" and mgmtd["kv_engine"]["fdb"]["clusterFile"].endswith(
        "fdb.cluster"
    )
    ports = {
        tomllib.loads(files[s][f"{s}_main.toml"])["server"]["base"]["groups"][0]["listener"]["listen_port"]
        for s in ("mgmtd", "meta", "storage")
    }
    assert len(ports) == 3, "services sharing a host network need distinct ports"


def test_render_golden(tmp_path: Path) -> None:
    """`fireflyer threefs render` output for the sample, file by file."""
    sample = tmp_path / "cr.yaml"
    sample.write_text(yaml.safe_dump(SAMPLE))
    out = tmp_path / "out"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fireflyer.cli",
            "threefs",
            "render",
            "-f",
            str(sample),
            "--mgmtd-addresses",
            "10.0.0.1,10.0.0.2,10.0.0.3",
            "--monitor-address",
            "10.96.0.10:10000",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    golden = GOLDEN / "threefs-render"
    rendered = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.toml"))
    assert rendered == sorted(p.relative_to(golden).as_posix() for p in golden.rglob("*.toml"))
    for name in rendered:
        assert (out / name).read_text() == (golden / name).read_text(), name


def test_mgmtd_addresses_must_be_ipv4_literals() -> None:
    with pytest.raises(ConfigError, match="not an IP address"):
        render_service(_spec(), RenderInputs("x", ["mgmtd-0.svc"]), "storage")
    with pytest.raises(ConfigError, match="IPv6"):
        render_service(_spec(), RenderInputs("x", ["fd00::1"]), "meta")
    with pytest.raises(ConfigError, match="needs the mgmtd addresses"):
        render_service(_spec(), RenderInputs("x", []), "fuse")


# -- chain table -------------------------------------------------------------------------------


def test_id_formulas_match_3fs_data_placement_tool() -> None:
    assert target_id(10001, 0, 0) == 101000100101
    assert target_id(10003, 0, 31) == 101000300132
    assert target_id(10002, 4, 1) == 101000200502
    assert chain_id(0, 1) == 900100001
    assert chain_id(2, 48) == 900300048


layouts = st.tuples(st.integers(2, 14), st.integers(1, 3), st.integers(1, 8), st.integers(2, 5)).filter(
    lambda t: t[3] <= t[0] and (t[0] * t[2]) % t[3] == 0
)


@settings(max_examples=60, deadline=None)
@given(layouts)
def test_chain_table_properties(layout: tuple[int, int, int, int]) -> None:
    nodes, disks, per_disk, width = layout
    node_ids = list(range(10001, 10001 + nodes))
    table = plan_chain_table(node_ids, disks, per_disk, width)
    # Every target of every disk, exactly once.
    expected = {target_id(n, d, i) for n in node_ids for d in range(disks) for i in range(per_disk)}
    used = [t for c in table.chains for t in c.targets]
    assert sorted(used) == sorted(expected)
    node_of = {t.target_id: t for t in table.targets}
    for chain in table.chains:
        members = [node_of[t] for t in chain.targets]
        assert len({m.node_id for m in members}) == width, "a chain's targets are on distinct nodes"
        assert len({m.disk for m in members}) == 1 and all(m.chain_id == chain.chain_id for m in members)
    assert len({c.chain_id for c in table.chains}) == len(table.chains)
    # Recovery traffic spreads: no pair of nodes shares far more chains than the average.
    counts = table.pair_counts()
    average = len(table.chains) * math.comb(width, 2) / math.comb(nodes, 2)
    assert max(counts.values()) <= math.ceil(average) + 3
    assert min(counts.values()) >= math.floor(average) - 3
    assert plan_chain_table(node_ids, disks, per_disk, width) == table  # deterministic


def test_chain_table_balances_the_sample_exactly() -> None:
    table = plan_chain_table(list(range(10001, 10006)), 16, 6, 3)
    counts = table.pair_counts()
    assert len(table.chains) == 160 and set(counts.values()) == {48}


def test_chain_table_beats_round_robin() -> None:
    nodes, per_disk, width = 12, 4, 3
    table = plan_chain_table(list(range(nodes)), 1, per_disk, width)
    slots = [n for _ in range(per_disk) for n in range(nodes)]
    naive = [tuple(slots[i : i + width]) for i in range(0, len(slots), width)]
    naive_counts = {p: 0 for p in itertools.combinations(range(nodes), 2)}
    for group in naive:
        for p in itertools.combinations(sorted(group), 2):
            naive_counts[p] += 1
    spread = max(table.pair_counts().values()) - min(table.pair_counts().values())
    assert spread < max(naive_counts.values()) - min(naive_counts.values())


def test_chain_table_rejects_impossible_layouts() -> None:
    with pytest.raises(ChainTableError, match="at least 3 storage nodes"):
        plan_chain_table([1, 2], 1, 1, 3)
    with pytest.raises(ChainTableError, match="multiple of the chain width"):
        plan_chain_table([1, 2, 3, 4], 1, 1, 3)
    with pytest.raises(ChainTableError, match="1–99"):
        plan_chain_table([1, 2, 3], 1, 100, 3)


def test_chain_table_cli() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fireflyer.cli",
            "threefs",
            "chain-table",
            "--nodes",
            "5",
            "--disks",
            "2",
            "--targets-per-disk",
            "6",
            "--replication",
            "3",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    lines = run.stdout.splitlines()
    creates = [line for line in lines if line.startswith("create-target ")]
    assert len(creates) == 5 * 2 * 6
    assert "ChainId,TargetId,TargetId,TargetId" in lines
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "fireflyer.cli",
            "threefs",
            "chain-table",
            "--nodes",
            "2",
            "--disks",
            "1",
            "--targets-per-disk",
            "1",
            "--replication",
            "3",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "at least 3 storage nodes" in bad.stderr


# -- admin_cli output, through the contract double ----------------------------------------------


def _double(state: Path, root: Path, *commands: str, token: str = "") -> str:
    (root / "admin.toml").write_text("cluster_id = 'x'\n")
    outputs = []
    for command in commands:
        run = subprocess.run(
            [
                sys.executable,
                str(DOUBLE),
                "-cfg",
                "/admin.toml",
                "--root",
                str(root),
                "--state",
                str(state),
                "--config.user_info.token",
                token,
                command,
            ],
            capture_output=True,
            text=True,
        )
        if run.returncode:
            raise AssertionError(f"{command}: {run.stderr}")
        outputs.append(f"{admin.COMMAND_MARK}{command}\n{run.stdout}")
    return "".join(outputs)


def _bootstrapped_double(tmp_path: Path) -> tuple[Path, Path, str, Any]:
    sys.path.insert(0, str(DOUBLE.parent))
    import admin_cli as double

    state, root = tmp_path / "state.json", tmp_path
    (root / "mgmtd.toml").write_text("[common]\n")
    _double(state, root, "init-cluster --mgmtd /mgmtd.toml 1 1048576 4")
    token = admin.parse_token(_double(state, root, "user-add --root --admin 0 root"))
    double.set_storage_nodes(state, {10001: True, 10002: True, 10003: True, 10004: True})
    table = plan_chain_table([10001, 10002, 10003], 1, 2, 3)
    (root / "chains.csv").write_text(table.chains_csv())
    (root / "table.csv").write_text(table.chain_table_csv())
    _double(
        state,
        root,
        *table.create_target_commands(),
        "upload-chains /chains.csv",
        "upload-chain-table --desc stage 1 /table.csv",
        token=token,
    )
    return state, root, token, double


def test_parsers_read_what_admin_cli_prints(tmp_path: Path) -> None:
    state, root, _token, _ = _bootstrapped_double(tmp_path)
    health = admin.parse_health(_double(state, root, "list-chains", "list-targets"))
    assert health.chain_counts() == {"total": 2, "serving": 2, "degraded": 0}
    assert health.target_counts() == {"serving": 6}
    assert {t.node_id for t in health.targets} == {10001, 10002, 10003}
    assert health.all_serving()
    with pytest.raises(admin.AdminOutputError):
        admin.parse_health("$ list-chains\ngarbage\n")
    with pytest.raises(admin.AdminOutputError, match="Token"):
        admin.parse_token("Uid 0\nName root\n")


def test_replacement_commands_keep_every_chain_serving(tmp_path: Path) -> None:
    state, root, token, double = _bootstrapped_double(tmp_path)
    double.set_storage_nodes(state, {10002: False})
    health = admin.parse_health(_double(state, root, "list-chains", "list-targets"))
    assert health.target_counts() == {"offline": 2, "serving": 4}
    removed = replacement.targets_to_remove(health, 10002)
    assert len(removed) == 2
    _double(state, root, *replacement.remove_step(1, 10002, removed, health).commands, token=token)
    _double(state, root, *replacement.add_step(1, removed, 10004).commands, token=token)
    for _ in range(3):
        health = admin.parse_health(_double(state, root, "list-chains", "list-targets"))
    assert health.all_serving()
    assert {t.node_id for t in health.targets} == {10001, 10003, 10004}
    _double(state, root, *replacement.unregister_step(1, 10002).commands, token=token)
    assert "10002" not in json.loads(state.read_text())["nodes"]


def test_a_storage_node_back_from_an_outage_resyncs_its_targets(tmp_path: Path) -> None:
    """A node that was NotReady for a while (no replacement yet) comes back: its targets wait,
    sync and serve again, as 3FS's state-transition table has it, without any admin command."""
    state, root, _token, double = _bootstrapped_double(tmp_path)
    double.set_storage_nodes(state, {10002: False})
    health = admin.parse_health(_double(state, root, "list-chains", "list-targets"))
    assert health.target_counts() == {"offline": 2, "serving": 4} and not health.all_serving()
    double.set_storage_nodes(state, {10001: True, 10002: True, 10003: True})
    states = [admin.parse_health(_double(state, root, "list-chains", "list-targets")) for _ in range(3)]
    assert states[-1].all_serving()
    assert states[-1].target_counts() == {"serving": 6}


def test_replacement_refuses_to_remove_a_last_serving_target(tmp_path: Path) -> None:
    state, root, _token, double = _bootstrapped_double(tmp_path)
    double.set_storage_nodes(state, {10001: False, 10003: False})
    health = admin.parse_health(_double(state, root, "list-chains", "list-targets"))
    with pytest.raises(replacement.ReplacementBlocked, match="no serving target besides node 10002"):
        replacement.targets_to_remove(health, 10002)


def test_double_validates_like_admin_cli(tmp_path: Path) -> None:
    state, root, token, _ = _bootstrapped_double(tmp_path)
    with pytest.raises(AssertionError, match="already initialized"):
        _double(state, root, "init-cluster --mgmtd /mgmtd.toml 1 1048576 4")
    with pytest.raises(AssertionError, match="authentication failed"):
        _double(state, root, "unregister-node 10002 STORAGE", token="wrong")
    with pytest.raises(AssertionError, match="required"):
        _double(state, root, "create-target --node-id 10001", token=token)
