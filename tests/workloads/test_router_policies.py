"""The router's policies as pure functions: (healthy units, a request's key) → the route chosen:
a (prefill, decode) pair of one revision, or one unit computing the request whole."""

from __future__ import annotations

import collections
import random

import pytest

from fireflyer.workloads.router.policies import (
    NO_DECODE_UNIT,
    NO_PREFILL_UNIT,
    POLICIES,
    REVISION_MISMATCH,
    Candidate,
    Policy,
    Route,
    affine,
    cache_aware,
    choose,
    least_load,
    ordered,
    pairs_with,
    request_key,
    round_robin,
)


def units(*loads: int, role: str = "decode") -> list[Candidate]:
    return [Candidate(f"http://u{i}:30000", role, n) for i, n in enumerate(loads)]  # type: ignore[arg-type]


def urls(chosen: list[Candidate]) -> list[str]:
    return [c.url for c in chosen]


def test_round_robin_cycles_in_a_stable_order_decode_first() -> None:
    pool = [
        Candidate("http://p0:1", "prefill", 0),
        Candidate("http://d1:1", "decode", 0),
        Candidate("http://a0:1", "any", 0),
        Candidate("http://d0:1", "decode", 0),
    ]
    expected = ["http://d0:1", "http://d1:1", "http://a0:1", "http://p0:1"]
    assert urls(ordered(pool)) == expected
    for shuffled in (pool, list(reversed(pool))):
        assert [round_robin(shuffled, t).url for t in range(8)] == expected * 2
    # Load does not matter to round-robin.
    busy = [Candidate(c.url, c.role, 100 if c.url == "http://d0:1" else 0) for c in pool]
    assert round_robin(busy, 0).url == "http://d0:1"


def test_least_load_picks_the_fewest_in_flight() -> None:
    assert least_load(units(3, 1, 2)).url == "http://u1:30000"
    assert least_load(units(0, 5, 0), turn=0).url == "http://u0:30000"
    # Ties take turns, so an idle router still spreads sequential requests.
    assert {least_load(units(0, 5, 0), turn=t).url for t in range(4)} == {
        "http://u0:30000",
        "http://u2:30000",
    }


def test_least_load_ties_go_to_decode_units() -> None:
    pool = [Candidate("http://p:1", "prefill", 0), Candidate("http://d:1", "decode", 0)]
    assert {least_load(pool, t).url for t in range(4)} == {"http://d:1"}
    pool = [Candidate("http://p:1", "prefill", 0), Candidate("http://d:1", "decode", 1)]
    assert least_load(pool).url == "http://p:1"  # but fewer in flight wins over the role


def test_cache_aware_is_sticky_per_key_and_independent_of_order() -> None:
    pool = units(0, 0, 0, 0)
    for key in ("Hello", "You are a helpful assistant.", "ids:1,2,3"):
        home = cache_aware(pool, key, load_cap=8)
        assert home == affine(pool, key)
        for turn in range(5):
            shuffled = random.Random(turn).sample(pool, len(pool))
            assert cache_aware(shuffled, key, load_cap=8, turn=turn).url == home.url


def test_cache_aware_spreads_keys_evenly() -> None:
    pool = units(0, 0, 0, 0)
    counts = collections.Counter(cache_aware(pool, f"prompt {i}").url for i in range(2000))
    assert set(counts) == set(urls(pool))
    assert all(400 < n < 600 for n in counts.values()), counts


def test_rendezvous_moves_only_the_keys_of_a_unit_that_joins_or_leaves() -> None:
    pool = units(0, 0, 0, 0)
    keys = [f"prompt {i}" for i in range(1000)]
    before = {k: affine(pool, k).url for k in keys}
    without = pool[:3]  # u3 leaves: only its keys move
    after = {k: affine(without, k).url for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "http://u3:30000"}
    joined = [*pool, Candidate("http://u4:30000", "decode", 0)]  # u4 joins: only keys it wins move
    after = {k: affine(joined, k).url for k in keys}
    assert all(after[k] in (before[k], "http://u4:30000") for k in keys)
    assert 100 < sum(after[k] == "http://u4:30000" for k in keys) < 300


def test_cache_aware_leaves_an_overloaded_affine_unit() -> None:
    pool = units(0, 0, 0)
    key = "a long shared system prompt"
    home = affine(pool, key)
    loaded = [Candidate(c.url, c.role, 8 if c == home else 0) for c in pool]
    assert cache_aware(loaded, key, load_cap=8).url == home.url  # 8 beyond the lightest: still home
    loaded = [Candidate(c.url, c.role, 9 if c == home else 0) for c in pool]
    away = cache_aware(loaded, key, load_cap=8)
    assert away.url != home.url and away.in_flight == 0  # 9 beyond: the least-loaded unit
    # The cap is relative to the lightest unit, not absolute.
    busy = [Candidate(c.url, c.role, 50 if c == home else 45) for c in pool]
    assert cache_aware(busy, key, load_cap=8).url == home.url
    # Cap 0: any extra load moves the request.
    slightly = [Candidate(c.url, c.role, 1 if c == home else 0) for c in pool]
    assert cache_aware(slightly, key, load_cap=0).url != home.url


