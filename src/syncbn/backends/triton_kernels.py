"""The Triton kernels of the GPU backend (``triton.py`` plans and launches them).

Imported only on first use, by ``triton._kernels()``: ``@triton.jit`` decides at
definition time whether the kernels are compiled for the GPU or run by Triton's interpreter
(``TRITON_INTERPRET=1``, CPU tensors), so this module must be imported after that variable is set.
Without triton installed it still imports (the kernels are then plain, unused functions).

Geometry: the input ``(N, C, *)`` is seen as ``(N, C, S)`` with strides ``(s_n, s_c, s_s)``
(contiguous or channels_last alike); a "row" ``m = n*S + s`` holds one value per channel, and
the reduction runs over ``rows = N*S`` rows. Row ``m`` sits at ``n*s_n + s*s_s``; when that is a
single stride (``LINEAR``: N == 1, S == 1 or ``s_n == S*s_s``) the host passes it as ``s_n`` and
no division is needed. A tile is ``tile_rows`` rows by ``BLOCK_C`` channels; program ``pid``
handles channel block ``pid % n_cb`` of row tile ``pid // n_cb`` (all on grid axis 0). Offsets
are int64; row indices int32 (the backend refuses ``rows >= 2**30``).

Per-element math is in ``ACC`` (float32 for half/float32 data, float64 for float64 data); every
per-channel quantity and every partial that crosses a kernel is float64. ``x - mean`` is formed
as ``(x - hi) - lo`` with ``mean = hi + lo`` split into two ``ACC`` numbers, so it is accurate
when ``|mean| >> std``.
"""

from __future__ import annotations

from .. import _wire

try:
    import triton
    import triton.language as tl
except ImportError:  # the backend does not apply without triton; nothing here is called
    triton = tl = None

# Status codes (``_wire.py``) and policies, as compile-time constants inside the kernels.
if tl is not None:
    _MISMATCH = tl.constexpr(_wire.MISMATCH)
    _NONFINITE = tl.constexpr(_wire.NONFINITE)
    _SKIP = tl.constexpr(_wire.POLICIES["skip"])
    _RAISE = tl.constexpr(_wire.POLICIES["raise"])
    _NF = tl.constexpr(len(_wire.FIELDS))  # the header is 2 * _NF numbers before the sentinel


def _jit(**options):
    """``triton.jit(**options)``, or the bare function when triton is not installed."""
    return triton.jit(**options) if triton is not None else (lambda fn: fn)


_FIELDS = ["f0", "f1", "f2", "f3", "f4", "f5"]
_RUNTIME = ["world", *_FIELDS]  # never specialized (1 or multiples of 16 must not recompile)


# ---------------------------------------------------------------------------------- helpers


@_jit()
def _rows(m, S, LINEAR: tl.constexpr):
    """Row indices ``m`` (int32) -> ``(n, s)`` as int64 (``s`` unused when LINEAR)."""
    if LINEAR:
        n = m.to(tl.int64)
        s = n * 0
    else:
        q = m // S
        n = q.to(tl.int64)
        s = (m - q * S).to(tl.int64)
    return n, s


@_jit()
def _offsets(n, s, c, s_n, s_c, s_s, LINEAR: tl.constexpr):
    """``[BLOCK_M, BLOCK_C]`` int64 element offsets of rows ``(n, s)`` and channels ``c``."""
    if LINEAR:
        row = n * s_n
    else:
        row = n * s_n + s * s_s
    return row[:, None] + c.to(tl.int64)[None, :] * s_c


@_jit()
def _add(a, b):
    return a + b


@_jit()
def _sum(x, axis: tl.constexpr):
    """``tl.sum`` (a reduction with ``+``, a fixed tree on the GPU), built from core builtins
    only: the standard library's ``@jit`` helpers (tl.sum, tl.zeros) are JITFunctions when
    triton was imported before TRITON_INTERPRET was set, and the interpreter cannot call them."""
    return tl.reduce(x, axis, _add)


@_jit()
def _spread(flag, like):
    """A scalar condition as a boolean vector shaped like the int vector ``like``
    (``vector & scalar`` gives a non-boolean mask under Triton 3.9's interpreter)."""
    return (like * 0 + flag.to(tl.int32)) != 0


