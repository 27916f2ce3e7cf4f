"""SM clock and board power while something runs on the GPU: nvidia-smi sampled in the background.

Unusual here: an H100 SXM has a 700 W board limit, and a batch-1 prefill that streams weights at full HBM bandwidth
already draws about 650 W with the SM clock at its maximum (benchmarks/results/narrow-h100-t64.json). When
compute-bound GEMMs run as well, the board reaches the limit and the driver lowers the SM clock (clock-event reason
0x4, software power cap). A latency therefore depends on how long the GPU has been busy before it, and this module
records the clock and the power inside each timed window so that a result file shows them. Samples are matched to
windows by nvidia-smi's own timestamps, so a pipe that buffers its lines loses nothing. Where nvidia-smi is missing
(CPU machines) a trace is empty and every window reads None.
"""

from __future__ import annotations

import datetime
import shutil
import statistics
import subprocess
from dataclasses import dataclass
from typing import Any, Self

FIELDS = ("timestamp", "clocks.sm", "power.draw", "temperature.gpu", "clocks_event_reasons.active")
REASONS = {0x1: "idle", 0x4: "sw power cap", 0x8: "hw slowdown", 0x20: "sw thermal", 0x40: "hw thermal",
           0x80: "hw power brake"}  # nvidia-smi --help-query-gpu, clocks_event_reasons


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the epoch, as time.time()
    sm_mhz: float
    watts: float
    celsius: float
    reasons: int  # bit mask of clock-event reasons


def parse(line: str) -> Sample | None:
    """One CSV line of `nvidia-smi --query-gpu=<FIELDS> --format=csv,noheader,nounits`, or None if it is not one
    (a header, a blank, '[N/A]' fields)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != len(FIELDS):
        return None
    try:
        t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()  # local time, as time.time()
        return Sample(t, float(parts[1]), float(parts[2]), float(parts[3]), int(parts[4], 16))
    except ValueError:
        return None


def summarize(samples: list[Sample]) -> dict[str, Any] | None:
    """Medians of the SM clock, power and temperature, their ranges, and every clock-event reason seen."""
    if not samples:
        return None
    mask = 0
    for s in samples:
        mask |= s.reasons
    med = lambda f: round(statistics.median(f(s) for s in samples), 1)
    return {"samples": len(samples), "sm_mhz": med(lambda s: s.sm_mhz),
            "sm_mhz_range": [min(s.sm_mhz for s in samples), max(s.sm_mhz for s in samples)],
            "watts": med(lambda s: s.watts), "watts_max": max(s.watts for s in samples),
            "celsius": med(lambda s: s.celsius),
            "clock_reasons": [name for bit, name in REASONS.items() if mask & bit] + (
                [f"0x{mask & ~sum(REASONS):x}"] if mask & ~sum(REASONS) else [])}


class PowerTrace:
    """`with PowerTrace(index) as trace:` samples GPU `index` every `period_ms` until the block ends; then
    `trace.window(t0, t1)` summarizes the samples between two time.time() stamps (None if there are none)."""

    def __init__(self, index: int = 0, period_ms: int = 50):
        self.index, self.period_ms = index, period_ms
        self.samples: list[Sample] = []
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        exe = shutil.which("nvidia-smi")
        if exe is not None:
            self._proc = subprocess.Popen(
                [exe, "-i", str(self.index), f"--query-gpu={','.join(FIELDS)}", "--format=csv,noheader,nounits",
                 "-lms", str(self.period_ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=10)
        self.samples = [s for s in map(parse, out.splitlines()) if s is not None]
        self._proc = None

    def window(self, t0: float, t1: float) -> dict[str, Any] | None:
        return summarize([s for s in self.samples if t0 <= s.t <= t1])
