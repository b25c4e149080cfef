"""The Triton kernels of the NVLink EP transport (fireflyer.kernels.ep_nvlink, which describes
the buffers and the steps): routing on the source, the send into the peers' receive buffers, the
receivers' offsets and expansion, and combine's send back and reduction."""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK_WORDS = 1024
SEND_BLOCK_WORDS = 2048  # an FP8 row of hidden 7168 (1792 words) in one pass
ROUTE_SLOTS = 8
ROUTE_TOKENS = 128
ALIGN_BYTES = 64


@triton.jit
def route_kernel(
    topk, slot_of_expert, slots_out, ranks_out, send_pos, chunk_counts, num_tokens, chunk_stride,
    K: tl.constexpr, KP: tl.constexpr, WORLD: tl.constexpr, WP: tl.constexpr, LOCAL: tl.constexpr,
    SLOTS: tl.constexpr, SB: tl.constexpr, BT: tl.constexpr,
):  # fmt: skip
    """Chunk c = tokens [c·BT, c·BT + BT). Programs (p < SLOTS/SB, c): each (token, k) on slots
    [p·SB, p·SB + SB) gets its rank among the chunk's tokens for that slot; the chunk's count
    per slot. Program (last, c): each token's index among the chunk's tokens sent to each rank;
    the chunk's rows per rank (after the slot counts). Chunk offsets are added by the sender."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    ks = tl.arange(0, KP)
    ts = chunk * BT + tl.arange(0, BT)
    tmask = ts < num_tokens
    tk_mask = tmask[:, None] & (ks[None, :] < K)
    idx = tl.load(topk + ts[:, None] * K + ks[None, :], mask=tk_mask, other=-1)
    slot = tl.load(slot_of_expert + tl.where(idx >= 0, idx, 0), mask=idx >= 0, other=-1)
    counts = chunk_counts + chunk * chunk_stride
    if pid * SB < SLOTS:
        if pid == 0:
            tl.store(slots_out + ts[:, None] * K + ks[None, :], slot, mask=tk_mask)
        js = pid * SB + tl.arange(0, SB)
        match = (slot[:, :, None] == js[None, None, :]).to(tl.int32)  # [BT, KP, SB]
        has = tl.max(match, axis=1)  # [BT, SB]
        before = tl.cumsum(has, axis=0) - has
        rank = tl.sum(match * before[:, None, :], axis=2)  # [BT, KP]
        mine = (slot >= pid * SB) & (slot < pid * SB + SB)
        tl.store(ranks_out + ts[:, None] * K + ks[None, :], rank, mask=tk_mask & mine)
        tl.store(counts + js, tl.sum(has, axis=0), mask=js < SLOTS)
    else:
        ds = tl.arange(0, WP)
        dest = tl.where(slot >= 0, slot // LOCAL, -1)
        hit = tl.max((dest[:, :, None] == ds[None, None, :]).to(tl.int32), axis=1)  # [BT, WP]
        sent_before = tl.cumsum(hit, axis=0) - hit
        out = send_pos + ds[None, :] * num_tokens + ts[:, None]
        tl.store(out, tl.where(hit > 0, sent_before, -1), mask=tmask[:, None] & (ds[None, :] < WORLD))
        tl.store(counts + SLOTS + ds, tl.sum(hit, axis=0), mask=ds < WORLD)


@triton.jit
def send_kernel(
    x_words, scale_words, slots, weights, ranks, send_pos, chunk_counts,
    rows, peer_rows, counts, peer_counts,
    rank, capacity, num_tokens, num_chunks, row_stride, count_stride, chunk_stride,
    K: tl.constexpr, KP: tl.constexpr, WORLD: tl.constexpr, LOCAL: tl.constexpr, LP: tl.constexpr,
    SLOTS: tl.constexpr, CHUNK: tl.constexpr, CP: tl.constexpr,
    META: tl.constexpr, PAYLOAD: tl.constexpr, SCALES: tl.constexpr, BLOCK: tl.constexpr,
    SBLOCK: tl.constexpr, ROW_UNIT: tl.constexpr, COUNT_UNIT: tl.constexpr,
):  # fmt: skip
    """Row of (token t, rank d) into d's receive buffer; one extra program per d publishes this
    rank's counts there. Positions from the route kernel are per chunk, so the chunk's offsets
    (entries and rows of earlier chunks, summed here from the per-chunk counts) are added."""
    t = tl.program_id(0)
    d = tl.program_id(1)
    cs = tl.arange(0, CP)
    if t == num_tokens:
        every = cs < num_chunks
        table = counts + tl.load(peer_counts + d) * COUNT_UNIT + rank * count_stride
        rows_sent = tl.load(chunk_counts + cs * chunk_stride + SLOTS + d, mask=every, other=0)
        tl.store(table, tl.sum(rows_sent, axis=0))
        es = tl.arange(0, LP)
        per_chunk = tl.load(
            chunk_counts + cs[:, None] * chunk_stride + d * LOCAL + es[None, :],
            mask=every[:, None] & (es[None, :] < LOCAL),
            other=0,
        )
        tl.store(table + 1 + es, tl.sum(per_chunk, axis=0), mask=es < LOCAL)
    else:
        earlier = cs < t // CHUNK
        index = tl.load(send_pos + d * num_tokens + t)
        if index >= 0:
            sent_before = tl.load(chunk_counts + cs * chunk_stride + SLOTS + d, mask=earlier, other=0)
            p = index + tl.sum(sent_before, axis=0)
            row = rows + tl.load(peer_rows + d) * ROW_UNIT + (rank * capacity + p).to(tl.int64) * row_stride
            ks = tl.arange(0, KP)
            kmask = ks < K
            slot = tl.load(slots + t * K + ks, mask=kmask, other=-1)
            here = (slot >= 0) & (slot // LOCAL == d)
            tl.store(row + ks, tl.where(here, slot % LOCAL, -1), mask=kmask)
            w = tl.load(weights + t * K + ks, mask=kmask, other=0.0)
            tl.store(row + K + ks, tl.where(here, w, 0.0).to(tl.int32, bitcast=True), mask=kmask)
            within = tl.load(ranks + t * K + ks, mask=kmask, other=0)
            before = tl.load(
                chunk_counts + cs[:, None] * chunk_stride + tl.where(here, slot, 0)[None, :],
                mask=earlier[:, None] & (kmask & here)[None, :],
                other=0,
            )
            tl.store(row + 2 * K + ks, within + tl.sum(before, axis=0), mask=kmask)
            tl.store(row + 3 * K, t)
            src = x_words + t.to(tl.int64) * PAYLOAD
            for c in tl.static_range(0, PAYLOAD, BLOCK):
                cols = c + tl.arange(0, BLOCK)
                m = cols < PAYLOAD
                tl.store(row + META + cols, tl.load(src + cols, mask=m), mask=m)
            if SCALES > 0:
                scols = tl.arange(0, SBLOCK)
                sm = scols < SCALES
                values = tl.load(scale_words + t.to(tl.int64) * SCALES + scols, mask=sm)
                tl.store(row + META + PAYLOAD + scols, values, mask=sm)


@triton.jit
def offsets_kernel(
    counts, grouped_base, masked_base, tokens_per_expert, total_rows, count_stride,
    WORLD: tl.constexpr, WP: tl.constexpr, LOCAL: tl.constexpr, LP: tl.constexpr,
):  # fmt: skip
    """From the count table [source, 1 + local experts]: where each source's entries of each
    expert start, in the grouped layout and in the masked one."""
    ss = tl.arange(0, WP)
    es = tl.arange(0, LP)
    m = (ss[:, None] < WORLD) & (es[None, :] < LOCAL)
    entries = tl.load(counts + ss[:, None] * count_stride + 1 + es[None, :], mask=m, other=0)
    earlier_sources = tl.cumsum(entries, axis=0) - entries
    per_expert = tl.sum(entries, axis=0)
    earlier_experts = tl.cumsum(per_expert, axis=0) - per_expert
    out = ss[:, None] * LOCAL + es[None, :]
    tl.store(grouped_base + out, earlier_experts[None, :] + earlier_sources, mask=m)
    tl.store(masked_base + out, es[None, :] * total_rows + earlier_sources, mask=m)
    tl.store(tokens_per_expert + es, per_expert.to(tl.int64), mask=es < LOCAL)


@triton.jit
def expand_kernel(
    rows, counts, grouped_base, masked_base, out_x, out_scales, masked_x, masked_scales,
    grouped_pos, masked_pos, row_token, row_weights,
    capacity, row_stride, count_stride, out_rows,
    K: tl.constexpr, LOCAL: tl.constexpr, META: tl.constexpr, PAYLOAD: tl.constexpr,
    SCALES: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr, SBLOCK: tl.constexpr,
):  # fmt: skip
    """Received row r: its payload to each of its experts' places (those below out_rows: the
    output may have been sized before the counts were known); the handle's tables."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    source = r // capacity
    valid = r % capacity < tl.load(counts + source * count_stride)
    row = rows + r.to(tl.int64) * row_stride
    first = c == 0
    if valid:
        cols = c * BLOCK + tl.arange(0, BLOCK)
        m = cols < PAYLOAD
        values = tl.load(row + META + cols, mask=m)
        scols = tl.arange(0, SBLOCK)
        sm = (scols < SCALES) & ((scols * 0 + c) == 0)
        if SCALES > 0:
            scales = tl.load(row + META + PAYLOAD + scols, mask=sm)
        if first:
            tl.store(row_token + r, tl.load(row + 3 * K))
        for k in tl.static_range(K):
            expert = tl.load(row + k)
            present = expert >= 0
            at = source * LOCAL + tl.where(present, expert, 0)
            within = tl.load(row + 2 * K + k)
            p = tl.where(present, tl.load(grouped_base + at) + within, -1)
            if first:
                tl.store(grouped_pos + r * K + k, p)
                tl.store(row_weights + r * K + k, tl.load(row + K + k).to(tl.float32, bitcast=True))
            if present & (p < out_rows):
                tl.store(out_x + p.to(tl.int64) * PAYLOAD + cols, values, mask=m)
                if SCALES > 0:
                    tl.store(out_scales + p.to(tl.int64) * SCALES + scols, scales, mask=sm)
            if MASKED:
                q = tl.where(present, tl.load(masked_base + at) + within, -1)
                if first:
                    tl.store(masked_pos + r * K + k, q)
                if present:
                    tl.store(masked_x + q.to(tl.int64) * PAYLOAD + cols, values, mask=m)
                    if SCALES > 0:
                        tl.store(masked_scales + q.to(tl.int64) * SCALES + scols, scales, mask=sm)
    elif first:
        tl.store(row_token + r, -1)
        for k in tl.static_range(K):
            tl.store(grouped_pos + r * K + k, -1)
            tl.store(row_weights + r * K + k, 0.0)
            if MASKED:
                tl.store(masked_pos + r * K + k, -1)