def test_cache_aware_without_a_key_is_least_load() -> None:
    pool = units(4, 2, 7)
    assert cache_aware(pool, "", load_cap=8).url == "http://u1:30000"


def test_choose_returns_a_route_per_policy() -> None:
    pool = units(5, 0, 3)
    assert choose("round-robin", pool, turn=1) == Route(ordered(pool)[1], whole=NO_PREFILL_UNIT)
    assert choose("least-load", pool) == Route(pool[1], whole=NO_PREFILL_UNIT)
    route = choose("cache-aware", pool, "hello", load_cap=100)
    assert route is not None and route.unit == affine(pool, "hello") and route.prefill is None
    for policy in ("round-robin", "least-load", "cache-aware"):
        assert choose(policy, [], "hello") is None
    with pytest.raises(ValueError, match="unknown routing policy"):
        choose("random", pool)  # type: ignore[arg-type]


def test_request_key_reads_prompts_and_chats() -> None:
    assert request_key({"prompt": "x" * 1000}, prefix_chars=256) == "x" * 256
    assert request_key({"prompt": ["Hello"]}) == request_key({"prompt": "Hello"})  # a batch of one
    ids = list(range(100))
    assert request_key({"prompt": ids}, prefix_chars=40) == "ids:" + ",".join(map(str, range(10)))
    assert request_key({"prompt": [ids]}, prefix_chars=40) == request_key({"prompt": ids}, prefix_chars=40)
    system = {"role": "system", "content": "You are a terse assistant. " * 20}
    a = request_key({"messages": [system, {"role": "user", "content": "first question"}]})
    b = request_key({"messages": [system, {"role": "user", "content": "another one"}]})
    assert a == b and a.startswith("<system>You are a terse")  # the shared prefix decides
    parts = {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}
    assert request_key({"messages": [parts]}) == request_key(
        {"messages": [{"role": "user", "content": "Hi\nthere"}]}
    )
    # What the router cannot read has no affinity (the unit answers it with a 400).
    for body in (None, [1, 2], {"prompt": [["a"], ["b"]]}, {"prompt": 5}, {"messages": "hi"}, {}):
        assert request_key(body) == ""


# -- (prefill, decode) pairs ------------------------------------------------------------------------


def unit(name: str, role: str, load: int = 0, revision: str | None = None) -> Candidate:
    return Candidate(f"http://{name}:30000", role, load, revision)  # type: ignore[arg-type]


def routes(policy: Policy, pool: list[Candidate], n: int = 200) -> list[Route]:
    chosen = [choose(policy, pool, f"prompt {i % 50}", turn=i) for i in range(n)]
    assert all(r is not None for r in chosen)
    return [r for r in chosen if r is not None]


@pytest.mark.parametrize("policy", POLICIES)
def test_a_request_goes_to_a_decode_unit_naming_a_prefill_unit(policy: Policy) -> None:
    prefill = [unit("p0", "prefill"), unit("p1", "prefill")]
    decode = [unit("d0", "decode"), unit("d1", "decode"), unit("a0", "any")]
    chosen = routes(policy, prefill + decode)
    assert all(r.prefill is not None and r.prefill.role == "prefill" for r in chosen)
    assert all(r.unit.role in ("decode", "any") and r.whole == "" for r in chosen)
    # Both sides spread over their units (cache-aware: over the 50 keys); least-load gives its
    # ties to decode units before role-less ones.
    spread = decode[:2] if policy == "least-load" else decode
    assert {r.unit.url for r in chosen} == {c.url for c in spread}
    assert {r.prefill.url for r in chosen if r.prefill} == {c.url for c in prefill}


def test_round_robin_goes_round_each_decode_units_prefill_partners() -> None:
    prefill = [unit(f"p{i}", "prefill") for i in range(2)]
    decode = [unit(f"d{i}", "decode") for i in range(4)]
    chosen = [choose("round-robin", prefill + decode, turn=t) for t in range(80)]
    pairs = collections.Counter((r.prefill.url, r.unit.url) for r in chosen if r and r.prefill)
    assert len(pairs) == 8 and set(pairs.values()) == {10}  # every pair, equally often


