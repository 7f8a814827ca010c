"""The fast path: how the network runs (precision, memory format, TF32, compile, CUDA graphs).

None of these switches changes the DDPM math in :mod:`ddpmkit.diffusion`; they change how the
predictor's forward pass is executed. On CUDA the defaults turn on what pays there (bf16 autocast,
channels-last, TF32, CUDA graphs for sampling); on the CPU everything defaults off, so results stay
bitwise reproducible in fp32.

:func:`accelerated` wraps a model for one sampling call; ``ddpmkit.training`` applies the
switches that training uses itself (:func:`tf32_mode`, channels-last weights, ``torch.compile``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import attrs
import torch
from torch import Tensor

from ddpmkit.errors import DdpmkitError

PRECISIONS = ("auto", "fp32", "bf16")


@attrs.define(frozen=True)
class FastPath:
    """Execution switches for the predictor. ``None`` means "auto": on for CUDA, off elsewhere.

    precision: ``"auto"`` (bf16 autocast on CUDA, fp32 elsewhere), ``"fp32"`` or ``"bf16"``
        (autocast; on a CPU it pays only where the processor has bf16 instructions, such as
        AVX512-BF16 or AMX). Default ``"auto"``.
    channels_last: NHWC memory format for the network's weights and inputs. Default auto.
    tf32: TensorFloat-32 matrix products and convolutions on CUDA (``False`` forces full fp32,
        also for cuDNN, which PyTorch otherwise runs in TF32). Default auto.
    compile: ``torch.compile`` the network (the first call compiles: seconds to minutes).
        Default ``False``.
    cuda_graphs: capture the network's forward pass once per batch shape in a CUDA graph and
        replay it at every sampling step (CUDA only). Default auto.
    """

    precision: str = attrs.field(default="auto", validator=attrs.validators.in_(PRECISIONS))
    channels_last: bool | None = None
    tf32: bool | None = None
    compile: bool = False
    cuda_graphs: bool | None = None

    @classmethod
    def eager(cls) -> FastPath:
        """Plain fp32 eager execution everywhere (the reference)."""
        return cls(precision="fp32", channels_last=False, tf32=False, compile=False, cuda_graphs=False)

    @classmethod
    def from_run(cls, config, **overrides) -> FastPath:
        """The switches stored in a :class:`~ddpmkit.run.config.RunConfig`, with ``overrides`` (None: keep)."""
        values = {"precision": config.precision, "channels_last": config.channels_last, "tf32": config.tf32,
                  "compile": config.compile, "cuda_graphs": config.cuda_graphs}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def resolve(self, device: torch.device) -> FastPath:
        """Every ``auto`` replaced by what it means on ``device``; impossible requests → DdpmkitError."""
        cuda = device.type == "cuda"
        if self.cuda_graphs and not cuda:
            raise DdpmkitError("--cuda-graphs needs a CUDA device; drop it (or use --device cuda)")
        precision = self.precision if self.precision != "auto" else ("bf16" if cuda else "fp32")
        pick = lambda v: cuda if v is None else bool(v)  # noqa: E731
        return FastPath(precision=precision, channels_last=pick(self.channels_last), tf32=pick(self.tf32) and cuda,
                        compile=self.compile, cuda_graphs=pick(self.cuda_graphs))


@contextlib.contextmanager
def tf32_mode(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matrix products and cuDNN convolutions on (or off) inside the block; restored after."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def model_memory_format(model: torch.nn.Module) -> torch.memory_format:
    """The memory format of the model's 4-D weights (the first whose layout tells them apart)."""
    for p in model.parameters():
        if p.ndim == 4:
            nchw, nhwc = p.is_contiguous(), p.is_contiguous(memory_format=torch.channels_last)
            if nchw != nhwc:  # a (C, 1, 1, 1) or (C, 1, 3, 3) weight is both; look further
                return torch.channels_last if nhwc else torch.contiguous_format
    return torch.contiguous_format


class _Eager:
    """``model(x, t, **conditions)`` in the chosen memory format and precision; returns fp32
    NCHW-contiguous output.

    ``conditions`` are the keyword inputs of the predictor contract (``class_labels``, and whatever
    a predictor declares in its ``conditions``); they pass through unchanged. ``t`` may be integer
    timesteps or a continuous noise level.
    """

    def __init__(self, fn: Callable[..., Tensor], fast: FastPath, device: torch.device):
        self.fn, self.fast, self.device = fn, fast, device

    def __call__(self, x: Tensor, t: Tensor, **conditions) -> Tensor:
        if self.fast.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # cache_enabled=False: cached weight casts would not survive a CUDA graph capture.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.fast.precision == "bf16",
                            cache_enabled=False):
            out = self.fn(x, t, **conditions)
        return out.float().contiguous()


