"""Engine, image K/V cache, processor and chat session on tiny CPU models (fp32), all three architectures."""

from __future__ import annotations

import argparse
import io
import threading

import pytest
import torch
from conftest import IMAGE_TOKEN_ID, random_ids, random_pixels, tiny_model
from PIL import Image
from torch.testing import assert_close
from transformers import PreTrainedTokenizerFast, TextIteratorStreamer

from saisa.chat import ChatSession
from saisa.data.processor import RemoteImageError, SaisaProcessor, load_processor
from saisa.generate import generate, resolve_settings
from saisa.image_cache import ImageKVCache
from saisa.model.vision import image_processor_for

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["what is in this picture", "a red square on a blue background", "describe the image please",
          "the cat sat on the mat", "there is a green circle and a yellow triangle", "how many shapes are there",
          "what colour is the square", "two shapes, one red and one blue", "hello! who are you?",
          "i am a small assistant. i describe images."] * 3


@pytest.fixture(scope="module")
def tokenizer():
    """A 100-token character BPE (ids match the tiny models: pad 0, eos <|im_end|> 2, <image> 99) with ChatML."""
    from tokenizers import Tokenizer, decoders, models, trainers

    alphabet = list("abcdefghijklmnopqrstuvwxyz .,?!'\n")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=IMAGE_TOKEN_ID, special_tokens=["<pad>", "<unk>", "<|im_end|>", "<|im_start|>"],
        initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    fast.chat_template = CHATML
    assert fast.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID and fast.eos_token_id == 2
    return fast


@pytest.fixture(scope="module")
def processor(tokenizer):
    return SaisaProcessor(image_processor_for(tiny_model("saisa").config.vision_config), tokenizer)


def prompt(length: int, seed: int, image_at=()) -> torch.Tensor:
    ids = random_ids(length, seed)
    for p in image_at:
        ids[p] = IMAGE_TOKEN_ID
    return ids


def left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = r, 1
    return ids, mask


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def picture(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy())


# ------------------------------------------------------------------------------------------------- engine numerics
@pytest.mark.parametrize("image_at", [(2, 7), ()], ids=["two_images", "text_only"])
def test_cached_decoding_equals_full_recomputation_at_every_step(arch, image_at):
    model = tiny_model(arch)
    ids = prompt(12, seed=3, image_at=image_at)[None]
    pixels = random_pixels(len(image_at)) if image_at else None
    out = generate(model, ids, pixel_values=pixels, max_new_tokens=8, eos_token_id=[], return_dict_in_generate=True,
                   output_logits=True)
    new = out.sequences[0, ids.shape[1]:]
    assert len(new) == 8
    with torch.no_grad():
        for t in range(len(new)):
            full = torch.cat([ids[0], new[:t]])[None]
            ref = model(input_ids=full, pixel_values=pixels).logits[0, -1]
            assert_close(out.logits[t][0], ref, atol=1e-4, rtol=1e-4)
            assert int(new[t]) == int(ref.index_fill(0, torch.tensor([IMAGE_TOKEN_ID]), -float("inf")).argmax())


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_batch_of_mixed_prompts_equals_each_alone(arch, penalty):
    model = tiny_model(arch)
    samples = [
        (prompt(11, seed=8, image_at=(2, 8)), random_pixels(2, seed=3)),
        (prompt(5, seed=9), None),
        (prompt(7, seed=10, image_at=(0,)), random_pixels(1, seed=4)),
        (prompt(9, seed=11, image_at=(4,)), random_pixels(1, seed=5)),
    ]
    opts = dict(max_new_tokens=6, repetition_penalty=penalty, pad_token_id=0)
    first = generate(model, samples[0][0][None], pixel_values=samples[0][1], eos_token_id=[], **opts)
    eos = int(first[0, -4])  # sample 0 stops after 3 tokens; the others stop wherever they emit it
    alone = [generate(model, s[None], pixel_values=p, eos_token_id=eos, **opts)[0, len(s):] for s, p in samples]
    assert len(alone[0]) == 3
    ids, mask = left_pad([s for s, _ in samples])
    pixels = torch.cat([p for _, p in samples if p is not None])
    batch = generate(model, ids, attention_mask=mask, pixel_values=pixels, eos_token_id=eos, **opts)
    assert batch.shape == (4, ids.shape[1] + max(len(a) for a in alone))
    for b, a in enumerate(alone):
        row = batch[b, ids.shape[1]:]
        assert row[: len(a)].tolist() == a.tolist()
        assert (row[len(a):] == 0).all()