@triton.jit
def combine_send_kernel(
    expert_out, positions, weights, row_token, combined, peer_combined, rank, capacity, hidden,
    K: tl.constexpr, BLOCK: tl.constexpr, UNIT: tl.constexpr,
):  # fmt: skip
    """Received row r from source s: Σ_k w · expert_out[pos], into s's combine buffer at
    [this rank · capacity + token]."""
    r = tl.program_id(0)
    token = tl.load(row_token + r)
    if token >= 0:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < hidden
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(K):
            p = tl.load(positions + r * K + k).to(tl.int64)
            w = tl.load(weights + r * K + k)
            present = (cols * 0 + p) >= 0  # the scalar test as a vector mask
            values = tl.load(expert_out + p * hidden + cols, mask=m & present, other=0.0)
            acc += values.to(tl.float32) * w
        source = r // capacity
        peer = combined + tl.load(peer_combined + source) * UNIT
        dst = peer + (rank * capacity + token).to(tl.int64) * hidden
        tl.store(dst + cols, acc.to(tl.bfloat16), mask=m)


@triton.jit
def combine_reduce_kernel(
    combined, send_pos, out, capacity, hidden, num_tokens, WORLD: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for d in tl.static_range(WORLD):
        sent = (cols * 0 + tl.load(send_pos + d * num_tokens + t)) >= 0
        row = (d * capacity + t).to(tl.int64)
        acc += tl.load(combined + row * hidden + cols, mask=m & sent, other=0.0).to(tl.float32)
    tl.store(out + t.to(tl.int64) * hidden + cols, acc.to(tl.bfloat16), mask=m)
