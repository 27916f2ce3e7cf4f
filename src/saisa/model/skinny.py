"""Triton GEMMs for few rows against a large weight: the text GEMMs of a batch-1 prefill (T <= 64 rows).

Unusual here: at so few rows y = x W^T is memory-bound (every weight byte is read once and used T times). These
kernels give each program a slice of W's rows and ALL of x's rows, so W is read exactly once, with a deep software
pipeline of loads. `gate_up` reads W_gate and W_up in the same loop and applies SiLU(g) * u on the way out, the
FFN's first half in one kernel: 2.70 TB/s at Vicuna-7B's shapes on an H100 against 2.39 for cuBLAS's two GEMMs and
the product, so the compiled text layers use it (fused.FFN). `linear` alone only matched cuBLAS (q/o/down_proj,
2.3-2.5 TB/s both; benchmarks/results/skinny-gemms-h100-t64.json); the skinny step runs q_proj with it so that
every kernel but the k/v GEMM can be a programmatic dependent launch (`pdl`: each kernel's programs start as the
one before's leave the SMs, send their first weight lines to L2 and wait for its writes). `linear_residual` is
`linear` with an epilogue that makes the next RMSNorm free: the residual add, the rows times the norm's weight,
the rows' sums of squares (fp32 atomics); `gate_up` then divides by the RMS (fused.skinny_layer_step). At o_proj
it took 15.8 us against 16.7 for cuBLAS + the add and norm, at down_proj 39.7 against 40.0
(skinny-residual-coresident-h100-t64.json, "residual"). Beside them, `rows_rstd`: a row norm in a few programs,
to run next to a GEMM on the SMs it leaves free (modeling's visual rows). Every kernel also reads a weight laid
out by `tile`, (N / block_n, K / block_k, block_n, block_k), where each program's block at each K step is one
contiguous 8 KB piece instead of 32 rows' 256-byte pieces: on an H100, 14.12 against 14.49 us at q/o_proj's shape and
35.03 against 37.65 at down_proj's (benchmarks/results/tiled-weights-h100.json); the skinny step reads such copies
(fused.tiled_text_layer). Triton is imported lazily: the
functions exist on every machine, and `supported` says when they can run (CUDA, Triton, shapes that tile).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch


class Tiles(NamedTuple):
    """A kernel configuration: rows of W per program (block_n), the K step (block_k), pipeline depth, warps, and how
    many programs share the K range of one output tile (split_k > 1: fp32 atomic adds into a zeroed buffer)."""

    block_n: int = 32
    block_k: int = 128
    stages: int = 4
    warps: int = 4
    split_k: int = 1
    prefetch: int = 0  # launched as a programmatic dependent: 128-byte lines per weight row sent to L2 before waiting


DEFAULT = Tiles()
# Measured fastest at 64 rows on an H100 (scripts/profile_skinny.py, benchmarks/results/skinny-gemms-h100-t64.json):
# SiLU(x W_g^T) * (x W_u^T) for Vicuna-7B's FFN at 2.70 TB/s, against 2.39 for cuBLAS's two GEMMs and the product.
GATE_UP = Tiles(block_n=32, block_k=128, stages=6, warps=4)
# o_proj and down_proj with skinny.linear_residual's epilogue: the fastest `linear` tiles at those shapes there.
RESIDUAL = Tiles(block_n=32, block_k=128, stages=6, warps=4)
# Lines of each weight row a programmatic dependent launch sends to L2 before it waits (fused.skinny_layer_step):
# on an H100, 32 skinny layers took 210.9 us per layer with 4, 211.5 with none, 210.5 with 16, 215.9 launched in
# turn (benchmarks/results/skinny-pdl-h100-t64.json); in an earlier run 4 was the fastest of 0-32, 213.4 against
# 214.7 with none and 218.2 in turn (skinny-pdl-h100-t64-first.json).
PREFETCH = 4
MAX_ROWS = 64  # more rows: GATE_UP's pipeline no longer fits in shared memory, and the GEMM nears compute-bound


@functools.cache
def triton_modules():
    """(triton, triton.language), or None where Triton is missing: the one lazy import of this package's kernels."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


