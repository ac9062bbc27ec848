"""Inference layers that multiply by a CSR (compressed sparse row) weight: :class:`SparseLinear`, :class:`SparseConv2d`.

Each holds the pruned weight as a ``torch.sparse_csr_tensor`` and computes ``W @ x^T`` with one of two
kernels (:data:`KERNELS`), so only the kept weights are multiplied: ``"mm"``, torch's sparse-dense
``addmm`` (MKL on the CPU), or ``"embedding_bag"``, each output row as the sum of the input rows its weight
keeps, scaled by the weights (``F.embedding_bag`` with ``per_sample_weights`` over the CSR arrays: FBGEMM's
vectorised kernels on the CPU, 1.3-2x faster than MKL's from a batch of about 32 on the machines measured,
slower at 1-8). The activations are multiplied in the ``(features, batch)`` layout both kernels want: the
output is returned as a transposed view, so a chain of sparse layers (with element-wise activations between
them) pays the layout copy once, at its first layer. They are for inference only: the weight is a buffer, not a parameter.
A dense ``Linear`` that receives that layout (a layer left dense after a CSR one) becomes a
:class:`FeatureMajorLinear`, which multiplies in it too: torch's ``linear`` on a transposed input takes a
slow path on small layers (a 100 -> 10 layer at batch 256: 93 us against 12 us).

Which layers are worth converting is decided in :mod:`lightning_clipprune.export.inference`, by timing.
"""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KERNELS",
    "FeatureMajorLinear",
    "SparseConv1d",
    "SparseConv2d",
    "SparseLinear",
    "feature_major",
    "sparse_product",
    "to_csr",
]

#: The sparse products a CSR layer can compute with (``kernel=``): ``"mm"`` (torch's CSR ``addmm``, MKL) and
#: ``"embedding_bag"`` (``F.embedding_bag`` over the CSR arrays). Which is faster depends on the layer, the
#: batch and the CPU; :func:`~lightning_clipprune.export.inference.to_inference` times both.
KERNELS = ("mm", "embedding_bag")


