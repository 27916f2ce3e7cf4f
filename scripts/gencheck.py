"""Greedy answers of a saved model to the first 16 test questions: batched `generate` vs one prompt at a time
without a cache (full forward per token), with special tokens shown. Usage: gencheck.py MODEL_DIR SYNTH_DIR [cuda].

Written to find why GPU demo runs scored 0 with correct first tokens: generation did not stop at <|im_end|> under
transformers 5.17 (the tokenizer read from the GGUF had eos "<|im_start|>"; fixed in saisa.assets).
"""
import json
import sys
from pathlib import Path

import torch

from saisa import SaisaForConditionalGeneration
from saisa.data.processor import load_processor
from saisa.demo import _messages

d=Path(sys.argv[1]); synth=Path(sys.argv[2]); dev=sys.argv[3] if len(sys.argv)>3 else 'cpu'
m=SaisaForConditionalGeneration.from_pretrained(d, dtype=torch.float32).to(dev).eval()
p=load_processor(d, m.config)
recs=json.loads((synth/'test_qa.json').read_text())[:16]
enc=p.apply_chat_template([_messages(r,synth) for r in recs], add_generation_prompt=True)
print(repr(p.tokenizer.decode(enc['input_ids'][0][enc['attention_mask'][0].bool()])))
eos=p.tokenizer.eos_token_id
with torch.no_grad():
    out=m.generate(input_ids=enc['input_ids'].to(dev), attention_mask=enc['attention_mask'].to(dev), pixel_values=enc['pixel_values'].to(dev), max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=p.tokenizer.pad_token_id)
    L=enc['input_ids'].shape[1]
    gen=out[:,L:]
    # no-cache greedy, one by one
    bad=0
    for i in range(len(recs)):
        ids=enc['input_ids'][i][enc['attention_mask'][i].bool()][None].to(dev)
        toks=[]
        for _ in range(6):
            lg=m(input_ids=ids, pixel_values=enc['pixel_values'][i:i+1].to(dev)).logits[0,-1]
            t=int(lg.argmax()); toks.append(t)
            if t==eos: break
            ids=torch.cat([ids, torch.tensor([[t]],device=dev)],1)
        g=[t for t in gen[i].tolist()][:len(toks)]
        if g!=toks: bad+=1
        print(recs[i]['answer'], '| batch:', repr(p.tokenizer.decode(gen[i], skip_special_tokens=False)), '| single no-cache:', repr(p.tokenizer.decode(toks, skip_special_tokens=False)))
print('mismatches', bad)
