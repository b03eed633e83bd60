"""The posterior head's own products, written out with their gradients: amp's bf16 linear layer and tfp's
FillScaleTriL for the full-covariance scale. Each gives what the plain PyTorch composition gives (the scale bit
for bit, the bf16 product as bf16 rounds), faster on a CPU. And, at import, the CPU math kernels resolved once on
one thread (resolve_vml_kernels), so that every run of a seed computes the same numbers."""
import torch
import torch.nn.functional as F

TRIL_DIAG_SHIFT = 1e-5   # tfp FillScaleTriL(diag_shift=1e-5): softplus(diag) + 1e-5

# The functions ATen computes with oneMKL's vector math (VML) on x86 CPUs (ATen/cpu/vml.h of torch 2.13).
VML_OPS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin", "sqrt",
           "tan", "tanh", "trunc")


def resolve_vml_kernels() -> None:
    """Call each VML function once, on one element and one thread, in float32 and float64.

    oneMKL picks a VML function's kernel at its first call. When that first call comes from two intra-op threads
    at once (a fresh process's first large exp, say), one thread can compute its whole chunk with a
    low-accuracy kernel, once (pytorch/pytorch#188792). On the 2-core CPU with torch 2.13 it did so in 10 of 150
    fresh processes (benchmarks/vml_first_call.py; none of 150 after this): the posterior's first exp(0.5 logvar)
    off by up to 1.5e-4 relative in one row, and two runs of one seed parted from their first step. A call on
    one element runs on the calling thread alone, and after it every later call gets the accurate kernel.
    Changes no number of a run that was not hit.
    """
    for dtype in (torch.float32, torch.float64):
        one = torch.full((1,), 0.5, dtype=dtype)
        for name in VML_OPS:
            getattr(torch, name)(one)


resolve_vml_kernels()   # every model module imports this one before it computes anything


def has_bf16_arithmetic(device: torch.device) -> bool:
    """Whether the device multiplies bf16 in hardware: a CUDA GPU from Ampere on, or a CPU with Intel's AMX or
    AVX512-BF16 or Arm's BF16 instructions. Elsewhere bf16 is emulated, slower than float32."""
    if device.type == "cuda":
        with torch.cuda.device(device):                                # the run's GPU, not the current one
            return torch.cuda.is_bf16_supported(including_emulation=False)
    caps = torch.cpu.get_capabilities() if device.type == "cpu" else {}
    return any(caps.get(k, False) for k in ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16"))


class BF16Linear(torch.autograd.Function):
    """y = x W^T + b with x and W rounded to bf16 for the three products, and W, b, their gradients, y float32.

    Written out rather than left to autocast, whose backward on a CPU reads the output gradient transposed
    (oneDNN's slow layout, twice the time of a contiguous copy and product) and whose bf16 product has to be cast
    to float32 for the loss anyway. The bias is added and its gradient summed in float32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x, w = x.to(torch.bfloat16), weight.to(torch.bfloat16)     # (B, I), (O, I)
        ctx.save_for_backward(x, w)
        return (x @ w.T).to(bias.dtype) + bias                      # (B, O)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        g = grad.to(torch.bfloat16)                                 # (B, O)
        grad_w = g.T.contiguous() @ x                               # (O, I); contiguous: see the class docstring
        return g @ w, grad_w.to(grad.dtype), grad.sum(0)           # dx bf16: autograd casts it to x's dtype


def tril_fill_index(n: int) -> torch.Tensor:
    """Index into the n(n+1)/2 scale parameters for each (i, j) of the lower triangle, tfp's fill order.

    tfp.math.fill_triangular reshapes concat(t[n:], reverse(t)) to (n, n) and keeps the lower triangle.
    Entries above the diagonal get index -1.
    """
    m = n * (n + 1) // 2
    k = torch.arange(n * n).view(n, n)                      # (n, n) flat position in the n*n vector
    index = torch.where(k < m - n, n + k, 2 * m - n - 1 - k)
    return torch.where(torch.ones(n, n, dtype=torch.bool).tril(), index, torch.full_like(index, -1))


def fill_scale_tril_indices(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FillScaleTriL's indices, from tril_fill_index: gather (n*n,), scatter (m,), diag (n,), m = n(n+1)/2.

    The scale is gathered from a row of the m parameters, the n transformed diagonal entries and a zero: gather
    is each scale entry's column in that row. scatter is the scale entry each parameter landed on (the
    diagonal's parameters: their diagonal entry, whose gradient the softplus's replaces). diag is the
    parameter of each diagonal entry.
    """
    m = n * (n + 1) // 2
    fill = tril_fill_index(n)                                         # (n, n), -1 above the diagonal
    diag = fill.diagonal().clone()                                    # (n,)
    gather = torch.where(fill >= 0, fill, m + n)                      # above the diagonal: the zero
    gather.diagonal().copy_(m + torch.arange(n))                      # on it: the transformed diagonal
    flat = torch.arange(n * n).view(n, n)                             # (n, n) position in the flat scale
    lower = fill >= 0
    scatter = torch.empty(m, dtype=torch.long)
    scatter[fill[lower]] = flat[lower]
    return gather.flatten(), scatter, diag


class FillScaleTriL(torch.autograd.Function):
    """tfp's FillScaleTriL(diag_shift=1e-5): the (B, m) head outputs -> lower-triangular scales (B, n, n), with
    softplus(x) + 1e-5 on the diagonal and zeros above it.

    The same numbers as gathering the entries, masking the upper triangle and adding diag_embed of the shifted
    softplus, forward and backward, in one gather each way: each parameter lands on exactly one entry of the
    scale, so its gradient is that entry's, read back with a gather instead of an accumulating scatter.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor, gather: torch.Tensor, scatter: torch.Tensor,
                diag: torch.Tensor) -> torch.Tensor:
        B, n = t.shape[0], diag.numel()
        # softplus and its gradient read the diagonal with a stride, as from the diagonal of a (B, n, n) tensor:
        # ATen's exp on contiguous rows is vectorised and rounds differently from its exp element by element
        raw_diag = t.new_empty(B, n, 2 if n > 1 else 1)[..., 0].copy_(t[:, diag])   # (B, n)
        src = torch.cat([t, F.softplus(raw_diag) + TRIL_DIAG_SHIFT, t.new_zeros(B, 1)], 1)   # (B, m + n + 1)
        ctx.save_for_backward(raw_diag, scatter, diag)
        return src.index_select(1, gather).view(B, n, n)                       # (B, n, n)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raw_diag, scatter, diag = ctx.saved_tensors
        B, n = raw_diag.shape
        g_t = grad.reshape(B, n * n).index_select(1, scatter)                  # (B, m)
        # a diagonal parameter reaches the scale only through the softplus
        g_diag = torch.ops.aten.softplus_backward(grad.diagonal(dim1=1, dim2=2), raw_diag, 1.0, 20.0)   # (B, n)
        g_t.index_copy_(1, diag, g_diag)
        return g_t, None, None, None
