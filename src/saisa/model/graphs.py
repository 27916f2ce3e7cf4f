"""CUDA-graph capture of a fixed-shape prefill: every kernel launch of the forward replayed as one graph.

Unusual here: the layout (positions, image slots, mask inputs) is built once on the host before capture, so the
captured region has no host synchronisation. At batch 1 the eager prefill is launch-bound (hundreds of small kernels
per forward), and this is what removes that overhead. New image features are not copied in before a replay: the
graph's first kernel reads them from the address the call writes into a pinned host word (`read_from_slot`), so
nothing is launched ahead of the graph: on H100 hosts a copy launched just before the t=64 prefill's graph put the
forward's first node 42-158 us after the call's start, against 21-49 for the replay alone, and the prefill took
8.060 against 8.109 ms (benchmarks/results/graph-launch-h100-s17-*.json, prefill-ab-h100/slot).
The GEMMs are captured through cuBLASLt by default (torch's preferred BLAS library, set while capturing and put
back after): at t=64 its kernels for the text GEMMs were faster than cuBLAS's (see BLAS). `capture_graph` is
the plain warm-up-then-capture that the bench's HF graphs and the graphed training step (saisa.train.graphed) use.
Every capture here runs with Python's cyclic garbage collector paused (`capturing`): a collection during a capture
may free an unrelated graph held in a dead reference cycle, and destroying a graph is not permitted while a stream
is capturing, so the capture under way was invalidated ("operation failed due to a previous error during capture",
after torch's warning "operation not permitted when stream is capturing (function reset)").
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from . import skinny

# torch's preferred BLAS library while a graph is captured (None: as set). On an H100 at t=64, cuBLASLt's kernels for
# q/o/down_proj (one kernel each, no split-K reduction) made the prefill 8.485 against 8.588 ms with cuBLAS in
# interleaved rounds (benchmarks/results/profile-prefill-h100-t64-lt.json, scripts/profile_prefill.py).
BLAS = "cublaslt"


@contextmanager
def preferred_blas(library: str | None):
    """torch.backends.cuda.preferred_blas_library(library) inside the block, the previous one after."""
    if library is None:
        yield
        return
    old = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(library)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(old)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside the block, as it was after (objects freed by reference counts
    are still freed at once)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextmanager
def capturing(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream | None = None) -> Iterator[None]:
    """`torch.cuda.graph(graph, stream=stream)` with the cyclic garbage collector paused (see the module's note)."""
    with gc_paused(), torch.cuda.graph(graph, stream=stream):
        yield


class GraphedForward:
    """`model.forward_with_layout` for one (input_ids, attention_mask, image-feature shape), captured on CUDA."""

    def __init__(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        logits_to_keep: int = 1,
        warmup: int = 3,
        blas: str | None = BLAS,
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedForward needs a CUDA device")
        device = model.get_input_embeddings().weight.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        num_images = 0 if image_features is None else image_features.shape[0]
        v = None if image_features is None else image_features.shape[1]
        self.layout = model.layout(input_ids.cpu(), attention_mask.cpu(), num_images, v)
        self.input_ids = input_ids.to(device).clone()
        self.image_features = None if image_features is None else image_features.to(device).clone()
        # Bound to the static buffers, not to self: no reference cycle, so the graph goes when its owner drops it.
        self._run = functools.partial(model.forward_with_layout, self.input_ids, self.layout, self.image_features,
                                      None, logits_to_keep)
        self._slot = self._read = self._held = None
        if self.image_features is not None and skinny.available():  # read_from_slot's kernel runs
            # The address of the features to read (first the static buffer's own), and an event after the read.
            self._slot = torch.tensor([self.image_features.data_ptr()], dtype=torch.int64).pin_memory()
            self._slot_word = self._slot.numpy()  # the same memory: written without a tensor op's overhead
            self._read = torch.cuda.Event(external=True)
            word = torch.zeros(1, dtype=torch.int64, device=device)  # the slot's word, fetched on the device
            self._run = functools.partial(_then, functools.partial(read_from_slot, self._slot, self.image_features,
                                                                   self._read, word), self._run)
        with preferred_blas(blas), torch.no_grad():
            on_side_stream(lambda: _repeat(self._run, warmup), torch.cuda.Stream(device))
            self.graph = torch.cuda.CUDAGraph()
            # Captured on a high-priority stream: the text layers (memory-bound) are then scheduled ahead of the
            # visual path when it runs on the model's side stream (compute-bound), so the two can share the SMs.
            # One more warm-up on that stream first, so that its first GEMMs (where torch sets up a stream's BLAS
            # workspace) run outside the capture. (A tiny llava graph once failed inside the capture, in a cuBLASLt
            # batched GEMM on an H100, with the error a collection during a capture gives: see `capturing`.)
            capture = torch.cuda.Stream(device, priority=-1)
            on_side_stream(self._run, capture)
            with capturing(self.graph, capture):
                self.logits = self._run()

    def __call__(self, image_features: torch.Tensor | None = None, input_ids: torch.Tensor | None = None):
        """Replay with new inputs of the captured shapes (None: the last ones); returns the static logits buffer
        (copy it to keep it). The graph reads `image_features` where they are (kept alive here until the next call)."""
        if image_features is not None:
            static = self.image_features
            if static is None or image_features.shape != static.shape or image_features.dtype != static.dtype or (
                    image_features.device != static.device):
                captured = "none" if static is None else f"{static.dtype} {tuple(static.shape)} on {static.device}"
                raise ValueError(f"image_features {image_features.dtype} {tuple(image_features.shape)} on "
                                 f"{image_features.device} do not match the captured ones ({captured}); capture a "
                                 "GraphedForward for these features")
            if self._slot is None:
                static.copy_(image_features, non_blocking=True)
            else:
                self._read.synchronize()  # the last replay has read the slot (at once unless calls are queued)
                self._held = image_features.contiguous()
                self._slot_word[0] = self._held.data_ptr()
        if input_ids is not None:
            self.input_ids.copy_(input_ids, non_blocking=True)
        self.graph.replay()
        return self.logits


@functools.cache
def _slot_kernels():
    triton, tl = skinny.triton_modules()

    @triton.jit
    def fetch_kernel(slot_ptr, word_ptr):
        # .cv: fetch the host word again on every read, never a line an earlier replay left in L2
        tl.store(word_ptr, tl.load(slot_ptr, cache_modifier=".cv"))

    @triton.jit
    def copy_kernel(word_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        src = tl.load(word_ptr).to(tl.pointer_type(dst_ptr.dtype.element_ty))
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        keep = offs < n
        tl.store(dst_ptr + offs, tl.load(src + offs, mask=keep), mask=keep)

    return triton, fetch_kernel, copy_kernel


def read_from_slot(slot: torch.Tensor, dst: torch.Tensor, done: torch.cuda.Event, word: torch.Tensor,
                   block: int = 4096) -> None:
    """Copy into `dst` (contiguous, CUDA) as many elements of its dtype from the device address held in `slot` (a
    pinned (1,) int64 CPU tensor, which a one-program kernel reads through unified addressing into `word`, a (1,)
    int64 tensor on dst's device, when it runs), then record `done`. Captured in a graph, the address is read at
    each replay: the host changes inputs by writing one word. One read of host memory, not one per program of the
    copy: 10.0 against 13.5 us from the graph's first node to the forward's on an H100
    (benchmarks/results/first-node-h100.json, scripts/probe_first_node.py)."""
    triton, fetch, copy = _slot_kernels()
    n = dst.numel()
    fetch[(1,)](slot, word, num_warps=1)
    copy[(triton.cdiv(n, block),)](word, dst, n, BLOCK=block, num_warps=4)
    done.record()


def _then(first: Callable[[], Any], fn: Callable[[], Any]) -> Any:
    first()
    return fn()


def _repeat(fn: Callable[[], Any], times: int) -> None:
    """Call fn `times` times, keeping none of its outputs (each is freed before the next call)."""
    for _ in range(times):
        fn()


def on_side_stream(fn: Callable[[], Any], stream: torch.cuda.Stream | None = None) -> Any:
    """`fn()` on `stream` (default: a new one on the current device), ordered after the work on its device's
    current stream and before the work that follows there: how warm-up runs before a capture, so that lazy set-up
    (BLAS workspaces, optimizer state) stays out of it."""
    side = stream if stream is not None else torch.cuda.Stream()
    current = torch.cuda.current_stream(side.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        out = fn()
    current.wait_stream(side)
    return out


def capture_graph(fn: Callable[[], Any], warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Capture `fn` (static inputs) into a CUDA graph after `warmup` calls on a side stream; (graph, its output).

    The capture only records: `fn`'s work runs at the first `graph.replay()`."""
    on_side_stream(lambda: _repeat(fn, warmup))
    graph = torch.cuda.CUDAGraph()
    with capturing(graph):
        out = fn()
    return graph, out
