"""Benchmark harness on CPU with tiny shapes: timing, model materialisation, one suite run, report and CLI.

The suite runs once per module (a few seconds) with one repeat per figure; the figures mean nothing on CPU, the
schema, the statuses and the cross-system logits checks do.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import replace

import pytest
import torch

from saisa.bench import report
from saisa.bench.setting import PRESETS, Repeats
from saisa.bench.suite import run_suite
from saisa.bench.systems import build_hf_llava, build_ours, materialize
from saisa.bench.timing import PeakMemory, measure_ceilings, time_fn

TINY = replace(PRESETS["tiny"], text_tokens=(8,), throughput_batches=(2,), input_sets=2)
ONCE = Repeats(warmup=0, repeats=1, throughput_repeats=1, decode_repeats=2, train_warmup=0, train_repeats=1)


@pytest.fixture(scope="module")
def results():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread avoids stalls when the CPU is shared
    try:
        yield run_suite(TINY, device="cpu", repeats=ONCE, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------- timing
def test_time_fn_median_and_rotation():
    seen = []

    def fn(i):
        seen.append(i)
        time.sleep(0.004)

    t = time_fn(fn, "cpu", warmup=2, repeats=5)
    assert seen == list(range(7)), "fn gets the call index, warm-up included, so callers can rotate inputs"
    assert t.clock == "perf_counter" and t.repeats == 5 and t.warmup == 2
    assert 3.5 <= t.median_ms < 200, t
    assert t.min_ms <= t.p10_ms <= t.median_ms <= t.p90_ms
    with pytest.raises(ValueError):
        time_fn(fn, "cpu", repeats=0)


def test_ceilings_and_floor():
    c = measure_ceilings("cpu", torch.float32, copy_bytes=2**20, matmul_n=64, warmup=1, repeats=2)
    assert c.copy_gb_per_s > 0 and c.matmul_tflops > 0
    fixed = replace(c, copy_gb_per_s=1000.0, matmul_tflops=500.0)
    assert fixed.floor_ms(5e11, 1e9) == pytest.approx((1.0, "compute"))  # 1 ms of math vs 1 ms... math wins ties
    assert fixed.floor_ms(1e11, 2e9) == pytest.approx((2.0, "memory"))
    with PeakMemory("cpu") as mem:
        pass
    assert mem.extra_mb is None  # not measured on CPU


# ----------------------------------------------------------------------------------------------------- models
def test_materialize_matches_a_normally_built_model():
    from transformers import LlavaForConditionalGeneration

    hf = build_hf_llava(TINY, torch.device("cpu"))
    assert not any(t.is_meta for t in [*hf.parameters(), *hf.buffers()])
    reference = LlavaForConditionalGeneration(hf.config)  # buffers computed by the constructors themselves
    ref_buffers = dict(reference.named_buffers())
    for name, buf in hf.named_buffers():
        torch.testing.assert_close(buf, ref_buffers[name], msg=name)
        assert buf.dtype == ref_buffers[name].dtype, name
    norm = hf.model.language_model.norm.weight
    assert (norm - 1).abs().max() < 0.15 and not torch.equal(norm, torch.ones_like(norm))
    w = hf.model.language_model.layers[0].mlp.up_proj.weight
    assert 0.015 < w.float().std() < 0.025

    ours = build_ours(TINY, "llava", torch.device("cpu"), donor=hf)
    assert ours.language_model.model.layers[0].mlp.up_proj.weight is w, "weights are borrowed, not copied"
    assert ours.multi_modal_projector.linear_1.weight.data_ptr() == hf.model.multi_modal_projector.linear_1.weight.data_ptr()

    tied = build_ours(TINY, "saisa", torch.device("cpu"), text_config=TINY.train_text_config)
    assert tied.language_model.lm_head.weight is tied.get_input_embeddings().weight, "tied weights stay tied"


def test_materialize_refuses_unknown_buffers():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.empty(3))

    with torch.device("meta"):
        module = Odd()
    with pytest.raises(RuntimeError, match="table"):
        materialize(module, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------- suite
def test_suite_schema_and_statuses(results):
    for key in ("setting", "environment", "ceilings", "systems", "entries", "checks", "projection", "wall_s"):
        assert key in results, key
    env = results["environment"]
    assert {"device", "torch", "transformers", "dtype"} <= set(env)
    sections = {e["section"] for e in results["entries"]}
    assert sections == {"prefill", "ttft", "throughput", "decode", "train"}
    for e in results["entries"]:
        assert e["status"] == "ok", e
        assert e["median_ms"] > 0 and e["floor_ms"] > 0 and e["bound"] in ("compute", "memory")
    systems = {e["system"] for e in results["entries"] if e["section"] == "prefill"}
    assert systems == {"saisa", "naavit", "llava", "hf_llava", "saisa_opt"}
    assert results["systems"]["hf_llava_graphs"]["status"] == "skipped"  # needs CUDA
    decode = [e for e in results["entries"] if e["section"] == "decode"]
    assert all(e["context"] == 16 + 8 for e in decode)  # v + t
    # every decoding system, timed in the same rounds: each has all of its repeats
    assert {e["system"] for e in decode} == {"saisa", "naavit", "llava", "hf_llava", "saisa_opt"}
    assert all(e["repeats"] == ONCE.decode_repeats for e in decode)
    stages = {(e["arch"], e["stage"]) for e in results["entries"] if e["section"] == "train"}
    assert stages == {("saisa", 1), ("llava", 1), ("saisa", 2), ("llava", 2)}
    assert results["projection"]["saisa"]["total_gpu_hours"] > 0
    json.dumps(results)  # serialisable as is


def test_systems_over_the_same_weights_compute_the_same_logits(results):
    for name, ref in (("hf_llava", "llava"), ("saisa_opt", "saisa")):
        check = results["checks"][name]
        assert check["reference"] == ref
        assert check["rel_err"] < 1e-4 and check["pass"], check  # float32, same weights, same inputs


def test_decode_step_keeps_the_context():
    from saisa.bench.systems import HFEager, OursEager, make_inputs

    device = torch.device("cpu")
    hf = build_hf_llava(TINY, device)
    ours = build_ours(TINY, "saisa", device, donor=hf)
    sets = make_inputs(TINY, 1, 8, device)
    with torch.no_grad():
        for system in (OursEager("saisa", ours, "saisa"), HFEager("hf_llava", hf, "llava")):
            system.prepare(1, 8, sets)
            system.start_decode()
            before = system.cache.get_seq_length()
            first = system.decode_step()
            for _ in range(2):
                system.decode_step()
            # The context stays put (ours also keeps a masked key slot for the image placeholder: v + t + 1).
            assert system.cache.get_seq_length() == before >= 16 + 8
            system._k = 0
            assert torch.equal(system.decode_step(), first), "same input, same context: same token"
            system.release()


# ----------------------------------------------------------------------------------------------------- report
def test_report_table_json_and_markdown(results, tmp_path, capsys):
    results = {"name": "tiny-cpu", "command": "pytest", **results}
    path = report.write_results(results, tmp_path / "results" / "tiny-cpu.json")
    report.print_report(results, path)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("section") and "median ms" in out[0]
    line = json.loads(out[-1])  # a table, then one JSON line
    assert line["bench"] == "tiny-cpu" and "saisa" in line["prefill_b1_ms"]

    md = report.render_benchmarks_md(tmp_path / "results", md_dir=tmp_path)
    assert "## tiny-cpu" in md and "### Targets" in md
    assert "| system | method | t=8 |" in md
    assert "ratio saisa / hf_llava" in md and "ratio saisa / llava" in md
    assert "Projected GPU-hours" in md and "A projection, not a measured run" in md
    assert "(benchmarks/prefill_latency_tiny-cpu.png)" not in md  # plots sit beside results/, linked relatively
    assert (tmp_path / "prefill_latency_tiny-cpu.png").stat().st_size > 1000
    assert "](prefill_latency_tiny-cpu.png)" in md


def test_graphed_system_picks_the_fastest_schedule_per_shape(monkeypatch):
    """saisa_graphs under "auto": each schedule is captured and timed once per shape (here a fake capture whose
    replay time depends on the schedule, one that fails), the fastest is kept and recorded in the entry, ttft at the
    same shape reuses it, and release restores the schedule saisa_opt runs."""
    from saisa.bench import systems

    device = torch.device("cpu")
    model = build_ours(TINY, "saisa", device)
    model.optimize_for_inference()
    applied, captures = [], []
    monkeypatch.setattr(model, "set_prefill_schedule", lambda chunk=None, overlap=False: applied.append(
        next(n for n, kw in systems.SAISA_SCHEDULES.items() if kw == {"chunk": chunk, "overlap": overlap})))
    delay = {"serial": 0.002, "overlap": 0.006}  # head4: fails (the tiny model has 2 layers)

    def capture(sets):
        name = applied[-1]
        captures.append(name)
        if name not in delay:
            raise ValueError(f"{name} does not fit")
        return lambda features: time.sleep(delay[name])

    system = systems.OursGraphed("saisa_graphs", model, "saisa", systems.AUTO, base="serial")
    monkeypatch.setattr(system, "_capture", capture)
    sets = systems.make_inputs(TINY, 1, 8, device)
    system.prepare(1, 8, sets)
    assert captures == [*systems.SAISA_SCHEDULES, "serial"] and applied[-1] == "serial"
    info = system.entry_info()
    assert info["schedule"] == "serial" and info["schedule_settings"] == {"chunk": None, "overlap": False}
    trials = info["schedule_trials_ms"]
    assert trials["serial"] < trials["overlap"] and trials["head4"].startswith("ValueError")
    system.release()
    assert applied[-1] == "serial"
    captures.clear()
    system.prepare(1, 8, sets)  # the same shape again (ttft): no new trials
    assert captures == ["serial"] and system.entry_info()["schedule"] == "serial"
    system.release()
    fixed = systems.OursGraphed("saisa_graphs", model, "saisa", "overlap", base="overlap")
    monkeypatch.setattr(fixed, "_capture", capture)
    fixed.prepare(1, 8, sets)
    assert fixed.entry_info() == {"schedule": "overlap", "schedule_settings": {"chunk": 1, "overlap": True}}
    with pytest.raises(ValueError, match="unknown schedule"):
        systems.OursGraphed("saisa_graphs", model, "saisa", "fastest")


def test_report_lists_the_schedules():
    entry = {"section": "prefill", "arch": "saisa", "batch": 1, "median_ms": 8.5, "status": "ok"}
    results = {"setting": {"text_tokens": [64, 128]}, "systems": {"saisa_graphs": {"variant": "cuda_graph"}},
               "entries": [{**entry, "system": "saisa_graphs", "text_tokens": 64, "schedule": "serial",
                            "schedule_trials_ms": {"serial": 8.5, "overlap": 8.8, "head4": "ValueError: x"}},
                           {**entry, "system": "saisa_graphs", "text_tokens": 128, "schedule": "head4"}]}
    lines = report._schedules(results, "prefill", [(1, 64), (1, 128)])
    assert lines[0] == "saisa_graphs prefill schedule: t=64 serial (serial 8.50, overlap 8.80 ms); t=128 head4."


def _fake(system: str, variant: str, source: str, **entry):
    return system, {"variant": variant, "source": source}, {"system": system, "status": "ok", **entry}


def test_targets_pass_and_fail():
    rows = [
        _fake("saisa_graphs", "cuda_graph", "saisa", section="prefill", arch="saisa", batch=1, text_tokens=64,
              median_ms=7.5),
        _fake("hf_llava_graphs", "cuda_graph", "hf", section="prefill", arch="llava", batch=1, text_tokens=64,
              median_ms=20.0),
        _fake("hf_llava", "eager", "hf", section="prefill", arch="llava", batch=1, text_tokens=64, median_ms=10.0),
        _fake("saisa", "eager", "saisa", section="throughput", arch="saisa", batch=16, text_tokens=64,
              samples_per_s=100.0),
        _fake("hf_llava", "eager", "hf", section="throughput", arch="llava", batch=16, text_tokens=64,
              samples_per_s=40.0),
        _fake("saisa", "eager", "saisa", section="decode", arch="saisa", batch=1, text_tokens=64, median_ms=10.6),
        _fake("llava", "eager", "saisa", section="decode", arch="llava", batch=1, text_tokens=64, median_ms=10.0),
    ]
    results = {"setting": {"text_tokens": [64], "throughput_batches": [4, 16]},
               "systems": {name: info for name, info, _ in rows}, "entries": [e for _, _, e in rows]}
    got = {t["target"]: t for t in report.evaluate_targets(results)}
    assert got["prefill b1 t=64: saisa ms"]["pass"] is True
    ratio = got["prefill b1 t=64: saisa / HF LLaVA (graphs)"]
    assert ratio["value"] == pytest.approx(7.5 / 20.0) and ratio["pass"] is True  # the eager HF is not the baseline
    assert got["prefill throughput b16: saisa / HF LLaVA"]["value"] == pytest.approx(2.5)
    assert got["prefill throughput b16: saisa / HF LLaVA"]["pass"] is False
    assert got["decode ms/token: saisa / our llava"]["pass"] is False
    assert got["train stage 1: saisa / llava samples/s"]["pass"] is None  # not measured


# ----------------------------------------------------------------------------------------------------- cli
def test_cli_report_writes_markdown(results, tmp_path):
    from saisa.bench.cli import main

    report.write_results({"name": "x", **results}, tmp_path / "results" / "x.json")
    md = tmp_path / "BENCHMARKS.md"
    assert main(["report", "--results-dir", str(tmp_path / "results"), "--md", str(md)]) == 0
    assert md.read_text().startswith("# Benchmarks")


def test_cli_names_match_the_suite():
    from saisa.bench import cli, setting, suite, systems
    from saisa.model import fused

    assert cli.SECTIONS == suite.SECTIONS
    assert cli.SYSTEMS == suite.INFERENCE_SYSTEMS
    assert set(cli.PRESETS) == set(setting.PRESETS)
    assert set(cli.ATTENTION) == {"auto", *fused.ATTENTION}
    assert cli.SCHEDULES == (systems.AUTO, *systems.SAISA_SCHEDULES)


def test_cli_rejects_unknown_section(tmp_path):
    from saisa.bench.cli import main

    with pytest.raises(ValueError, match="unknown sections"):
        main(["--preset", "tiny", "--device", "cpu", "--only", "prefil", "--out", str(tmp_path / "r.json")])


# ----------------------------------------------------------------------------------------------------- gpu
@pytest.mark.gpu
def test_suite_on_cuda_tiny():
    """Every system, CUDA graphs included, on tiny shapes: no errors, and graphed logits match eager ones."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    r = run_suite(replace(PRESETS["tiny"], dtype="bfloat16"), device="cuda", quick=True, log=lambda line: None)
    bad = [e for e in r["entries"] if e["status"] in ("error", "oom")]
    assert not bad, "; ".join(f"{e['system']} {e['section']} b={e['batch']} t={e.get('text_tokens')}: "
                              f"{e['status']} {e.get('error')}" for e in bad)
    assert r["systems"]["hf_llava_graphs"]["method"].startswith("cuda_graph"), r["systems"]["hf_llava_graphs"]
    for name, check in r["checks"].items():
        assert check["pass"], (name, check)
    assert all("peak_mb" in e for e in r["entries"] if e["status"] == "ok")


