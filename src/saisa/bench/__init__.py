"""Benchmarks: measured FLOPs (`measured_flops`), timing, sweeps and reports. Submodules import torch only where they
measure; import them directly (`from saisa.bench.measured_flops import measure_tflops`) so `import saisa.bench`
stays cheap."""
