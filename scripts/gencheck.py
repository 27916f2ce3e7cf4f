"""Greedy answers of a saved model to the first test questions: batched `generate` vs one prompt at a time without
a cache (a full forward per token), special tokens shown, and the number of prompts where the two disagree.

Written to find why GPU demo runs scored 0 with correct first tokens: generation did not stop at <|im_end|> under
transformers 5.17 (the tokenizer read from the GGUF had eos "<|im_start|>"; fixed in saisa.assets).

    PYTHONPATH=src python3 scripts/gencheck.py MODEL_DIR SYNTH_DIR [cpu|cuda] [--questions 16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from saisa import SaisaForConditionalGeneration
from saisa.data.processor import load_processor
from saisa.demo import MAX_NEW_TOKENS, _messages


def greedy_without_cache(model, ids: torch.Tensor, pixels: torch.Tensor, eos: int) -> list[int]:
    """Greedy tokens for one unpadded prompt (1, L), re-running the whole sequence for every token."""
    tokens: list[int] = []
    for _ in range(MAX_NEW_TOKENS):
        token = int(model(input_ids=ids, pixel_values=pixels).logits[0, -1].argmax())
        tokens.append(token)
        if token == eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("synth_dir", type=Path)
    ap.add_argument("device", nargs="?", default="cpu")
    ap.add_argument("--questions", type=int, default=16)
    args = ap.parse_args()
    model = SaisaForConditionalGeneration.from_pretrained(args.model_dir, dtype=torch.float32).to(args.device).eval()
    processor = load_processor(args.model_dir, model.config)
    tokenizer = processor.tokenizer
    records = json.loads((args.synth_dir / "test_qa.json").read_text())[: args.questions]
    enc = processor.apply_chat_template([_messages(r, args.synth_dir) for r in records], add_generation_prompt=True)
    ids, mask, pixels = (enc[k].to(args.device) for k in ("input_ids", "attention_mask", "pixel_values"))
    print(repr(tokenizer.decode(ids[0][mask[0].bool()])))
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        batched = out[:, ids.shape[1]:]
        mismatches = 0
        for i, record in enumerate(records):
            single = greedy_without_cache(model, ids[i][mask[i].bool()][None], pixels[i: i + 1], eos)
            mismatches += batched[i].tolist()[: len(single)] != single
            print(record["answer"], "| batch:", repr(tokenizer.decode(batched[i], skip_special_tokens=False)),
                  "| single, no cache:", repr(tokenizer.decode(single, skip_special_tokens=False)))
    print("mismatches", mismatches)


if __name__ == "__main__":
    main()
