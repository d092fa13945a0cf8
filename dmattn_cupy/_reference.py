"""NumPy reference path: the readable specification of dynamic-mask attention.

Notation for one (batch b, query head h) and a chunk of query rows i, over keys j:

    s_ij = scale * q_i . k_j + bias_ij                    scores
    s_ij = c * tanh(s_ij / c)            (if c = softcap > 0)
    s_ij = -inf  where mask_ij == 0, or (causal) j > i + Sk - Sq   (bottom-right aligned)
    m_i  = max_j s_ij,   l_i = sum_j exp(s_ij - m_i)
    P_ij = exp(s_ij - m_i) / l_i,   lse_i = m_i + log l_i
    O_i  = sum_j P_ij v_j

A row with no visible key has P = 0, O = 0, lse = -inf and zero gradients.

Memory stays bounded: the work loops over (batch, head, query chunk) and only one chunk's
(rows, Sk) score tile exists at a time, never a full (B, H, Sq, Sk) array.

Precision: float16 inputs are computed in float32 and returned as float16; float64 stays
float64 (float64 bias also promotes the computation). lse is returned in the computing
precision (float32, or float64 for float64 work) so the float64 path stays exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy

from ._validate import Problem

# Score-tile elements per query chunk: rows = this // Sk (32 MiB per float64 tile); a handful of
# such tiles are alive at once, so an 8192 x 8192 problem needs well under 1 GiB of scratch.
CHUNK_ELEMENTS = 1 << 22


def compute_dtype(q, bias) -> numpy.dtype:
    dtypes = [q.dtype] if bias is None else [q.dtype, bias.dtype]
    return numpy.result_type(numpy.float32, *dtypes)


def _tiles(problem: Problem, chunk_rows: int | None) -> Iterator[tuple[int, int, slice]]:
    """(batch, query head, query rows) for every chunk of the problem."""
    rows_per_chunk = chunk_rows or max(1, CHUNK_ELEMENTS // problem.seqlen_k)
    for b in range(problem.batch):
        for h in range(problem.heads):
            for start in range(0, problem.seqlen_q, rows_per_chunk):
                yield b, h, slice(start, min(start + rows_per_chunk, problem.seqlen_q))


def _operand_index(operand, b: int, h: int, rows: slice, problem: Problem) -> tuple:
    """Index of the (rows|1, Sk) slice of a (B|1, H|Hk|1, Sq|1, Sk) mask/bias/dbias.

    Broadcast dims (size 1) read index 0; a head dim of Hk is shared like k/v.
    """
    batch_size, head_size, rows_size, _ = operand.shape
    if head_size == problem.heads:
        head = h
    elif head_size == problem.kv_heads:
        head = h // problem.group_size
    else:
        head = 0
    return (b if batch_size > 1 else 0, head, rows if rows_size > 1 else slice(0, 1))


def _scores(q_rows, k_head, bias_tile, problem: Problem):
    """Capped scores s and, with softcap, tanh(s_pre / c) (the backward needs it)."""
    s = problem.scale * (q_rows @ k_head.T)  # s = scale * q k^T
    if bias_tile is not None:
        s = s + bias_tile  # s += bias; a float-minimum bias stays finite (no -inf, no NaN)
    if problem.softcap == 0:
        return s, None
    tanh = numpy.tanh(s / problem.softcap)
    return problem.softcap * tanh, tanh  # s = c * tanh(s_pre / c)


def _visible(mask_tile, rows: slice, problem: Problem):
    """Bool (rows, Sk): key j is visible to query i (mask != 0 and, if causal, j <= i + Sk - Sq)."""
    visible = numpy.ones((rows.stop - rows.start, problem.seqlen_k), dtype=bool)
    if mask_tile is not None:
        visible &= mask_tile != 0
    if problem.causal:
        i = numpy.arange(rows.start, rows.stop)[:, None]
        j = numpy.arange(problem.seqlen_k)[None, :]
        visible &= j <= i + problem.seqlen_k - problem.seqlen_q
    return visible


def _softmax(s, visible):
    """P (rows, Sk) and lse (rows,) over visible keys; empty rows give P = 0, lse = -inf."""
    with numpy.errstate(over="ignore", divide="ignore"):
        s = numpy.where(visible, s, -numpy.inf)  # hidden keys: s = -inf
        row_max = s.max(axis=-1, keepdims=True)  # m = max_j s_ij  (-inf on empty rows)
        # Empty rows shift by 0, not by m = -inf, to avoid (-inf) - (-inf) = NaN. Subtracting
        # the max first keeps exp in range even when bias sits at the float minimum: a row whose
        # keys all have that bias gets s - m = 0 and so the uniform softmax.
        shift = numpy.where(numpy.isfinite(row_max), row_max, 0)
        e = numpy.exp(s - shift)  # e_ij = exp(s_ij - m_i), 0 where hidden
        total = e.sum(axis=-1, keepdims=True)  # l_i = sum_j e_ij (>= 1 unless the row is empty)
        p = e / numpy.where(total > 0, total, 1)  # P = e / l
        lse = (shift + numpy.log(total))[:, 0]  # lse = m + log l  (log 0 = -inf: empty rows)
    return p, lse


def _tile_inputs(q, k, v, mask, bias, b, h, rows, problem, dtype):
    """One tile's q rows, k/v heads (GQA: kv head h // group) and visible/bias slices."""
    kv_head = h // problem.group_size
    q_rows = q[b, rows, h].astype(dtype)
    k_head = k[b, :, kv_head].astype(dtype)
    v_head = v[b, :, kv_head].astype(dtype)
    bias_tile = (None if bias is None
                 else bias[_operand_index(bias, b, h, rows, problem)].astype(dtype))
    mask_tile = None if mask is None else mask[_operand_index(mask, b, h, rows, problem)]
    return q_rows, k_head, v_head, bias_tile, _visible(mask_tile, rows, problem)