def test_optimize_for_inference_keeps_prefill_and_decoding():
    """After optimize_for_inference(compile=True), the engine's cached prefill and decoding (folded visual K/V,
    fused.visual_kv_chunk) give the logits they gave before, and the cache-less fused forward (one k/v GEMM over
    visual and text rows per layer) gives the engine's last-token prefill logits, on a left-padded batch."""
    model = tiny_model("saisa")
    ids, mask = left_pad([prompt(12, seed=30, image_at=(2, 7)), prompt(9, seed=31, image_at=(1, 5))])
    pixels = random_pixels(4, seed=6)
    opts = {"attention_mask": mask, "pixel_values": pixels, "max_new_tokens": 5, "eos_token_id": [],
            "pad_token_id": 0, "return_dict_in_generate": True, "output_logits": True}
    before = generate(model, ids, **opts)
    with torch.no_grad():
        model.optimize_for_inference(chunk=1, compile=True, compile_backend="eager")
        assert model._fused is not None
        prefill = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, logits_to_keep=1).logits[:, -1]
    after = generate(model, ids, **opts)
    assert after.sequences.tolist() == before.sequences.tolist()
    for a, b in zip(after.logits, before.logits):
        assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert_close(prefill, before.logits[0], atol=1e-4, rtol=1e-4)


def test_prompt_ending_with_an_image_is_a_clear_error():
    model = tiny_model("saisa")
    with pytest.raises(ValueError, match="ends with an image placeholder"):
        generate(model, prompt(5, seed=1, image_at=(4,))[None], pixel_values=random_pixels(1), max_new_tokens=2)


def test_unsupported_options_are_refused():
    model = tiny_model("saisa")
    with pytest.raises(ValueError, match="num_beams"):
        resolve_settings(model, 4, num_beams=4)
    with pytest.raises(TypeError, match="frobnicate"):
        resolve_settings(model, 4, frobnicate=True)
    assert resolve_settings(model, 4, max_length=10).max_new_tokens == 6
    assert resolve_settings(model, 4).eos_token_ids == (2,)  # from the model's generation_config


# --------------------------------------------------------------------------------------------------- image cache
@pytest.mark.parametrize("arch", ["saisa", "naavit"])
def test_image_cache_hit_skips_the_vision_tower_and_gives_the_same_tokens(arch):
    model = tiny_model(arch)
    vision_calls, projector_calls = count_calls(model.vision_tower), count_calls(model.multi_modal_projector)
    pixels = random_pixels(1, seed=7)
    q1, q2 = prompt(9, seed=1, image_at=(3,))[None], prompt(11, seed=2, image_at=(3,))[None]
    opts = dict(max_new_tokens=5, eos_token_id=[])
    reference = [generate(model, q, pixel_values=pixels, **opts) for q in (q1, q2)]
    cache = ImageKVCache()
    vision_calls[0] = projector_calls[0] = 0
    miss = generate(model, q1, pixel_values=pixels, image_cache=cache, **opts)
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1) and vision_calls[0] == 1
    projected = projector_calls[0]
    hit = generate(model, q2, pixel_values=pixels, image_cache=cache, **opts)  # new question, same image and offset
    assert (cache.hits, cache.misses) == (1, 1)
    assert vision_calls[0] == 1 and projector_calls[0] == projected, "a hit must skip the tower and the projector"
    assert miss.tolist() == reference[0].tolist() and hit.tolist() == reference[1].tolist()
    assert cache.bytes == 2 * model.config.text_config.num_hidden_layers * 2 * model.num_visual_tokens * 8 * 4
    # Another offset is another entry; changed weights invalidate the old ones.
    generate(model, prompt(9, seed=1, image_at=(5,))[None], pixel_values=pixels, image_cache=cache, **opts)
    assert cache.misses == 2
    with torch.no_grad():
        model.multi_modal_projector.linear_1.bias.add_(0.1)
    changed = generate(model, q2, pixel_values=pixels, image_cache=cache, **opts)
    assert cache.misses == 3 and vision_calls[0] == 3
    assert changed.tolist() == generate(model, q2, pixel_values=pixels, **opts).tolist()