def to_csr(weight: Tensor) -> Tensor:
    """The 2-D ``weight`` as a CSR tensor holding only its non-zero entries (torch's "beta" warning silenced).

    On the CPU its indices are int32 (MKL's own index type), unless there are too many entries for them.

    Example::

        >>> to_csr(torch.tensor([[0.0, 2.0], [0.0, 0.0]])).values()
        tensor([2.])
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = weight.detach().contiguous().to_sparse_csr()
        if csr.values().numel() >= 2**31 - 1 or csr.device.type != "cpu":
            return csr
        # int32 indices: what MKL's kernel reads (int64 ones are converted on every call), and half the bytes
        return torch.sparse_csr_tensor(
            csr.crow_indices().to(torch.int32),
            csr.col_indices().to(torch.int32),
            csr.values(),
            csr.shape,
            check_invariants=False,  # torch's own conversion built them
        )


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling is not None and is_compiling())


def _numpy_copy_pays(rows: int, cols: int) -> bool:
    # Measured (benchmarks/bench_inference.md, "The layout copy"): numpy's transposing copy takes 0.3-0.9x
    # torch's time for an input of at most 2**18 floats, but 1.5-6x when its rows are a multiple of 512 bytes
    # apart (a width of 256, 512, 768, 1024 ...: cache-set conflicts) or the batch a multiple of 512.
    return cols % 128 != 0 and rows % 512 != 0 and rows * cols <= 2**18


@torch.jit.ignore
def _transposed_copy(x2d: Tensor) -> Tensor:
    # traced or compiled graphs keep torch's copy, which they can record
    if (
        _numpy_copy_pays(x2d.shape[0], x2d.shape[1])
        and x2d.dtype == torch.float32
        and x2d.is_cpu
        and x2d.is_contiguous()
        and not x2d.requires_grad
        and not torch.jit.is_tracing()
        and not _compiling()
    ):
        return torch.from_numpy(np.ascontiguousarray(x2d.numpy().T))
    return x2d.t().contiguous()


def _transposed(x2d: Tensor) -> Tensor:
    """``x2d.t()`` as a contiguous tensor: the ``(features, batch)`` rows the CSR kernel multiplies."""
    xt = x2d.t()
    if xt.is_contiguous():  # already laid out: the output of a previous sparse layer
        return xt
    if torch.jit.is_scripting():
        return xt.contiguous()
    return _transposed_copy(x2d)


def _check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def sparse_product(weight: Tensor, bias: Tensor | None, xt: Tensor, kernel: str) -> Tensor:
    """``weight @ xt + bias[:, None]`` for a CSR ``weight`` and a dense ``(in, n)`` ``xt``, by ``kernel``.

    Example::

        >>> w = torch.tensor([[0.0, 2.0], [1.0, 0.0]]); xt = torch.randn(2, 3)
        >>> torch.allclose(sparse_product(to_csr(w), None, xt, "embedding_bag"), w @ xt)
        True
    """
    if kernel == "embedding_bag":
        # row i of the result: the sum over the kept (j, w_ij) of w_ij * xt[j], i.e. a bag per weight row
        out = F.embedding_bag(
            weight.col_indices(), xt, weight.crow_indices(), mode="sum", per_sample_weights=weight.values(),
            include_last_offset=True,
        )
        return out if bias is None else out.add_(bias.unsqueeze(1))
    return torch.mm(weight, xt) if bias is None else torch.addmm(bias.unsqueeze(1), weight, xt)


def _csr_matmul(weight: Tensor, bias: Tensor | None, x2d: Tensor, kernel: str) -> Tensor:
    """``x2d @ weight.T + bias`` for a CSR ``weight``; the result is a transposed view of a contiguous tensor."""
    xt = _transposed(x2d)  # one copy at a chain's start, none between sparse layers
    return sparse_product(weight, bias, xt, kernel).t()


def feature_major(x: Tensor) -> bool:
    """Whether the 2-D ``x`` is a transposed view of a contiguous ``(features, batch)`` tensor (what a CSR layer returns)."""
    return x.dim() == 2 and not x.is_contiguous() and x.t().is_contiguous()


class FeatureMajorLinear(nn.Linear):
    """A dense ``nn.Linear`` that keeps the ``(features, batch)`` layout of a CSR layer's output.

    Given a transposed view of a contiguous tensor (:func:`feature_major`), it computes ``W @ x^T + b`` on the
    underlying rows (one dense product, no copy) and returns a transposed view again, so the layers after it
    see the same layout; any other input goes through ``nn.Linear``. Its parameters are the ``Linear``'s own.

    Args:
        linear: the ``nn.Linear`` whose weight and bias it shares.

    Example::

        >>> lin = nn.Linear(8, 4); x = torch.randn(8, 3).t()
        >>> torch.allclose(FeatureMajorLinear(lin)(x), lin(x), atol=1e-6)
        True
    """

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_parameter("weight", linear.weight)
        self.register_parameter("bias", linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.is_contiguous():
            return F.linear(x, self.weight, self.bias)
        xt = x.t()
        if not xt.is_contiguous():
            return F.linear(x, self.weight, self.bias)
        bias = self.bias
        out = torch.mm(self.weight, xt) if bias is None else torch.addmm(bias.unsqueeze(1), self.weight, xt)
        return out.t()


class _CsrModule(nn.Module):
    """A module holding CSR buffers that ``copy.deepcopy`` can copy (torch's own deepcopy of a CSR tensor raises
    "Cannot access storage of SparseCsrTensorImpl"): those buffers are cloned, everything else deep-copied."""

    def __deepcopy__(self, memo: dict[int, object]) -> _CsrModule:
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_buffers":
                buffers = {}
                for name, buf in value.items():
                    if buf is not None and buf.layout == torch.sparse_csr:
                        if id(buf) not in memo:  # a tensor shared by two modules stays shared in the copy
                            memo[id(buf)] = buf.clone()
                        buffers[name] = memo[id(buf)]
                    else:
                        buffers[name] = copy.deepcopy(buf, memo)
                value = buffers
            else:
                value = copy.deepcopy(value, memo)
            new.__dict__[key] = value
        return new


class SparseLinear(_CsrModule):
    """A ``Linear`` whose weight is a CSR tensor: the same outputs (within float rounding), for inference only.

    Args:
        linear: the pruned ``nn.Linear`` to copy (its weight's zeros are not stored).
        kernel: the sparse product, one of :data:`KERNELS` (``"mm"``: MKL's; ``"embedding_bag"``: faster at
            large batches on many CPUs).

    Raises:
        ValueError: an unknown ``kernel``.

    Example::

        >>> lin = nn.Linear(8, 4); _ = lin.weight.data.mul_(torch.rand(4, 8) > 0.9)
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(SparseLinear(lin)(x), lin(x), atol=1e-6)
        True
    """

    def __init__(self, linear: nn.Linear, kernel: str = "mm") -> None:
        super().__init__()
        self.kernel = _check_kernel(kernel)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.register_buffer("weight", to_csr(linear.weight))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @classmethod
    def from_hf_conv1d(cls, conv1d: nn.Module, kernel: str = "mm") -> SparseLinear:
        """From a Hugging Face ``Conv1D`` (GPT-2's layers), which computes ``x @ W + b`` with ``W`` stored ``(in, out)``.

        Example::

            >>> class Conv1D(nn.Module):
            ...     def __init__(self, nf, nx):
            ...         super().__init__(); self.nf = nf
            ...         self.weight, self.bias = nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.randn(nf))
            >>> layer, x = Conv1D(4, 8), torch.randn(3, 8)
            >>> torch.allclose(SparseLinear.from_hf_conv1d(layer)(x), x @ layer.weight + layer.bias, atol=1e-6)
            True
        """
        weight = conv1d.weight.detach()
        view = SimpleNamespace(in_features=weight.shape[0], out_features=weight.shape[1], weight=weight.t(), bias=conv1d.bias)
        return cls(view, kernel)  # type: ignore[arg-type]  # what __init__ reads of a Linear

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # no reshapes: a few microseconds of a small layer's call
            return _csr_matmul(self.weight, self.bias, x, self.kernel)
        shape = list(x.shape[:-1])  # a list, not *unpacking: torch.jit.script accepts it
        shape.append(self.out_features)
        return _csr_matmul(self.weight, self.bias, x.reshape(-1, self.in_features), self.kernel).reshape(shape)

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        total = self.in_features * self.out_features
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz} ({nnz / total:.1%}), "
            f"kernel={self.kernel!r}"
        )


def _check_convertible(kind: str, conv: nn.Module) -> None:
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(
            f"{kind}: only groups=1, padding_mode='zeros' and numeric padding are supported, got "
            f"groups={conv.groups}, padding_mode={conv.padding_mode!r}, padding={conv.padding!r}"
        )


class SparseConv2d(_CsrModule):
    """A ``Conv2d`` (``groups=1``) computed as a CSR weight times the unfolded input (``F.unfold``), for inference.

    The unfold copies the input ``kernel_h * kernel_w`` times, so this pays only for large, very sparse
    convolutions; :func:`~lightning_clipprune.export.inference.to_inference` times it against the dense
    convolution and keeps whichever is faster.

    Args:
        conv: the pruned ``nn.Conv2d`` to copy; ``groups`` must be 1 and ``padding_mode`` ``"zeros"``.
        kernel: the sparse product, one of :data:`KERNELS`.

    Raises:
        ValueError: ``groups != 1``, a padding mode other than ``"zeros"``, a string padding, or an unknown
            ``kernel``.

    Example::

        >>> conv = nn.Conv2d(3, 4, 3, padding=1); x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(SparseConv2d(conv)(x), conv(x), atol=1e-5)
        True
    """

    def __init__(self, conv: nn.Conv2d, kernel: str = "mm") -> None:
        super().__init__()
        _check_convertible("SparseConv2d", conv)
        self.kernel = _check_kernel(kernel)
        self.out_channels = conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.register_buffer("weight", to_csr(conv.weight.reshape(conv.out_channels, -1)))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def _out_size(self, size: int, dim: int) -> int:
        k, s, p, d = self.kernel_size[dim], self.stride[dim], self.padding[dim], self.dilation[dim]
        return (size + 2 * p - d * (k - 1) - 1) // s + 1

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == 3  # a (channels, height, width) input, as nn.Conv2d takes
        if unbatched:
            x = x.unsqueeze(0)
        n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        # (N, C*k*k, L) -> (C*k*k, N*L): one copy, then one sparse product for the whole batch.
        xt = cols.permute(1, 0, 2).reshape(cols.shape[1], -1)
        out = sparse_product(self.weight, self.bias, xt, self.kernel)
        out = out.reshape(self.out_channels, n, -1).permute(1, 0, 2)
        out = out.reshape(n, self.out_channels, self._out_size(h, 0), self._out_size(w, 1))
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return (
            f"out_channels={self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, nnz={nnz}, "
            f"kernel={self.kernel!r}"
        )


class SparseConv1d(_CsrModule):
    """A ``Conv1d`` (``groups=1``) computed as a CSR weight times its input's windows, for inference.

    The windows are a strided view of the (padded) input; one copy lays them out as ``(C * k, N * L)`` for the
    sparse product (``F.unfold``, which :class:`SparseConv2d` uses, costs twice that on one-dimensional
    inputs). It pays on wide, very sparse layers (512 channels, kernel 5, 98 %: 1.8x one thread), not on
    most: :func:`~lightning_clipprune.export.inference.to_inference` times it and keeps the faster.

    Args:
        conv: the pruned ``nn.Conv1d`` to copy; ``groups`` must be 1 and ``padding_mode`` ``"zeros"``.
        kernel: the sparse product, one of :data:`KERNELS`.

    Raises:
        ValueError: ``groups != 1``, a padding mode other than ``"zeros"``, a string padding, or an unknown
            ``kernel``.

    Example::

        >>> conv = nn.Conv1d(3, 4, 5, padding=2, dilation=2); x = torch.randn(2, 3, 16)
        >>> torch.allclose(SparseConv1d(conv)(x), conv(x), atol=1e-5)
        True
    """

    def __init__(self, conv: nn.Conv1d, kernel: str = "mm") -> None:
        super().__init__()
        _check_convertible("SparseConv1d", conv)
        self.kernel = _check_kernel(kernel)
        self.out_channels = conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size[0], conv.stride[0]
        self.padding, self.dilation = conv.padding[0], conv.dilation[0]
        self.register_buffer("weight", to_csr(conv.weight.reshape(conv.out_channels, -1)))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == 2  # a (channels, length) input, as nn.Conv1d takes
        if unbatched:
            x = x.unsqueeze(0)
        if self.padding:
            x = F.pad(x, [self.padding, self.padding])
        windows = x.unfold(2, self.dilation * (self.kernel_size - 1) + 1, self.stride)[:, :, :, :: self.dilation]
        n, length = windows.shape[0], windows.shape[2]
        cols = windows.permute(1, 3, 0, 2).reshape(-1, n * length)  # (C * k, N * L): the one copy
        out = sparse_product(self.weight, self.bias, cols, self.kernel)
        out = out.reshape(self.out_channels, n, length).permute(1, 0, 2)
        return out.squeeze(0) if unbatched else out

    extra_repr = SparseConv2d.extra_repr  # the same attributes, ints here