@_jit()
def _head_values(f0, f1, f2, f3, f4, f5):
    """The header a rank writes, in 16 slots: ``[f0, f0**2, ..., f5, f5**2, f5, f5**2, ...]``
    (float64; the fields are integers below 2**20, so every value and W times it is exact)."""
    i = tl.arange(0, 16)
    k = i // 2
    f = tl.where(k == 0, f0, tl.where(k == 1, f1, tl.where(k == 2, f2, tl.where(
        k == 3, f3, tl.where(k == 4, f4, f5)))))
    f = tl.cast(f, tl.float64)
    return tl.where(i % 2 == 0, f, f * f)


@_jit()
def _frame(buf, pid, programs, pay_end, L, f0, f1, f2, f3, f4, f5, BLOCK_Z: tl.constexpr):
    """Write the buffer's frame: sentinels ``buf[0] = buf[L-1] = 1``, zeros on
    ``[pay_end, L-1-2*NF)`` (spread over the programs) and the header (program 0)."""
    head = L - 1 - 2 * _NF
    i = tl.arange(0, 16)
    first = _spread(pid == 0, i)
    tl.store(buf + head + i, _head_values(f0, f1, f2, f3, f4, f5), mask=(i < 2 * _NF) & first)
    ends = tl.where(i == 0, 0, L - 1).to(tl.int64)
    tl.store(buf + ends, tl.full([16], 1.0, tl.float64), mask=(i < 2) & first)
    z = tl.arange(0, BLOCK_Z)
    for start in range(pay_end + pid * BLOCK_Z, head, programs * BLOCK_Z):
        tl.store(buf + start + z, tl.full([BLOCK_Z], 0, tl.float64), mask=start + z < head)


@_jit()
def _header_ok(buf, L, world, f0, f1, f2, f3, f4, f5):
    """True when the reduced header shows every rank sent the same fields and both sentinels
    came back as ``world``."""
    head = L - 1 - 2 * _NF
    i = tl.arange(0, 16)
    w = tl.cast(world, tl.float64)
    got = tl.load(buf + head + i, mask=i < 2 * _NF, other=0.0)
    want = tl.where(i < 2 * _NF, w * _head_values(f0, f1, f2, f3, f4, f5), 0.0)
    bad = _sum((got != want).to(tl.int32), 0)
    return (bad == 0) & (tl.load(buf) == w) & (tl.load(buf + L - 1) == w)


@_jit()
def _finite(v):
    return tl.abs(v) < float("inf")  # False for NaN and +-Inf


