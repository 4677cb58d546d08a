"""GPU check: the GPU tests, then decode tokens/s of rm_runner's PyTorch CUDA path against plain
``generate()`` for a random-weight Llama-3.2-1B shape in bf16, at batch 1 and 32, beside the
HBM-bandwidth floor. Self-contained (no network, random weights), under 10 minutes on one
H100/H200-class GPU:

    python benchmarks/gpu_check.py [--skip-tests] [--new-tokens 128]

Needs torch (CUDA) and transformers, plus rm_runner's light dependencies (hydra-core, omegaconf,
filelock, psutil, tqdm) and pytest. On a machine without network, bring their wheels
(``pip download -d gpu-wheels hydra-core omegaconf pytest psutil filelock tqdm``) and pass
``--wheels gpu-wheels``: they are installed from there with --no-index first.
Decode rate = batch x (N - 1) / (t(N new tokens) - t(1 new token)): prefill is subtracted out.
The floor is the fastest a decode step can be when every weight byte is read once from HBM
per step: weight bytes / bandwidth, with the bandwidth measured here by a large device copy
(and the vendor's figure where the GPU is known).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NOMINAL_TBPS = {"H200": 4.8, "H100 SXM": 3.35, "H100 NVL": 3.9, "H100 PCIe": 2.0, "H100": 3.35,
                "A100-SXM4-80GB": 2.04, "A100 80GB PCIe": 1.94, "A100": 1.56, "L40S": 0.864}
GOAL_FLOOR_FRACTION, GOAL_SPEEDUP = 0.25, 5.0


def llama_3_2_1b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                       rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
                       pad_token_id=128001)


def measured_bandwidth_tbps(torch) -> float:
    """Device-to-device copy of 4 GiB: 2 bytes moved (read + write) per byte copied."""
    src = torch.empty(2 * 1024**3, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    began, reps = time.perf_counter(), 10
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - began
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 4 * 1024**3 * reps / elapsed / 1e12


def decode_rate(generate, batch: int, prompt_len: int, new_tokens: int, torch, repeats: int = 3) -> float:
    ids = torch.randint(10, 128000, (batch, prompt_len), device="cuda")
    mask = torch.ones_like(ids)

    def timed(n: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            torch.cuda.synchronize()
            began = time.perf_counter()
            out = generate(ids, mask, n)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - began)
            assert out.shape[1] == prompt_len + n, out.shape
        return best

    timed(new_tokens)  # warm-up: compiles and captures graphs on the compiled path
    return batch * (new_tokens - 1) / (timed(new_tokens) - timed(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--wheels", type=Path, help="a folder of wheels to install (offline) before starting")
    args = parser.parse_args()
    if args.wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links",
                        str(args.wheels), *sorted({p.name.split("-")[0] for p in args.wheels.glob("*.whl")})],
                       check=True)
    import importlib.util

    missing = [m for m in ("torch", "transformers", "omegaconf", "hydra", "filelock", "psutil", "tqdm", "pytest")
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"gpu_check: missing modules {', '.join(missing)}; install them or pass --wheels DIR", file=sys.stderr)
        return 2

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing to check", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0)
    print(f"GPU: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}")

    rc = 0
    if not args.skip_tests:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_gpu.py", "tests/test_hook.py"],
                            cwd=REPO, env=env).returncode
        print(f"GPU tests: {'passed' if rc == 0 else f'FAILED (exit {rc})'}")

    from transformers import AutoModelForCausalLM

    from rm_runner.backends.gpu import GPUBackend
    from rm_runner.config import Dtype, ModelConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_3_2_1b_config(), dtype=torch.bfloat16).to("cuda").eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = measured_bandwidth_tbps(torch)
    nominal = next((v for k, v in NOMINAL_TBPS.items() if k in name), None)
    floor_steps = bandwidth * 1e12 / weight_bytes
    print(f"weights {weight_bytes / 1e9:.2f} GB; HBM copy bandwidth measured {bandwidth:.2f} TB/s"
          f" (nominal {nominal or '?'} TB/s) -> floor {floor_steps:.0f} decode steps/s")

    def plain(ids, mask, n):
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=128001)

    backend = GPUBackend(mode="pytorch", static_cache=True)
    backend.initialize()
    prepared = backend.prepare_model(model, ModelConfig(name="llama-3.2-1b-random", source=None, dtype=Dtype.bfloat16))

    def ours(ids, mask, n):
        return backend.execute(prepared, {"input_ids": ids, "attention_mask": mask}, max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, pad_token_id=128001)

    rows = []
    for batch in (1, 32):
        began = time.perf_counter()
        base = decode_rate(plain, batch, args.prompt_len, args.new_tokens, torch)
        fast = decode_rate(ours, batch, args.prompt_len, args.new_tokens, torch)
        floor = floor_steps * batch
        rows.append((batch, base, fast, floor, time.perf_counter() - began))

    print("\n| batch | plain generate() tok/s | rm_runner PyTorch CUDA tok/s | speedup | HBM floor tok/s | % of floor |")
    print("|---|---|---|---|---|---|")
    for batch, base, fast, floor, _ in rows:
        print(f"| {batch} | {base:.0f} | {fast:.0f} | {fast / base:.1f}x | {floor:.0f} | {100 * fast / floor:.0f}% |")
    batch1 = rows[0]
    ok = batch1[2] >= GOAL_FLOOR_FRACTION * batch1[3] and batch1[2] >= GOAL_SPEEDUP * batch1[1]
    print(f"\ngoal at batch 1 (>= {GOAL_FLOOR_FRACTION:.0%} of floor and >= {GOAL_SPEEDUP:.0f}x plain): "
          f"{'met' if ok else 'NOT met'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
