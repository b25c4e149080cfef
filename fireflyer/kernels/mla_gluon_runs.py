"""The Gluon MLA decode kernel over a length-balanced schedule (`mla_schedule`).

Program (m, r) attends run r of the schedule: from its first sequence's first tile to its last
sequence's end tile, sequence after sequence. The loader and the math partitions of `mla_gluon`
walk the run together, one sequence at a time; the ring of KV stages carries on across the
sequences (its position is the tiles the run has loaded so far), so the loads of the next
sequence start while the math finishes the current one. Each sequence's share goes to its own
partial slot, which the Triton combine merges.
"""

from __future__ import annotations

from fireflyer.kernels.mla_gluon import HAVE_GLUON

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from fireflyer.kernels.mla_gluon_parts import (
        D_V_C,
        LOADER_REGS_C,
        _attend,
        _kv_ring,
        _load_kv,
        _release_ring,
    )

    @gluon.jit
    def _piece(RUNS, SEQ, pid_r, seq, BLOCK_N: gl.constexpr):
        """(sequence length, first tile, tile count) of `seq` within run pid_r."""
        first_seq = gl.load(RUNS + pid_r * 4)
        last_seq = gl.load(RUNS + pid_r * 4 + 2)
        seqlen = gl.load(SEQ + seq)
        first = gl.where(seq == first_seq, gl.load(RUNS + pid_r * 4 + 1), 0)
        end = gl.where(seq == last_seq, gl.load(RUNS + pid_r * 4 + 3), gl.cdiv(seqlen, BLOCK_N))
        return seqlen, first, gl.maximum(end - first, 0)

    @gluon.jit
    def _attend_run(
        Q, OP, LP, q_nope, q_rope, kv_nope, kv_rope, ready, empty, pid_m, pid_r, RUNS, SEQ, OFFSET,
        FIRST_RUN, scale_log2, stride_qb, S_Q: gl.constexpr, H_Q: gl.constexpr,
        BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    ):  # fmt: skip
        """Math partition: each sequence of the run in turn, into its partial slot."""
        k = 0
        for seq in range(gl.load(RUNS + pid_r * 4), gl.load(RUNS + pid_r * 4 + 2) + 1):
            seqlen, first, n_tiles = _piece(RUNS, SEQ, pid_r, seq, BLOCK_N)
            if n_tiles > 0:  # a sequence without KV in this run has no slot of it
                slot = (gl.load(OFFSET + seq) + pid_r - gl.load(FIRST_RUN + seq)).to(gl.int64)
                _attend(
                    Q, OP + slot * (S_Q * H_Q * D_V_C), LP + slot * (S_Q * H_Q), q_nope, q_rope,
                    kv_nope, kv_rope, ready, empty, pid_m, seq, seqlen, first, n_tiles, k,
                    scale_log2, stride_qb, S_Q, H_Q, BLOCK_N, STAGES, False,
                )  # fmt: skip
                k += n_tiles

    @gluon.jit
    def _load_run(
        nope_desc, rope_desc, kv_nope, kv_rope, ready, empty, BT, pid_r, RUNS, SEQ, stride_btb,
        BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    ):  # fmt: skip
        """Loader partition: the run's tiles, sequence after sequence, through one ring."""
        k = 0
        for seq in range(gl.load(RUNS + pid_r * 4), gl.load(RUNS + pid_r * 4 + 2) + 1):
            _, first, n_tiles = _piece(RUNS, SEQ, pid_r, seq, BLOCK_N)
            if n_tiles > 0:
                _load_kv(
                    nope_desc, rope_desc, kv_nope, kv_rope, ready, empty, BT, seq, stride_btb,
                    first, n_tiles, k, BLOCK_N, STAGES,
                )  # fmt: skip
                k += n_tiles

    @gluon.jit
    def mla_runs_kernel(
        Q, nope_desc, rope_desc, BT, SEQ, RUNS, OFFSET, FIRST_RUN, OP, LP, scale_log2, stride_qb,
        stride_btb, S_Q: gl.constexpr, H_Q: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
    ):  # fmt: skip
        """Grid (query tiles, runs); launched with num_warps=8 (the two math warpgroups)."""
        pid_m = gl.program_id(0)
        pid_r = gl.program_id(1)
        q_nope, q_rope, kv_nope, kv_rope, ready, empty = _kv_ring(nope_desc, rope_desc, BLOCK_N, STAGES)
        # Argument tuples are spelled out: constexprs must reach the partitions as constexprs.
        # fmt: off
        gl.warp_specialize(
            [
                (_attend_run, (Q, OP, LP, q_nope, q_rope, kv_nope, kv_rope, ready, empty, pid_m, pid_r,
                               RUNS, SEQ, OFFSET, FIRST_RUN, scale_log2, stride_qb, S_Q, H_Q, BLOCK_N,
                               STAGES)),
                (_load_run, (nope_desc, rope_desc, kv_nope, kv_rope, ready, empty, BT, pid_r, RUNS, SEQ,
                             stride_btb, BLOCK_N, STAGES)),
            ],
            [1],
            [LOADER_REGS_C],
        )
        # fmt: on
        _release_ring(ready, empty, STAGES)
