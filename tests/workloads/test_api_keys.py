"""API keys on the OpenAI APIs: the key file (parsing, re-reading, what an unreadable or emptied
file does), `fireflyer serve`'s API and `fireflyer router` asking for a key on every route but
health and metrics, the router and a decode unit authenticating to the units behind them with
their own key, and a rotated key taking effect without a restart."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp

from fireflyer.cli import build_parser
from fireflyer.errors import FireflyerError
from fireflyer.workloads import api_keys
from fireflyer.workloads.api_keys import KeyFile, RequireApiKey, bearer_token, matches, parse_keys
from fireflyer.workloads.router.app import RouterConfig, create_app
from fireflyer.workloads.router.server import config_from_args
from fireflyer.workloads.serve import server as serve_server
from fireflyer.workloads.serve.api import OPEN_PATHS as UNIT_OPEN_PATHS
from fireflyer.workloads.serve.api import create_app as create_serve_app
from fireflyer.workloads.serve.handoff import DecodeFetcher
from fireflyer.workloads.serve.kv_transfer import TcpKVReceiver
from fireflyer.workloads.serve.tokenizer import ServeTokenizer
from tests.workloads.api_engine import MODEL, FakeEngine
from tests.workloads.api_engine import anyio_backend as anyio_backend
from tests.workloads.api_engine import tokenizer as tokenizer
from tests.workloads.router_harness import Running, body, eventually, routing, serving

ROUTER_KEY, CLIENT_KEY = "sk-router-0123456789", "sk-client-abcdefghij"


def write_keys(path: Path, text: str) -> Path:
    """Replace the file the way a Secret volume does: a new file renamed over the old one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def assert_401(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    error: dict[str, Any] = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert error["param"] is None and error["message"]
    return error


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def healthy(client: httpx.AsyncClient) -> bool:
    return (await client.get("/health")).status_code == 200


# -- the key file --------------------------------------------------------------------------------


def test_a_key_file_holds_one_key_per_line() -> None:
    text = "# rotated 2025-06\n  sk-one  \n\nsk-two\n# sk-retired\nsk-one\n"
    assert parse_keys(text) == ("sk-one", "sk-two")
    assert parse_keys("\n# nothing\n") == ()


def test_only_a_bearer_token_is_a_key() -> None:
    assert bearer_token("Bearer sk-1") == "sk-1"
    assert bearer_token("bearer   sk-1 ") == "sk-1"
    assert bearer_token("Basic c2stMQ==") is None
    assert bearer_token("Bearer") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None
    assert bearer_token("sk-1") is None


def test_a_key_matches_only_whole() -> None:
    keys = ("sk-one", "sk-two")
    assert matches("sk-two", keys)
    assert not matches("sk-tw", keys)
    assert not matches("sk-two2", keys)
    assert not matches("", keys)
    assert not matches(None, keys)
    assert not matches("sk-one", ())


def test_a_missing_or_empty_key_file_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(FireflyerError, match="No such file"):
        KeyFile(tmp_path / "absent")
    with pytest.raises(FireflyerError, match="holds no key"):
        KeyFile(write_keys(tmp_path / "keys", "# none yet\n"))


def test_the_key_file_is_re_read_when_it_changes(tmp_path: Path) -> None:
    clock = Clock()
    path = write_keys(tmp_path / "keys", "sk-old\n")
    keys = KeyFile(path, recheck_seconds=1.0, clock=clock)
    assert keys.accepts("Bearer sk-old") and keys.authorization() == {"authorization": "Bearer sk-old"}
    write_keys(path, "sk-old\nsk-new\n")  # a new key appended
    assert not keys.accepts("Bearer sk-new")  # not looked at again within a second
    clock.now = 1.0
    assert keys.accepts("Bearer sk-new") and keys.accepts("Bearer sk-old")
    write_keys(path, "sk-new\n")  # the old one removed
    clock.now = 2.0
    assert not keys.accepts("Bearer sk-old")
    assert keys.authorization() == {"authorization": "Bearer sk-new"}


def test_an_unreadable_key_file_keeps_the_keys_and_an_emptied_one_accepts_none(tmp_path: Path) -> None:
    clock = Clock()
    path = write_keys(tmp_path / "keys", "sk-1\n")
    keys = KeyFile(path, clock=clock)
    path.unlink()
    clock.now = 5.0
    assert keys.accepts("Bearer sk-1")
    write_keys(path, "# every key revoked\n")
    clock.now = 10.0
    assert not keys.accepts("Bearer sk-1")
    assert keys.authorization() == {}


def test_the_flags_and_the_environment_name_the_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_keys(tmp_path / "keys", "sk-1\n")
    parser = build_parser()
    router = parser.parse_args(["router", "--api-key-file", str(path)])
    assert config_from_args(router).api_key_file == path
    assert config_from_args(parser.parse_args(["router"])).api_key_file is None
    serve = parser.parse_args(["serve", "--model", str(tmp_path)])
    assert serve_server.api_keys(serve) is None
    monkeypatch.setenv(api_keys.ENV, str(path))  # how the operator names it to the units
    keys = serve_server.api_keys(serve)
    assert keys is not None and keys.path == path
    monkeypatch.setenv(api_keys.ENV, str(tmp_path / "absent"))
    with pytest.raises(FireflyerError, match="absent"):
        serve_server.api_keys(serve)


# -- fireflyer serve -----------------------------------------------------------------------------


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return write_keys(tmp_path / "api-keys", f"{ROUTER_KEY}\n{CLIENT_KEY}\n")


@contextlib.asynccontextmanager
async def unit_client(app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://unit") as client:
        yield client


PROTECTED: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}),
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{MODEL}", None),
    ("POST", "/v1/kv/prefill", {"prompt_token_ids": [1, 2, 3], "transfer": {}, "blocks": 0}),
    ("GET", "/v1/no-such-route", None),  # unknown routes are not a way to probe without a key
]


