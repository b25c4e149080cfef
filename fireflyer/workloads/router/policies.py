"""Routing policies: pure functions from (the healthy backends, a request's key) to a route.

A route is a (prefill, decode) pair: the request goes to the decode unit, which fetches the
prompt's KV from the prefill unit the router names; or one unit that computes the request whole,
when no prefill unit can pair with it. `choose` is the one place that decides, and the proxy only
ever reads a `Route`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["prefill", "decode", "any"]
Policy = Literal["round-robin", "least-load", "cache-aware"]
POLICIES: tuple[Policy, ...] = ("round-robin", "least-load", "cache-aware")
DEFAULT_LOAD_CAP = 8
DEFAULT_PREFIX_CHARS = 256  # about one 64-token KV block of English text
CHARS_PER_TOKEN = 4  # token-id prompts: the key takes prefix_chars / 4 ids

# Ties go to decode units first: they are sized for many concurrent sequences, and a decode unit
# is where a request ends when prefill hands over.
_ROLE_RANK: dict[str, int] = {"decode": 0, "any": 1, "prefill": 2}

# Why a route has no prefill side (`Route.whole`).
NO_PREFILL_UNIT = "no_prefill_unit"  # no healthy prefill unit (or a one-role deployment)
NO_DECODE_UNIT = "no_decode_unit"  # only prefill units are healthy: one computes it whole
REVISION_MISMATCH = "revision_mismatch"  # prefill units are healthy, none of the decode's revision


@dataclass(frozen=True)
class Candidate:
    """What a policy knows of one healthy backend."""

    url: str
    role: Role
    in_flight: int  # requests this router has open on it (for a prefill unit: not yet prefilled)
    revision: str | None = None  # units pair only within one revision; None is a revision too


@dataclass(frozen=True)
class Route:
    """Where one request goes: to `unit`, which fetches the prompt's KV from `prefill`; or, with
    `prefill` None, to `unit` to compute whole, `whole` saying why."""

    unit: Candidate
    prefill: Candidate | None = None
    whole: str = ""


def pairs_with(prefill: Candidate, decode: Candidate) -> bool:
    """A decode unit can consume a prefill unit's KV only when both run the same revision (the
    same model, engine and kernels); an unknown revision pairs only with an unknown one."""
    return prefill.role == "prefill" and prefill.revision == decode.revision


def ordered(candidates: Sequence[Candidate]) -> list[Candidate]:
    """A stable order (decode units first, then by URL), so that choices do not depend on the
    order in which backends were learned."""
    return sorted(candidates, key=lambda c: (_ROLE_RANK[c.role], c.url))


def round_robin(candidates: Sequence[Candidate], turn: int) -> Candidate:
    pool = ordered(candidates)
    return pool[turn % len(pool)]


def least_load(candidates: Sequence[Candidate], turn: int = 0) -> Candidate:
    """Fewest requests in flight; among equals the best-ranked role, then in turn (so an idle
    router still spreads sequential requests)."""
    fewest = min(c.in_flight for c in candidates)
    tied = [c for c in ordered(candidates) if c.in_flight == fewest]
    best = min(_ROLE_RANK[c.role] for c in tied)
    tied = [c for c in tied if _ROLE_RANK[c.role] == best]
    return tied[turn % len(tied)]


def affinity_weight(key: str, url: str) -> int:
    """The rendezvous (highest-random-weight) score of `url` for `key`."""
    digest = hashlib.blake2b(f"{url}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def affine(candidates: Sequence[Candidate], key: str) -> Candidate:
    """The backend `key` belongs to. Rendezvous hashing: when a backend joins or leaves, only the
    keys it wins or held move, so the other units' prefix caches stay warm."""
    return max(candidates, key=lambda c: (affinity_weight(key, c.url), c.url))


def cache_aware(
    candidates: Sequence[Candidate], key: str, load_cap: int = DEFAULT_LOAD_CAP, turn: int = 0
) -> Candidate:
    """The affine backend of `key`, unless it has more than `load_cap` requests in flight beyond
    the least-loaded one: a hot prefix must not pile up on one unit while others idle."""
    lightest = least_load(candidates, turn)
    if not key:
        return lightest
    home = affine(candidates, key)
    if home.in_flight - lightest.in_flight > load_cap:
        return lightest
    return home


def pick(policy: Policy, candidates: Sequence[Candidate], key: str, turn: int, load_cap: int) -> Candidate:
    """One unit of a non-empty pool by `policy`."""
    if policy == "round-robin":
        return round_robin(candidates, turn)
    if policy == "least-load":
        return least_load(candidates, turn)
    if policy == "cache-aware":
        return cache_aware(candidates, key, load_cap, turn)
    raise ValueError(f"unknown routing policy {policy!r}")


def choose(
    policy: Policy,
    candidates: Sequence[Candidate],
    key: str = "",
    *,
    turn: int = 0,
    load_cap: int = DEFAULT_LOAD_CAP,
) -> Route | None:
    """The route of one request over the healthy `candidates` (all roles), None when there are none.

    The decode side is chosen first, by `policy` among the decode and role-less units: decode
    units hold the deployment's serving capacity, so their load must not depend on which prefill
    units are up. The prefill side is then chosen by the same policy among the prefill units of
    the decode unit's revision; cache-aware affinity matters most there, where the prompt's prefix
    cache is. With no such prefill unit (a one-role deployment, or a rollout that has not yet
    brought up a prefill unit of that revision) the decode unit computes the request whole; with
    no decode or role-less unit healthy, a prefill unit does.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown routing policy {policy!r}")
    if not candidates:
        return None
    decoders = [c for c in candidates if c.role != "prefill"]
    prefillers = [c for c in candidates if c.role == "prefill"]
    if not decoders:
        return Route(pick(policy, prefillers, key, turn, load_cap), whole=NO_DECODE_UNIT)
    unit = pick(policy, decoders, key, turn, load_cap)
    if not prefillers:
        return Route(unit, whole=NO_PREFILL_UNIT)
    partners = [p for p in prefillers if pairs_with(p, unit)]
    if not partners:
        return Route(unit, whole=REVISION_MISMATCH)
    # A turn of its own for the prefill side: with the decode side's turn, round-robin would tie
    # each decode unit to one prefill unit whenever the two counts share a factor, and starve others.
    return Route(unit, pick(policy, partners, key, turn // len(decoders), load_cap))


def request_key(body: Any, prefix_chars: int = DEFAULT_PREFIX_CHARS) -> str:
    """The part of a request that decides its prefix affinity: the first `prefix_chars` of the
    prompt, or of the chat messages as role-tagged text. Empty when the body has no prompt the
    router can read (the unit will answer it with a 400 anyway)."""
    if not isinstance(body, dict):
        return ""
    if "messages" in body:
        return _chat_text(body["messages"])[:prefix_chars]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one, as the engine unwraps it
    if isinstance(prompt, str):
        return prompt[:prefix_chars]
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        ids = prompt[: max(1, prefix_chars // CHARS_PER_TOKEN)]
        return "ids:" + ",".join(str(t) for t in ids)
    return ""


def _chat_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    parts = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):  # text parts, as the engine joins them
            content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<{message.get('role', '')}>{content if isinstance(content, str) else ''}")
    return "".join(parts)
