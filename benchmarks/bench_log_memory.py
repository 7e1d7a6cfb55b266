"""Memory of the Hugging Face backend's certificate log over a long ``generate()``: flat, not growing.

    python benchmarks/bench_log_memory.py [--steps 10000] [--keep 4096] [--every 1000] [--out PATH]

A tiny Llama (2 layers, 4 query heads, head dim 4, random weights: no download) generates ``--steps``
tokens greedily through ``register("...", method="exact")`` with transformers' KV cache. Every
``--every`` steps the script records the number of head records the log keeps, the head-calls its
summaries cover, and the bytes the log holds (``tracemalloc``: the Python objects allocated by the
log's records, measured as the traced memory of a deep copy of the log). Before bounded logs, the
log grew by one record per head per step (72,000 records for 1,000 tokens of a 6-layer, 12-head model).

Prints a table and writes JSON (default benchmarks/results/bench_log_memory.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import platform
import time
import tracemalloc

import torch


def log_bytes(log) -> int:
    """Bytes of Python objects a deep copy of the log allocates (its records and summaries)."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    clone = copy.deepcopy(log)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del clone
    return used


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--keep", type=int, default=4096)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "bench_log_memory.json"))
    a = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnbound.integrations.huggingface import register

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=a.steps + 16)
    model = LlamaForCausalLM(cfg).eval()
    log = register("attnbound-log-memory", method="exact", eps=None, keep=a.keep)
    model.set_attn_implementation("attnbound-log-memory")
    rows, ids, past = [], torch.tensor([[1, 2, 3, 4]]), None
    t0 = time.perf_counter()
    with torch.no_grad():
        for step in range(1, a.steps + 1):
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            past, ids = res.past_key_values, res.logits[:, -1:].argmax(-1)
            if step % a.every == 0 or step == a.steps:
                rows.append({"step": step, "records_kept": len(log.records), "head_calls": log.head_calls,
                             "log_bytes": log_bytes(log), "seconds": time.perf_counter() - t0})
                print(f"step {step:6d}  records kept {len(log.records):6d}  head-calls {log.head_calls:8d}  "
                      f"log {rows[-1]['log_bytes'] / 2**20:7.2f} MiB  {rows[-1]['seconds']:7.1f} s", flush=True)
    doc = {"steps": a.steps, "keep": a.keep, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
           "rows": rows, "torch": torch.__version__, "machine": platform.machine()}
    path = pathlib.Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