@_jit()
def _sum_tiles(part, T, C, c, cmask, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per channel, the two float64 partials ``part[0, :, c]`` and ``part[1, :, c]`` summed over
    the ``T`` tiles in a fixed order (blocks of BLOCK_T tiles, each summed as a fixed tree)."""
    a = tl.full([BLOCK_C], 0, tl.float64)
    b = tl.full([BLOCK_C], 0, tl.float64)
    t = tl.arange(0, BLOCK_T)
    plane = tl.cast(T, tl.int64) * C
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + t
        off = rows.to(tl.int64)[:, None] * C + c.to(tl.int64)[None, :]
        mask = (rows < T)[:, None] & cmask[None, :]
        a += _sum(tl.load(part + off, mask=mask, other=0.0), 0)
        b += _sum(tl.load(part + plane + off, mask=mask, other=0.0), 0)
    return a, b


@_jit()
def _split(mean, ACC: tl.constexpr):
    """``mean`` (float64) as ``hi + lo`` in ACC: ``(x - hi) - lo`` is ``x - mean`` to ACC's
    precision even when ``|mean| >> std``."""
    hi = mean.to(ACC)
    lo = (mean - hi.to(tl.float64)).to(ACC)
    return hi, lo


@_jit()
def _narrow(v, ptr):
    """float64 ``v`` in ``ptr``'s element type, bfloat16 through float32: Triton's interpreter
    (3.9) turns a direct float64 -> bfloat16 cast into garbage. (Rounding twice can differ from
    rounding once by one bfloat16 unit, in rare ties.)"""
    if ptr.dtype.element_ty == tl.bfloat16:
        v = v.to(tl.float32)
    return v.to(ptr.dtype.element_ty)


@_jit()
def _expm1(z):
    """``exp(z) - 1`` accurate near 0 (Kahan: ``(u - 1) * z / log(u)``, ``u = exp(z)``)."""
    u = tl.exp(z)
    um1 = u - 1.0
    safe = tl.where((um1 == 0.0) | (um1 == -1.0), 1.0, um1)
    ratio = safe * z / tl.log(tl.where(um1 == 0.0, 2.0, u))
    return tl.where(um1 == 0.0, z, tl.where(um1 == -1.0, -1.0, ratio))


@_jit()
def _log1p(t):
    """``log(1 + t)`` accurate near 0 (``log(u) * t / (u - 1)``, ``u = 1 + t``)."""
    u = 1.0 + t
    um1 = u - 1.0
    return tl.where(um1 == 0.0, t, tl.log(u) * t / tl.where(um1 == 0.0, 1.0, um1))


# The activations (``_stats``: IDENTITY 0, RELU 1, LEAKY_RELU 2, ELU 3), with torch's
# conventions; ``p`` is leaky_relu's slope or elu's alpha, in the element math's dtype.
@_jit()
def _act(z, p, ACT: tl.constexpr):
    """``act(z)``."""
    out = z
    if ACT == 1:
        out = tl.where(z < 0.0, 0.0, z)
    elif ACT == 2:
        out = tl.where(z > 0.0, z, z * p)
    elif ACT == 3:
        out = tl.where(z > 0.0, z, p * _expm1(z))
    return out


@_jit()
def _act_dz(z, p, ACT: tl.constexpr):
    """``act'(z)`` at the pre-activation (torch's value at ``z = 0``); not for identity."""
    if ACT == 1:
        out = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        out = tl.where(z > 0.0, 1.0, p)
    else:
        out = tl.where(z > 0.0, 1.0, p * tl.exp(z))
    return out


@_jit()
def _act_dy(y, p, ACT: tl.constexpr):
    """``act'(z)`` from the output ``y`` (relu and the invertible kinds); not for identity."""
    if ACT == 1:
        out = tl.where(y > 0.0, 1.0, 0.0)
    elif ACT == 2:
        out = tl.where(y > 0.0, 1.0, p)
    else:
        out = tl.where(y > 0.0, 1.0, y + p)
    return out


@_jit()
def _act_inv(y, p, LOWEST, ACT: tl.constexpr):
    """``z`` with ``act(z) == y`` (invertible kinds; elu's ``y / alpha`` clamped at LOWEST, the
    data dtype's smallest number above -1)."""
    out = y
    if ACT == 2:
        out = tl.where(y > 0.0, y, y / p)
    elif ACT == 3:
        t = y / p
        out = tl.where(y > 0.0, y, _log1p(tl.where(t < LOWEST, LOWEST, t)))
    return out


# ---------------------------------------------------------------------------------- forward


