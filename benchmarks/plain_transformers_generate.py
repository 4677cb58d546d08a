"""The peer: the same generation written as plain transformers code, no rm_runner.

Usage: python plain_transformers_generate.py MODEL_DIR PROMPTS.jsonl MAX_NEW_TOKENS BATCH_SIZE
Prints one JSON line: generate_s, output_tokens, token_ids.
"""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    model_dir, prompts_file, max_new, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    prompts = [json.loads(line)["prompt"] for line in open(prompts_file) if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    token_ids, began = [], time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, padding_side="left")
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_new, do_sample=False, eos_token_id=None,
                                 pad_token_id=tokenizer.pad_token_id)
        token_ids += out[:, batch["input_ids"].shape[1] :].tolist()
    elapsed = time.perf_counter() - began
    print(json.dumps({"generate_s": elapsed, "output_tokens": sum(map(len, token_ids)), "token_ids": token_ids}))


if __name__ == "__main__":
    main()
