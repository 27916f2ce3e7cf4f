"""Timing primitives: device-event medians, peak memory, and the two measured ceilings that give every figure a floor.

Unusual here: one code path for CUDA and CPU. On CUDA each call is timed with a pair of events after a
`torch.cuda.synchronize()` (so the queue is empty and host launch overhead is part of the latency, as a user sees it);
on CPU with `time.perf_counter`, so the whole harness runs in CPU tests. The callable receives the repeat index, so a
caller rotates among several input sets and repeated calls never hit data left in cache by the previous one.
The floor of a figure is max(FLOPs / measured matmul rate, bytes / measured copy bandwidth) (see
/work/.library/device/METHOD.md): no implementation runs much faster, and the larger term names the bound.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

MIB = 2**20


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: torch.device | str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    """Summary of `repeats` timed calls, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    repeats: int
    warmup: int
    clock: str  # "cuda_event" or "perf_counter"

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: how far apart the bulk of the repeats lie."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spread": round(self.spread, 4)}


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list, q in [0, 1]."""
    return ordered[round(q * (len(ordered) - 1))]


def time_fn(
    fn: Callable[[int], Any], device: torch.device | str, *, warmup: int = 3, repeats: int = 20
) -> Timing:
    """Median latency of `fn(i)` (i = 0, 1, ...: the caller rotates input sets by it), after `warmup` untimed calls.

    Every call starts on an idle device (synchronize first) and ends when its work is done, so the figure is the
    latency of one call, launch overhead included, not a pipelined throughput.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for i in range(warmup):
        fn(i)
    samples: list[float] = []
    if is_cuda(device):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            torch.cuda.synchronize(device)
            starts[i].record()
            fn(warmup + i)
            ends[i].record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        clock = "cuda_event"
    else:
        for i in range(repeats):
            t0 = time.perf_counter()
            fn(warmup + i)
            samples.append((time.perf_counter() - t0) * 1e3)
        clock = "perf_counter"
    return summarize(samples, warmup, clock)


def summarize(samples: list[float], warmup: int, clock: str) -> Timing:
    """Timing of per-call latencies in ms (median, p10, p90, min)."""
    if not samples:
        raise ValueError("no samples to summarize")
    ordered = sorted(samples)
    return Timing(
        median_ms=statistics.median(ordered), p10_ms=_percentile(ordered, 0.1), p90_ms=_percentile(ordered, 0.9),
        min_ms=ordered[0], repeats=len(ordered), warmup=warmup, clock=clock,
    )


# ----------------------------------------------------------------------------------------------------- memory
def free_memory(device: torch.device | str, collect: bool = True) -> None:
    """Give cached blocks back so the next configuration starts clean; `collect` first frees reference cycles (an
    exception's traceback, a captured graph) with a full garbage collection, which costs 0.1-0.5 s."""
    if collect:
        gc.collect()
    if is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class PeakMemory:
    """Context manager: peak bytes allocated above what was allocated on entry (None on CPU).

    `extra_mb` = (max_memory_allocated - allocated at entry) / MiB. Callers add the bytes the configuration owns
    from before (its weights) to report a configuration's own peak even when weights are shared between systems.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.extra_mb: float | None = None
        self._base = 0

    def __enter__(self) -> PeakMemory:
        if is_cuda(self.device):
            free_memory(self.device, collect=False)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if is_cuda(self.device):
            torch.cuda.synchronize(self.device)
            self.extra_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / MIB


def tensor_bytes(tensors) -> int:
    """Total bytes of distinct tensors (shared storage counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------------------------------- ceilings
@dataclass(frozen=True)
class Ceilings:
    """Measured device ceilings (random data, never zeros)."""

    copy_gb_per_s: float  # bytes read + bytes written per second of a device-to-device copy, / 1e9
    matmul_tflops: float  # 2 n^3 / time of an n x n x n product in `dtype`, / 1e12
    copy_bytes: int  # size of the copied tensor
    matmul_n: int
    dtype: str
    copy: dict[str, Any]  # the Timing of each measurement
    matmul: dict[str, Any]

    def floor_ms(self, flops: float, nbytes: float) -> tuple[float, str]:
        """(floor in ms, "compute" | "memory"): the larger of FLOPs / matmul rate and bytes / copy bandwidth."""
        compute = flops / (self.matmul_tflops * 1e12) * 1e3
        memory = nbytes / (self.copy_gb_per_s * 1e9) * 1e3
        return (compute, "compute") if compute >= memory else (memory, "memory")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _time_copy(device, dtype, nbytes: int, gen: torch.Generator, warmup: int, repeats: int) -> Timing:
    elements = nbytes // torch.empty((), dtype=dtype).element_size()
    sources = [torch.randn(elements, device=device, dtype=dtype, generator=gen) for _ in range(2)]
    dest = torch.empty_like(sources[0])
    return time_fn(lambda i: dest.copy_(sources[i % 2]), device, warmup=warmup, repeats=repeats)


def _time_matmul(device, dtype, n: int, gen: torch.Generator, warmup: int, repeats: int) -> Timing:
    a = [torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(2)]
    b = [torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(2)]
    out = torch.empty(n, n, device=device, dtype=dtype)
    return time_fn(lambda i: torch.mm(a[i % 2], b[(i // 2) % 2], out=out), device, warmup=warmup, repeats=repeats)


def measure_ceilings(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16, *, copy_bytes: int | None = None,
    matmul_n: int | None = None, warmup: int = 3, repeats: int = 20,
) -> Ceilings:
    """Copy bandwidth and matmul rate on this device. Defaults: 1 GiB and n = 8192 on CUDA; 4 MiB and 128 on CPU.

    Two input sets alternate in each measurement, so no repeat reads what the previous one left in cache.
    """
    cuda = is_cuda(device)
    copy_bytes = copy_bytes or (2**30 if cuda else 4 * MIB)
    matmul_n = matmul_n or (8192 if cuda else 128)
    gen = torch.Generator(device=device).manual_seed(0)
    copy_t = _time_copy(device, dtype, copy_bytes, gen, warmup, repeats)
    mm_t = _time_matmul(device, dtype, matmul_n, gen, warmup, repeats)
    free_memory(device)
    return Ceilings(
        copy_gb_per_s=2 * copy_bytes / (copy_t.median_ms * 1e-3) / 1e9,
        matmul_tflops=2 * matmul_n**3 / (mm_t.median_ms * 1e-3) / 1e12,
        copy_bytes=copy_bytes, matmul_n=matmul_n, dtype=str(dtype).removeprefix("torch."),
        copy=copy_t.as_dict(), matmul=mm_t.as_dict(),
    )


# ----------------------------------------------------------------------------------------------------- environment
def environment(device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """Versions and device facts that a figure depends on."""
    import platform

    import transformers

    device = torch.device(device)
    env: dict[str, Any] = {
        "device_type": device.type, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
        "platform": platform.platform(),
    }
    if is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                   device_count=torch.cuda.device_count())
    else:
        env.update(device=platform.processor() or platform.machine() or "cpu", threads=torch.get_num_threads())
    return env