@_jit()
def fwd_tile(x, part, rows, C, S, x_n, x_c, x_s, tile_rows, n_cb,
             LINEAR: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_C: tl.constexpr):
    """Tile partials: the raw moments ``sum(x)``, ``sum(x**2)`` of one tile, in float64, from
    sums around the mean ``k`` of the tile's first BLOCK_M rows (``s1 = sum(x - k)``,
    ``s2 = sum((x - k)**2)`` in ACC): ``sum(x) = n*k + s1``, ``sum(x**2) = s2 + k*(2*s1 + n*k)``.
    ``part`` is ``[2, T, C]`` float64. An empty shard (rows == 0) runs one tile of zeros."""
    pid = tl.program_id(0)
    cb = pid % n_cb
    t = pid // n_cb
    T = tl.num_programs(0) // n_cb
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    r0 = t * tile_rows
    r1 = tl.minimum(r0 + tile_rows, rows)
    i = tl.arange(0, BLOCK_M)

    m = r0 + i
    n, s = _rows(m, S, LINEAR)
    mask = (m < r1)[:, None] & cmask[None, :]
    head = tl.load(x + _offsets(n, s, c, x_n, x_c, x_s, LINEAR), mask=mask, other=0.0)
    first = tl.maximum(tl.minimum(r1 - r0, BLOCK_M), 1).to(ACC)
    k = _sum(head.to(ACC), 0) / first  # the shift: the first rows' mean, near the tile's mean

    s1 = tl.full([BLOCK_M, BLOCK_C], 0, ACC)
    s2 = tl.full([BLOCK_M, BLOCK_C], 0, ACC)
    for start in range(r0, r1, BLOCK_M):
        m = start + i
        n, s = _rows(m, S, LINEAR)
        mask = (m < r1)[:, None] & cmask[None, :]
        v = tl.load(x + _offsets(n, s, c, x_n, x_c, x_s, LINEAR), mask=mask, other=0.0)
        d = tl.where(mask, v.to(ACC) - k[None, :], 0.0)
        s1 += d
        s2 += d * d
    k64 = k.to(tl.float64)
    a = _sum(s1, 0).to(tl.float64)
    b = _sum(s2, 0).to(tl.float64)
    cnt = tl.maximum(r1 - r0, 0).to(tl.float64)
    out = t.to(tl.int64) * C + c
    tl.store(part + out, cnt * k64 + a, mask=cmask)
    tl.store(part + tl.cast(T, tl.int64) * C + out, b + k64 * (2.0 * a + cnt * k64), mask=cmask)


@_jit(do_not_specialize=_FIELDS)
def fwd_pack(part, buf, T, C, rows, L, f0, f1, f2, f3, f4, f5,
             BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_Z: tl.constexpr):
    """The whole forward buffer: ``[1 | sum(x) (C) | sum(x**2) (C) | n | 0... | header | 1]``,
    the tile partials summed in a fixed order (deterministic, no atomics)."""
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    sx, sx2 = _sum_tiles(part, T, C, c, cmask, BLOCK_T, BLOCK_C)
    tl.store(buf + 1 + c, sx, mask=cmask)
    tl.store(buf + 1 + C + c, sx2, mask=cmask)
    tl.store(buf + 1 + 2 * C, tl.cast(rows, tl.float64), mask=pid == 0)
    _frame(buf, pid, tl.num_programs(0), 2 * C + 2, L, f0, f1, f2, f3, f4, f5, BLOCK_Z)


