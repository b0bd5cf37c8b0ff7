"""Fused packing of GUARD's perturbed and clean batch: `[u + z ; u]` with z_i = h (g_i + 1e-7) / (||g_i||_2 + 1e-7).

The `guard` regularizer's fast path (docs/spec.md section 2, "the fast path") runs the eval-mode forwards at u + z
and at u as one batch of 2B. Building that batch in torch takes a norm reduction, three elementwise ops and a cat,
each a full trip through memory (see `pack_perturbed_reference`); the Triton version reads g twice and u once and
writes the 2B buffer once.

Layout. A row is one sample's D = C*H*W values. In both supported memory formats, contiguous (any rank) and
channels_last (4-D), each sample occupies one dense block of D elements at offset b*D, only permuted inside the block.
The norm and the elementwise formula do not care about the order inside a row, so the kernels work on flat memory
and the output, allocated in u's memory format, keeps that layout for the convolution that follows.

Design choice: two kernels on a (row, chunk) grid rather than one program per row. A per-row program would give B
programs, too few to fill a GPU at the batch sizes GUARD uses (B = 64 on 132 SMs) and one lonely program at B = 1;
chunking keeps the grid at B * ceil(D / BLOCK) programs whatever B is. The first kernel writes one fp32 partial sum
of squares per chunk (no atomics, so results are deterministic run to run); the second re-reads its row's partials,
forms the norm and writes both halves of the output. The cost is a second read of g (5 element transfers per element
instead of the minimum 4), against 14 for the torch reference in fp32.

Dispatch: `pack_perturbed` uses Triton for CUDA tensors and the torch reference elsewhere; `backend="triton"` forces
the kernel, which on CPU runs only when TRITON_INTERPRET=1 was set before this module was imported (triton decides
at decoration time whether a kernel is compiled or interpreted).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

EPS = 1e-7  # docs/spec.md section 2: z_i = h (g_i + 1e-7) / (||g_i||_2 + 1e-7); the same constant in both places

# Elements per program. Not autotuned: no GPU was available when this was written, so this is a conventional choice
# for a bandwidth-bound elementwise kernel (4096 elements = 16 KiB of fp32 per operand per program, num_warps=4
# gives 32 elements per thread). Measure on the target GPU before changing it.
BLOCK = 4096


# --------------------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _row_sumsq_kernel(
    g_ptr,  # (B*D,) input gradient in u's memory order, any float dtype
    partial_ptr,  # (B*n_chunks,) fp32 out: sum of g^2 over each chunk of each row
    D,  # elements per row (C*H*W)
    n_chunks,  # chunks per row, ceil(D / BLOCK)
    BLOCK: tl.constexpr,  # elements handled by one program
):
    row = tl.program_id(0).to(tl.int64)  # int64: B*D exceeds 2**31 at ImageNet resolution and batch 256
    chunk = tl.program_id(1).to(tl.int64)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    g = tl.load(g_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)  # accumulate in fp32 for bf16/fp16
    tl.store(partial_ptr + row * n_chunks + chunk, tl.sum(g * g, axis=0))


@triton.jit
def _pack_kernel(
    u_ptr,  # (B*D,) normalized input, any float dtype
    g_ptr,  # (B*D,) input gradient, same dtype and memory order as u
    partial_ptr,  # (B*n_chunks,) fp32 partial sums of squares from _row_sumsq_kernel
    out_ptr,  # (2B*D,) out, u's dtype: rows [0, B) get u + z, rows [B, 2B) get u
    h,  # fp32 step length of z in normalized-input units
    B,  # rows of u (the clean half starts at row B of out)
    D,  # elements per row
    n_chunks,  # chunks per row
    BLOCK: tl.constexpr,  # elements handled by one program
    CHUNKS_POW2: tl.constexpr,  # n_chunks rounded up to a power of two (tl.arange needs one)
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    # Every program of a row sums the same few partials in the same order, so all chunks agree on the norm.
    ks = tl.arange(0, CHUNKS_POW2)
    sumsq = tl.sum(tl.load(partial_ptr + row * n_chunks + ks, mask=ks < n_chunks, other=0.0), axis=0)
    scale = h / (tl.sqrt(sumsq) + 1e-7)  # fp32; a zero row gives z = h * 1e-7 / 1e-7 = h per element, no NaN
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    offs = row * D + cols
    u = tl.load(u_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    perturbed = u.to(tl.float32) + (g + 1e-7) * scale  # fp32 math, one rounding to the output dtype at the store
    tl.store(out_ptr + offs, perturbed.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + B * D + offs, u, mask=mask)  # the clean half is a straight copy, no rounding


# --------------------------------------------------------------------------------------------------------------------
# Launcher


def _memory_format(u: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor stored that way (and not also plain contiguous), else contiguous."""
    if u.dim() == 4 and not u.is_contiguous() and u.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def pack_perturbed_triton(u: torch.Tensor, g: torch.Tensor, h: float, block: int = BLOCK) -> torch.Tensor:
    """Launch the two kernels. u, g: (B, ...) same shape, dtype and device. Returns (2B, ...) in u's memory format.

    A u (or g) that is neither contiguous nor 4-D channels_last is first copied to contiguous (one extra pass)."""
    if u.shape != g.shape:
        raise ValueError(f"pack_perturbed: u {tuple(u.shape)} and g {tuple(g.shape)} must have the same shape")
    if u.dtype != g.dtype or u.device != g.device:
        raise ValueError(f"pack_perturbed: u ({u.dtype}, {u.device}) and g ({g.dtype}, {g.device}) must share "
                         "dtype and device")
    if u.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"pack_perturbed: dtype {u.dtype} not supported (float32, bfloat16, float16)")
    if u.dim() < 1:
        raise ValueError("pack_perturbed: u needs a batch dimension")
    fmt = _memory_format(u)
    u = u.contiguous(memory_format=fmt)  # no-op in the two supported layouts
    g = g.contiguous(memory_format=fmt)  # g must walk memory in the same order as u
    B = u.shape[0]
    D = u.numel() // B if B else 0
    out = torch.empty((2 * B, *u.shape[1:]), dtype=u.dtype, device=u.device, memory_format=fmt)
    if B == 0 or D == 0:
        return out
    n_chunks = triton.cdiv(D, block)
    partial = torch.empty(B * n_chunks, dtype=torch.float32, device=u.device)
    grid = (B, n_chunks)
    _row_sumsq_kernel[grid](g, partial, D, n_chunks, BLOCK=block)
    _pack_kernel[grid](u, g, partial, out, float(h), B, D, n_chunks, BLOCK=block,
                       CHUNKS_POW2=triton.next_power_of_2(n_chunks))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Autograd