@pytest.mark.parametrize("policy", POLICIES)
def test_without_a_pair_a_unit_computes_the_request_whole(policy: Policy) -> None:
    decode_only = [unit("d0", "decode"), unit("d1", "decode")]
    assert {(r.prefill, r.whole) for r in routes(policy, decode_only)} == {(None, NO_PREFILL_UNIT)}
    anys = [unit("a0", "any"), unit("a1", "any")]
    assert {(r.prefill, r.whole) for r in routes(policy, anys)} == {(None, NO_PREFILL_UNIT)}
    prefill_only = [unit("p0", "prefill"), unit("p1", "prefill")]
    chosen = routes(policy, prefill_only)
    assert {(r.prefill, r.whole) for r in chosen} == {(None, NO_DECODE_UNIT)}
    assert {r.unit.url for r in chosen} == {c.url for c in prefill_only}  # still spread


@pytest.mark.parametrize("policy", POLICIES)
def test_units_of_different_revisions_are_never_paired(policy: Policy) -> None:
    pool = [
        unit("p-old", "prefill", revision="old"),
        unit("p-new", "prefill", revision="new"),
        unit("p-new2", "prefill", revision="new"),
        unit("d-old", "decode", revision="old"),
        unit("d-new", "decode", revision="new"),
        unit("d-next", "decode", revision="next"),  # no prefill unit of its revision yet
        unit("d-unknown", "decode"),  # no revision said: pairs with none of the above
        unit("a-new", "any", revision="new"),
    ]
    chosen = routes(policy, pool, 400)
    pairs = {(r.prefill.url, r.unit.url) for r in chosen if r.prefill}
    u = "http://{}:30000".format
    allowed = {
        (u("p-old"), u("d-old")),
        (u("p-new"), u("d-new")),
        (u("p-new2"), u("d-new")),
        (u("p-new"), u("a-new")),
        (u("p-new2"), u("a-new")),
    }
    # least-load gives its ties to decode units before the role-less a-new.
    assert pairs == ({p for p in allowed if p[1] != u("a-new")} if policy == "least-load" else allowed)
    whole = {r.unit.url: r.whole for r in chosen if r.prefill is None}
    # The decode side does not wait for a pair: a decode unit without one computes whole.
    assert whole == {u("d-next"): REVISION_MISMATCH, u("d-unknown"): REVISION_MISMATCH}

    # Units that say no revision pair with each other.
    unknown = [unit("p", "prefill"), unit("d", "decode")]
    assert {(r.prefill.url if r.prefill else None) for r in routes(policy, unknown)} == {u("p")}
    assert pairs_with(unit("p", "prefill"), unit("d", "decode"))
    assert not pairs_with(unit("p", "prefill", revision="r"), unit("d", "decode"))
    assert not pairs_with(unit("p", "prefill"), unit("d", "decode", revision="r"))
    assert not pairs_with(unit("x", "any"), unit("d", "decode"))  # only prefill units hand KV over


def test_cache_aware_keeps_a_prefix_on_its_prefill_unit() -> None:
    prefill = [unit(f"p{i}", "prefill") for i in range(4)]
    decode = [unit(f"d{i}", "decode") for i in range(3)]
    for key in ("You are a helpful assistant.", "ids:1,2,3", "Translate to French:"):
        home = affine(prefill, key)
        for turn in range(6):
            shuffled = random.Random(turn).sample(prefill + decode, 7)
            route = choose("cache-aware", shuffled, key, turn=turn)
            assert route is not None and route.prefill == home and route.unit == affine(decode, key)
    # The load cap holds on the prefill side too: an affine prefill unit 9 requests beyond the
    # lightest one (cap 8) loses the key to the least-loaded prefill unit.
    key = "a long shared system prompt"
    home = affine(prefill, key)
    loaded = [unit(c.url[7:-6], "prefill", 9 if c == home else 0) for c in prefill]
    route = choose("cache-aware", loaded + decode, key, load_cap=8)
    assert route is not None and route.prefill is not None
    assert route.prefill != home and route.prefill.in_flight == 0
    # Cache-aware prefill affinity is among the prefill units of the decode unit's revision.
    mixed = [
        *prefill,
        unit("p-other", "prefill", revision="other"),
        unit("d-other", "decode", revision="other"),
    ]
    for i in range(100):
        route = choose("cache-aware", mixed, f"prompt {i}")
        assert route is not None and route.prefill is not None
        assert route.prefill.revision == route.unit.revision


def test_least_load_pairs_the_least_loaded_units_of_each_role() -> None:
    pool = [
        unit("p0", "prefill", 3),
        unit("p1", "prefill", 1),
        unit("p2", "prefill", 2),
        unit("d0", "decode", 0),
        unit("d1", "decode", 4),
    ]
    route = choose("least-load", pool)
    assert route is not None and route.unit.url == "http://d0:30000"
    assert route.prefill is not None and route.prefill.url == "http://p1:30000"
    # The prefill side's load is counted apart from the decode side's: a busy decode unit does not
    # make a prefill unit look busy, nor the other way round.
    pool[0] = unit("p0", "prefill", 0)
    route = choose("least-load", pool)
    assert route is not None and route.prefill is not None and route.prefill.url == "http://p0:30000"