@_jit(do_not_specialize=_RUNTIME)
def fwd_apply(x, out, buf, stats, w, b, rmean, rvar, status,
              rows, C, S, L, x_n, x_c, x_s, o_n, o_c, o_s, tile_rows, n_cb,
              world, f0, f1, f2, f3, f4, f5, eps: tl.float64, momentum: tl.float64,
              act_param: tl.float64,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RM: tl.constexpr,
              HAS_RV: tl.constexpr, POLICY: tl.constexpr, LINEAR: tl.constexpr,
              ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
              ACT: tl.constexpr):
    """From the reduced buffer: header check, float64 mean/var/invstd, ``stats`` (row tile 0),
    running statistics (row tile 0, only when the header is right, the global count >= 2 and,
    with POLICY RAISE, every sum is finite), the status word (program 0), then this tile's
    ``out = act((x - mean) * invstd * w + b)`` (``out`` may be ``x``: each element is read
    before it is written, by the same program)."""
    pid = tl.program_id(0)
    cb = pid % n_cb
    t = pid // n_cb
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C

    ok = _header_ok(buf, L, world, f0, f1, f2, f3, f4, f5)
    sx = tl.load(buf + 1 + c, mask=cmask, other=0.0)
    sx2 = tl.load(buf + 1 + C + c, mask=cmask, other=0.0)
    count = tl.load(buf + 1 + 2 * C)
    mean = sx / count
    var = sx2 / count - mean * mean
    var = tl.where(var < 0.0, 0.0, var)  # (a NaN stays NaN)
    invstd = 1.0 / tl.sqrt(var + eps)

    owner = cmask & _spread(t == 0, c)  # row tile 0 writes the per-channel results
    tl.store(stats + c, mean, mask=owner)
    tl.store(stats + C + c, invstd, mask=owner)
    tl.store(stats + 2 * C, count, mask=pid == 0)
    bad = _sum(tl.full([BLOCK_C], 0, tl.int32), 0)
    if POLICY == _RAISE:  # every sum of every channel must be finite (the C kernel's rule)
        j = tl.arange(0, BLOCK_C)
        for c0 in range(0, 2 * C, BLOCK_C):
            v = tl.load(buf + 1 + c0 + j, mask=c0 + j < 2 * C, other=0.0)
            bad += _sum((~_finite(v)).to(tl.int32), 0)
    finite = bad == 0
    code = tl.where(ok, tl.where(finite, 0, _NONFINITE), _MISMATCH)
    old = tl.load(status)
    tl.store(status, tl.maximum(old, code), mask=pid == 0)

    update = owner & _spread(ok & finite & (count >= 2.0), c)
    if HAS_RM:
        before = tl.load(rmean + c, mask=update, other=0.0).to(tl.float64)
        new = before * (1.0 - momentum) + mean * momentum
        if POLICY == _SKIP:
            new = tl.where(_finite(new), new, before)
        tl.store(rmean + c, _narrow(new, rmean), mask=update)
    if HAS_RV:
        before = tl.load(rvar + c, mask=update, other=0.0).to(tl.float64)
        new = before * (1.0 - momentum) + var * (count / (count - 1.0)) * momentum
        if POLICY == _SKIP:
            new = tl.where(_finite(new), new, before)
        tl.store(rvar + c, _narrow(new, rvar), mask=update)

    scale = invstd
    if HAS_W:
        scale = scale * tl.load(w + c, mask=cmask, other=0.0).to(tl.float64)
    shift = tl.full([BLOCK_C], 0, tl.float64)
    if HAS_B:
        shift = tl.load(b + c, mask=cmask, other=0.0).to(tl.float64)
    hi, lo = _split(mean, ACC)
    scale_a = scale.to(ACC)
    shift_a = shift.to(ACC)
    # a float64 vector first: tl.cast of a scalar argument rounds it to float32 when interpreted
    p = (tl.full([BLOCK_C], 0, tl.float64) + act_param).to(ACC)[None, :]
    r0 = t * tile_rows
    r1 = tl.minimum(r0 + tile_rows, rows)
    i = tl.arange(0, BLOCK_M)
    for start in range(r0, r1, BLOCK_M):
        m = start + i
        n, s = _rows(m, S, LINEAR)
        mask = (m < r1)[:, None] & cmask[None, :]
        v = tl.load(x + _offsets(n, s, c, x_n, x_c, x_s, LINEAR), mask=mask, other=0.0).to(ACC)
        y = ((v - hi[None, :]) - lo[None, :]) * scale_a[None, :] + shift_a[None, :]
        y = _act(y, p, ACT)
        tl.store(out + _offsets(n, s, c, o_n, o_c, o_s, LINEAR), y.to(out.dtype.element_ty),
                 mask=mask)


# ---------------------------------------------------------------------------------- backward


