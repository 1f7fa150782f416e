"""float32 linear layers through oneDNN with their weights packed once, wherever no gradient flows into a weight
(generation, scoring, the forgetting stage, the frozen layers of a LoRA training).

torch computes a float32 `nn.Linear` with MKL's sgemm, which lays the weight out for its kernel again on every
call. oneDNN given the weight already laid out (`torch.ops.mkldnn._reorder_linear_weight`: the packing
torch.compile's CPU backend freezes weights into) computes the same float32 products, only the order of the sums
differs, and is much faster on the small batches of decoding. bench/linear_kernels.py, Gemma 3 270M's decoder
layer shapes, 2026-12-08, AMD EPYC with AVX-512: 2.8x F.linear at 16 rows, 2.3x at 1,024 rows on 2 cores; 2.5x
and 2.3x on one core; 1.7x and 1.2x with torch and oneDNN held to AVX2 (the slower machines' instructions).

The weight itself is left as it is (training, merging and state dicts read it); the packed copy is made on first
use and again whenever the weight changes (its version counter), and lives as long as the weight (Gemma 3 270M's
decoder layers: 400 MiB more; training adds the transposed copies its input gradients read, 400 MiB, and the
loss's output layer, 640 MiB). A layer reads it only inside `packed_linears`, only where autocast is off and
weight and input are float32 on the CPU, and only where the weight wants no gradient (a frozen base layer under
LoRA; in inference, every layer): everywhere else it is torch's own layer.

What the version counter cannot see, a copy cannot follow: inside a training (torch's fused AdamW writes weights
without moving it) no trainable weight is packed or copied at all (`packed_linears(training=True)`), and a PEFT
merge (`merge_and_unload` writes `weight.data`) must be followed by `drop_copies` where the model ran packed
before (run_folder.merge_adapter does).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

# rows the packed layout is made for: 1 to 1,024 rows ran within 5% of their best layout with it (bench/)
PACK_ROWS = 16
# None: torch's layers; "all": every float32 layer reads packed weights where no gradient is recorded; "frozen":
# only the layers whose weights want no gradient (inside a training)
_MODE: ContextVar[str | None] = ContextVar("specialist_packed_linears", default=None)
# inside a training: an optimizer may write a trainable weight without moving its version counter (torch's fused
# AdamW, the Trainer's default, does), so no copy of a trainable weight is held there, whoever asks
_TRAINING: ContextVar[bool] = ContextVar("specialist_training", default=False)
# (id of a weight, what was derived from it) -> (a weak reference to the weight, its `_stamp`, a weak reference to
# its storage, the derived tensor); weak, so a model let go of takes its copies with it
_HELD: dict[tuple[int, str], tuple[weakref.ref, tuple[int, int], weakref.ref, object]] = {}
_GUARD = threading.Lock()


@functools.cache
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


def _stamp(weight: torch.Tensor) -> tuple[int, int]:
    """What tells a weight's values apart from before: its version counter, and where its data lies. The counter
    alone misses a write through `.data`, which has a counter of its own: `param.data = new` (a module's
    `.to(dtype)` and back, PEFT's safe merge) keeps the version and swaps the storage under it."""
    return _version(weight), weight.data_ptr()


def _is_current(held, weight: torch.Tensor) -> bool:
    # the storage itself is compared as well as its address: a storage freed by `.data = new` may have its
    # memory handed straight to the new one (torch keeps one Python object per live storage, so `is` is exact)
    return (held is not None and held[0]() is weight and held[1] == _stamp(weight)
            and held[2]() is weight.untyped_storage())


def held_copy(weight: torch.Tensor, kind: str, make: Callable[[torch.Tensor], object]) -> object:
    """`make(weight)`, made once per weight and `kind` (again if the weight is changed in place or given new data)
    and shared by every caller until the weight is freed."""
    if weight.requires_grad and _TRAINING.get():  # see _TRAINING: made afresh every time
        return make(weight.detach())
    key = (id(weight), kind)
    held = _HELD.get(key)
    if _is_current(held, weight):
        return held[3]
    with _GUARD:  # two threads asking at once make it once
        held = _HELD.get(key)
        if _is_current(held, weight):
            return held[3]
        made = make(weight.detach())
        _HELD[key] = (weakref.ref(weight, lambda _, key=key: _HELD.pop(key, None)), _stamp(weight),
                      weakref.ref(weight.untyped_storage()), made)
        return made


def drop_copies(model) -> None:
    """Let go of every copy held of `model`'s weights, of any kind (after a training: evaluation reads no
    transposed copy, and makes what it reads again on first use; after a merge through `weight.data`: all are
    stale)."""
    ids = {id(parameter) for parameter in model.parameters()}
    with _GUARD:
        # a snapshot: a weight freed meanwhile drops its own entry (its weak reference's callback)
        for key in [key for key in list(_HELD) if key[0] in ids]:
            _HELD.pop(key, None)


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
        ctx.weight = weight
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        if ctx.needs_input_grad[0] and torch.is_grad_enabled():
            # create_graph (a second derivative through this gradient): the packed product has no derivative of
            # its own and would silently give zero, so torch's differentiable product
            grad_x = grad @ ctx.weight
        else:
            grad_x = product(grad.contiguous(), ctx.backward_weight) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def holds_copies(weight: torch.Tensor) -> bool:
    """Whether a copy of `weight` made now stays right until its version counter moves: everywhere but inside a
    training, for a weight the optimizer writes (see _TRAINING)."""
    return not (weight.requires_grad and _TRAINING.get())


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    mode = _MODE.get()
    return (mode is not None and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.device.type == "cpu" and weight.device.type == "cpu" and x.numel() > 0
            and weight.numel() > 0  # oneDNN has no primitive for a layer with no outputs (or no inputs)
            and not torch.is_autocast_enabled("cpu")
            # a weight that wants a gradient: autograd's path where one is recorded, and always inside a training
            and not (weight.requires_grad and (mode == "frozen" or torch.is_grad_enabled())))


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, bias = self.weight, self.bias
    if not _kernel_applies(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _FrozenLinear.apply(x, weight, bias)
    return linear(x, weight, bias)


class _PackedForward:
    """An installed layer's `forward`: `_forward` bound to it. A class rather than a bound method so that the
    model still pickles (`torch.save` of a whole module): pickle looks a bound method up again by its function's
    name, `_forward`, which the layer has no attribute of."""

    __slots__ = ("module",)

    def __init__(self, module: torch.nn.Linear) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _forward(self.module, x)


def head_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias for an output layer computed by hand (the chunked loss, the greedy head): through the
    packed weight inside `packed_linears`, else torch's."""
    return linear(x, weight, bias) if _kernel_applies(x, weight) else F.linear(x, weight, bias)


def install(model) -> None:
    """Give every `nn.Linear` of `model` (a PEFT wrapper's base layers and adapters included) the forward that
    reads packed weights inside `packed_linears`; its output layer keeps torch's (a float32 copy of a large
    vocabulary's layer costs more memory than the rare full-logit passes gain: greedy decoding has its own
    head, specialist.decode.GreedyHead). Idempotent."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    for module in model.modules():
        if type(module) is torch.nn.Linear and module is not head and "forward" not in vars(module):
            module.forward = _PackedForward(module)


@contextmanager
def packed_linears(model, enabled: bool = True, training: bool = False) -> Iterator[None]:
    """Within, in this thread: the linear layers of `model` read packed weights (see the module docstring); not
    `enabled`: torch's layers, whatever scope this one is inside. `training` (a trainer's whole run): only weights
    that want no gradient are packed, and no copy of a trainable weight is held, in any scope entered inside it
    (the generation of an evaluation during training)."""
    training = training or _TRAINING.get()
    mode = ("frozen" if training else "all") if enabled and available() else None
    if mode is not None:
        install(model)
    tokens = (_MODE.set(mode), _TRAINING.set(training))
    try:
        yield
    finally:
        _MODE.reset(tokens[0])
        _TRAINING.reset(tokens[1])
