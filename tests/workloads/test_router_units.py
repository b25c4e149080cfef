"""`fireflyer router` and what tells it its units: the backends file the operator's ConfigMap
becomes, (prefill, decode) pairs within one revision and the header that names the prefill unit,
the command line the operator renders, and the router in front of a real `fireflyer serve`
process on the tiny model."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from fireflyer.api.inference import InferenceDeployment
from fireflyer.cli import build_parser
from fireflyer.operator.inference import children
from fireflyer.operator.inference.pairing import pairing_revision
from fireflyer.workloads.router.backends import read_backends_file
from fireflyer.workloads.serve.tokenizer import ServeTokenizer
from tests.ports import free_port
from tests.workloads.api_engine import anyio_backend as anyio_backend
from tests.workloads.api_engine import sse_events
from tests.workloads.api_engine import tokenizer as tokenizer
from tests.workloads.router_harness import (
    BACKEND,
    PREFILL,
    R,
    Unit,
    body,
    eventually,
    health,
    metrics,
    routing,
    sample,
    serving,
    without_ids,
    write_units,
)
from tests.workloads.serve_servers import REPO, Server, _die_with_parent, logs_on_failure
from tests.workloads.serve_servers import checkpoint as checkpoint

pytestmark = pytest.mark.anyio


# -- the backends file ---------------------------------------------------------------------------


async def test_backends_file_adds_and_removes_units_without_restart(
    tokenizer: ServeTokenizer, tmp_path: Path
) -> None:
    path = tmp_path / "units.json"
    async with serving(tokenizer, 3) as (a, b, c):
        write_units(path, json.dumps({"decode": [b.url]}))
        async with routing([a], backends_file=path) as client:

            async def units_are(*expected: Unit) -> bool:
                units = (await health(client)).get("units", [])
                return {u["url"] for u in units if u["healthy"]} == {e.url for e in expected}

            async def served(n: int) -> set[str]:
                rs = [await client.post("/v1/completions", json=body(f"request {i}")) for i in range(n)]
                assert all(r.status_code == 200 for r in rs)
                return {r.headers[BACKEND] for r in rs}

            await eventually(lambda: units_are(a, b))
            assert await served(4) == {a.url, b.url}

            write_units(path, json.dumps({"prefill": [c.url], "decode": []}))  # b leaves, c joins
            await eventually(lambda: units_are(a, c))
            before = b.requests
            # c is a prefill unit: a, the one decode unit left, answers and fetches the KV from c.
            assert await served(4) == {a.url} and b.requests == before
            assert [h.get(PREFILL) for h in a.posts[-4:]] == [c.url] * 4 and c.posts == []
            m = await metrics(client)
            assert sample(m, "backend_healthy", backend=c.url, role="prefill") == 1
            assert (R + "backend_healthy", frozenset({"backend": b.url, "role": "decode"}.items())) not in m

            write_units(path, '{"decode": [')  # half-written: the units read before stay
            await asyncio.sleep(0.3)
            assert await units_are(a, c)


# -- (prefill, decode) pairs ------------------------------------------------------------------------


def units_file(path: Path, **roles: list[tuple[Unit, str]]) -> None:
    write_units(
        path,
        json.dumps(
            {role: [{"url": u.url, "revision": rev} for u, rev in units] for role, units in roles.items()}
        ),
    )


async def test_a_request_reaches_the_decode_unit_naming_a_prefill_unit_of_its_revision(
    tokenizer: ServeTokenizer, tmp_path: Path
) -> None:
    path = tmp_path / "units.json"
    async with serving(tokenizer, 5) as (p_old, p_new, d_old, d_new, p_new2):
        units_file(path, prefill=[(p_old, "r1")], decode=[(d_old, "r1"), (d_new, "r2")])
        async with routing([], backends_file=path) as client:
            await eventually(lambda: _healthy_count(client, 3))

            async def send(n: int, stream: bool = False) -> list[httpx.Response]:
                rs = [
                    await client.post("/v1/completions", json=body(f"q {i}", stream=stream)) for i in range(n)
                ]
                assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
                return rs

            # d_new (r2) has no prefill unit of its revision yet: it computes whole, no header.
            rs = await send(4) + await send(2, stream=True)
            assert {r.headers[BACKEND] for r in rs} == {d_old.url, d_new.url}
            assert {h.get(PREFILL) for h in d_old.posts} == {p_old.url}
            assert d_new.posts and all(PREFILL not in h for h in d_new.posts)
            for r in rs:  # the answer names the prefill unit that was asked, if any
                assert r.headers.get(PREFILL) == (p_old.url if r.headers[BACKEND] == d_old.url else None)
            stream = next(r for r in rs[4:] if r.headers[BACKEND] == d_old.url)
            assert sse_events(stream.text)[-1] == "[DONE]"

            # A prefill unit of r2 joins through the file, without a restart: d_new pairs with it.
            units_file(
                path,
                prefill=[(p_old, "r1"), (p_new, "r2"), (p_new2, "r2")],
                decode=[(d_old, "r1"), (d_new, "r2")],
            )
            await eventually(lambda: _healthy_count(client, 5))
            seen = len(d_new.posts)
            await send(8)
            assert {h.get(PREFILL) for h in d_new.posts[seen:]} == {p_new.url, p_new2.url}

            # A client cannot name the prefill unit itself: the router's own choice replaces it.
            forged = {PREFILL: "http://169.254.169.254:80"}
            for _ in range(2):
                r = await client.post("/v1/completions", json=body("x"), headers=forged)
                assert r.status_code == 200 and r.headers[PREFILL] != forged[PREFILL]
            assert {h.get(PREFILL) for h in d_old.posts} == {p_old.url}  # never across revisions
            assert {h.get(PREFILL) for h in d_new.posts[seen:]} == {p_new.url, p_new2.url}

            # The prefill units are named, never sent to.
            assert p_old.posts == p_new.posts == p_new2.posts == []
            assert p_old.requests == p_new.requests == p_new2.requests == 0

            m = await metrics(client)
            paired = sample(m, "pairs_total", prefill=p_old.url, decode=d_old.url, outcome="ok")
            assert paired == len(d_old.posts) >= 4
            assert sample(m, "unpaired_total", reason="revision_mismatch") == 3  # d_new's first 3
            pairs_new = [
                sample(m, "pairs_total", prefill=p.url, decode=d_new.url, outcome="ok")
                for p in (p_new, p_new2)
            ]
            assert sum(pairs_new) == len(d_new.posts) - 3
            assert sample(m, "pairs_total", prefill=p_old.url, decode=d_new.url, outcome="ok") == 0
            assert all(sample(m, "in_flight_requests", backend=u.url) == 0 for u in (p_old, p_new, p_new2))

            # A rollout recreates d_old at its URL with r2: from then on it pairs with r2 only.
            units_file(path, prefill=[(p_old, "r1"), (p_new, "r2")], decode=[(d_old, "r2"), (d_new, "r2")])
            await eventually(lambda: _revision_is(client, d_old.url, "r2"))
            seen = len(d_old.posts)
            await send(4)
            assert {h.get(PREFILL) for h in d_old.posts[seen:]} == {p_new.url}


async def _healthy_count(client: httpx.AsyncClient, n: int) -> bool:
    return sum(u["healthy"] for u in (await health(client)).get("units", [])) == n


async def _revision_is(client: httpx.AsyncClient, url: str, revision: str) -> bool:
    return any(u["url"] == url and u["revision"] == revision for u in (await health(client))["units"])


async def test_a_prefill_unit_counts_a_request_as_its_load_until_the_answer_begins(
    tokenizer: ServeTokenizer,
) -> None:
    async with serving(tokenizer, 2) as (p, d), routing([d], "least-load", prefill=[p]) as client:
        d.engine.gate.clear()  # the answer does not begin
        task = asyncio.create_task(client.post("/v1/completions", json=body(stream=True)))
        await eventually(lambda: d.requests == 1)
        m = await metrics(client)
        assert sample(m, "in_flight_requests", backend=p.url) == 1
        assert sample(m, "in_flight_requests", backend=d.url) == 1
        d.engine.gate.set()
        r = await asyncio.wait_for(task, 10)
        assert r.status_code == 200 and r.headers[PREFILL] == p.url
        m = await metrics(client)
        assert sample(m, "in_flight_requests", backend=p.url) == 0
        assert sample(m, "in_flight_requests", backend=d.url) == 0


async def test_a_failed_decode_unit_is_retried_on_another_pair(tokenizer: ServeTokenizer) -> None:
    async with (
        serving(tokenizer, 3) as (p, dead, alive),
        routing([dead, alive], prefill=[p], health_interval=60) as client,
    ):
        await dead.running.stop()  # the router's last check said healthy
        for i in range(2):
            r = await client.post("/v1/completions", json=body(f"request {i}", stream=True))
            assert r.status_code == 200 and r.headers[BACKEND] == alive.url and r.headers[PREFILL] == p.url
        # The retry went to another decode unit with the same prefill unit named.
        assert [h[PREFILL] for h in alive.posts] == [p.url, p.url] and p.posts == []
        m = await metrics(client)
        assert sample(m, "retries_total", reason="unreachable") == 1
        assert sample(m, "pairs_total", prefill=p.url, decode=dead.url, outcome="unreachable") == 1
        assert sample(m, "pairs_total", prefill=p.url, decode=alive.url, outcome="ok") == 2
        assert sample(m, "backend_healthy", backend=p.url, role="prefill") == 1  # not blamed
        assert sample(m, "in_flight_requests", backend=p.url) == 0

    # Only prefill units are healthy: one computes the request whole, with no header.
    async with serving(tokenizer, 2) as (p, d), routing([d], prefill=[p]) as client:
        d.engine.healthy = False
        await eventually(lambda: _healthy_count(client, 1))
        r = await client.post("/v1/completions", json=body())
        assert r.status_code == 200 and r.headers[BACKEND] == p.url and PREFILL not in r.headers
        assert len(p.posts) == 1 and PREFILL not in p.posts[0]
        m = await metrics(client)
        assert sample(m, "unpaired_total", reason="no_decode_unit") == 1


# -- the command line and a real unit --------------------------------------------------------------


def test_the_operator_rendered_command_parses(tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO / "manifests/samples/small/inference.yaml").read_text())
    doc["metadata"] |= {"namespace": "default", "uid": "u-1"}
    spec = InferenceDeployment.model_validate(doc).spec
    hosts = {"prefill": ["p0.svc"], "decode": ["d0.svc", "d1.svc"]}
    deployment, units, _service = children.router(doc, spec, hosts)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["fireflyer"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "router" and args.policy == spec.router.policy
    assert args.port == children.ROUTER_PORT and args.health_interval == 2.0
    # The units come from the mounted ConfigMap, in the file format the router reads.
    mount = container["volumeMounts"][0]
    assert args.backends_file == f"{mount['mountPath']}/{children.ROUTER_BACKENDS_FILE}"
    assert (
        deployment["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == units["metadata"]["name"]
    )
    written = tmp_path / "backends.json"
    written.write_text(units["data"][children.ROUTER_BACKENDS_FILE])
    rev = pairing_revision(spec)
    assert sorted(read_backends_file(written)) == [
        ("http://d0.svc:30000", "decode", rev, False),
        ("http://d1.svc:30000", "decode", rev, False),
        ("http://p0.svc:30000", "prefill", rev, False),
    ]
    assert json.loads(units["data"][children.ROUTER_BACKENDS_FILE])["prefill"] == [
        {"url": "http://p0.svc:30000", "revision": rev}
    ]
    # A scaled role changes the file, not the pod template: the router is not restarted.
    more = children.router(doc, spec, {**hosts, "decode": [*hosts["decode"], "d2.svc"]})
    assert more[0] == deployment and more[1]["data"] != units["data"]
    # A unit whose pods still run an older spec is listed with that spec's pairing revision: the
    # router never pairs it with a unit of the new one.
    rolling = children.router(doc, spec, hosts, unit_revisions={"d1.svc": "0ld"})
    written.write_text(rolling[1]["data"][children.ROUTER_BACKENDS_FILE])
    assert sorted(read_backends_file(written))[1] == ("http://d1.svc:30000", "decode", "0ld", False)
    assert rolling[0] == deployment


def test_router_in_front_of_a_real_serve_process(checkpoint: Path, tmp_path: Path) -> None:
    unit = Server("unit", checkpoint, tmp_path, ["--dtype", "float32", "--num-kv-blocks", "64"])
    unit.start()
    port = free_port()
    cmd = [sys.executable, "-m", "fireflyer.cli", "router", "--decode", unit.url, "--port", str(port)]
    cmd += ["--host", "127.0.0.1", "--health-interval", "0.5"]
    log_path = tmp_path / "router.log"
    with log_path.open("wb") as log:
        router = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=_die_with_parent
        )
    try:
        with logs_on_failure(unit):
            unit.wait_ready()
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(timeout=60.0, trust_env=False) as c:
                deadline = time.monotonic() + 30
                while not _answers(c, url + "/health"):
                    assert router.poll() is None, log_path.read_text()
                    assert time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.1)
                request = {"prompt": [5, 6, 7, 8, 9], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
                routed = c.post(url + "/v1/completions", json=request)
                direct = c.post(unit.url + "/v1/completions", json=request)
                assert routed.status_code == 200, routed.text
                assert routed.headers[BACKEND] == unit.url
                assert without_ids(routed.json()) == without_ids(direct.json())
                stream = request | {"stream": True}
                routed_events = sse_events(c.post(url + "/v1/completions", json=stream).text)
                direct_events = sse_events(c.post(unit.url + "/v1/completions", json=stream).text)
                assert [without_ids(e) for e in routed_events] == [without_ids(e) for e in direct_events]
                chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
                routed = c.post(url + "/v1/chat/completions", json=chat)
                direct = c.post(unit.url + "/v1/chat/completions", json=chat)
                assert routed.status_code == 200 and without_ids(routed.json()) == without_ids(direct.json())
                assert c.get(url + "/v1/models").json() == c.get(unit.url + "/v1/models").json()
                text = c.get(url + "/metrics").text
                assert f'{R}requests_total{{backend="{unit.url}",outcome="ok"}} 3.0' in text

                unit.stop()  # the unit goes: the router says so within a health interval
                deadline = time.monotonic() + 10
                while c.get(url + "/health").status_code != 503:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
    finally:
        router.terminate()
        router.wait(timeout=20)
        unit.stop()


def _answers(c: httpx.Client, url: str) -> bool:
    try:
        return c.get(url).status_code == 200
    except httpx.HTTPError:
        return False