@_jit()
def _coefs(w, b, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per channel (float64): weight and bias, 1 and 0 where absent."""
    weight = tl.full([BLOCK_C], 1.0, tl.float64)
    bias = tl.full([BLOCK_C], 0.0, tl.float64)
    if HAS_W:
        weight = tl.load(w + c, mask=cmask, other=1.0).to(tl.float64)
    if HAS_B:
        bias = tl.load(b + c, mask=cmask, other=0.0).to(tl.float64)
    return weight, bias


@_jit()
def bwd_tile(dy, v, stats, w, b, part, rows, C, S, d_n, d_c, d_s, x_n, x_c, x_s, tile_rows,
             n_cb, act_param: tl.float64, lowest: tl.float64,
             LINEAR: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_C: tl.constexpr, ACT: tl.constexpr, FROM_Y: tl.constexpr,
             HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Tile partials ``sum(dz)`` and (``v`` = x) ``sum(dz * (x - mean))`` or (FROM_Y: ``v`` = the
    output y) ``sum(dz * xhat)`` (float64) into ``part [2, T, C]``; ``dz = dy * act'(z)``, with
    ``z = (x - mean) * invstd * w + b`` or ``z = act^-1(y)``, ``xhat = (z - b) / w``."""
    pid = tl.program_id(0)
    cb = pid % n_cb
    t = pid // n_cb
    T = tl.num_programs(0) // n_cb
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    hi, lo = _split(tl.load(stats + c, mask=cmask, other=0.0), ACC)
    weight, bias = _coefs(w, b, c, cmask, HAS_W, HAS_B, BLOCK_C)
    scale = (tl.load(stats + C + c, mask=cmask, other=0.0) * weight).to(ACC)
    shift = bias.to(ACC)
    wa = weight.to(ACC)
    # a float64 vector first: tl.cast of a scalar argument rounds it to float32 when interpreted
    p = (tl.full([BLOCK_C], 0, tl.float64) + act_param).to(ACC)[None, :]
    low = (tl.full([BLOCK_C], 0, tl.float64) + lowest).to(ACC)[None, :]
    r0 = t * tile_rows
    r1 = tl.minimum(r0 + tile_rows, rows)
    i = tl.arange(0, BLOCK_M)
    a = tl.full([BLOCK_M, BLOCK_C], 0, ACC)
    bb = tl.full([BLOCK_M, BLOCK_C], 0, ACC)
    for start in range(r0, r1, BLOCK_M):
        m = start + i
        n, s = _rows(m, S, LINEAR)
        mask = (m < r1)[:, None] & cmask[None, :]
        g = tl.load(dy + _offsets(n, s, c, d_n, d_c, d_s, LINEAR), mask=mask, other=0.0).to(ACC)
        u = tl.load(v + _offsets(n, s, c, x_n, x_c, x_s, LINEAR), mask=mask, other=0.0).to(ACC)
        if FROM_Y:
            if ACT != 0:
                g = g * _act_dy(u, p, ACT)
            xh = (_act_inv(u, p, low, ACT) - shift[None, :]) / wa[None, :]
        else:
            xh = (u - hi[None, :]) - lo[None, :]
            if ACT != 0:
                g = g * _act_dz(xh * scale[None, :] + shift[None, :], p, ACT)
        a += tl.where(mask, g, 0.0)
        bb += tl.where(mask, g * xh, 0.0)
    out = t.to(tl.int64) * C + c
    tl.store(part + out, _sum(a, 0).to(tl.float64), mask=cmask)
    tl.store(part + tl.cast(T, tl.int64) * C + out, _sum(bb, 0).to(tl.float64), mask=cmask)


@_jit(do_not_specialize=_FIELDS)
def bwd_pack(part, stats, buf, gw, gb, T, C, rows, L, f0, f1, f2, f3, f4, f5,
             HAS_BUF: tl.constexpr, HAS_GW: tl.constexpr, HAS_GB: tl.constexpr,
             BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_Z: tl.constexpr,
             XHAT: tl.constexpr):
    """Local ``grad_bias = sum(dy)``, ``grad_weight = sum(dy * xhat) = invstd * sum(dy*(x-mean))``
    (XHAT: the partials are of ``dy * xhat`` already) in their dtypes, and (HAS_BUF) the whole
    backward buffer ``[1 | sum(dy) (C) | sum(dy * xhat) (C) | 0... | header | 1]``."""
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    sdy, sdyx = _sum_tiles(part, T, C, c, cmask, BLOCK_T, BLOCK_C)
    # an empty shard sends exact zeros, even when the global batch is empty too (invstd NaN)
    if not XHAT:
        sdyx = sdyx * tl.load(stats + C + c, mask=cmask, other=0.0)
    sdyxhat = tl.where(rows > 0, sdyx, 0.0)
    if HAS_GW:
        tl.store(gw + c, _narrow(sdyxhat, gw), mask=cmask)
    if HAS_GB:
        tl.store(gb + c, _narrow(sdy, gb), mask=cmask)
    if HAS_BUF:
        tl.store(buf + 1 + c, sdy, mask=cmask)
        tl.store(buf + 1 + C + c, sdyxhat, mask=cmask)
        _frame(buf, pid, tl.num_programs(0), 2 * C + 1, L, f0, f1, f2, f3, f4, f5, BLOCK_Z)


@_jit(do_not_specialize=_RUNTIME)
def bwd_apply(dy, v, gin, stats, w, b, buf, status, rows, C, S, L,
              d_n, d_c, d_s, x_n, x_c, x_s, g_n, g_c, g_s, tile_rows, n_cb,
              world, f0, f1, f2, f3, f4, f5, act_param: tl.float64, lowest: tl.float64,
              HAS_W: tl.constexpr, LINEAR: tl.constexpr, ACC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACT: tl.constexpr,
              FROM_Y: tl.constexpr, HAS_B: tl.constexpr):
    """Header check into ``status`` (program 0), then this tile's
    ``grad_input = w*invstd*(dz - S_dz/n - xhat*S_dzxhat/n)`` with the GLOBAL sums: from x
    (``v``), mean-first, ``dz*a + (x - mean)*b + c``; or (FROM_Y) from the output y (``v``),
    ``dz*a + xhat*b + c``; ``dz`` and ``xhat`` as in :func:`bwd_tile`."""
    pid = tl.program_id(0)
    cb = pid % n_cb
    t = pid // n_cb
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    ok = _header_ok(buf, L, world, f0, f1, f2, f3, f4, f5)
    old = tl.load(status)
    tl.store(status, tl.maximum(old, tl.where(ok, 0, _MISMATCH)), mask=pid == 0)

    mean = tl.load(stats + c, mask=cmask, other=0.0)
    invstd = tl.load(stats + C + c, mask=cmask, other=0.0)
    count = tl.load(stats + 2 * C)
    sdy = tl.load(buf + 1 + c, mask=cmask, other=0.0)
    sdyxhat = tl.load(buf + 1 + C + c, mask=cmask, other=0.0)
    weight, bias = _coefs(w, b, c, cmask, HAS_W, HAS_B, BLOCK_C)
    k = invstd * weight
    ca = k.to(ACC)
    if FROM_Y:
        cb_ = (-k * (sdyxhat / count)).to(ACC)
    else:
        cb_ = (-k * invstd * (sdyxhat / count)).to(ACC)
    cc = (-k * (sdy / count)).to(ACC)
    shift = bias.to(ACC)
    wa = weight.to(ACC)
    # a float64 vector first: tl.cast of a scalar argument rounds it to float32 when interpreted
    p = (tl.full([BLOCK_C], 0, tl.float64) + act_param).to(ACC)[None, :]
    low = (tl.full([BLOCK_C], 0, tl.float64) + lowest).to(ACC)[None, :]
    hi, lo = _split(mean, ACC)
    r0 = t * tile_rows
    r1 = tl.minimum(r0 + tile_rows, rows)
    i = tl.arange(0, BLOCK_M)
    for start in range(r0, r1, BLOCK_M):
        m = start + i
        n, s = _rows(m, S, LINEAR)
        mask = (m < r1)[:, None] & cmask[None, :]
        g = tl.load(dy + _offsets(n, s, c, d_n, d_c, d_s, LINEAR), mask=mask, other=0.0).to(ACC)
        u = tl.load(v + _offsets(n, s, c, x_n, x_c, x_s, LINEAR), mask=mask, other=0.0).to(ACC)
        if FROM_Y:
            if ACT != 0:
                g = g * _act_dy(u, p, ACT)
            xh = (_act_inv(u, p, low, ACT) - shift[None, :]) / wa[None, :]
        else:
            xh = (u - hi[None, :]) - lo[None, :]
            if ACT != 0:
                g = g * _act_dz(xh * ca[None, :] + shift[None, :], p, ACT)
        r = g * ca[None, :] + xh * cb_[None, :] + cc[None, :]
        tl.store(gin + _offsets(n, s, c, g_n, g_c, g_s, LINEAR), r.to(gin.dtype.element_ty),
                 mask=mask)