def _signature(value) -> tuple:
    """What a captured graph is specialised to for one input: a tensor's shape, dtype and device
    (its values are copied in at every replay); any other value (``None``, a number) itself."""
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype, str(value.device))
    return ("value", value)


class _Graphed:
    """Replays a CUDA graph of ``eager(x, t, **conditions)``: one launch per step instead of one per kernel.

    Every tensor input — ``x``, ``t`` and each condition (class labels, a continuous noise level, the
    doubled batch of classifier-free guidance) — is a static input of the graph: copied into the
    graph's buffer before each replay. One graph per signature (the inputs' names, shapes and
    dtypes, and the values of non-tensor inputs), captured on first use after a warm-up on a side
    stream; a call whose shapes differ captures a graph of its own. The output is cloned, so callers
    may keep it.
    """

    def __init__(self, eager: _Eager, warmup: int = 3):
        self.eager, self.warmup, self.graphs = eager, warmup, {}
        self.failed: str | None = None  # why capture failed; then every call runs eagerly

    def _capture(self, x: Tensor, t: Tensor, **conditions):
        static = {k: v.clone() if isinstance(v, Tensor) else v for k, v in conditions.items()}
        sx, st = x.clone(), t.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):  # cuDNN/cuBLAS choose algorithms and compile caches fill here
                self.eager(sx, st, **static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.eager(sx, st, **static)
        return sx, st, static, out, graph

    def __call__(self, x: Tensor, t: Tensor, **conditions) -> Tensor:
        if self.failed:
            return self.eager(x, t, **conditions)
        key = (_signature(x), _signature(t), tuple(sorted((k, _signature(v)) for k, v in conditions.items())))
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self.graphs[key] = self._capture(x, t, **conditions)
            except RuntimeError as exc:  # e.g. a predictor that reads values back to the host
                self.failed = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                warnings.warn(f"the network could not be captured as a CUDA graph ({self.failed}); "
                              "sampling without graphs (--no-cuda-graphs skips the attempt)", stacklevel=2)
                return self.eager(x, t, **conditions)
        sx, st, static, out, graph = entry
        sx.copy_(x)
        st.copy_(t)
        for k, v in conditions.items():
            if isinstance(v, Tensor):
                static[k].copy_(v)
        graph.replay()
        return out.clone()


@contextlib.contextmanager
def accelerated(model: torch.nn.Module, fast: FastPath, device: torch.device) -> Iterator[Callable[..., Tensor]]:
    """``model`` as a ``fn(x, t, **conditions) -> fp32 output`` running on the fast path, for the duration of the block.

    Channels-last converts the model's weights in place and converts them back on exit; TF32 is set
    and restored likewise — also on plain fp32 eager execution (:func:`is_eager`), where the model
    itself is yielded unwrapped: cuDNN runs convolutions in TF32 unless told not to; graphs and
    compiled code are dropped on exit.
    """
    fast = fast.resolve(device)
    if is_eager(fast, device):
        with tf32_mode(fast.tf32):
            yield model
        return
    fmt_before = model_memory_format(model)

    def convert(fmt: torch.memory_format) -> None:
        # Outside inference mode: weights converted inside it would become inference tensors, which
        # autograd refuses if the model is trained again afterwards.
        with torch.inference_mode(False), torch.no_grad():
            model.to(memory_format=fmt)

    with tf32_mode(fast.tf32):
        if fast.channels_last:
            convert(torch.channels_last)
        try:
            fn = torch.compile(model) if fast.compile else model
            call: Callable[..., Tensor] = _Eager(fn, fast, device)
            if fast.cuda_graphs:
                call = _Graphed(call)
            yield call
        finally:
            if fast.channels_last:
                convert(fmt_before)


def is_eager(fast: FastPath, device: torch.device) -> bool:
    """Whether ``fast`` on ``device`` is plain fp32 eager execution (nothing to wrap)."""
    r = fast.resolve(device)
    return r.precision == "fp32" and not (r.channels_last or r.tf32 or r.compile or r.cuda_graphs)
