"""Data pipeline: label masks of every template, datasets, collation (CPU, offline tokenizers)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from test_data_helpers import MeanColourProcessor, make_tokenizer, solid, supervised_spans

from saisa.data.collate import Collator
from saisa.data.datasets import ConversationDataset, ImageCountError
from saisa.data.images import ImageLoadError
from saisa.data.templates import (
    IGNORE_INDEX,
    LLAMA_3_SYSTEM,
    LLAVA_V1_SYSTEM,
    VICUNA_SYSTEM,
    FullyMaskedError,
    Segment,
    Template,
    TemplateError,
    encode_conversation,
    encode_prompt,
    image_token_id,
)

CONV = [
    {"from": "human", "value": "<image>\nWhat colour is the circle?"},
    {"from": "gpt", "value": "Red."},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "Two."},
]
TEXT_ONLY = [{"from": "human", "value": "Hello world"}, {"from": "gpt", "value": "Hello."}]


def _check(tok, template, conv, expected_text, expected_spans, *, bos=True, strip=False):
    enc = encode_conversation(conv, tok, template, sample_id="s1")
    # the pieces add up to the tokenization of the whole rendering
    assert enc.input_ids == tok(expected_text, add_special_tokens=bos)["input_ids"]
    assert (enc.input_ids[0] == tok.bos_token_id) == bos
    spans = supervised_spans(tok, enc.input_ids, enc.labels)
    if strip:  # a SentencePiece decoder drops the leading space of what it decodes
        spans, expected_spans = [s.strip() for s in spans], [s.strip() for s in expected_spans]
    assert spans == expected_spans
    img = image_token_id(tok)
    assert all(lab == IGNORE_INDEX for t, lab in zip(enc.input_ids, enc.labels) if t == img)
    return enc


# ---- templates ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_vicuna_v1_multi_turn(kind):
    tok = make_tokenizer(kind)
    text = (VICUNA_SYSTEM + " USER: <image>\nWhat colour is the circle? ASSISTANT: Red.</s>"
            "USER: How many shapes are there? ASSISTANT: Two.</s>")
    enc = _check(tok, "vicuna_v1", CONV, text, [" Red.</s>", " Two.</s>"], strip=kind == "metaspace")
    assert enc.num_images == 1 and not enc.truncated


def test_llava_v1_system_prompt():
    tok = make_tokenizer()
    text = LLAVA_V1_SYSTEM + " USER: Hello world ASSISTANT: Hello.</s>"
    _check(tok, "llava_v1", TEXT_ONLY, text, [" Hello.</s>"])


def test_vicuna_text_only_and_explicit_system():
    tok = make_tokenizer()
    conv = [{"from": "system", "value": "Be brief."}, *TEXT_ONLY]
    enc = _check(tok, "vicuna_v1", conv, "Be brief. USER: Hello world ASSISTANT: Hello.</s>", [" Hello.</s>"])
    assert enc.num_images == 0


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_plain_stage1(kind):
    tok = make_tokenizer(kind)
    conv = [{"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": "A red circle."}]
    # LLaVA preprocess_plain: the human text is replaced by the image token; no newline after it
    _check(tok, "plain", conv, "<image>A red circle.\n", ["A red circle.\n"], strip=kind == "metaspace")


def test_plain_several_images():
    tok = make_tokenizer()
    conv = [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "Two pictures."}]
    enc = _check(tok, "plain", conv, "<image><image>Two pictures.\n", ["Two pictures.\n"])
    assert enc.num_images == 2


def test_llama_3_multi_turn():
    tok = make_tokenizer()
    h = "<|start_header_id|>{}<|end_header_id|>\n\n"
    text = (h.format("system") + LLAMA_3_SYSTEM + "<|eot_id|>"
            + h.format("user") + "<image>\nWhat colour is the circle?<|eot_id|>"
            + h.format("assistant") + "Red.<|eot_id|>"
            + h.format("user") + "How many shapes are there?<|eot_id|>" + h.format("assistant") + "Two.<|eot_id|>")
    _check(tok, "llama_3", CONV, text, ["Red.<|eot_id|>", "Two.<|eot_id|>"])


def test_saisa_llama_3_is_vicuna_layout_with_end_of_text():
    tok = make_tokenizer()
    text = VICUNA_SYSTEM + " USER: Hello world ASSISTANT: Hello.<|end_of_text|>"
    _check(tok, "saisa_llama_3", TEXT_ONLY, text, [" Hello.<|end_of_text|>"])


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_chat_template_chatml(kind):
    tok = make_tokenizer(kind)
    messages = [{"role": m["from"].replace("human", "user").replace("gpt", "assistant"), "content": m["value"]}
                for m in CONV]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    _check(tok, "chat_template", CONV, text, ["Red.<|im_end|>\n", "Two.<|im_end|>\n"], bos=False,
           strip=kind == "metaspace")


def test_several_images_are_masked_and_counted():
    tok = make_tokenizer()
    conv = [{"from": "human", "value": "<image><image>\nCompare."}, {"from": "gpt", "value": "Same."},
            {"from": "human", "value": "And <image>?"}, {"from": "gpt", "value": "Different."}]
    for template in ("vicuna_v1", "llama_3", "chat_template"):
        enc = encode_conversation(conv, tok, template)
        assert enc.num_images == 3
        assert [s.strip() for s in supervised_spans(tok, enc.input_ids, enc.labels)][0].startswith("Same.")


def test_truncation_keeps_partial_labels_and_counts_images():
    tok = make_tokenizer()
    full = encode_conversation(CONV, tok, "vicuna_v1")
    first_answer_end = max(i for i, lab in enumerate(full.labels[: len(full.labels) // 2 + 20])
                           if lab != IGNORE_INDEX)
    enc = encode_conversation(CONV, tok, "vicuna_v1", max_length=first_answer_end + 1)
    assert enc.truncated and enc.num_tokens == len(full.input_ids)
    assert supervised_spans(tok, enc.input_ids, enc.labels)[0] == " Red.</s>"


def test_fully_masked_after_truncation_raises_with_id():
    tok = make_tokenizer()
    with pytest.raises(FullyMaskedError, match=r"sample 'long-1'.*truncation.*max_length=10") as e:
        encode_conversation(CONV, tok, "vicuna_v1", max_length=10, sample_id="long-1")
    assert e.value.sample_id == "long-1"


def test_no_assistant_turn_is_fully_masked():
    with pytest.raises(FullyMaskedError, match="no assistant turn"):
        encode_conversation([{"from": "human", "value": "Hi"}], make_tokenizer(), "vicuna_v1", sample_id=3)


def test_chat_template_without_prefix_property_is_refused():
    tok = make_tokenizer()
    # renders the last message differently from earlier ones (as templates that strip old reasoning do)
    tok.chat_template = ("{%- for m in messages -%}{%- if loop.last -%}LAST {% endif -%}"
                         "{{ m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor -%}")
    with pytest.raises(TemplateError, match=r"sample 'bad'.*renders the first messages differently"):
        encode_conversation(TEXT_ONLY, tok, "chat_template", sample_id="bad")


def test_boundary_inside_a_word_is_a_tokenization_mismatch():
    class Split(Template):
        name = "split"

        def segments(self, messages, tokenizer, *, add_generation_prompt=False):
            return [Segment("Hel", False), Segment("lo world", True)]

    with pytest.raises(TemplateError, match=r"sample 7: tokenization mismatch"):
        encode_conversation(TEXT_ONLY, make_tokenizer(), Split(), sample_id=7)


def test_image_token_must_be_one_token():
    tok = make_tokenizer(image_token=False)
    with pytest.raises(TemplateError, match="ensure_image_token"):
        encode_conversation(CONV, tok, "vicuna_v1", sample_id="x")
    encode_conversation(TEXT_ONLY, tok, "vicuna_v1")  # text-only data does not need it


def test_template_needs_its_special_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hi": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>")
    with pytest.raises(TemplateError, match=r"'<\|start_header_id\|>' to be a single token"):
        encode_conversation(TEXT_ONLY, tok, "llama_3")


def test_unknown_role_and_template():
    with pytest.raises(TemplateError, match="sample 5: turn 0 has role 'bot'"):
        encode_conversation([{"from": "bot", "value": "x"}], make_tokenizer(), "plain", sample_id=5)
    with pytest.raises(KeyError, match="unknown conversation template"):
        encode_conversation(TEXT_ONLY, make_tokenizer(), "alpaca")


def test_encode_prompt_ends_with_generation_prompt():
    tok = make_tokenizer()
    ids = encode_prompt(CONV[:1], tok, "vicuna_v1")
    assert tok.decode(ids, skip_special_tokens=False).endswith("What colour is the circle? ASSISTANT:")
    ids = encode_prompt(CONV[:1], tok, "chat_template")
    assert tok.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


# ---- datasets -------------------------------------------------------------------------------------------------------


def _write_data(tmp_path, records, images=None):
    (tmp_path / "img").mkdir(exist_ok=True)
    for name, img in (images or {}).items():
        img.save(tmp_path / "img" / name)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def _dataset(path, **kw):
    kw.setdefault("background", (0, 0, 0))
    return ConversationDataset.from_json(path, tokenizer=make_tokenizer(), template="vicuna_v1", **kw)


def test_dataset_items_lengths_and_modality(tmp_path):
    records = [
        {"id": "a", "image": "img/red.png", "conversations": CONV},
        {"id": "b", "conversations": TEXT_ONLY},
        {"id": "c", "image": ["img/red.png", "img/blue.png"],
         "conversations": [{"from": "human", "value": "<image> vs <image>"}, {"from": "gpt", "value": "Different."}]},
        {"id": "d", "image": "img/never-written.png", "conversations": CONV},  # lengths must not open images
    ]
    path = _write_data(tmp_path, records, {"red.png": solid((255, 0, 0), (8, 4)), "blue.png": solid((0, 0, 255))})
    ds = _dataset(path)
    assert ds.is_multimodal == [True, False, True, True]
    assert ds.lengths == [12 + 1, 3, 2 + 2, 12 + 1]  # words + one token per image
    assert ds.modality_lengths[1] == -3
    a = ds[0]
    assert a["id"] == "a" and a["input_ids"].dtype == torch.long and a["labels"].shape == a["input_ids"].shape
    assert len(a["images"]) == 1 and a["images"][0].size == (8, 8)  # padded to square
    assert a["images"][0].getpixel((0, 0)) == (0, 0, 0) and a["images"][0].getpixel((4, 4)) == (255, 0, 0)
    assert ds[1]["images"] == []
    c = ds[2]
    assert [im.getpixel((4, 4)) for im in c["images"]] == [(255, 0, 0), (0, 0, 255)]


def test_dataset_moves_lone_image_to_front_like_llava(tmp_path):
    records = [{"id": "a", "image": "img/red.png", "conversations": [
        {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "Red."}]}]
    ds = _dataset(_write_data(tmp_path, records, {"red.png": solid((255, 0, 0))}))
    tok = ds.tokenizer
    assert "USER: <image>\nWhat is this? ASSISTANT:" in tok.decode(ds[0]["input_ids"], skip_special_tokens=False)


def test_dataset_bad_data_messages(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    records = [
        {"id": "missing", "image": "img/nope.png", "conversations": CONV},
        {"id": "corrupt", "image": "img/corrupt.png", "conversations": CONV},
        {"id": "count", "image": ["img/nope.png", "img/nope.png"], "conversations": CONV},
        {"id": "noimage", "conversations": CONV},
    ]
    ds = _dataset(_write_data(tmp_path, records))
    with pytest.raises(ImageLoadError, match=r"sample 'missing': image not found: .*img/nope.png"):
        ds[0]
    with pytest.raises(ImageLoadError, match=r"sample 'corrupt'.*img/corrupt.png"):
        ds[1]
    with pytest.raises(ImageCountError, match=r"sample 'count': 1 '<image>' placeholder\(s\) .* but 2 image"):
        ds[2]
    with pytest.raises(ImageCountError, match=r"sample 'noimage': 1 .* but 0 image"):
        ds[3]


def test_dataset_fully_masked_is_a_counted_skip(tmp_path):
    long_text_only = [{**turn, "value": turn["value"].replace("<image>\n", "")} for turn in CONV]
    short = [{"from": "system", "value": "Hi."}, *TEXT_ONLY]  # 13 tokens; the default system prompt alone has 29
    records = [{"id": "long", "conversations": long_text_only}, {"id": "ok", "conversations": short}]
    path = _write_data(tmp_path, records)
    ds = _dataset(path, max_length=16)
    item = ds[0]
    assert item["id"] == "long" and "truncation" in item["skipped"] and "input_ids" not in item
    collate = Collator(pad_token_id=0)
    batch = collate([item, ds[1]])
    assert batch.input_ids.shape[0] == 1 and collate.num_skipped == 1
    with pytest.raises(ValueError, match=r"every sample of this batch was skipped \(ids \['long'\]\)"):
        collate([item])
    with pytest.raises(FullyMaskedError):
        _dataset(path, max_length=16, on_fully_masked="raise")[0]


def test_truncation_drops_images_whose_placeholder_was_cut(tmp_path):
    conv = [{"from": "human", "value": "<image>\nFirst?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "<image>\nSecond?"}, {"from": "gpt", "value": "Blue."}]
    records = [{"id": "two", "image": ["img/red.png", "img/blue.png"], "conversations": conv}]
    path = _write_data(tmp_path, records, {"red.png": solid((255, 0, 0)), "blue.png": solid((0, 0, 255))})
    full = _dataset(path, llava_image_position=False)[0]
    supervised = (full["labels"] != IGNORE_INDEX).tolist()
    cut = supervised.index(False, supervised.index(True))  # just after the first answer
    item = _dataset(path, max_length=cut, llava_image_position=False)[0]
    assert len(item["images"]) == 1 and int((item["input_ids"] == image_token_id(make_tokenizer())).sum()) == 1


def test_hf_datasets_dataset_with_pil_images():
    datasets = pytest.importorskip("datasets")
    hf = datasets.Dataset.from_dict({
        "id": ["p", "t"],
        "image": [solid((0, 255, 0), (6, 6)), None],
        "conversations": [CONV, TEXT_ONLY],
    }).cast_column("image", datasets.Image())
    ds = ConversationDataset(hf, make_tokenizer(), "chat_template", background=(0, 0, 0),
                             image_processor=MeanColourProcessor())
    assert ds.is_multimodal == [True, False]
    item = ds[0]
    assert item["images"].shape == (1, 3, 2, 2)
    assert torch.allclose(item["images"][0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=0.02)
    assert ds[1]["images"] == []


def test_pad_mode_needs_a_background():
    with pytest.raises(ValueError, match="needs the pad colour"):
        ConversationDataset([], make_tokenizer(), "plain")


# ---- collation ------------------------------------------------------------------------------------------------------


def _samples():
    tok = make_tokenizer()
    a = encode_conversation([{"from": "human", "value": "<image><image>\nCompare."}, {"from": "gpt", "value": "Red."}],
                            tok, "vicuna_v1")
    b = encode_conversation(TEXT_ONLY, tok, "vicuna_v1")
    c = encode_conversation(CONV, tok, "vicuna_v1")

    def mk(e, imgs, i):
        return {"id": i, "input_ids": torch.tensor(e.input_ids), "labels": torch.tensor(e.labels), "images": imgs}

    return tok, [mk(a, [solid((255, 0, 0)), solid((0, 255, 0))], "a"), mk(b, [], "b"),
                 mk(c, [solid((0, 0, 255))], "c")]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_padding_and_image_order(side):
    tok, samples = _samples()
    batch = Collator(tok.pad_token_id, side, MeanColourProcessor(), image_token_id=image_token_id(tok))(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    L = max(lengths)
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.labels.shape == (3, L)
    for i, (s, n) in enumerate(zip(samples, lengths)):
        real = slice(0, n) if side == "right" else slice(L - n, L)
        pad = slice(n, L) if side == "right" else slice(0, L - n)
        assert torch.equal(batch.input_ids[i, real], s["input_ids"])
        assert torch.equal(batch.labels[i, real], s["labels"])
        assert batch.attention_mask[i, real].eq(1).all() and batch.attention_mask[i, pad].eq(0).all()
        assert batch.input_ids[i, pad].eq(tok.pad_token_id).all() and batch.labels[i, pad].eq(IGNORE_INDEX).all()
    # images of sample 0 first, in reading order, then sample 2's
    assert batch.pixel_values.shape == (3, 3, 2, 2) and batch.num_images == 3
    expected = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    assert torch.allclose(batch.pixel_values[:, :, 0, 0], expected)


def test_collate_with_clip_image_processor():
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor  # no torchvision
    proc = cls(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    tok, samples = _samples()
    batch = Collator(tok.pad_token_id, "right", proc)(samples)
    assert batch.pixel_values.shape == (3, 3, 16, 16) and batch.pixel_values.dtype == torch.float32


def test_collate_text_only_and_pixel_tensors():
    tok, samples = _samples()
    batch = Collator(tok.pad_token_id)([samples[1]])
    assert batch.pixel_values is None and batch.labels is not None
    s = dict(samples[2], images=torch.zeros(1, 3, 4, 4))
    assert Collator(tok.pad_token_id)([s, samples[1]]).pixel_values.shape == (1, 3, 4, 4)
    nolabels = [{k: v for k, v in x.items() if k != "labels"} for x in samples[1:2]]
    assert Collator(tok.pad_token_id)(nolabels).labels is None


def test_collate_errors():
    tok, samples = _samples()
    with pytest.raises(ValueError, match="no pad token"):
        Collator(None)
    with pytest.raises(ValueError, match="padding_side"):
        Collator(0, "middle")
    with pytest.raises(ValueError, match="no image_processor"):
        Collator(tok.pad_token_id)(samples)
    bad = dict(samples[2], images=[])
    with pytest.raises(ValueError, match=r"sample 'c': 1 image placeholder tokens but 0 images"):
        Collator(tok.pad_token_id, image_token_id=image_token_id(tok))([bad])


def test_collate_inside_a_dataloader(tmp_path):
    records = [{"id": str(i), "image": "img/red.png", "conversations": CONV} for i in range(4)]
    path = _write_data(tmp_path, records, {"red.png": solid((255, 0, 0), (10, 6))})
    ds = _dataset(path)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=Collator(0, "right", MeanColourProcessor()))
    batches = list(loader)
    assert len(batches) == 2 and batches[0].pixel_values.shape == (2, 3, 2, 2)
    assert isinstance(ds[0]["images"][0], Image.Image)


# ---- the real SmolLM2 tokenizer, when the asset is already cached ---------------------------------------------------


def _cached_smollm2_dir():
    from saisa import assets

    gguf = assets.cache_dir() / f"{assets.SMOLLM2.package}-{assets.SMOLLM2.version}" / assets.SMOLLM2.members[0]
    path = gguf.parent / "SmolLM2-135M-Instruct-hf"
    return path if (path / "tokenizer.json").is_file() else None


@pytest.mark.skipif(_cached_smollm2_dir() is None, reason="SmolLM2 asset not cached (saisa.assets.load_smollm2())")
def test_smollm2_tokenizer_masks():
    from transformers import AutoTokenizer

    from saisa.data.templates import ensure_image_token

    tok = AutoTokenizer.from_pretrained(_cached_smollm2_dir())
    ensure_image_token(tok)
    conv = [*CONV[:3], {"from": "gpt", "value": "Two shapes: a circle and 3 squares."}]
    enc = encode_conversation(conv, tok, "chat_template")
    assert supervised_spans(tok, enc.input_ids, enc.labels) == ["Red.<|im_end|>\n",
                                                                "Two shapes: a circle and 3 squares.<|im_end|>\n"]
    assert enc.input_ids == tok(tok.apply_chat_template(
        [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in conv],
        tokenize=False), add_special_tokens=False)["input_ids"]
    enc = encode_conversation(conv, tok, "vicuna_v1")  # SmolLM2 adds no BOS; its EOS <|im_end|> closes the turns
    assert supervised_spans(tok, enc.input_ids, enc.labels) == [" Red.<|im_end|>",
                                                                " Two shapes: a circle and 3 squares.<|im_end|>"]
    enc = encode_conversation(conv[:2], tok, "plain")
    assert tok.decode(enc.input_ids) == "<image>Red.\n"
