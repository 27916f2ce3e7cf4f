"""NAAViT attention for a few text queries as Triton kernels: RoPE, scores, softmax and values in one pass.

Unusual here: at batch 1 the text queries are few (t=64) and the keys many (576 visual + t text), so one program
per query head would leave most of an H100's 132 SMs idle and walk the keys serially. Each program takes one span of
the keys instead (split-K over keys, as flash-decoding does), rotates its queries and keys with RoPE as they are
loaded (the k/v GEMM's output is read unrotated, in place), and keeps an online softmax; a second kernel merges the
spans by their log-sum-exp and writes (B, T, Hq * D), o_proj's input layout. This replaces the six kernels of
`fused.attend(kind="eager")` plus the two RoPEs and the transpose. With `row_sums` the text rows' q and k/v come
from rows not yet divided by their RMS (fused.skinny_layer_step), and the division is done here, per query row and
per text key. Triton is imported lazily; `supported` says where the kernels run (CUDA, Triton (skinny.available),
head_dim a power of two from 32 to 128).
"""

from __future__ import annotations

import functools

import torch

from . import skinny
from .skinny import triton_modules

MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634


@functools.cache
def _triton():
    """The kernels, compiled on first use (None where Triton is missing)."""
    if triton_modules() is None:
        return None
    triton, tl = triton_modules()
    _rstd = skinny.kernels().rstd
    dependent_start = skinny.kernels().dependent_start

    @triton.jit
    def _rotated(ptrs, cos_ptrs, sin_ptrs, half: tl.constexpr, mask, HALF_TABLE: tl.constexpr, lo_add=None,
                 hi_add=None, ADD: tl.constexpr = False):
        """RoPE (rotate-half) of one (rows, D) block loaded as its two halves; fp32 math, rounded to the input dtype
        as the reference's rotated tensor is. HALF_TABLE: the tables' two halves are equal, read the first only.
        ADD: lo_add/hi_add (fp32) added to the halves before the rotation (the visual rows' k bias)."""
        lo = tl.load(ptrs, mask=mask, other=0.0)
        hi = tl.load(ptrs + half, mask=mask, other=0.0)
        c_lo = tl.load(cos_ptrs, mask=mask, other=0.0).to(tl.float32)
        s_lo = tl.load(sin_ptrs, mask=mask, other=0.0).to(tl.float32)
        if HALF_TABLE:
            c_hi, s_hi = c_lo, s_lo
        else:
            c_hi = tl.load(cos_ptrs + half, mask=mask, other=0.0).to(tl.float32)
            s_hi = tl.load(sin_ptrs + half, mask=mask, other=0.0).to(tl.float32)
        lo32, hi32 = lo.to(tl.float32), hi.to(tl.float32)
        if ADD:
            lo32, hi32 = lo32 + lo_add, hi32 + hi_add
        return (lo32 * c_lo - hi32 * s_lo).to(lo.dtype), (hi32 * c_hi + lo32 * s_hi).to(lo.dtype)

    @triton.jit
    def span_kernel(q_ptr, kv_ptr, cos_ptr, sin_ptr, bias_ptr, o_ptr, acc_ptr, ml_ptr, ss_ptr, vs_ptr, kvb_ptr,
                    T, S, span, t_pad, qk_scale, log2e, inv_h, eps, stride_vb,
                    stride_qb, stride_qt, stride_kb, stride_ks, v_col, stride_cb, stride_cs,
                    stride_bb, stride_bt, stride_bs, stride_ob, stride_ot,
                    GROUP: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr, HALF_TABLE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr, SCALE: tl.constexpr,
                    VIS_SCALE: tl.constexpr, VIS_BIAS: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            dependent_start()
        half: tl.constexpr = D // 2
        part = tl.program_id(0) % SPLIT
        offs_m = (tl.program_id(0) // SPLIT) * BLOCK_M + tl.arange(0, BLOCK_M)
        head = tl.program_id(1)  # query head; its K/V head is head // GROUP
        b = tl.program_id(2)
        rows = offs_m < T
        dh = tl.arange(0, half)[None, :]
        q_rows = q_ptr + b * stride_qb + offs_m[:, None] * stride_qt + head * D + dh
        q_pos = b * stride_cb + (S - T + offs_m[:, None]) * stride_cs + dh  # the queries are the last T key rows
        q_lo, q_hi = _rotated(q_rows, cos_ptr + q_pos, sin_ptr + q_pos, half, rows[:, None], HALF_TABLE)
        if SCALE:  # the text rows' RMS division, deferred from their norm (row_sums): queries' into the scale
            q_scale = _rstd(ss_ptr, b * T + offs_m, rows, inv_h, eps) * qk_scale
        kv_base = kv_ptr + b * stride_kb + (head // GROUP) * D
        if VIS_BIAS:  # the visual rows' k/v bias (W_kv b_2): keys' halves and the values' row, fp32
            kb_lo = tl.load(kvb_ptr + (head // GROUP) * D + dh)
            kb_hi = tl.load(kvb_ptr + (head // GROUP) * D + half + dh)
            vb = tl.load(kvb_ptr + v_col + (head // GROUP) * D + tl.arange(0, D)[None, :])
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        start = part * span
        end = tl.minimum(S, start + span)
        for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            keys = offs_n < end
            k_pos = b * stride_cb + offs_n[:, None] * stride_cs + dh
            visual = offs_n < S - T
            if VIS_BIAS:
                k_lo, k_hi = _rotated(kv_base + offs_n[:, None] * stride_ks + dh, cos_ptr + k_pos, sin_ptr + k_pos,
                                      half, keys[:, None], HALF_TABLE, tl.where(visual[:, None], kb_lo, 0.0),
                                      tl.where(visual[:, None], kb_hi, 0.0), True)
            else:
                k_lo, k_hi = _rotated(kv_base + offs_n[:, None] * stride_ks + dh, cos_ptr + k_pos, sin_ptr + k_pos,
                                      half, keys[:, None], HALF_TABLE)
            scores = tl.dot(q_hi, tl.trans(k_hi), tl.dot(q_lo, tl.trans(k_lo)))  # (BLOCK_M, BLOCK_N) fp32
            bias = tl.load(bias_ptr + b * stride_bb + offs_m[:, None] * stride_bt + offs_n[None, :] * stride_bs,
                           mask=rows[:, None] & keys[None, :], other=float("-inf")).to(tl.float32)
            if SCALE or VIS_SCALE:  # keys divided by their rows' RMS: text rows' (SCALE), visual rows' (VIS_SCALE)
                k_scale = tl.full((BLOCK_N,), 1.0, tl.float32)
                if VIS_SCALE:  # noqa: SIM102 (a constexpr, then a runtime condition: Triton keeps them apart)
                    if n0 < S - T:
                        k_scale = tl.load(vs_ptr + b * stride_vb + offs_n, mask=keys & visual, other=1.0)
                if SCALE:  # noqa: SIM102
                    if n0 + BLOCK_N > S - T:
                        text = offs_n - (S - T)
                        k_scale = k_scale * _rstd(ss_ptr, b * T + text, (text >= 0) & keys, inv_h, eps)
                scores = scores * k_scale[None, :]
            if SCALE:
                scores = scores * q_scale[:, None] + bias * log2e
            else:
                scores = scores * qk_scale + bias * log2e  # log2 domain: exp2 below
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key so far: keep exp2 finite
            p = tl.exp2(scores - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(kv_base + v_col + offs_n[:, None] * stride_ks + tl.arange(0, D)[None, :], mask=keys[:, None],
                        other=0.0)
            if VIS_BIAS:
                v = (v.to(tl.float32) + tl.where(visual[:, None], vb, 0.0)).to(v.dtype)
            if SCALE or VIS_SCALE:  # values divided by their rows' RMS: their weights here, not the sum l_i
                acc = tl.dot((p * k_scale[None, :]).to(v.dtype), v, acc * alpha[:, None])
            else:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        if SPLIT == 1:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            o = o_ptr + b * stride_ob + offs_m[:, None] * stride_ot + head * D + tl.arange(0, D)[None, :]
            tl.store(o, out.to(o_ptr.dtype.element_ty), mask=rows[:, None])
        else:  # this span's unnormalised output and its running max and sum, for merge_kernel
            slot = ((b * tl.num_programs(1) + head) * SPLIT + part) * t_pad
            tl.store(acc_ptr + (slot + offs_m[:, None]) * D + tl.arange(0, D)[None, :], acc)
            tl.store(ml_ptr + 2 * slot + offs_m, m_i)
            tl.store(ml_ptr + 2 * slot + t_pad + offs_m, l_i)

    @triton.jit
    def merge_kernel(o_ptr, acc_ptr, ml_ptr, T, t_pad, stride_ob, stride_ot,
                     D: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, PDL: tl.constexpr):
        """The SPLIT spans of one (batch, head, block of query rows) merged by their log-sum-exp (log2 domain)."""
        if PDL:
            dependent_start()
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        head = tl.program_id(1)
        b = tl.program_id(2)
        rows = offs_m < T
        first = (b * tl.num_programs(1) + head) * SPLIT
        m_all = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        for sp in tl.static_range(SPLIT):
            m_all = tl.maximum(m_all, tl.load(ml_ptr + 2 * (first + sp) * t_pad + offs_m, mask=rows,
                                              other=float("-inf")))
        m_use = tl.where(m_all == float("-inf"), 0.0, m_all)
        l_all = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        for sp in tl.static_range(SPLIT):
            slot = (first + sp) * t_pad
            w = tl.exp2(tl.load(ml_ptr + 2 * slot + offs_m, mask=rows, other=float("-inf")) - m_use)
            l_all += w * tl.load(ml_ptr + 2 * slot + t_pad + offs_m, mask=rows, other=0.0)
            acc += w[:, None] * tl.load(acc_ptr + (slot + offs_m[:, None]) * D + tl.arange(0, D)[None, :],
                                        mask=rows[:, None], other=0.0)
        out = acc / tl.where(l_all == 0.0, 1.0, l_all)[:, None]
        o = o_ptr + b * stride_ob + offs_m[:, None] * stride_ot + head * D + tl.arange(0, D)[None, :]
        tl.store(o, out.to(o_ptr.dtype.element_ty), mask=rows[:, None])

    return triton, span_kernel, merge_kernel


def supported(q: torch.Tensor, kv: torch.Tensor, head_dim: int) -> bool:
    """Whether `text_attention` can run for these tensors: CUDA, Triton, half precision, head_dim a power of two
    from 32 to MAX_HEAD_DIM (the scores are two products over half a head, and Triton's need K >= 16), contiguous
    last dims."""
    return (q.is_cuda and _triton() is not None and q.dtype in (torch.bfloat16, torch.float16) and kv.dtype == q.dtype
            and 32 <= head_dim <= MAX_HEAD_DIM and head_dim & (head_dim - 1) == 0
            and q.stride(-1) == 1 and kv.stride(-1) == 1)


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _spans(q: torch.Tensor, kv: torch.Tensor, head_dim: int, split: int | None, block_n: int, block_m: int | None
           ) -> tuple[int, int, int]:
    """text_attention's (block_m, key spans, keys per span) for these shapes (its arguments of those names)."""
    b, t, qd = q.shape
    s = kv.shape[1]
    if block_m is None:
        block_m = min(64, max(16, 1 << max(t - 1, 0).bit_length()))
    elif block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"text_attention: block_m must be a power of two >= 16, got {block_m}")
    q_blocks = -(-t // block_m)
    key_blocks = -(-s // block_n)
    if split is None:
        split = -(-_multiprocessors(q.device.index or 0) // (b * (qd // head_dim) * q_blocks))
    span = -(-key_blocks // max(1, min(split, key_blocks))) * block_n
    return block_m, -(-s // span), span


def merges(q: torch.Tensor, kv: torch.Tensor, head_dim: int) -> bool:
    """Whether `text_attention` with its default spans runs a merge kernel after its span kernel (more than one key
    span): then the span kernel, the last to read kv, is not the kernel just before the next one."""
    return _spans(q, kv, head_dim, None, 64, None)[1] > 1


def text_attention(
    q: torch.Tensor,  # (B, T, Hq * D): the text queries, not rotated
    kv: torch.Tensor,  # (B, S, 2 * Hkv * D): the k/v GEMM's output, [keys | values] per row, keys not rotated
    cos: torch.Tensor,  # (B, S, D): RoPE tables of the key rows; the queries are the last T key rows
    sin: torch.Tensor,
    bias: torch.Tensor,  # (B, 1, T, S): 0 where a query may attend to a key, -inf elsewhere
    head_dim: int,
    scale: float | None = None,
    half_table: bool = False,
    split: int | None = None,
    block_n: int = 64,
    stages: int = 2,
    warps: int = 4,
    row_sums: torch.Tensor | None = None,
    row_dim: int = 0,
    eps: float = 0.0,
    pdl: bool = False,
    vis_rstd: torch.Tensor | None = None,
    kv_bias: torch.Tensor | None = None,
    block_m: int | None = None,
) -> torch.Tensor:
    """softmax(rope(q) rope(k)^T * scale + bias) v for every query head -> (B, T, Hq * D) (check `supported`
    first). half_table: cos/sin repeat their first half (transformers' RoPE), so only it is read. split: key
    spans per (batch, head, query block); None: enough to give every SM a program. block_m: query rows per
    program (a power of two from 16; None: all T up to 64). row_sums: skinny.linear_residual's
    sums of squares (B*T,) of the text rows (row_dim wide), which q and the last T rows of kv were
    projected from without dividing by their RMS (eps: the norm's): each query and text key/value is divided here.
    pdl: both kernels launched as programmatic dependents of the kernel before (skinny.pdl_supported): each waits
    for its writes before reading anything. vis_rstd (B, S - T) fp32, kv_bias (2 * Hkv * D,) fp32: the first S - T
    (visual) rows of kv were projected from rows before their bias b and their norm's division
    (fused.visual_rows_chunk): kv_bias (= W_kv b) is added to those rows and each is multiplied by its vis_rstd here,
    so no normalised copy of the visual rows is written."""
    b, t, qd = q.shape
    s = kv.shape[1]
    hkv = kv.shape[-1] // (2 * head_dim)
    hq = qd // head_dim
    if (kv.shape[0] != b or qd % head_dim or hq % max(hkv, 1) or kv.shape[-1] != 2 * hkv * head_dim
            or cos.shape != (b, s, head_dim) or sin.shape != cos.shape or bias.shape != (b, 1, t, s) or t > s):
        raise ValueError(f"text_attention: q {tuple(q.shape)}, kv {tuple(kv.shape)}, cos {tuple(cos.shape)}, sin "
                         f"{tuple(sin.shape)}, bias {tuple(bias.shape)} do not fit head_dim {head_dim} (expected "
                         "q (B, T, Hq*D), kv (B, S, 2*Hkv*D), cos/sin (B, S, D), bias (B, 1, T, S))")
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("text_attention needs cos and sin with one layout and a contiguous last dim")
    if not supported(q, kv, head_dim):
        raise ValueError(f"text_attention needs CUDA, Triton, bf16/fp16 q and kv of one dtype, contiguous last dims "
                         f"and a power-of-two head_dim from 32 to {MAX_HEAD_DIM}; got {q.dtype} q on {q.device}, "
                         f"{kv.dtype} kv, head_dim {head_dim} (check supported() and use fused.attend otherwise)")
    triton, span_kernel, merge_kernel = _triton()
    skinny.check_pdl(pdl, q)
    if row_sums is not None:
        skinny.check_sums(row_sums, b * t)
        if row_dim < 1:
            raise ValueError("text_attention: row_sums needs row_dim, the width of the rows they were summed over")
    sv = s - t
    if vis_rstd is not None and (vis_rstd.shape != (b, sv) or vis_rstd.dtype != torch.float32
                                 or not vis_rstd.is_contiguous()):
        raise ValueError(f"text_attention: vis_rstd must be a contiguous fp32 (B, S - T) = ({b}, {sv}) tensor, got "
                         f"{vis_rstd.dtype} {tuple(vis_rstd.shape)}")
    if kv_bias is not None and (kv_bias.shape != (kv.shape[-1],) or kv_bias.dtype != torch.float32
                                or not kv_bias.is_contiguous()):
        raise ValueError(f"text_attention: kv_bias must be a contiguous fp32 ({kv.shape[-1]},) tensor (keys' bias, "
                         f"then values'), got {kv_bias.dtype} {tuple(kv_bias.shape)}")
    block_m, split, span = _spans(q, kv, head_dim, split, block_n, block_m)
    q_blocks = triton.cdiv(t, block_m)
    out = q.new_empty(b, t, qd)
    t_pad = q_blocks * block_m
    if split > 1:
        acc = torch.empty(b * hq * split * t_pad, head_dim, dtype=torch.float32, device=q.device)
        ml = torch.empty(b * hq * split * 2 * t_pad, dtype=torch.float32, device=q.device)
    else:
        acc = ml = out
    span_kernel[(q_blocks * split, hq, b)](
        q, kv, cos, sin, bias, out, acc, ml, out if row_sums is None else row_sums,
        out if vis_rstd is None else vis_rstd, out if kv_bias is None else kv_bias, t, s, span, t_pad,
        (head_dim**-0.5 if scale is None else scale) * LOG2E, LOG2E, 1.0 / max(row_dim, 1), eps, max(sv, 1),
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), hkv * head_dim, cos.stride(0), cos.stride(1),
        bias.stride(0), bias.stride(2), bias.stride(3), out.stride(0), out.stride(1),
        GROUP=hq // hkv, D=head_dim, SPLIT=split, HALF_TABLE=half_table, BLOCK_M=block_m, BLOCK_N=block_n,
        STAGES=stages, SCALE=row_sums is not None, VIS_SCALE=vis_rstd is not None, VIS_BIAS=kv_bias is not None,
        PDL=pdl, num_warps=warps, launch_pdl=pdl,
    )
    if split > 1:
        merge_block = 16
        merge_kernel[(triton.cdiv(t, merge_block), hq, b)](
            out, acc, ml, t, t_pad, out.stride(0), out.stride(1), D=head_dim, SPLIT=split,
            BLOCK_M=merge_block, PDL=pdl, num_warps=4, launch_pdl=pdl,
        )
    return out


def halves_equal(cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether RoPE tables repeat their first half in the second (transformers' Llama-family RoPE does), so the
    kernel may read half of them (`half_table`)."""
    d = cos.shape[-1] // 2
    return bool(torch.equal(cos[..., :d], cos[..., d:]) and torch.equal(sin[..., :d], sin[..., d:]))


@torch.library.custom_op("saisa::text_attention", mutates_args=())
def text_attention_op(q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                      head_dim: int, half_table: bool) -> torch.Tensor:
    """`text_attention` with its default settings, as an operator torch.compile keeps whole."""
    return text_attention(q, kv, cos, sin, bias, head_dim, half_table=half_table)


@text_attention_op.register_fake
def _(q, kv, cos, sin, bias, head_dim, half_table):
    return q.new_empty(q.shape)

