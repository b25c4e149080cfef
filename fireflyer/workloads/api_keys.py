"""API keys of the OpenAI APIs (`fireflyer router`, `fireflyer serve`): a file of accepted keys,
re-read when it changes, and the ASGI middleware that asks every request for one.

The file holds one key per line; blank lines and lines starting with `#` are skipped, surrounding
spaces dropped. The operator mounts it from a Secret (data key `api-keys`), so rotating keys is
editing the Secret: the kubelet swaps the file and the next check reads the new one.

A request carries its key as `Authorization: Bearer KEY`. Keys are compared in constant time,
against every accepted key (no early exit), so neither the answer's timing nor its content says
how much of a key was right, or which key a near miss was close to. Paths in `open_paths` (health
and metrics: probes and scrapes carry no key) need none.

A process that calls another one behind the same file (the router its units, a decode unit a
prefill unit) sends the file's first key. Rotation without a failed request: append the new key,
move the clients to it, then remove the old key (the first one)."""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from fireflyer.errors import FireflyerError
from fireflyer.workloads.serve.protocol import ApiError

log = logging.getLogger("fireflyer.api_keys")

ENV = "FIREFLYER_API_KEY_FILE"
"""`--api-key-file`'s default, for pods whose command line is not ours to extend."""
RECHECK_SECONDS = 1.0
"""How often the file's identity is looked at: a stat per request would be wasted work."""


def parse_keys(text: str) -> tuple[str, ...]:
    """The keys a file's text holds, in order, each once."""
    keys: dict[str, None] = {}
    for line in text.splitlines():
        key = line.strip()
        if key and not key.startswith("#"):
            keys.setdefault(key, None)
    return tuple(keys)


def bearer_token(authorization: str | None) -> str | None:
    """KEY from `Bearer KEY` (the scheme in any case), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def matches(token: str | None, keys: Iterable[str]) -> bool:
    """Whether token is one of keys, compared in constant time with each of them."""
    if token is None:
        return False
    given = token.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode())
    return found


def invalid_api_key(token: str | None) -> ApiError:
    """OpenAI's 401; the message never repeats the key given."""
    if token is None:
        message = (
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    else:
        message = "Incorrect API key provided."
    return ApiError(401, message, type="invalid_request_error", code="invalid_api_key")


class KeyFile:
    """The accepted keys, from a file re-read when its modification time, size or inode changes
    (a Secret volume swaps a symlink, which changes the inode). A file that cannot be read keeps
    the keys read before; a file that reads with no key in it accepts none."""

    def __init__(
        self,
        path: Path,
        *,
        recheck_seconds: float = RECHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.recheck_seconds = recheck_seconds
        self._clock = clock
        self._checked = clock()
        try:
            self._stamp = self._identity()
            self._keys = parse_keys(path.read_text())
        except OSError as exc:
            raise FireflyerError(f"--api-key-file {path}: {exc.strerror or exc}") from exc
        if not self._keys:
            raise FireflyerError(f"--api-key-file {path} holds no key (one key per line)")
        self._unreadable = False

    def _identity(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def keys(self) -> tuple[str, ...]:
        now = self._clock()
        if now - self._checked >= self.recheck_seconds:
            self._checked = now
            self._reload()
        return self._keys

    def _reload(self) -> None:
        try:
            stamp = self._identity()
            if stamp == self._stamp:
                return
            keys = parse_keys(self.path.read_text())
        except OSError as exc:
            if not self._unreadable:
                log.warning("API key file %s: %s; keeping the keys read before", self.path, exc)
            self._unreadable = True
            return
        self._unreadable = False
        self._stamp = stamp
        if keys != self._keys:
            log.info("API key file %s: %d keys", self.path, len(keys))
            if not keys:
                log.warning("API key file %s holds no key: every request is refused", self.path)
        self._keys = keys

    def accepts(self, authorization: str | None) -> bool:
        return matches(bearer_token(authorization), self.keys())

    def authorization(self) -> dict[str, str]:
        """The header this process sends to another one behind the same keys: the first key."""
        keys = self.keys()
        return {"authorization": f"Bearer {keys[0]}"} if keys else {}


def flag_path(value: str | None) -> Path | None:
    """`--api-key-file`, falling back to $FIREFLYER_API_KEY_FILE; None when neither is set."""
    chosen = value or os.environ.get(ENV)
    return Path(chosen) if chosen else None


class RequireApiKey:
    """ASGI middleware: every HTTP request but those to `open_paths` needs an accepted key, else
    it gets OpenAI's 401 without reaching the app."""

    def __init__(self, app: ASGIApp, keys: KeyFile, open_paths: Iterable[str]) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        if self.keys.accepts(header):
            await self.app(scope, receive, send)
            return
        error = invalid_api_key(bearer_token(header))
        body = error.body().model_dump_json().encode()
        await send(
            {
                "type": "http.response.start",
                "status": error.status_code,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