def test_report_shows_the_clock_and_power_of_each_timed_prefill(results):
    assert "SM clock and board power" not in "\n".join(report.render_results(results))  # CPU: no trace, no table
    entries = [dict(e) for e in results["entries"]]
    prefill = [e for e in entries if e["section"] == "prefill" and e["status"] == "ok" and e["batch"] == 1]
    prefill[0]["power"] = {"samples": 7, "sm_mhz": 1725.0, "sm_mhz_range": [1605.0, 1800.0], "watts": 693.0,
                           "watts_max": 701.0, "celsius": 58.0, "clock_reasons": ["sw power cap"]}
    md = "\n".join(report.render_results({**results, "entries": entries}))
    e = prefill[0]
    assert (f"| {e['system']} | {e['text_tokens']} | {e['median_ms']:.3f} | 1725 | 1605-1800 | 693 | sw power cap | 7 |"
            in md)
    assert md.count("| sw power cap |") == 1  # only the entry that has a power window


# ----------------------------------------------------------------------------------------------------- power trace
def test_power_parse_reads_nvidia_smi_lines_and_rejects_others():
    from saisa.bench import power

    s = power.parse("2026/11/22 10:50:23.972, 1650, 692.45, 58, 0x0000000000000004")
    assert (s.sm_mhz, s.watts, s.celsius, s.reasons) == (1650.0, 692.45, 58.0, 4)
    assert abs(s.t - datetime.datetime(2026, 11, 22, 10, 50, 23, 972000).timestamp()) < 1e-6
    assert power.parse("timestamp, clocks.current.sm [MHz], power.draw [W], temperature.gpu, reasons") is None
    assert power.parse("2026/11/22 10:50:23.972, [N/A], 692.45, 58, 0x4") is None
    assert power.parse("") is None