class PackPerturbed(torch.autograd.Function):
    """out = [u + z ; u] with z a constant (built from the detached g): d out / d u is the identity on both halves."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, g: torch.Tensor, h: float, block: int) -> torch.Tensor:
        ctx.batch = u.shape[0]
        return pack_perturbed_triton(u, g.detach(), h, block)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        B = ctx.batch
        return grad_out[:B] + grad_out[B:], None, None, None  # (B, ...): both halves are u plus a constant


# --------------------------------------------------------------------------------------------------------------------
# Reference


def pack_perturbed_reference(u: torch.Tensor, g: torch.Tensor, h: float) -> torch.Tensor:
    """[u + z ; u], z_i = h (g_i + 1e-7) / (||g_i||_2 + 1e-7), in plain torch (differentiable wrt u; g is detached).

    Memory traffic for fp32, in units of one (B, D) tensor (B*D*4 bytes): the norm reads g (1); `g + EPS` reads g
    and writes a temporary (2); `h * ...` (2); `/ norm` (2); `u + z` reads two and writes one (3); the cat reads both
    halves and writes 2B rows (4). Total 14 transfers in 6 kernels (bf16/fp16 add the up/down casts on top), against
    5 for the fused kernels (read g twice, read u once, write both halves). The op is bandwidth-bound, so about 14/5
    is the speedup to expect from fusing on a GPU.
    """
    g = g.detach()
    dims = tuple(range(1, g.dim()))
    acc = torch.promote_types(g.dtype, torch.float32)  # fp32 accumulation (fp64 stays fp64, for exactness tests)
    norm = torch.linalg.vector_norm(g, dim=dims, dtype=acc, keepdim=True)  # (B, 1, ...)
    z = h * (g.to(acc) + EPS) / (norm + EPS)  # (B, ...)
    perturbed = (u.to(acc) + z).to(u.dtype)  # one rounding at the end, as in the kernel
    return torch.cat([perturbed, u])  # (2B, ...); cat keeps u's memory format (channels_last stays channels_last)


# --------------------------------------------------------------------------------------------------------------------
# Dispatch

BACKENDS = ("auto", "triton", "torch")


def pack_perturbed(u: torch.Tensor, g: torch.Tensor, h: float, backend: str = "auto") -> torch.Tensor:
    """`[u + z ; u]` (2B, ...) for the batched GUARD forward; differentiable wrt u, g treated as a constant.

    backend: "auto" (Triton for CUDA tensors, torch reference elsewhere), "triton" (forced; on CPU only under
    TRITON_INTERPRET=1, for tests) or "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"pack_perturbed: backend {backend!r}; valid: {', '.join(BACKENDS)}")
    use_triton = backend == "triton" or (backend == "auto" and u.is_cuda)
    if use_triton:
        return PackPerturbed.apply(u, g, h, BLOCK)
    return pack_perturbed_reference(u, g, h)