def test_image_cache_in_a_batch_dedups_and_mixes_hits_and_misses():
    model = tiny_model("saisa")
    vision_calls = count_calls(model.vision_tower)
    a, b = random_pixels(1, seed=1), random_pixels(1, seed=2)
    rows = [prompt(8, seed=3, image_at=(2,)), prompt(8, seed=4, image_at=(2,)), prompt(8, seed=5, image_at=(2, 5))]
    pixels = torch.cat([a, a, b, a])  # row 0: a; row 1: a (same offset); row 2: b, then a at another offset
    ids, mask = left_pad(rows)
    opts = dict(max_new_tokens=4, eos_token_id=[], attention_mask=mask)
    expected = generate(model, ids, pixel_values=pixels, **opts)
    cache = ImageKVCache()
    cache_hit = ImageKVCache()
    generate(model, rows[0][None], pixel_values=a, image_cache=cache_hit, max_new_tokens=1)
    vision_calls[0] = 0
    got = generate(model, ids, pixel_values=pixels, image_cache=cache, **opts)
    assert got.tolist() == expected.tolist()
    assert (cache.misses, len(cache)) == (3, 3) and vision_calls[0] == 1  # one tower call for the two contents
    got = generate(model, ids, pixel_values=pixels, image_cache=cache_hit, **opts)  # a@2 hits, the rest miss
    assert got.tolist() == expected.tolist() and cache_hit.hits == 1


def test_image_cache_is_bounded_lru():
    model = tiny_model("saisa")
    entry = 2 * 2 * 2 * model.num_visual_tokens * 8 * 4
    cache = ImageKVCache(max_bytes=2 * entry)
    for seed in range(3):
        generate(model, prompt(6, seed=1, image_at=(2,))[None], pixel_values=random_pixels(1, seed=seed),
                 image_cache=cache, max_new_tokens=1)
    assert len(cache) == 2 and cache.bytes == 2 * entry and cache.evictions == 1
    generate(model, prompt(6, seed=1, image_at=(2,))[None], pixel_values=random_pixels(1, seed=0),
             image_cache=cache, max_new_tokens=1)
    assert cache.hits == 0 and cache.misses == 4, "the oldest entry was evicted"
    assert "hits=0 misses=4" in repr(cache)


def test_llava_does_not_use_the_image_cache():
    model = tiny_model("llava")
    cache = ImageKVCache()
    ids = prompt(8, seed=1, image_at=(2,))[None]
    out = generate(model, ids, pixel_values=random_pixels(1), image_cache=cache, max_new_tokens=3)
    assert out.tolist() == generate(model, ids, pixel_values=random_pixels(1), max_new_tokens=3).tolist()
    assert cache.hits == cache.misses == len(cache) == 0


# --------------------------------------------------------------------------------------- streaming, sampling, stops
def test_streaming_yields_the_same_text(processor):
    model = tiny_model("saisa")
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": picture(1)}, {"type": "text", "text": "hello"}]}])
    opts = dict(max_new_tokens=12, eos_token_id=[])
    plain = generate(model, **inputs, **opts)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=generate, args=(model,), kwargs={**inputs, **opts, "streamer": streamer})
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == processor.batch_decode(plain[:, inputs["input_ids"].shape[1]:])[0]
    assert streamed


def test_sampling_is_reproducible_under_a_seed():
    model = tiny_model("saisa")
    ids = prompt(8, seed=1, image_at=(2,))[None]
    opts = dict(pixel_values=random_pixels(1), max_new_tokens=10, do_sample=True, temperature=1.5, top_k=40,
                top_p=0.95, eos_token_id=[])
    a = generate(model, ids, seed=123, **opts)
    b = generate(model, ids, generator=torch.Generator().manual_seed(123), **opts)
    assert a.tolist() == b.tolist()
    assert any(generate(model, ids, seed=s, **opts).tolist() != a.tolist() for s in (1, 2, 3))


def test_eos_and_stop_strings_stop_generation(tokenizer):
    model = tiny_model("saisa")
    ids = prompt(8, seed=1, image_at=(2,))[None]
    opts = dict(pixel_values=random_pixels(1), max_new_tokens=10)
    free = generate(model, ids, eos_token_id=[], **opts)[0, 8:].tolist()
    eos, unused = free[3], next(t for t in range(3, 99) if t not in free)
    stopped = generate(model, ids, eos_token_id=[unused, eos], **opts)[0, 8:].tolist()
    assert stopped == free[: free.index(eos) + 1]  # EOS included, as transformers does

    # A stop string ending inside token 3: generation stops at the first token that completes it (overhang allowed).
    said = [tokenizer.decode(free[: j + 1]) for j in range(len(free))]
    stop = said[3][-2:]
    assert stop not in tokenizer.decode(ids[0]) and said[3] != said[2]
    first = next(j for j, text in enumerate(said) if stop in text)
    out = generate(model, ids, eos_token_id=[], stop_strings=[stop], tokenizer=tokenizer, **opts)[0, 8:].tolist()
    assert out == free[: first + 1]
    with pytest.raises(ValueError, match="tokenizer="):
        generate(model, ids, stop_strings="x", **opts)