@pytest.mark.anyio
async def test_the_engine_api_asks_every_request_for_a_key(tokenizer: ServeTokenizer, key_path: Path) -> None:
    engine = FakeEngine(tokenizer)
    app = create_serve_app(engine, api_keys=KeyFile(key_path))
    async with unit_client(app) as client:
        for method, path, payload in PROTECTED:
            assert (
                "You didn't provide"
                in assert_401(await client.request(method, path, json=payload))["message"]
            )
            wrong = await client.request(method, path, json=payload, headers=bearer("sk-wrong"))
            assert ROUTER_KEY not in wrong.text and "sk-wrong" not in wrong.text  # no key echoed
            assert assert_401(wrong)["message"] == "Incorrect API key provided."
            basic = await client.request(method, path, json=payload, headers={"Authorization": CLIENT_KEY})
            assert_401(basic)
        assert engine.streams == []  # nothing reached the engine
        ok = await client.post("/v1/completions", json=PROTECTED[0][2], headers=bearer(CLIENT_KEY))
        assert ok.status_code == 200, ok.text
        models = await client.get("/v1/models", headers=bearer(ROUTER_KEY))
        assert models.status_code == 200 and models.json()["data"][0]["id"] == MODEL
        # Open: probes, scrapes, and the load window the operator's EPLB controller reads.
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        load = await client.get("/v1/eplb/load")
        assert load.status_code == 404 and load.json()["error"]["code"] == "no_moe_layers"
        assert set(UNIT_OPEN_PATHS) == {"/health", "/metrics", "/v1/eplb/load"}


@pytest.mark.anyio
async def test_the_engine_takes_a_rotated_key_without_a_restart(
    tokenizer: ServeTokenizer, tmp_path: Path
) -> None:
    clock = Clock()
    path = write_keys(tmp_path / "api-keys", "sk-first\n")
    app = create_serve_app(FakeEngine(tokenizer), api_keys=KeyFile(path, clock=clock))
    async with unit_client(app) as client:
        assert (await client.get("/v1/models", headers=bearer("sk-first"))).status_code == 200
        write_keys(path, "sk-second\n")
        clock.now = 60.0
        assert_401(await client.get("/v1/models", headers=bearer("sk-first")))
        assert (await client.get("/v1/models", headers=bearer("sk-second"))).status_code == 200


@pytest.mark.anyio
async def test_a_decode_unit_sends_its_key_to_the_prefill_unit(
    tokenizer: ServeTokenizer, key_path: Path
) -> None:
    prefill_engine = FakeEngine(tokenizer)
    app = create_serve_app(prefill_engine, api_keys=KeyFile(key_path))
    prefill = await Running(app).start()
    prompt = list(range(1, 140))  # two full blocks to hand over
    try:
        for auth, answered in ((None, "answered 401"), (KeyFile(key_path).authorization, None)):
            receiver = TcpKVReceiver("127.0.0.1", 0, default_timeout=5.0, io_timeout=5.0)
            fetcher = DecodeFetcher(receiver, "tiny", timeout=0.5, auth=auth)
            try:
                result = await fetcher.fetch(prompt, prefill.url)
            finally:
                await fetcher.close()
            assert result.failure is not None  # a scripted engine sends no blocks either way
            if answered:
                assert answered in result.failure and prefill_engine.streams == []
            else:
                assert "401" not in result.failure, result.failure
                assert [s.prompt_ids for s in prefill_engine.streams] == [prompt]  # the prefill ran
    finally:
        await prefill.stop()


