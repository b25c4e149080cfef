"""Paged KV blocks with prefix caching, and an optional second tier (the on-disk KV store).

A block holds the MLA latent of `block_tokens` tokens for every layer. A full block whose KV has
been computed is named by its chain key (`fireflyer.storage.kvcache.chain_keys`), which names the
whole token prefix up to and including the block, so the GPU cache and the on-disk tier share
names. Every block is in exactly one state:

- free: reference count 0 and no key (its content is garbage);
- referenced: listed by one or more block tables (only full, keyed blocks are ever shared);
- cached: reference count 0 but keyed, kept in an LRU; a later prefix hit revives it, a fresh
  allocation evicts the least recently used one (saving it to the tier first) when no free block
  is left.

Single-threaded: the engine loop owns it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Protocol

from fireflyer.storage.kvcache import chain_keys
from fireflyer.workloads.serve.types import BLOCK_TOKENS, Sequence


class KVTier(Protocol):
    """A slower store behind the GPU blocks, addressed by the same chain keys."""

    def lookup(self, keys: list[str]) -> int:
        """How many leading keys of `keys` the tier holds."""
        ...

    def load(self, keys: list[str], block_ids: list[int]) -> int:
        """Fill GPU blocks `block_ids` with the blocks named `keys` (same length); returns how
        many leading blocks were filled. A block may leave the tier between `lookup` and `load`
        (evicted by another process, or found corrupt): loading stops at the first such gap,
        since later blocks of a chain are useless without it, and must not raise."""
        ...

    def save(self, keys: list[str], block_ids: list[int]) -> None:
        """Copy GPU blocks `block_ids` out under `keys`; called before those blocks are reused."""
        ...


def blocks_for(num_tokens: int, block_tokens: int = BLOCK_TOKENS) -> int:
    return -(-num_tokens // block_tokens)


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_tokens: int = BLOCK_TOKENS,
        namespace: str = "",
        tier: KVTier | None = None,
    ) -> None:
        if num_blocks < 1 or block_tokens < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_tokens ({block_tokens}) must be ≥ 1")
        self.num_blocks = num_blocks
        self.block_tokens = block_tokens
        self.namespace = namespace
        self.tier = tier
        self._refs = [0] * num_blocks
        self._key_of: list[str | None] = [None] * num_blocks
        self._block_of: dict[str, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # front = least recently used
        # Per sequence, until free(): its chain keys computed so far (kept when an admission
        # fails, to retry without rehashing), and once allocated how many of its blocks are
        # keyed (matched at admission or committed since).
        self._keys: dict[Sequence, list[str]] = {}
        self._committed: dict[Sequence, int] = {}
        self.queried_tokens = 0
        self.hit_tokens = 0  # served from the cache at admission, GPU or tier
        self.tier_hit_tokens = 0  # the part of hit_tokens loaded from the tier
        self.evicted_blocks = 0

    # -- counters ----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free ones plus cached ones it may evict."""
        return len(self._free) + len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Keyed blocks, referenced or not: what a prefix can hit on the GPU."""
        return len(self._block_of)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    # -- sequences ---------------------------------------------------------------------------

    def allocate(self, seq: Sequence, token_budget: int = 0, *, keep_free: int = 0) -> bool:
        """Admit `seq` (first time or after preemption): reuse the longest cached chain of full
        blocks of its tokens (GPU first, then the tier), never its last token, so at least one
        token is computed and the step can sample. Sets `block_table`, `num_computed_tokens` and
        `num_cached_tokens`.

        With `token_budget` > 0 it also reserves the blocks of the first chunk, the next
        min(token_budget, remaining) tokens. Tier hits are loaded as far as blocks allow, leaving
        `keep_free` blocks allocatable; if even the GPU hits and the chunk do not fit, it returns
        False with nothing changed and no statistics counted. Tier blocks that turn out missing
        at load time are not hits: the chain stops before the first of them, the blocks taken for
        them go back to the free list (or become the chunk's), and the rest is computed."""
        if seq.block_table or seq in self._committed:
            raise ValueError(f"{seq.request_id} is already allocated; free it first")
        keys = self._chain(seq, (seq.num_tokens - 1) // self.block_tokens)
        hits: list[int] = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            hits.append(block)
        revived = sum(1 for b in hits if self._refs[b] == 0)
        allocatable = self.num_free_blocks - revived - keep_free

        def fresh_blocks(num_tier: int) -> int:
            """Blocks to take when `num_tier` blocks come from the tier: they, and the chunk's."""
            target = (len(hits) + num_tier) * self.block_tokens
            if token_budget > 0:
                target = min(seq.num_tokens, target + token_budget)
            return blocks_for(target, self.block_tokens) - len(hits)

        # Tier hits never make the first chunk cheaper, so a miss here skips the tier lookup.
        if fresh_blocks(0) > allocatable:
            return False
        tier_keys = keys[len(hits) :]
        num_tier = min(self.tier.lookup(tier_keys), len(tier_keys)) if self.tier and tier_keys else 0
        while fresh_blocks(num_tier) > allocatable:
            num_tier -= 1  # load what fits; the rest is computed

        for block in hits:
            self._ref(block)
        new_blocks = self._take(fresh_blocks(num_tier))
        loaded = 0
        if num_tier:
            assert self.tier is not None
            loaded = self._load(tier_keys[:num_tier], new_blocks[:num_tier])
            for key, block in zip(tier_keys, new_blocks[:loaded], strict=False):
                self._register(key, block)
            if loaded < num_tier:
                # The chunk now starts at the gap and needs no more blocks than before (often
                # fewer): unfilled blocks in front become its blocks, the surplus is freed.
                keep = fresh_blocks(loaded)
                self._release(new_blocks[keep:])
                del new_blocks[keep:]
        cached_tokens = (len(hits) + loaded) * self.block_tokens
        seq.block_table = hits + new_blocks
        seq.num_computed_tokens = seq.num_cached_tokens = cached_tokens
        self._committed[seq] = len(hits) + loaded
        self.queried_tokens += seq.num_tokens
        self.hit_tokens += cached_tokens
        self.tier_hit_tokens += loaded * self.block_tokens
        return True

    def ensure_capacity(self, seq: Sequence, num_tokens_after: int, *, keep_free: int = 0) -> bool:
        """Grow `seq.block_table` to hold the KV of `num_tokens_after` tokens. False, and nothing
        changed, unless enough blocks are allocatable (leaving `keep_free` of them)."""
        if seq not in self._committed:
            raise ValueError(f"{seq.request_id} is not allocated")
        need = blocks_for(num_tokens_after, self.block_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.num_free_blocks - keep_free:
            return False
        seq.block_table.extend(self._take(need))
        return True

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Key the blocks of `seq` that became full with computed KV, so other sequences hit them.
        A key another block already holds keeps that block: sequences using it are undisturbed,
        and this one's copy stays unkeyed (freed plainly later)."""
        full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_tokens
        done = self._committed.get(seq, 0)
        if full <= done:
            return
        keys = self._chain(seq, full)
        for i in range(done, full):
            self._register(keys[i], seq.block_table[i])
        self._committed[seq] = full

    def free(self, seq: Sequence) -> None:
        """Release the blocks of `seq`. Keyed ones join the LRU tail last block first, so a chain's
        tail is evicted before its head (a head alone still serves shorter prefixes)."""
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] < 0:
                raise AssertionError(f"block {block} freed more often than allocated")
            if self._refs[block] == 0:
                if self._key_of[block] is None:
                    self._free.append(block)
                else:
                    self._cached[block] = None
        seq.block_table = []
        self._keys.pop(seq, None)
        self._committed.pop(seq, None)

    # -- internals ---------------------------------------------------------------------------

    def _chain(self, seq: Sequence, num_keys: int) -> list[str]:
        """The first `num_keys` chain keys of `seq`, cached while it holds blocks (token_ids only
        grow, so earlier keys stay valid). New keys continue the chain from the last known one:
        each block is hashed once per admission, however the sequence grows."""
        keys = self._keys.setdefault(seq, [])
        if len(keys) < num_keys:
            bt = self.block_tokens
            tokens = seq.token_ids[len(keys) * bt : num_keys * bt]
            keys.extend(chain_keys(tokens, bt, self.namespace, keys[-1] if keys else None))
        return keys[:num_keys]

    def _load(self, keys: list[str], block_ids: list[int]) -> int:
        """Ask the tier to load; how many leading blocks it filled, within [0, len(keys)]."""
        assert self.tier is not None
        filled = self.tier.load(keys, block_ids)
        return max(0, min(int(filled), len(keys)))

    def _release(self, blocks: list[int]) -> None:
        """Give back blocks just taken by `_take` (reference 1, unkeyed), unused: they are the
        first a later `_take` hands out."""
        for block in reversed(blocks):
            assert self._refs[block] == 1 and self._key_of[block] is None
            self._refs[block] = 0
            self._free.appendleft(block)

    def _ref(self, block: int) -> None:
        if self._refs[block] == 0:
            self._cached.pop(block, None)
        self._refs[block] += 1

    def _register(self, key: str, block: int) -> None:
        if key in self._block_of or self._key_of[block] is not None:
            return
        self._key_of[block] = key
        self._block_of[key] = block

    def _take(self, count: int) -> list[int]:
        """`count` blocks with reference 1: never-keyed free blocks first, then LRU evictions,
        which the tier saves (one batch) before anyone writes to them."""
        taken: list[int] = []
        evicted_keys: list[str] = []
        evicted: list[int] = []
        while len(taken) < count:
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._cached.popitem(last=False)
                key = self._key_of[block]
                assert key is not None
                del self._block_of[key]
                self._key_of[block] = None
                evicted_keys.append(key)
                evicted.append(block)
                self.evicted_blocks += 1
            self._refs[block] = 1
            taken.append(block)
        if evicted_keys and self.tier is not None:
            self.tier.save(evicted_keys, evicted)
        return taken

    def check(self) -> None:
        """Raise AssertionError unless the bookkeeping is consistent (for tests)."""
        free, cached = set(self._free), set(self._cached)
        assert len(free) == len(self._free), "a block is twice on the free list"
        assert not free & cached, "a block is both free and cached"
        counted = [0] * self.num_blocks
        for seq in self._committed:
            assert len(set(seq.block_table)) == len(seq.block_table), f"{seq.request_id} repeats a block"
            for block in seq.block_table:
                counted[block] += 1
        for block in range(self.num_blocks):
            refs, key = self._refs[block], self._key_of[block]
            if block in free:
                assert refs == 0 and key is None, f"free block {block} has refs {refs} or key {key}"
            elif block in cached:
                assert refs == 0 and key is not None, f"cached block {block} has refs {refs} or no key"
            else:
                assert refs > 0, f"block {block} is neither free, cached nor referenced"
            assert refs == counted[block], f"block {block} has refs {refs} but {counted[block]} tables"
            if key is not None:
                assert self._block_of.get(key) == block, f"block {block}'s key maps elsewhere"
        assert len(self._block_of) == sum(k is not None for k in self._key_of), "key map has strays"
