"""Plain transformers generation baseline: `model.generate` on chat-templated prompts, batched, left-padded.

The sampling settings are the ones our hf Sampler passes (do_sample, temperature, top_p, top_k=0, KV cache), and
each batch is seeded with seed + the index of its first prompt as `align generate` does, so both sides draw the
same samples. Prints one JSON line: new tokens/s over the generation loop (tokens up to and including the first
end-of-sequence token of each row) and the peak RSS.
"""

import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.bench.child import parse_args, report

a = parse_args()
tokenizer = AutoTokenizer.from_pretrained(a.model, padding_side="left")
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype)).eval()
prompts = [json.loads(line)["prompt"] for line in Path(a.data).read_text().splitlines() if line.strip()][: a.prompts]
eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
          else [model.generation_config.eos_token_id])
start, tokens = time.perf_counter(), 0
for i in range(0, len(prompts), a.batch):
    inputs = tokenizer.apply_chat_template(prompts[i:i + a.batch], add_generation_prompt=True, padding=True,
                                           return_tensors="pt", return_dict=True)
    torch.manual_seed(a.seed + i)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=a.max_new_tokens, do_sample=True, temperature=a.temperature,
                             top_p=a.top_p, top_k=0, pad_token_id=tokenizer.pad_token_id)
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        tokens += next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
seconds = time.perf_counter() - start
report(new_tokens_per_second=tokens / seconds, new_tokens=tokens, seconds=seconds)