# -- fireflyer router ----------------------------------------------------------------------------


def keyed(path: Path) -> Callable[[ASGIApp], ASGIApp]:
    """A unit asking for the keys of `path`, as `fireflyer serve --api-key-file` does."""
    return lambda app: RequireApiKey(app, KeyFile(path), UNIT_OPEN_PATHS)


@pytest.mark.anyio
async def test_the_router_asks_clients_for_a_key_and_sends_its_own_to_the_units(
    tokenizer: ServeTokenizer, key_path: Path
) -> None:
    async with (
        serving(tokenizer, 1, wrap=keyed(key_path)) as [unit],
        routing([unit], api_key_file=key_path) as client,
    ):
        await eventually(lambda: healthy(client), timeout=10)  # /health needs no key
        for method, path, payload in (
            ("POST", "/v1/completions", body()),
            (
                "POST",
                "/v1/chat/completions",
                {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
            ),
            ("GET", "/v1/models", None),
            ("GET", f"/v1/models/{MODEL}", None),
        ):
            assert_401(await client.request(method, path, json=payload))
            assert_401(await client.request(method, path, json=payload, headers=bearer("sk-guess")))
        assert unit.posts == [] and unit.requests == 0
        ok = await client.post("/v1/completions", json=body(), headers=bearer(CLIENT_KEY))
        assert ok.status_code == 200, ok.text
        # The unit got the router's key (the file's first), never the client's.
        assert unit.posts[-1]["authorization"] == f"Bearer {ROUTER_KEY}"
        models = await client.get("/v1/models", headers=bearer(CLIENT_KEY))
        assert models.status_code == 200 and models.json()["data"][0]["id"] == MODEL
        assert (await client.get("/metrics")).status_code == 200


@pytest.mark.anyio
async def test_without_a_key_file_the_router_asks_for_none_and_passes_the_clients_header_on(
    tokenizer: ServeTokenizer,
) -> None:
    async with serving(tokenizer, 1) as [unit], routing([unit]) as client:
        await eventually(lambda: healthy(client), timeout=10)
        assert (await client.post("/v1/completions", json=body())).status_code == 200
        r = await client.post("/v1/completions", json=body(), headers=bearer(CLIENT_KEY))
        assert r.status_code == 200 and unit.posts[-1]["authorization"] == f"Bearer {CLIENT_KEY}"


@pytest.mark.anyio
async def test_the_router_takes_a_rotated_key_without_a_restart(
    tokenizer: ServeTokenizer, tmp_path: Path
) -> None:
    path = write_keys(tmp_path / "api-keys", "sk-first\n")
    async with (
        serving(tokenizer, 1, wrap=keyed(path)) as [unit],
        routing([unit], api_key_file=path) as client,
    ):
        await eventually(lambda: healthy(client), timeout=10)
        assert (
            await client.post("/v1/completions", json=body(), headers=bearer("sk-first"))
        ).status_code == 200
        write_keys(path, "sk-first\nsk-second\n")  # step 1: the new key appended

        async def second_accepted() -> bool:
            r = await client.post("/v1/completions", json=body(), headers=bearer("sk-second"))
            return r.status_code == 200

        await eventually(second_accepted, timeout=5)
        write_keys(path, "sk-second\n")  # step 2: the old key removed

        async def first_refused() -> bool:
            r = await client.post("/v1/completions", json=body(), headers=bearer("sk-first"))
            return r.status_code == 401

        await eventually(first_refused, timeout=5)
        r = await client.post("/v1/completions", json=body(), headers=bearer("sk-second"))
        assert r.status_code == 200, r.text  # the unit, re-reading the same file, takes the new first key
        assert unit.posts[-1]["authorization"] == "Bearer sk-second"


def test_a_router_with_an_unreadable_key_file_does_not_start(tmp_path: Path) -> None:
    with pytest.raises(FireflyerError, match="api-key-file"):
        create_app(RouterConfig(api_key_file=tmp_path / "absent"))
