"""Int8 weight-only quantisation of a loaded model (docs/design.md §6.3): `quantize_int8(model)` returns a copy whose
attention, dense-FFN and expert weights are stored as int8 with one scale per output channel, and that decodes,
generates and evaluates through the model's own code paths.

How it fits without a second model: each quantised weight becomes an `Int8Matrix`, a tensor-like object (it defines
`__torch_function__`, as PyTorch's "extending torch" guide describes) that stands in for the float matrix wherever the
model reads one. The matrix products the model performs on weights (`F.linear`, `@`, `torch.mm`, `torch.addmm`)
run on the int8 data; the layout moves the decoding path makes (`torch.cat` of gate and up, `.transpose`, `.unbind`
of the experts) stay int8; any other operation (the float64 folding of the absorbed MLA maps) sees the dequantised
matrix. The copy's `DecodingWeights` store quantises what it builds as well, so the absorbed maps it folds are int8
too, and generation holds no float copy of a quantised weight.

What stays in full precision: embeddings, norms, the routers (their logits choose experts, a discrete decision) and
the LM head, as is usual for weight-only schemes. On CPU the product runs PyTorch's int8 weight-only kernel
(`torch._weight_int8pack_mm`) with bfloat16 activations, which it requires; elsewhere, and for an input width that is
not a multiple of 16 (the CPU kernel returns wrong values then, measured with torch 2.13), the weight is dequantised
for the product.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from longcat_lab.model.cache import DecodingWeights
from longcat_lab.model.model import LongCatLM
from longcat_lab.model.moe import Experts, Router

QMAX = 127  # symmetric int8: -127..127, so that scale * q is symmetric around 0
KERNEL_MULTIPLE = 16  # the CPU kernel's input width must be a multiple of this


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q [..., out, in] int8, scale [..., out] in w's dtype) with w ~= q * scale[..., None].
    A row of zeros gets scale 1 (q is 0 there anyway)."""
    amax = w.detach().abs().amax(dim=-1).float()
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w.detach().float() / scale[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale.to(w.dtype)


def _mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ (q * scale)^T with q [out, in]: the int8 kernel where it is valid, else a dequantised matmul."""
    lead, k = x.shape[:-1], x.shape[-1]
    if x.device.type == "cpu" and k % KERNEL_MULTIPLE == 0 and x.dtype in (torch.float32, torch.bfloat16):
        x2 = x.reshape(-1, k).to(torch.bfloat16).contiguous()
        y = torch._weight_int8pack_mm(x2, q, scale.to(torch.bfloat16))
        return y.to(x.dtype).reshape(*lead, q.shape[0])
    return x @ (q.to(x.dtype) * scale.to(x.dtype)[:, None]).T


class Int8Matrix:
    """A float matrix (or a stack of them, [N, out, in]) stored as int8 `q` with per-output-channel `scale`.

    `transposed` marks the [in, out] view that `x @ W` expects (the decoding layout, `DecodingWeights.transpose`);
    the data stay in the [out, in] layout the kernel reads. `dtype` is the float dtype the matrix stands for, so code
    that asks a weight for its dtype gets the compute dtype, as with the original parameter."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, transposed: bool = False):
        self.q, self.scale, self.transposed = q, scale, transposed

    @classmethod
    def from_float(cls, w: torch.Tensor, transposed: bool = False) -> Int8Matrix:
        """Quantise w per output channel: its rows ([..., out, in]), or its columns if `transposed` ([..., in, out])."""
        q, scale = quantize_rows(w.transpose(-2, -1) if transposed else w)
        return cls(q.contiguous(), scale, transposed)

    # The tensor attributes the model's code reads ------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        s = self.q.shape
        return torch.Size((*s[:-2], s[-1], s[-2])) if self.transposed else s

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def ndim(self) -> int:
        return self.q.ndim

    @property
    def _version(self) -> int:  # `DecodingWeights` stamps its sources with these two
        return self.q._version

    def data_ptr(self) -> int:
        return self.q.data_ptr()

    def dim(self) -> int:
        return self.q.ndim

    def numel(self) -> int:
        return self.q.numel()

    def nbytes(self) -> int:
        """Bytes held: the int8 data and the scales."""
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self) -> torch.Tensor:
        w = self.q.to(self.dtype) * self.scale[..., None]
        return w.transpose(-2, -1) if self.transposed else w

    # Layout moves stay int8 -----------------------------------------------------------------------------------
    def transpose(self, a: int, b: int) -> Int8Matrix:
        if sorted((a % self.ndim, b % self.ndim)) != [self.ndim - 2, self.ndim - 1]:
            raise ValueError(f"Int8Matrix.transpose({a}, {b}) is not allowed: only the last two dims can be swapped")
        return Int8Matrix(self.q, self.scale, not self.transposed)

    def t(self) -> Int8Matrix:
        return self.transpose(0, 1)

    def detach(self) -> Int8Matrix:
        return self

    def contiguous(self) -> Int8Matrix:
        return self

    def __getitem__(self, i: int) -> Int8Matrix:
        if self.ndim != 3 or not isinstance(i, int):
            raise ValueError(f"Int8Matrix[{i!r}] is not allowed: only one matrix of a stack is selected by index")
        return Int8Matrix(self.q[i], self.scale[i], self.transposed)

    def unbind(self, dim: int = 0) -> tuple[Int8Matrix, ...]:
        if self.ndim != 3 or dim != 0:
            raise ValueError(f"Int8Matrix.unbind({dim}) is not allowed: only a stack [N, ...] unbinds, along dim 0")
        return tuple(self[i] for i in range(self.q.shape[0]))

    def __getattr__(self, name: str):
        """Any other tensor method or attribute (`.double()`, `.view`, `.to`) acts on the dequantised matrix."""
        if name.startswith("_"):  # copy and pickle probe dunder names before __init__ has run
            raise AttributeError(name)
        if name.endswith("_"):  # on a dequantised temporary an in-place op would silently change nothing
            raise AttributeError(f"Int8Matrix.{name} is not allowed: a quantised weight is read-only")
        return getattr(self.dequantize(), name)

    def __repr__(self) -> str:
        return f"Int8Matrix(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    def __matmul__(self, other):
        return _dequantized(torch.matmul, (self, other), {})

    def __rmatmul__(self, other):
        return self.__torch_function__(torch.matmul, (), (other, self))

    # Products run on the int8 data; everything else sees the dequantised matrix --------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and isinstance(args[1], Int8Matrix) and not args[1].transposed:
            y = _mm(args[0], args[1].q, args[1].scale)
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return y if bias is None else y + bias
        if func in (torch.matmul, torch.mm, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.Tensor.mm):
            x, w = args[0], args[1]
            if isinstance(w, Int8Matrix) and w.transposed and w.ndim == 2 and isinstance(x, torch.Tensor):
                y = _mm(x, w.q, w.scale)
                out = kwargs.get("out")
                return y if out is None else out.copy_(y)
        if func is torch.addmm and isinstance(args[2], Int8Matrix) and args[2].transposed and args[2].ndim == 2:
            y = _mm(args[1], args[2].q, args[2].scale)
            return args[0] * kwargs.get("beta", 1) + y * kwargs.get("alpha", 1)
        if func is torch.cat:
            joined = _cat_rows(args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0))
            if joined is not None:
                return joined
        return _dequantized(func, args, kwargs)


