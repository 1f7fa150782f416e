"""float32 linear layers through oneDNN with their weights packed once, for forward passes that want no gradient
(generation, the forgetting stage).

torch computes a float32 `nn.Linear` with MKL's sgemm, which lays the weight out for its kernel again on every
call. oneDNN given the weight already laid out (`torch.ops.mkldnn._reorder_linear_weight`: the packing
torch.compile's CPU backend freezes weights into) computes the same float32 products, only the order of the sums
differs, and is much faster on the small batches of decoding. bench/linear_kernels.py, Gemma 3 270M's decoder
layer shapes, 2026-12-08, AMD EPYC with AVX-512: 3.0x F.linear at 16 rows, 2.3x at 1,024 rows on 2 cores; 2.6x
and 2.3x on one core; 1.5x and 1.2x with torch and oneDNN held to AVX2 (the slower machines' instructions).

The weight itself is left as it is (training, merging and state dicts read it); the packed copy is made on first
use and again whenever the weight changes (its version counter), and lives as long as the weight (Gemma 3 270M's
decoder layers: 400 MiB more; training adds the transposed copies its input gradients read, 400 MiB more). A
layer reads it only inside `packed_linears`, only where autocast is off and weight and input are float32 on the
CPU, and only where the weight wants no gradient (a frozen base layer under LoRA; in inference, every layer):
everywhere else it is torch's own layer.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import MethodType

import torch
import torch.nn.functional as F

# rows the packed layout is made for: 1 to 1,024 rows ran within 5% of their best layout with it (bench/)
PACK_ROWS = 16
_ACTIVE: ContextVar[bool] = ContextVar("specialist_packed_linears", default=False)
# (id of a weight, what was derived from it) -> (a weak reference to the weight, its version, the derived tensor);
# weak, so a model let go of takes its copies with it
_HELD: dict[tuple[int, str], tuple[weakref.ref, int, object]] = {}
_GUARD = threading.Lock()


def available() -> bool:
    """Whether this torch has oneDNN and its packed linear kernel."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight  # noqa: B018 - the op is looked up lazily, and may be missing
        torch.ops.mkldnn._linear_pointwise  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor keeps no version: it cannot be changed outside inference mode
        return -1


def held_copy(weight: torch.Tensor, kind: str, make: Callable[[torch.Tensor], object]) -> object:
    """`make(weight)`, made once per weight and `kind` (again if the weight is changed in place) and shared by
    every caller until the weight is freed."""
    key = (id(weight), kind)
    held = _HELD.get(key)
    if held is not None and held[0]() is weight and held[1] == _version(weight):
        return held[2]
    with _GUARD:  # two threads asking at once make it once
        held = _HELD.get(key)
        if held is not None and held[0]() is weight and held[1] == _version(weight):
            return held[2]
        made = make(weight.detach())
        _HELD[key] = (weakref.ref(weight, lambda _, key=key: _HELD.pop(key, None)), _version(weight), made)
        return made


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (float32 or bfloat16, out x in) laid out for oneDNN's linear kernel."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS)


def packed(weight: torch.Tensor) -> torch.Tensor:
    """`pack(weight)`, made once per weight (the parameter itself: a `detach()` is a new tensor each time)."""
    return held_copy(weight, "onednn", pack)


def product(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T + bias, W given packed (`pack`); no gradient."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear on the packed copy of `weight`: the same products, no gradient."""
    return product(x, packed(weight), bias)


def transposed(weight: torch.Tensor) -> torch.Tensor:
    """`weight.T` packed, for the input's gradient (grad_x = grad_y @ weight), made once per weight."""
    return held_copy(weight, "onednn-t", lambda w: pack(w.t()))


class _FrozenLinear(torch.autograd.Function):
    """x @ weight.T + bias for a weight that wants no gradient (a frozen base layer under LoRA): the product and
    the input's gradient both through packed copies (weight, and weight.T)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.backward_weight = transposed(weight) if ctx.needs_input_grad[0] else None
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = product(grad.contiguous(), ctx.backward_weight) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_ACTIVE.get() and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.device.type == "cpu" and weight.device.type == "cpu" and x.numel() > 0
            and not torch.is_autocast_enabled("cpu"))


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, bias = self.weight, self.bias
    if not _kernel_applies(x, weight):
        return F.linear(x, weight, bias)
    if not torch.is_grad_enabled():
        return linear(x, weight, bias)
    if weight.requires_grad:  # the weight's own gradient: autograd's path
        return F.linear(x, weight, bias)
    if x.requires_grad or (bias is not None and bias.requires_grad):
        return _FrozenLinear.apply(x, weight, bias)
    return linear(x, weight, bias)


def head_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 transpose: bool = False) -> torch.Tensor:
    """x @ weight.T + bias (or x @ weight, `transpose`) for an output layer computed by hand (the chunked loss):
    through packed copies inside `packed_linears`, else torch's."""
    if not _kernel_applies(x, weight):
        return x @ weight if transpose else F.linear(x, weight, bias)
    return product(x.contiguous(), transposed(weight)) if transpose else linear(x, weight, bias)


def install(model) -> None:
    """Give every `nn.Linear` of `model` (a PEFT wrapper's base layers and adapters included) the forward that
    reads packed weights inside `packed_linears`; its output layer keeps torch's (a float32 copy of a large
    vocabulary's layer costs more memory than the rare full-logit passes gain: greedy decoding has its own
    head, specialist.decode.GreedyHead). Idempotent."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    for module in model.modules():
        if type(module) is torch.nn.Linear and module is not head and "forward" not in vars(module):
            module.forward = MethodType(_forward, module)


@contextmanager
def packed_linears(model, enabled: bool = True) -> Iterator[None]:
    """Within: the linear layers of `model` read packed weights (see the module docstring), in this thread."""
    if not enabled or not available():
        yield
        return
    install(model)
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
