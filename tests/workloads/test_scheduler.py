"""Scheduler: chunked prefill within the budget, running first, preemption, abort, finishing."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fireflyer.workloads.serve.block_manager import BlockManager
from fireflyer.workloads.serve.scheduler import Scheduler
from fireflyer.workloads.serve.types import (
    FinishReason,
    QueueFullError,
    SamplingParams,
    SchedulerOutput,
    Sequence,
    SequenceStatus,
)

EOS = 2
VOCAB = 1000


def make_scheduler(
    num_blocks: int = 64,
    *,
    block_tokens: int = 64,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 256,
    max_model_len: int = 4096,
    max_waiting: int = 100,
) -> Scheduler:
    bm = BlockManager(num_blocks, block_tokens)
    return Scheduler(
        bm,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        eos_token_ids={EOS},
        max_waiting=max_waiting,
    )


def make_seq(n: int, max_tokens: int = 4, *, base: int = 10, request_id: str | None = None) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    seq = Sequence(prompt_ids=[base + i % 500 for i in range(n)], params=params)
    if request_id is not None:
        seq.request_id = request_id
    return seq


def next_token(seq: Sequence) -> int:
    """A deterministic 'model': the next token depends on the whole context, like greedy decoding."""
    return 3 + (sum(seq.token_ids) * 31 + seq.num_tokens) % (VOCAB - 3)


def check_output(sched: Scheduler, out: SchedulerOutput) -> None:
    """What the model runner relies on."""
    bm = sched.block_manager
    assert out.num_tokens <= sched.max_num_batched_tokens
    ids = [c.seq.request_id for c in out.chunks]
    assert len(ids) == len(set(ids)), "a sequence scheduled twice in one step"
    lengths = [c.length for c in out.chunks]
    assert lengths == sorted(lengths, key=lambda n: n != 1), "decode chunks come first"
    for c in out.chunks:
        assert c.seq.status == SequenceStatus.RUNNING
        assert c.length >= 1 and c.start == c.seq.num_computed_tokens
        assert len(c.seq.block_table) * bm.block_tokens >= c.start + c.length
    for seq in out.preempted:
        assert seq.status == SequenceStatus.WAITING and seq.block_table == []
        assert seq.request_id not in ids
    assert len(sched.running) <= sched.max_num_seqs
    bm.check()


def step(sched: Scheduler) -> tuple[SchedulerOutput, list[Sequence]]:
    out = sched.schedule()
    check_output(sched, out)
    sampled = {c.seq.request_id: next_token(c.seq) for c in out.chunks if c.samples}
    finished = sched.update(out, sampled)
    sched.block_manager.check()
    return out, finished


def run_to_completion(sched: Scheduler, max_steps: int = 10_000) -> dict[str, Sequence]:
    done: dict[str, Sequence] = {}
    for _ in range(max_steps):
        if not sched.has_work:
            return done
        _, finished = step(sched)
        for seq in finished:
            assert seq.request_id not in done, "reported finished twice"
            done[seq.request_id] = seq
    raise AssertionError("the scheduler did not drain")


def test_chunked_prefill_respects_the_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=100)
    a = make_seq(250, max_tokens=3)
    sched.add(a)
    lengths = []
    while sched.has_work:
        out, _ = step(sched)
        lengths.append([(c.start, c.length) for c in out.chunks])
    assert lengths == [[(0, 100)], [(100, 100)], [(200, 50)], [(250, 1)], [(251, 1)]]
    assert a.finish_reason == FinishReason.LENGTH and len(a.output_ids) == 3
    assert a.first_token_time is not None


def test_running_first_then_waiting_fifo_with_the_rest_of_the_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=100)
    a = make_seq(20, max_tokens=10)
    sched.add(a)
    step(sched)  # a prefilled, one token sampled
    b, c = make_seq(300, base=100), make_seq(30, base=200)
    sched.add(b)
    sched.add(c)
    out, _ = step(sched)
    assert [(x.seq, x.length) for x in out.chunks] == [(a, 1), (b, 99)]  # c waits: budget spent
    out, _ = step(sched)
    # b is older than c: running first, in arrival order; b leaves no room for c.
    assert [(x.seq, x.length) for x in out.chunks] == [(a, 1), (b, 99)]
    out, _ = step(sched)
    assert [(x.seq, x.start, x.length) for x in out.chunks] == [(a, 22, 1), (b, 198, 99)]
    out, _ = step(sched)
    assert [(x.seq, x.start, x.length) for x in out.chunks] == [(a, 23, 1), (b, 297, 3), (c, 0, 30)]


def test_a_long_prefill_leaves_a_token_for_each_younger_decode() -> None:
    sched = make_scheduler(max_num_batched_tokens=64)
    old = make_seq(100, max_tokens=50)
    young1, young2 = make_seq(10, max_tokens=50, base=300), make_seq(10, max_tokens=50, base=400)
    for seq in (old, young1, young2):
        sched.add(seq)
    step(sched)  # old: 64 tokens
    out, _ = step(sched)  # old: the last 36, the young ones whole: all three sample
    assert [(c.seq, c.length) for c in out.chunks] == [(old, 36), (young1, 10), (young2, 10)]
    # As after a preemption and readmission: the oldest running sequence prefills 101 tokens
    # while younger ones decode.
    old.num_computed_tokens = 0
    out = sched.schedule()
    check_output(sched, out)
    assert [(c.seq, c.length) for c in out.chunks] == [(young1, 1), (young2, 1), (old, 62)]


def test_prefix_cache_hits_across_requests() -> None:
    sched = make_scheduler(max_num_batched_tokens=512)
    a = make_seq(300, max_tokens=1)
    sched.add(a)
    run_to_completion(sched)
    b = make_seq(300, max_tokens=1)
    sched.add(b)
    out, _ = step(sched)
    assert [(c.start, c.length) for c in out.chunks] == [(256, 44)]
    assert b.num_cached_tokens == 256
    assert sched.block_manager.hit_tokens == 256


def test_preemption_under_a_tiny_block_budget_completes_every_sequence() -> None:
    rng = random.Random(7)
    seqs_spec = [(rng.randint(1, 150), rng.randint(1, 120)) for _ in range(12)]

    def run(num_blocks: int) -> tuple[dict[str, list[int]], int]:
        sched = make_scheduler(num_blocks, block_tokens=16, max_num_batched_tokens=48, max_model_len=400)
        for i, (n, max_tokens) in enumerate(seqs_spec):
            sched.add(make_seq(n, max_tokens, base=i * 7, request_id=f"r{i}"))
        done = run_to_completion(sched)
        assert sched.block_manager.num_used_blocks == 0
        return {rid: s.token_ids for rid, s in done.items()}, sched.num_preemptions

    roomy, roomy_preemptions = run(1000)
    tight, tight_preemptions = run(18)  # 288 tokens: the longest sequence needs 270
    assert roomy_preemptions == 0 and tight_preemptions > 0
    assert tight.keys() == roomy.keys() == {f"r{i}" for i in range(12)}
    for i, (n, max_tokens) in enumerate(seqs_spec):
        assert len(tight[f"r{i}"]) == n + max_tokens
    assert tight == roomy  # recomputation after preemption changes nothing


def test_preemption_takes_the_youngest_and_requeues_it_first() -> None:
    sched = make_scheduler(4, block_tokens=16, max_num_batched_tokens=64, max_model_len=64)
    a, b = make_seq(32, max_tokens=30, request_id="a"), make_seq(32, max_tokens=30, base=99, request_id="b")
    sched.add(a)
    sched.add(b)
    step(sched)  # both prefilled: 2 blocks each, all 4 used; the sampled 33rd token needs a third
    assert sched.block_manager.num_free_blocks == 0
    out, _ = step(sched)
    assert out.preempted == [b] and [c.seq for c in out.chunks] == [a]
    assert b.num_computed_tokens == 0 and b.num_preemptions == 1 and sched.num_preemptions == 1
    assert list(sched.waiting) == [b] and b.output_ids  # its output stays, recomputed as prompt
    done = run_to_completion(sched)
    assert set(done) == {"a", "b"}
    assert len(b.output_ids) == 30 and b.status == SequenceStatus.FINISHED


def test_a_sequence_stops_before_outgrowing_the_cache() -> None:
    sched = make_scheduler(2, block_tokens=16, max_model_len=1000)
    seq = make_seq(20, max_tokens=100)
    sched.add(seq)
    run_to_completion(sched)
    assert seq.finish_reason == FinishReason.LENGTH and seq.num_tokens == 32


def test_abort_frees_blocks_and_is_reported_by_the_next_update() -> None:
    sched = make_scheduler(max_num_batched_tokens=64)
    running, waiting = make_seq(100, max_tokens=50), make_seq(30, base=500)
    sched.add(running)
    sched.add(waiting)
    step(sched)
    assert sched.num_running == 1 and sched.num_waiting == 1
    assert sched.block_manager.num_used_blocks > 0
    assert sched.abort(running.request_id) and sched.abort(waiting.request_id)
    assert not sched.abort(running.request_id) and not sched.abort("nope")
    assert running.block_table == [] and sched.block_manager.num_used_blocks == 0
    assert running.status == waiting.status == SequenceStatus.FINISHED
    assert running.finish_reason == waiting.finish_reason == FinishReason.ABORT
    assert sched.has_work and sched.num_running == sched.num_waiting == 0
    out = sched.schedule()
    assert out.chunks == []
    assert sched.update(out, {}) == [running, waiting]
    assert not sched.has_work and sched.update(sched.schedule(), {}) == []
    sched.block_manager.check()


def test_abort_between_schedule_and_update_ignores_the_chunk() -> None:
    sched = make_scheduler()
    a, b = make_seq(10), make_seq(10, base=100)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert sched.abort(a.request_id)
    finished = sched.update(out, {a.request_id: 5, b.request_id: 6})
    assert finished == [a]
    assert a.output_ids == [] and a.num_computed_tokens == 0
    assert b.output_ids == [6]
    sched.block_manager.check()


def test_finish_reasons() -> None:
    sched = make_scheduler(max_model_len=13)
    eos = Sequence(prompt_ids=[5] * 10, params=SamplingParams(max_tokens=5))
    ignored = Sequence(prompt_ids=[5] * 10, params=SamplingParams(max_tokens=2, ignore_eos=True))
    stop = Sequence(prompt_ids=[6] * 10, params=SamplingParams(max_tokens=5, stop_token_ids=(77,)))
    long = Sequence(prompt_ids=[7] * 10, params=SamplingParams(max_tokens=50, ignore_eos=True))
    for seq in (eos, ignored, stop, long):
        sched.add(seq)
    out = sched.schedule()
    tokens = {eos.request_id: EOS, ignored.request_id: EOS, stop.request_id: 77, long.request_id: 9}
    assert sched.update(out, tokens) == [eos, stop]
    assert eos.finish_reason == stop.finish_reason == FinishReason.STOP
    assert eos.output_ids == [EOS] and eos.block_table == []
    out = sched.schedule()
    assert sched.update(out, {ignored.request_id: EOS, long.request_id: 9}) == [ignored]
    assert ignored.finish_reason == FinishReason.LENGTH and ignored.output_ids == [EOS, EOS]
    out = sched.schedule()
    assert sched.update(out, {long.request_id: 9}) == [long]
    assert long.finish_reason == FinishReason.LENGTH and long.num_tokens == 13


def test_max_num_seqs_limits_the_batch() -> None:
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=1000)
    seqs = [make_seq(10, base=i * 20) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    out, _ = step(sched)
    assert [c.seq for c in out.chunks] == seqs[:2] and sched.num_waiting == 1


def test_queue_full() -> None:
    sched = make_scheduler(max_waiting=2)
    sched.add(make_seq(5))
    sched.add(make_seq(5))
    with pytest.raises(QueueFullError):
        sched.add(make_seq(5))
    step(sched)  # admitted: room in the queue again
    sched.add(make_seq(5))


def test_oversize_prompts_are_rejected_with_the_numbers() -> None:
    sched = make_scheduler(10, max_model_len=2000)
    with pytest.raises(ValueError, match=r"2000 tokens; max_model_len is 2000"):
        sched.add(make_seq(2000))
    with pytest.raises(ValueError, match=r"has 700 tokens and needs 11 KV blocks of 64 tokens.*10 blocks"):
        sched.add(make_seq(700))
    with pytest.raises(ValueError, match="empty"):
        sched.add(make_seq(0))
    seq = make_seq(5)
    sched.add(seq)
    with pytest.raises(ValueError, match="already"):
        sched.add(seq)
    assert sched.num_waiting == 1


def test_readmission_keeps_the_cached_tokens_of_arrival() -> None:
    sched = make_scheduler(4, block_tokens=16, max_num_batched_tokens=64, max_model_len=64)
    a, b = make_seq(30, max_tokens=30), make_seq(30, max_tokens=30, base=99)
    sched.add(a)
    sched.add(b)
    run_to_completion(sched)
    assert b.num_preemptions > 0 and b.num_cached_tokens == 0


# -- random workloads -------------------------------------------------------------------------


class SlotMemory:
    """The KV cache as the runner sees it: the token whose KV each slot holds. A chunk checks
    that every earlier position of its sequence holds that sequence's token (so a prefix hit, a
    tier load or a shared block gives the right KV), then writes its own positions."""

    def __init__(self, bm: BlockManager) -> None:
        self.bt = bm.block_tokens
        self.slots: list[list[int | None]] = [[None] * self.bt for _ in range(bm.num_blocks)]

    def run(self, out: SchedulerOutput) -> None:
        for chunk in out.chunks:
            seq, table = chunk.seq, chunk.seq.block_table
            for pos in range(chunk.start):
                assert self.slots[table[pos // self.bt]][pos % self.bt] == seq.token_ids[pos], (
                    f"{seq.request_id} position {pos} holds the wrong KV"
                )
            for pos in range(chunk.start, chunk.start + chunk.length):
                self.slots[table[pos // self.bt]][pos % self.bt] = seq.token_ids[pos]


class SlotTier:
    def __init__(self, memory: SlotMemory) -> None:
        self.memory = memory
        self.store: dict[str, list[int | None]] = {}
        self.loaded = 0

    def lookup(self, keys: list[str]) -> int:
        n = 0
        while n < len(keys) and keys[n] in self.store:
            n += 1
        return n

    def load(self, keys: list[str], block_ids: list[int]) -> int:
        self.loaded += len(keys)
        for key, block in zip(keys, block_ids, strict=True):
            self.memory.slots[block] = list(self.store[key])
        return len(keys)

    def save(self, keys: list[str], block_ids: list[int]) -> None:
        for key, block in zip(keys, block_ids, strict=True):
            assert None not in self.memory.slots[block], "a keyed block is not full"
            self.store[key] = list(self.memory.slots[block])


Op = tuple[str, int, int, int]
op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 80), st.integers(1, 60), st.integers(0, 3)),
    st.tuples(st.just("step"), st.integers(1, 4), st.just(0), st.just(0)),
    st.tuples(st.just("abort"), st.integers(0, 50), st.just(0), st.just(0)),
)


def run_workload(ops: list[Op], num_blocks: int, budget: int, with_tier: bool, seed: int) -> Scheduler:
    """Adds, steps and aborts against a block manager and a simulated KV memory, checking the
    invariants after each; then drains: every request is reported once and all blocks are free."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, 4)
    memory = SlotMemory(bm)
    tier = SlotTier(memory)
    bm.tier = tier if with_tier else None
    sched = Scheduler(
        bm,
        max_num_seqs=4,
        max_num_batched_tokens=budget,
        max_model_len=100,
        eos_token_ids={EOS},
        max_waiting=100,
    )
    prefixes = [[rng.randrange(VOCAB) for _ in range(40)] for _ in range(4)]
    added: list[Sequence] = []
    reported: list[Sequence] = []

    def one_step() -> None:
        out = sched.schedule()
        check_output(sched, out)
        memory.run(out)
        sampled = {
            c.seq.request_id: EOS if rng.random() < 0.02 else rng.randrange(3, 6)
            for c in out.chunks
            if c.samples
        }
        reported.extend(sched.update(out, sampled))
        bm.check()

    for kind, a, b, c in ops:
        if kind == "add":
            prompt = (prefixes[c] + [rng.randrange(VOCAB) for _ in range(a)])[: a + c * 10]
            seq = Sequence(prompt_ids=prompt, params=SamplingParams(max_tokens=b))
            try:
                sched.add(seq)
            except ValueError:
                assert len(prompt) >= sched.max_seq_len
                continue
            added.append(seq)
        elif kind == "step":
            for _ in range(a):
                one_step()
        elif added:
            seq = added[a % len(added)]
            live = not seq.is_finished
            assert sched.abort(seq.request_id) == live
        assert len({id(s) for s in sched.running} | {id(s) for s in sched.waiting}) == (
            sched.num_running + sched.num_waiting
        )
        assert all(s.block_table == [] for s in sched.waiting)

    for _ in range(5000):
        if not sched.has_work:
            break
        one_step()
    assert not sched.has_work
    assert sorted(id(s) for s in reported) == sorted(id(s) for s in added)
    assert all(s.is_finished and s.finish_reason is not None for s in added)
    assert bm.num_used_blocks == 0
    for seq in added:
        if seq.finish_reason != FinishReason.ABORT:
            assert 1 <= len(seq.output_ids) <= seq.params.max_tokens
            assert seq.num_tokens <= 100
    return sched


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(op, min_size=1, max_size=40),
    num_blocks=st.integers(8, 40),
    budget=st.integers(8, 64),
    with_tier=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_workloads_keep_the_invariants(
    ops: list[Op], num_blocks: int, budget: int, with_tier: bool, seed: int
) -> None:
    run_workload(ops, num_blocks, budget, with_tier, seed)