def test_power_summary_names_the_clock_reasons():
    from saisa.bench import power

    samples = [power.Sample(float(i), mhz, w, 60.0, r) for i, (mhz, w, r) in
               enumerate([(1980, 640.0, 0x0), (1650, 699.0, 0x4), (1410, 701.0, 0x4 | 0x100)])]
    got = power.summarize(samples)
    assert got["sm_mhz"] == 1650 and got["sm_mhz_range"] == [1410, 1980] and got["watts_max"] == 701.0
    assert got["clock_reasons"] == ["sw power cap", "0x100"]
    assert power.summarize([]) is None


def test_power_trace_samples_a_running_nvidia_smi_and_windows_by_its_timestamps(tmp_path, monkeypatch):
    from saisa.bench import power

    fake = tmp_path / "nvidia-smi"  # prints three samples a second apart, stamped now - 2, now - 1, now
    fake.write_text("#!/usr/bin/env python3\nimport datetime, sys, time\n"
                    "now = datetime.datetime.now()\n"
                    "for k, mhz in ((2, 1980), (1, 1650), (0, 1410)):\n"
                    "    t = now - datetime.timedelta(seconds=k)\n"
                    "    print(t.strftime('%Y/%m/%d %H:%M:%S.%f')[:-3] + f', {mhz}, 650.5, 60, 0x4', flush=True)\n"
                    "time.sleep(30)\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with power.PowerTrace(0, period_ms=50) as trace:
        time.sleep(1.0)
        now = time.time()
    assert len(trace.samples) == 3
    last = trace.window(now - 2.5, now + 1)  # stamped about now - 3, now - 2, now - 1: the last two
    assert last["samples"] == 2 and last["sm_mhz_range"] == [1410, 1650] and last["clock_reasons"] == ["sw power cap"]
    assert trace.window(now + 5, now + 6) is None


def test_power_trace_without_nvidia_smi_is_empty(monkeypatch):
    from saisa.bench import power

    monkeypatch.setattr(power.shutil, "which", lambda name: None)
    with power.PowerTrace() as trace:
        pass
    assert trace.samples == [] and trace.window(0, time.time()) is None