# --------------------------------------------------------------------------------------------------- processor
def test_processor_inputs_and_chat_template(processor, tmp_path):
    path = tmp_path / "pic.png"
    picture(2).save(path)
    messages = [{"role": "user", "content": [{"type": "image", "path": str(path)},
                                             {"type": "text", "text": "what is in this picture?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\n<image>\nwhat is in this picture?<|im_end|>\n<|im_start|>assistant\n"
    out = processor.apply_chat_template(messages)
    assert (out["input_ids"] == IMAGE_TOKEN_ID).sum() == 1 and out["pixel_values"].shape == (1, 3, 32, 32)
    batch = processor.apply_chat_template([messages, [{"role": "user", "content": "hi"}]])
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][1, 0] == 0  # left padded
    with pytest.raises(ValueError, match="1 '<image>' placeholder.*0 image"):
        processor(text="<image> hi")
    with pytest.raises(RemoteImageError, match="allow_remote"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "image", "url": "https://x/y.png"}]}])
    with pytest.raises(OSError, match="image not found"):
        processor(text="<image>", images=str(tmp_path / "missing.png"))
    processor.save_pretrained(tmp_path / "proc")
    loaded = load_processor(tmp_path / "proc")
    assert loaded.apply_chat_template(messages, tokenize=False) == text
    assert_close(loaded.apply_chat_template(messages)["pixel_values"], out["pixel_values"])


# --------------------------------------------------------------------------------------------------------- chat
@pytest.mark.parametrize("arch", ["saisa", "llava"])
def test_chat_session_reuses_the_cache_across_turns(arch, processor):
    model = tiny_model(arch)
    session = ChatSession(model, processor, image_cache=ImageKVCache(), max_new_tokens=6)
    embed_calls = []
    model.get_input_embeddings().register_forward_hook(lambda m, inp, out: embed_calls.append(inp[0].shape[1]))
    vision_calls = count_calls(model.vision_tower)
    reply1 = session.ask("what is in this picture?", [picture(3)])
    assert vision_calls[0] == 1
    cached, cached_text = session.cache.get_seq_length(), session.cached_text
    embed_calls.clear()
    reply2 = session.ask("describe the image please")
    assert vision_calls[0] == 1 and session.reprefills == 0
    rendered, _ = processor.render(session.messages[:-1])
    suffix = rendered[len(cached_text):]
    assert suffix.endswith("<|im_start|>user\ndescribe the image please<|im_end|>\n<|im_start|>assistant\n")
    expected_new = 1 + len(processor.tokenizer(suffix, add_special_tokens=False)["input_ids"])  # + pending token
    assert embed_calls[0] == expected_new, "turn 2's prefill must feed only the new tokens"
    assert session.cache.get_seq_length() == cached + expected_new + session.engine.timings.new_tokens - 1
    # The same conversation prefilled from scratch gives the same reply.
    fresh = processor.apply_chat_template(session.messages[:-1])
    out = generate(model, **fresh, max_new_tokens=6, eos_token_id=processor.tokenizer.eos_token_id)
    assert processor.batch_decode(out[:, fresh["input_ids"].shape[1]:])[0] == reply2
    assert session.messages[1]["content"] == reply1
    session.reset()
    assert session.cache is None and session.messages == []


def test_chat_cli_transcript(processor, tmp_path, monkeypatch, capsys):
    from saisa.chat import add_arguments, run

    model = tiny_model("saisa")
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    good = tmp_path / "pic.png"
    picture(4).save(good)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    transcript = f"hello\n/image {tmp_path / 'nope.png'}\n/image {tmp_path / 'bad.png'}\n/image {good}\nwhat?\n" \
                 "/stats\n/reset\nagain\n/quit\nnot reached\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(transcript))
    args = parser.parse_args(["--model", str(tmp_path / "m"), "--image", str(good), "--max-new-tokens", "4"])
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "[error: image not found" in out and "[error: not a readable image" in out
    assert f"[image {good} attached" in out and "[conversation reset]" in out and "hits=" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    args = parser.parse_args(["--model", str(tmp_path / "m"), "--image", str(tmp_path / "nope.png")])
    assert run(args) == 2
    err = capsys.readouterr().err
    assert "image not found" in err and "Traceback" not in err


def test_model_generate_is_the_engine():
    """modeling.py's `generate` delegates here, so model.generate takes transformers' arguments."""
    model = tiny_model("saisa")
    ids = prompt(8, seed=1, image_at=(2,))[None]
    opts = dict(pixel_values=random_pixels(1), max_new_tokens=4, eos_token_id=[])
    assert model.generate(ids, **opts).tolist() == generate(model, ids, **opts).tolist()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, do_sample=True, top_k=5,
                         seed=0, return_dict_in_generate=True, output_scores=True, **opts)
    assert out.sequences.shape == (1, 12) and len(out.scores) == 4