def busy_ops(rng: random.Random) -> list[Op]:
    ops: list[Op] = []
    for _ in range(60):
        roll = rng.random()
        if roll < 0.45:
            ops.append(("add", rng.randint(1, 70), rng.randint(1, 60), rng.randrange(4)))
        elif roll < 0.95:
            ops.append(("step", rng.randint(1, 3), 0, 0))
        else:
            ops.append(("abort", rng.randrange(50), 0, 0))
    return ops


def test_busy_random_workloads_preempt_hit_and_use_the_tier() -> None:
    """Denser than hypothesis draws: many requests at once over few blocks, so the checks above
    run through preemptions, GPU prefix hits and tier loads (asserted, to keep it so)."""
    preemptions = hit_tokens = tier_hit_tokens = 0
    for seed in range(12):
        rng = random.Random(seed)
        sched = run_workload(busy_ops(rng), rng.randint(10, 24), rng.randint(8, 48), True, seed)
        preemptions += sched.num_preemptions
        hit_tokens += sched.block_manager.hit_tokens
        tier_hit_tokens += sched.block_manager.tier_hit_tokens
    assert preemptions > 20 and tier_hit_tokens > 0 and hit_tokens > tier_hit_tokens


def test_the_watermark_holds_back_admissions_but_not_a_lone_request() -> None:
    bm = BlockManager(10, 16)
    sched = Scheduler(
        bm,
        max_num_seqs=8,
        max_num_batched_tokens=1000,
        max_model_len=1000,
        eos_token_ids={EOS},
        max_waiting=10,
        watermark=0.2,  # 2 blocks
    )
    lone = make_seq(150, max_tokens=2)  # 10 blocks: all of them
    sched.add(lone)
    out, _ = step(sched)
    assert [c.seq for c in out.chunks] == [lone]
    run_to_completion(sched)
    first, second = make_seq(60, max_tokens=50, base=1), make_seq(40, max_tokens=50, base=300)
    sched.add(first)
    step(sched)  # first holds 4 blocks
    sched.add(second)  # 3 blocks would leave 3 ≥ 2: admitted
    out, _ = step(sched)
    assert second in [c.seq for c in out.chunks]
    third = make_seq(20, base=600)  # 2 blocks would leave 1 < 2: waits
    sched.add(third)
    out, _ = step(sched)
    assert third not in [c.seq for c in out.chunks] and sched.num_waiting == 1
