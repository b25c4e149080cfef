"""The router's side of a scale-in: a unit listed `"draining": true` in the backends file gets no
new request, while a stream already open on it runs to its end; /health shows each unit's
in-flight count and drain (the operator reads them there), also when no unit can take requests."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from fireflyer.workloads.router.backends import Listed, read_backends_file
from fireflyer.workloads.serve.tokenizer import ServeTokenizer
from tests.workloads.api_engine import anyio_backend as anyio_backend
from tests.workloads.api_engine import sse_events
from tests.workloads.api_engine import tokenizer as tokenizer
from tests.workloads.router_harness import (
    BACKEND,
    Unit,
    body,
    eventually,
    health,
    routing,
    serving,
    write_units,
)

pytestmark = pytest.mark.anyio


def test_the_backends_file_marks_draining_units_and_stays_compatible(tmp_path: Path) -> None:
    path = tmp_path / "units.json"
    path.write_text(
        json.dumps(
            {
                "decode": [
                    "http://a:30000",
                    {"url": "http://b:30000", "revision": "r1"},
                    {"url": "http://c:30000", "revision": "r1", "draining": True},
                ]
            }
        )
    )
    assert read_backends_file(path) == [
        Listed("http://a:30000", "decode"),
        Listed("http://b:30000", "decode", "r1"),
        Listed("http://c:30000", "decode", "r1", draining=True),
    ]
    path.write_text(json.dumps({"decode": [{"url": "http://c:30000", "draining": "yes"}]}))
    with pytest.raises(ValueError, match="draining"):
        read_backends_file(path)


async def _unit(client: httpx.AsyncClient, unit: Unit) -> dict[str, object]:
    return next(u for u in (await health(client))["units"] if u["url"] == unit.url)


async def test_a_draining_unit_gets_no_new_request_and_its_open_stream_completes(
    tokenizer: ServeTokenizer, tmp_path: Path
) -> None:
    path = tmp_path / "units.json"
    async with serving(tokenizer, 2) as (staying, leaving):
        write_units(path, json.dumps({"decode": [leaving.url]}))
        async with routing([], backends_file=path) as client:
            await eventually(lambda: _healthy(client, leaving))
            leaving.engine.delay = 0.01
            tokens = 24
            async with client.stream(
                "POST", "/v1/completions", json=body("a long answer", stream=True, max_tokens=tokens)
            ) as stream:
                assert stream.headers[BACKEND] == leaving.url
                lines = stream.aiter_lines()
                first = await anext(lines)
                leaving.engine.gate.clear()  # the rest of the answer waits until the drain is seen
                unit = await _unit(client, leaving)
                assert unit["in_flight"] == 1 and unit["draining"] is False

                # The operator lists `leaving` as draining, beside the unit that stays.
                write_units(
                    path, json.dumps({"decode": [staying.url, {"url": leaving.url, "draining": True}]})
                )
                await eventually(lambda: _drain_seen(client, staying, leaving))
                before = leaving.requests
                for i in range(6):
                    r = await client.post("/v1/completions", json=body(f"new request {i}"))
                    assert r.status_code == 200 and r.headers[BACKEND] == staying.url
                assert leaving.requests == before

                leaving.engine.gate.set()
                rest = [line async for line in lines]
            events = sse_events("\n".join([first, *rest]) + "\n")
            assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
            assert events[-2]["choices"][0]["finish_reason"] == "length"
            # Every token: the same request answered whole (by the unit that stays) says the same.
            whole = await client.post("/v1/completions", json=body("a long answer", max_tokens=tokens))
            assert whole.headers[BACKEND] == staying.url
            streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
            assert streamed == whole.json()["choices"][0]["text"] and streamed
            await eventually(lambda: _in_flight(client, leaving, 0))


async def test_health_lists_units_when_only_draining_units_are_left(
    tokenizer: ServeTokenizer, tmp_path: Path
) -> None:
    path = tmp_path / "units.json"
    async with serving(tokenizer, 1) as (leaving,):
        write_units(path, json.dumps({"decode": [{"url": leaving.url, "draining": True}]}))
        async with routing([], backends_file=path) as client:
            await eventually(lambda: _healthy(client, leaving))
            r = await client.get("/health")
            assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_backend"
            assert "draining" in r.json()["error"]["message"]
            assert r.json()["units"][0] | {"healthy": True} == r.json()["units"][0]
            assert (r.json()["units"][0]["draining"], r.json()["units"][0]["in_flight"]) == (True, 0)
            r = await client.post("/v1/completions", json=body())
            assert r.status_code == 503 and leaving.requests == 0

            write_units(path, json.dumps({"decode": [leaving.url]}))  # the drain is cancelled
            await eventually(lambda: _status(client, 200))
            r = await client.post("/v1/completions", json=body())
            assert r.status_code == 200 and r.headers[BACKEND] == leaving.url


async def _healthy(client: httpx.AsyncClient, unit: Unit) -> bool:
    units = (await client.get("/health")).json().get("units", [])
    return any(u["url"] == unit.url and u["healthy"] for u in units)


async def _drain_seen(client: httpx.AsyncClient, staying: Unit, leaving: Unit) -> bool:
    units = {u["url"]: u for u in (await health(client)).get("units", [])}
    return (
        staying.url in units
        and units[staying.url]["healthy"]
        and units.get(leaving.url, {}).get("draining") is True
        and units[leaving.url]["in_flight"] == 1
    )


async def _in_flight(client: httpx.AsyncClient, unit: Unit, n: int) -> bool:
    return (await _unit(client, unit))["in_flight"] == n


async def _status(client: httpx.AsyncClient, status: int) -> bool:
    await asyncio.sleep(0)
    return (await client.get("/health")).status_code == status