def forward(q, k, v, mask, bias, problem: Problem, chunk_rows: int | None = None):
    """out (q's shape and dtype) and lse (B, H, Sq). chunk_rows overrides the chunk height."""
    dtype = compute_dtype(q, bias)
    out = numpy.empty(q.shape, dtype)
    lse = numpy.empty((problem.batch, problem.heads, problem.seqlen_q), dtype)
    for b, h, rows in _tiles(problem, chunk_rows):
        q_rows, k_head, v_head, bias_tile, visible = _tile_inputs(
            q, k, v, mask, bias, b, h, rows, problem, dtype)
        s, _ = _scores(q_rows, k_head, bias_tile, problem)
        p, lse[b, h, rows] = _softmax(s, visible)
        out[b, rows, h] = p @ v_head  # O = P V
    return out.astype(q.dtype, copy=False), lse


def backward(dout, q, k, v, out, mask, bias, problem: Problem, chunk_rows: int | None = None):
    """(dq, dk, dv, dbias) in the dtypes of q, k, v, bias; dbias is None without bias.

    P is recomputed from the scores (each chunk holds whole rows) rather than as exp(s - lse):
    where bias sits at the float minimum, lse = m + log l rounds to m and exp(s - lse) would
    lose the 1/l factor. Both are the same P in exact arithmetic.
    """
    dtype = compute_dtype(q, bias)
    dq = numpy.zeros(q.shape, dtype)
    dk = numpy.zeros(k.shape, dtype)
    dv = numpy.zeros(v.shape, dtype)
    dbias = None if bias is None else numpy.zeros(bias.shape, dtype)
    for b, h, rows in _tiles(problem, chunk_rows):
        q_rows, k_head, v_head, bias_tile, visible = _tile_inputs(
            q, k, v, mask, bias, b, h, rows, problem, dtype)
        kv_head = h // problem.group_size
        s, tanh = _scores(q_rows, k_head, bias_tile, problem)
        p, _ = _softmax(s, visible)  # P = 0 at hidden keys, so every gradient there is 0
        do = dout[b, rows, h].astype(dtype)
        dv[b, :, kv_head] += p.T @ do  # dV = P^T dO   (summed over the group's query heads)
        dp = do @ v_head.T  # dP = dO V^T
        di = (do * out[b, rows, h].astype(dtype)).sum(axis=-1, keepdims=True)  # D = rowsum(dO∘O)
        ds = p * (dp - di)  # dS = P ∘ (dP - D)
        if tanh is not None:
            ds = ds * (1 - tanh * tanh)  # through s = c tanh(s_pre / c): dS_pre = dS ∘ (1 - tanh²)
        dq[b, rows, h] = problem.scale * (ds @ k_head)  # dQ = scale · dS K
        dk[b, :, kv_head] += problem.scale * (ds.T @ q_rows)  # dK = scale · dS^T Q
        if dbias is not None:
            index = _operand_index(dbias, b, h, rows, problem)
            # dBias = dS_pre, summed over every dim the bias was broadcast on.
            dbias[index] += ds if dbias.shape[2] > 1 else ds.sum(axis=0, keepdims=True)
    return (dq.astype(q.dtype, copy=False), dk.astype(k.dtype, copy=False),
            dv.astype(v.dtype, copy=False),
            None if dbias is None else dbias.astype(bias.dtype, copy=False))