@functools.cache
def kernels():
    """The kernels and a jitted helper other kernels call, compiled on first use (None where Triton is missing)."""
    if triton_modules() is None:
        return None
    triton, tl = triton_modules()

    @triton.jit
    def _weight_block(w_ptr, pid, k0, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILED: tl.constexpr):
        """Pointers to the (BLOCK_N, BLOCK_K) block of W at program `pid`'s rows and column k0, and the step to the
        next block along K. TILED: W laid out as `tile` makes it (stride_wn is then K): the block is contiguous."""
        if TILED:
            return (w_ptr + (pid * stride_wn + k0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None] * BLOCK_K
                    + tl.arange(0, BLOCK_K)[None, :]), BLOCK_N * BLOCK_K
        return (w_ptr + (pid * BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * stride_wn + k0
                + tl.arange(0, BLOCK_K)[None, :]), BLOCK_K

    @triton.jit
    def _rows_dot(x_ptr, w_ptr, M, k0, k_len, stride_xm, stride_wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, TILED: tl.constexpr):
        """x[:, k0:k0 + k_len] W[block, k0:k0 + k_len]^T in fp32 for this program's block of W's rows (all of x's
        rows): (acc (BLOCK_M, BLOCK_N), offs_m, offs_n)."""
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        rows = offs_m[:, None] < M
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        w_ptrs, w_step = _weight_block(w_ptr, tl.program_id(0), k0, stride_wn, BLOCK_N, BLOCK_K, TILED)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, k_len, BLOCK_K):
            acc = tl.dot(tl.load(x_ptrs, mask=rows, other=0.0), tl.trans(tl.load(w_ptrs)), acc)
            x_ptrs += BLOCK_K
            w_ptrs += w_step
        return acc, offs_m, offs_n

    @triton.jit
    def _prefetch_rows(w_ptr, k0, stride_wn, BLOCK_N: tl.constexpr, LINES: tl.constexpr, TILED: tl.constexpr):
        """LINES lines of 64 elements (128 bytes of bf16/fp16) from column k0 of this program's BLOCK_N rows of W
        sent to L2 (TILED: as many lines from where its blocks start): PTX prefetch, no registers wait for them."""
        if TILED:
            ptrs = w_ptr + (tl.program_id(0) * stride_wn + k0) * BLOCK_N + tl.arange(0, LINES * BLOCK_N) * 64
        else:
            offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            ptrs = w_ptr + offs_n[:, None] * stride_wn + k0 + tl.arange(0, LINES)[None, :] * 64
        tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)

    @triton.jit
    def _discard(ptrs, keep):
        """The 128-byte L2 lines at `ptrs` (where `keep` is not 0) dropped without being written back to HBM (PTX
        discard.global.L2): their contents become undefined."""
        tl.inline_asm_elementwise("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, $2, 0;\n\t@p discard.global.L2 [$1], 128;"
                                  "\n\t}\n\tmov.u32 $0, 0;", "=r,l,r", [ptrs, keep], dtype=tl.int32, is_pure=False,
                                  pack=1)

    @triton.jit
    def _discard_share(dead_ptr, lines):
        """This program's share of the first `lines` 128-byte lines at dead_ptr (16-bit elements) dropped from L2."""
        pid = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
        programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
        for start in range(pid * 128, lines, programs * 128):
            idx = start + tl.arange(0, 128)
            _discard(dead_ptr + idx.to(tl.int64) * 64, (idx < lines).to(tl.int32))

    @triton.jit
    def dependent_start():
        """Programmatic dependent launch: wait until the kernel before has finished and its writes are visible,
        then let the kernel after launch (its programs take SMs as ours leave them, and wait in turn)."""
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def linear_kernel(x_ptr, w_ptr, y_ptr, M, K, stride_xm, stride_wn, stride_ym,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                      PDL: tl.constexpr, PREFETCH: tl.constexpr, TILED: tl.constexpr):
        span = K // SPLIT_K
        if PDL:
            if PREFETCH > 0:
                _prefetch_rows(w_ptr, tl.program_id(1) * span, stride_wn, BLOCK_N, PREFETCH, TILED)
            dependent_start()
        acc, offs_m, offs_n = _rows_dot(x_ptr, w_ptr, M, tl.program_id(1) * span, span, stride_xm, stride_wn,
                                        BLOCK_M, BLOCK_N, BLOCK_K, TILED)
        rows = offs_m[:, None] < M
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        if SPLIT_K == 1:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=rows)
        else:
            tl.atomic_add(y_ptrs, acc, mask=rows, sem="relaxed")

    @triton.jit
    def _rstd(ss_ptr, offs_m, rows, inv_n, eps):
        """1 / RMS of rows `offs_m` (1 where not `rows`) from their sums of squares (linear_residual_kernel's)."""
        return tl.where(rows, tl.rsqrt(tl.load(ss_ptr + offs_m, mask=rows, other=0.0) * inv_n + eps), 1.0)

    @triton.jit
    def gate_up_kernel(x_ptr, wg_ptr, wu_ptr, y_ptr, ss_ptr, M, K, stride_xm, stride_wn, stride_ym, eps,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE: tl.constexpr,
                       PDL: tl.constexpr, PREFETCH: tl.constexpr, TILED: tl.constexpr):
        if PDL:
            if PREFETCH > 0:
                _prefetch_rows(wg_ptr, 0, stride_wn, BLOCK_N, PREFETCH, TILED)
                _prefetch_rows(wu_ptr, 0, stride_wn, BLOCK_N, PREFETCH, TILED)
            dependent_start()
        pid_n = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        rows = offs_m[:, None] < M
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        w_off, w_step = _weight_block(0, pid_n, 0, stride_wn, BLOCK_N, BLOCK_K, TILED)  # offsets into both weights
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K, BLOCK_K):
            x = tl.load(x_ptrs, mask=rows, other=0.0)
            gate = tl.dot(x, tl.trans(tl.load(wg_ptr + w_off)), gate)
            up = tl.dot(x, tl.trans(tl.load(wu_ptr + w_off)), up)
            x_ptrs += BLOCK_K
            w_off += w_step
        if SCALE:  # x is the norm's weight times the rows, not yet divided by their RMS: do it here
            rstd = _rstd(ss_ptr, offs_m, offs_m < M, 1.0 / K, eps)[:, None]
            gate, up = gate * rstd, up * rstd
        # As the reference rounds them: gate and up to the output dtype, SiLU in fp32, the product rounded once more.
        dtype = y_ptr.dtype.element_ty
        g = gate.to(dtype).to(tl.float32)
        h = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32) * up.to(dtype).to(tl.float32)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], h.to(dtype), mask=rows)

    @triton.jit
    def linear_residual_kernel(x_ptr, w_ptr, res_ptr, out_ptr, rows_ptr, ln_ptr, xln_ptr, ss_ptr, dead_ptr, M, K, T,
                               dead_lines, stride_xm, stride_wn, stride_rb, stride_rt, stride_ob, stride_ot, stride_wb,
                               stride_wt, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               ROWS: tl.constexpr, LN: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
                               TILED: tl.constexpr, DEAD: tl.constexpr):
        if DEAD:  # before the wait: the dead tensor's last reader finished before the kernel before us started
            _discard_share(dead_ptr, dead_lines)
        if PDL:
            if PREFETCH > 0:
                _prefetch_rows(w_ptr, 0, stride_wn, BLOCK_N, PREFETCH, TILED)
            dependent_start()
        acc, offs_m, offs_n = _rows_dot(x_ptr, w_ptr, M, 0, K, stride_xm, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K,
                                        TILED)
        rows = offs_m[:, None] < M
        # As the reference rounds: the product to the output dtype, then the residual add, rounded once more.
        dtype = out_ptr.dtype.element_ty
        b, t = offs_m[:, None] // T, offs_m[:, None] % T  # rows are (batch, text position)
        res = tl.load(res_ptr + b * stride_rb + t * stride_rt + offs_n[None, :], mask=rows, other=0.0)
        h = (res.to(tl.float32) + acc.to(dtype).to(tl.float32)).to(dtype)
        tl.store(out_ptr + b * stride_ob + t * stride_ot + offs_n[None, :], h, mask=rows)
        if ROWS:  # a second copy: the text rows of the next layer's k/v input
            tl.store(rows_ptr + b * stride_wb + t * stride_wt + offs_n[None, :], h, mask=rows)
        h32 = h.to(tl.float32)
        tl.atomic_add(ss_ptr + offs_m, tl.sum(h32 * h32, 1), mask=offs_m < M, sem="relaxed")  # this block's share
        if LN:  # the next norm's weight times the rows; the consumer divides by the RMS
            ln = tl.load(ln_ptr + offs_n).to(tl.float32)
            tl.store(xln_ptr + offs_m[:, None] * (tl.num_programs(0) * BLOCK_N) + offs_n[None, :],
                     (h32 * ln[None, :]).to(dtype), mask=rows)

    @triton.jit
    def rows_rstd_kernel(x_ptr, b_ptr, out_ptr, R, stride_x, eps, H: tl.constexpr, BLOCK_R: tl.constexpr):
        """1 / RMS of (x + b) rounded to x's dtype, per row, as fused.rows_rstd: few programs, each a row block of
        whole rows at a time, strided over the rows."""
        offs_h = tl.arange(0, H)
        b = tl.load(b_ptr + offs_h).to(tl.float32)
        for r0 in range(tl.program_id(0) * BLOCK_R, R, tl.num_programs(0) * BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            rmask = offs_r < R
            x = tl.load(x_ptr + offs_r[:, None] * stride_x + offs_h[None, :], mask=rmask[:, None], other=0.0)
            v = (x.to(tl.float32) + b[None, :]).to(x.dtype).to(tl.float32)
            tl.store(out_ptr + offs_r, tl.rsqrt(tl.sum(v * v, 1) / H + eps), mask=rmask)

    return _Kernels(triton, linear_kernel, gate_up_kernel, linear_residual_kernel, _rstd, dependent_start,
                    rows_rstd_kernel)


class _Kernels(NamedTuple):
    triton: object
    linear: object
    gate_up: object
    linear_residual: object
    rstd: object  # @triton.jit helpers other kernels call (text_attention's)
    dependent_start: object
    rows_rstd: object


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch (the `pdl` of this package's kernels) needs a Hopper or later GPU and a Triton
    with griddepcontrol (tl.extra.cuda.gdc_wait)."""
    return device.type == "cuda" and _pdl_supported(device.index if device.index is not None else
                                                     torch.cuda.current_device())


@functools.cache
def _pdl_supported(index: int) -> bool:  # asked at every launch with pdl: once per device
    if triton_modules() is None or torch.cuda.get_device_capability(index)[0] < 9:
        return False
    return hasattr(getattr(triton_modules()[1].extra, "cuda", None), "gdc_wait")


def check_pdl(pdl: bool, x: torch.Tensor) -> None:
    """Raise if pdl is asked for where it cannot run."""
    if pdl and not pdl_supported(x.device):
        raise ValueError(f"pdl=True needs a Hopper or later GPU and a Triton with griddepcontrol; {x.device} has not "
                         "(check skinny.pdl_supported)")


def available() -> bool:
    """A CUDA device and Triton: where this package's Triton kernels (here and in text_attention) can run at all."""
    return torch.cuda.is_available() and kernels() is not None


def tile(w: torch.Tensor, tiles: Tiles = DEFAULT) -> torch.Tensor:
    """W (N, K) as the kernels here read it, a copy: (N / block_n, K / block_k, block_n, block_k), contiguous, so
    that each program's block at each K step is one contiguous piece of memory instead of block_n rows' pieces
    (pass it wherever W would go; the same `tiles`' block_n and block_k then serve it)."""
    n, k = w.shape
    if not tiles_evenly(w, tiles):
        raise ValueError(f"skinny.tile: W {tuple(w.shape)} does not tile into ({tiles.block_n}, {tiles.block_k}) "
                         "blocks")
    return w.view(n // tiles.block_n, tiles.block_n, k // tiles.block_k, tiles.block_k).transpose(1, 2).contiguous()


def tiles_evenly(w: torch.Tensor, tiles: Tiles = DEFAULT) -> bool:
    """Whether `tile` can lay W (N, K) out for these tiles."""
    return w.dim() == 2 and w.shape[0] % tiles.block_n == 0 and w.shape[1] % tiles.block_k == 0


def weight_shape(w: torch.Tensor) -> tuple[int, int]:
    """(N, K) of a weight as given (N, K) or as `tile` lays it out."""
    return (w.shape[0] * w.shape[2], w.shape[1] * w.shape[3]) if w.dim() == 4 else (w.shape[0], w.shape[1])


def _tiled_for(w: torch.Tensor, tiles: Tiles) -> bool:
    """Whether w is laid out by `tile` for these tiles (raise if it is tiled for others)."""
    if w.dim() != 4:
        return False
    if w.shape[2:] != (tiles.block_n, tiles.block_k) or not w.is_contiguous():
        raise ValueError(f"a tiled weight {tuple(w.shape)} serves kernels with blocks of ({w.shape[2]}, "
                         f"{w.shape[3]}), not ({tiles.block_n}, {tiles.block_k}); tile it with these tiles")
    return True


def _weight_args(w: torch.Tensor, tiles: Tiles) -> dict:
    """The row stride the kernels take (K for a tiled weight) and TILED."""
    tiled = _tiled_for(w, tiles)
    return {"stride": weight_shape(w)[1] if tiled else w.stride(0), "TILED": tiled}


def supported(x: torch.Tensor, *weights: torch.Tensor, tiles: Tiles = DEFAULT) -> bool:
    """Whether the kernels can compute x W^T for these tensors: CUDA, Triton present, at most MAX_ROWS rows, every
    weight (N, K) contiguous with N a multiple of block_n and K of block_k * split_k, x's last dim K."""
    return fits(x.numel() // x.shape[-1], x.shape[-1], x, *weights, tiles=tiles)


def fits(rows: int, k: int, like: torch.Tensor, *weights: torch.Tensor, tiles: Tiles = DEFAULT) -> bool:
    """`supported` for an x of `rows` rows of width k, with the device and dtype of `like` (x need not exist)."""
    if not like.is_cuda or kernels() is None:
        return False
    n = weight_shape(weights[0])[0]
    return (rows <= MAX_ROWS and weight_shape(weights[0])[1] == k and n % tiles.block_n == 0
            and k % (tiles.block_k * tiles.split_k) == 0
            and all(weight_shape(w) == (n, k) and w.is_contiguous() and w.dtype == like.dtype
                    and w.dim() == weights[0].dim() and (w.dim() == 2 or w.shape[2:] == (tiles.block_n, tiles.block_k))
                    for w in weights))


def _launch(tiles: Tiles, x: torch.Tensor, pdl: bool) -> dict:
    """The launch options every kernel here takes: pipeline depth, warps and, with pdl, a programmatic dependent
    launch (the kernel's programs may start while the kernel before is still running: each first sends
    `tiles.prefetch` lines of its weight rows to L2, then waits for that kernel's writes)."""
    check_pdl(pdl, x)
    if tiles.prefetch & (tiles.prefetch - 1):
        raise ValueError(f"Tiles.prefetch must be 0 or a power of two, got {tiles.prefetch}")
    return {"num_stages": tiles.stages, "num_warps": tiles.warps, "PDL": pdl,
            "PREFETCH": tiles.prefetch if pdl else 0, "launch_pdl": pdl}


def whole_lines(x: torch.Tensor) -> int:
    """How many 128-byte lines from x's start lie wholly inside it (0 unless it is contiguous and starts on a line:
    a line shared with another tensor must never be discarded)."""
    if not x.is_contiguous() or x.data_ptr() % 128:
        return 0
    return x.numel() * x.element_size() // 128


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def linear(x: torch.Tensor, w: torch.Tensor, tiles: Tiles = DEFAULT, pdl: bool = False,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T -> (..., N), without bias (check `supported` first). pdl: launched as a programmatic
    dependent of the kernel before (`_launch`; `pdl_supported`). out: an (M, N) tensor with contiguous rows (any
    row stride, e.g. the last rows of a larger buffer) to write the result into; returned as (..., N) when it is
    contiguous, else as given; not with split_k > 1."""
    triton, kernel = kernels().triton, kernels().linear
    x2 = _rows(x)
    m, k = x2.shape
    n = weight_shape(w)[0]
    wa = _weight_args(w, tiles)
    block_m = max(16, triton.next_power_of_2(m))
    split = tiles.split_k
    if out is not None:
        if split > 1 or out.shape != (m, n) or out.stride(-1) != 1 or out.dtype != x.dtype:
            raise ValueError(f"skinny.linear: out must be a ({m}, {n}) {x.dtype} tensor with contiguous rows and "
                             f"split_k 1, got {out.dtype} {tuple(out.shape)} strides {out.stride()}, split_k {split}")
        y = out
    else:
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device) if split > 1 else x.new_empty(m, n)
    kernel[(n // tiles.block_n, split)](
        x2, w, y, m, k, x2.stride(0), wa["stride"], y.stride(0),
        BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, SPLIT_K=split, TILED=wa["TILED"],
        **_launch(tiles, x, pdl),
    )
    if out is not None:
        return out.view(*x.shape[:-1], n) if out.is_contiguous() else out
    return y.to(x.dtype).view(*x.shape[:-1], n) if split > 1 else y.view(*x.shape[:-1], n)


def gate_up(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, tiles: Tiles = DEFAULT,
            ss: torch.Tensor | None = None, eps: float = 0.0, pdl: bool = False) -> torch.Tensor:
    """SiLU(x wg^T) * (x wu^T), (..., K) -> (..., N), in one kernel (split_k is ignored). ss: the partial sums of
    squares `linear_residual` returned with x = its rows times the norm's weight: x is then divided by the rows'
    RMS (eps as the norm's) first, so the norm costs no kernel of its own. pdl: as `linear`'s."""
    triton, kernel = kernels().triton, kernels().gate_up
    x2 = _rows(x)
    m, k = x2.shape
    n = weight_shape(wg)[0]
    wa = _weight_args(wg, tiles)
    if _tiled_for(wu, tiles) != wa["TILED"]:
        raise ValueError("skinny.gate_up: wg and wu must both be tiled (skinny.tile) or both not")
    y = x.new_empty(m, n)
    if ss is not None:
        check_sums(ss, m)
    kernel[(n // tiles.block_n,)](
        x2, wg, wu, y, y if ss is None else ss, m, k, x2.stride(0), wa["stride"], y.stride(0), eps,
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        SCALE=ss is not None, TILED=wa["TILED"], **_launch(tiles, x, pdl),
    )
    return y.view(*x.shape[:-1], n)


def check_sums(ss: torch.Tensor, rows: int) -> None:
    """Raise unless `ss` is what linear_residual returns as the sums of squares of `rows` rows."""
    if ss.shape != (rows,) or ss.dtype != torch.float32 or not ss.is_contiguous():
        raise ValueError(f"sums of squares must be a contiguous fp32 ({rows},) tensor from linear_residual, "
                         f"got {ss.dtype} {tuple(ss.shape)}")


def linear_residual(
    x: torch.Tensor,  # (B, T, K)
    w: torch.Tensor,  # (N, K)
    residual: torch.Tensor,  # (B, T, N); any row strides
    ln: torch.Tensor | None = None,  # (N,): the next RMSNorm's weight
    rows_out: torch.Tensor | None = None,  # (B, T, N) view to write the sum into as well
    sums: torch.Tensor | None = None,  # (B*T,) fp32 zeros to add the sums of squares into
    tiles: Tiles = DEFAULT,
    pdl: bool = False,
    dead: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """h = residual + x w^T, rounded as the reference rounds (product, then sum), and what the next RMSNorm needs
    without a kernel of its own: (h (B, T, N), h * ln (B, T, N) or None, the sums of h^2 per row (B*T,) fp32).
    The consumer (gate_up, text_attention) divides by the RMS they give. Each program adds its block of columns'
    share to `sums` (zeros; None: allocated here) by fp32 atomics, so their last bits depend on the order the
    programs finish in. `rows_out`: h is also written there (the next layer's k/v input rows). pdl: as `linear`'s.
    dead: a 16-bit temporary no one reads again, whose last reader is a kernel before the one just before this
    (with pdl our programs start, before they wait, only once every program of that kernel has waited for the
    kernels before it, so those have finished): the programs first drop its whole 128-byte L2 lines unwritten (PTX
    discard.global.L2; its contents become undefined), so HBM does not take them as writes while the weights
    stream in. Kernels after this one may reuse its memory: they wait for this one.
    Check `supported` first."""
    triton, kernel = kernels().triton, kernels().linear_residual
    b, t, k = x.shape
    n = weight_shape(w)[0]
    wa = _weight_args(w, tiles)
    if residual.shape != (b, t, n) or (rows_out is not None and rows_out.shape != residual.shape) or (
            ln is not None and ln.shape != (n,)) or residual.stride(-1) != 1 or (
            rows_out is not None and rows_out.stride(-1) != 1):
        raise ValueError(f"linear_residual: x {tuple(x.shape)}, w {tuple(w.shape)}, residual "
                         f"{tuple(residual.shape)}, rows_out {None if rows_out is None else tuple(rows_out.shape)}, "
                         f"ln {None if ln is None else tuple(ln.shape)}: expected residual and rows_out (B, T, N) "
                         "with contiguous rows, ln (N,)")
    x2 = _rows(x)
    m = b * t
    out = residual.new_empty(b, t, n)
    xln = out.new_empty(b, t, n) if ln is not None else None
    if sums is None:
        sums = torch.zeros(m, dtype=torch.float32, device=x.device)
    check_sums(sums, m)
    ss = sums
    dest = rows_out if rows_out is not None else out
    if dead is not None and dead.element_size() != 2:
        raise ValueError(f"linear_residual: dead must be a 16-bit tensor, got {dead.dtype}")
    dead_lines = 0 if dead is None else whole_lines(dead)
    kernel[(n // tiles.block_n,)](
        x2, w, residual, out, dest, out if ln is None else ln, out if xln is None else xln, ss,
        dead if dead_lines else out, m, k, t, dead_lines,
        x2.stride(0), wa["stride"], residual.stride(0), residual.stride(1), out.stride(0), out.stride(1),
        dest.stride(0), dest.stride(1),
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        ROWS=rows_out is not None, LN=ln is not None, TILED=wa["TILED"], DEAD=dead_lines > 0,
        **_launch(tiles, x, pdl),
    )
    return out, xln, ss



@torch.library.custom_op("saisa::gate_up", mutates_args=())
def gate_up_op(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor) -> torch.Tensor:
    """`gate_up` with the GATE_UP tiles, as an operator torch.compile keeps whole (inductor cannot see into it)."""
    return gate_up(x, wg, wu, GATE_UP)


@gate_up_op.register_fake
def _(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight_shape(wg)[0])


def rows_rstd(rows: torch.Tensor, b: torch.Tensor, eps: float, out: torch.Tensor, programs: int = 16,
              block_r: int = 4) -> torch.Tensor:
    """1 / RMS of rows + b per row, as fused.rows_rstd, for one layer's (R, H) rows (contiguous rows, any row
    stride; H a power of two) in `programs` programs of whole rows, so that it fits beside a GEMM that leaves a few
    SMs free: into out (R,) fp32, returned."""
    r, h = rows.shape
    if rows.stride(-1) != 1 or h & (h - 1) or b.shape != (h,) or out.shape != (r,) or out.dtype != torch.float32:
        raise ValueError(f"skinny.rows_rstd: rows {tuple(rows.shape)} (contiguous rows, a power-of-two width), b "
                         f"{tuple(b.shape)} and out {out.dtype} {tuple(out.shape)} do not fit: expected b (H,), "
                         "out (R,) fp32")
    kernels().rows_rstd[(programs,)](rows, b, out, r, rows.stride(0), eps, H=h, BLOCK_R=block_r, num_warps=8)
    return out