def _cat_rows(items, dim: int) -> Int8Matrix | None:
    """Int8Matrix stacked along the output dim (what `DecodingWeights.transpose` does to gate and up), or None."""
    if not items or not all(isinstance(m, Int8Matrix) and not m.transposed for m in items):
        return None
    if dim % items[0].ndim != items[0].ndim - 2:
        return None
    return Int8Matrix(torch.cat([m.q for m in items], dim=-2), torch.cat([m.scale for m in items], dim=-1))


def _dequantized(func, args, kwargs):
    def plain(a):
        if isinstance(a, Int8Matrix):
            return a.dequantize()
        if isinstance(a, (list, tuple)):
            return type(a)(plain(b) for b in a)
        return a

    return func(*plain(args), **{k: plain(v) for k, v in kwargs.items()})


def _quantize_tree(value: Any) -> Any:
    """The decoding store's values with every float matrix ([in, out], `DecodingWeights.transpose`'s layout)
    quantised; tuples are walked, Int8Matrix and other objects are kept."""
    if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.is_floating_point():
        return Int8Matrix.from_float(value, transposed=True)
    if isinstance(value, tuple):
        return tuple(_quantize_tree(v) for v in value)
    return value


class Int8DecodingWeights(DecodingWeights):
    """The decoding store of a quantised model: what it builds is quantised per output channel (the absorbed MLA
    maps, folded from the dequantised weights in float64, and any other float matrix), the int8 layouts pass
    through."""

    def get(self, key: tuple, sources: tuple, build):
        return super().get(key, sources, lambda: _quantize_tree(build()))


def _replace(module: nn.Module, name: str, w: torch.Tensor, transposed: bool = False) -> None:
    delattr(module, name)  # the parameter goes; a plain attribute takes its name
    object.__setattr__(module, name, Int8Matrix.from_float(w.detach(), transposed))


@torch.no_grad()
def quantize_int8(model: LongCatLM) -> LongCatLM:
    """A copy of `model` in eval mode whose attention, dense-FFN and expert weights (and the MTP module's, which are
    of the same kinds plus its `eh_proj`) are int8 per output channel (`Int8Matrix`): every `nn.Linear` but the
    routers' and the LM head, and every `Experts`. Embeddings, norms, routers and the LM head keep their dtype.
    `model` is left untouched. The copy generates (`generate`, `stream`, speculative decoding) and evaluates
    (`eval.bpb.bits_per_byte`) like any model; it is for inference only: it cannot be trained, and `state_dict`
    leaves the quantised weights out. Quantise on the device the copy will run on: the int8 weights are not
    parameters, so `.to()` does not move them."""
    if not isinstance(model, LongCatLM):
        raise ValueError(f"model={type(model).__name__} is not allowed: quantize_int8 takes a LongCatLM")
    copy_ = copy.deepcopy(model).eval()
    copy_.decoding_weights = Int8DecodingWeights()
    routers = {id(m.classifier) for m in copy_.modules() if isinstance(m, Router)}
    for module in list(copy_.modules()):
        if isinstance(module, nn.Linear) and module is not copy_.lm_head and id(module) not in routers:
            _replace(module, "weight", module.weight)
        elif isinstance(module, Experts):
            _replace(module, "gate_up_proj", module.gate_up_proj)
            _replace(module, "down_proj", module.down_proj)
    copy_.register_forward_pre_hook(_refuse_gradients)
    return copy_


def _refuse_gradients(module: nn.Module, args) -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(
            "a quantize_int8 model runs without gradients: call it under torch.no_grad() or torch.inference_mode()"
        )


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights: its parameters and buffers plus the int8 data and scales of its `Int8Matrix`
    weights (each storage counted once)."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for module in model.modules():
        total += sum(v.nbytes() for v in vars(module).values() if isinstance(v, Int8Matrix))
    return total


__all__ = ["Int8DecodingWeights", "Int8Matrix", "model_bytes", "quantize_int8", "quantize_rows"]
