"""Compiled gather of sequence windows: one block copy per window, the next windows prefetched.

A shuffled batch copies ``B`` windows of ``L`` contiguous rows from random places of the split's
``(N, F)`` row-major array. NumPy's fancy index of a ``sliding_window_view`` already copies each window
as one block, but it asks for the next window's memory only when it starts copying it, so every window
begins with a wait on main memory. :func:`gather_windows` tells the CPU about the window
:data:`PREFETCH_AHEAD` places ahead (a prefetch hint per 64-byte line, ``llvm.prefetch``) before
copying the current one with ``llvm.memcpy`` (the C library's block copy), so the loads of the next
windows overlap the copy of this one. Measured on 1M rows x 32 float32 features, L 30, B 256,
shuffled, one core: 4.7M windows/s against 3.3-3.4M for the NumPy gather; numba loops that copy
element by element reached 1.0-2.8M (``bench/bench_loader.py`` measures the batcher).

The result is byte for byte the NumPy gather's (tested). The kernel checks the shapes, dtypes and
contiguity of both arrays and every start row against the bounds before it copies anything, and
raises instead of reading or writing outside them.

Numba has no prefetch or memcpy function of its own, so the two are emitted as LLVM intrinsics
(``numba.extending.intrinsic``, a few lines each); the kernel is compiled into numba's on-disk cache
like the project's other kernels.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

PREFETCH_AHEAD = 2  # windows ahead of the one being copied (1, 2 and 4 measured alike; 8 slower)
CACHE_LINE = 64

# llvm.prefetch is overloaded on its pointer type; the typed-pointer name is what LLVM 14 needs and
# what later LLVMs (opaque pointers, "p0") still accept by renaming it
_PREFETCH_NAME = "llvm.prefetch.p0i8"


def _data_pointer(context, builder, array_type, value):  # noqa: ANN001, ANN202 - numba codegen objects
    array = context.make_array(array_type)(context, builder, value)
    return builder.bitcast(array.data, cgutils.voidptr_t)


@intrinsic
def _prefetch(typingctx, array, byte_offset):  # noqa: ANN001, ANN202, ARG001 - numba intrinsic signature
    """Hint: load the cache line at ``array``'s data + ``byte_offset`` (read, keep in all cache levels)."""
    sig = types.void(array, byte_offset)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        base = _data_pointer(context, builder, signature.args[0], args[0])
        address = builder.gep(base, [args[1]])
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t, i32, i32, i32]),
                                            _PREFETCH_NAME)
        builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _copy_bytes(typingctx, dst, dst_offset, src, src_offset, n_bytes):  # noqa: ANN001, ANN202, ARG001
    """``memcpy(dst.data + dst_offset, src.data + src_offset, n_bytes)`` (no bounds check: the caller's)."""
    sig = types.void(dst, dst_offset, src, src_offset, n_bytes)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        to = builder.gep(_data_pointer(context, builder, signature.args[0], args[0]), [args[1]])
        frm = builder.gep(_data_pointer(context, builder, signature.args[2], args[2]), [args[3]])
        cgutils.raw_memcpy(builder, to, frm, args[4], 1)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def gather_windows_into(rows: np.ndarray, starts: np.ndarray, seq_len: int, out: np.ndarray) -> None:
    """Kernel of :func:`gather_windows`, which allocates ``out`` and calls it:
    ``rows`` a C-contiguous ``(N, F)`` array, ``starts`` int64, ``out`` a C-contiguous
    ``(len(starts), seq_len, F)`` array of the rows' dtype. It checks all of that (it raises
    ``ValueError``, and ``IndexError`` for a start row outside ``rows``) before it copies anything."""
    n_rows = rows.shape[0]
    row_bytes = rows.shape[1] * rows.itemsize
    window = seq_len * row_bytes
    lines = (window + CACHE_LINE - 1) // CACHE_LINE
    n = starts.shape[0]
    if not (rows.flags.c_contiguous and out.flags.c_contiguous and out.itemsize == rows.itemsize):
        raise ValueError("rows and out must be C-contiguous arrays of one dtype")
    if out.shape[0] != n or out.shape[1] != seq_len or out.shape[2] != rows.shape[1]:
        raise ValueError("out must have the shape (len(starts), seq_len, rows.shape[1])")
    for j in range(n):
        start = starts[j]
        if start < 0 or start + seq_len > n_rows:
            raise IndexError("window start row outside the array")
    for j in range(min(PREFETCH_AHEAD, n)):
        for k in range(lines):
            _prefetch(rows, starts[j] * row_bytes + k * CACHE_LINE)
    for j in range(n):
        if j + PREFETCH_AHEAD < n:
            ahead = starts[j + PREFETCH_AHEAD] * row_bytes
            for k in range(lines):
                _prefetch(rows, ahead + k * CACHE_LINE)
        _copy_bytes(out, j * window, rows, starts[j] * row_bytes, window)


def gather_windows(rows: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    """The ``(len(starts), seq_len, F)`` windows of ``rows`` (a C-contiguous ``(N, F)`` array) beginning
    at ``starts``: ``sliding_window_view(rows, (seq_len, F))[:, 0][starts]``, byte for byte."""
    if rows.ndim != 2 or not rows.flags.c_contiguous:
        raise ValueError("gather_windows needs a C-contiguous (N, F) array")
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    out = np.empty((starts.shape[0], seq_len, rows.shape[1]), dtype=rows.dtype)
    if starts.shape[0] and seq_len and rows.shape[1]:
        gather_windows_into(rows, starts, seq_len, out)
    return out
