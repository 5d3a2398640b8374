"""Training speed: tlm's training step against a plain loop over transformers' LlamaForCausalLM of the same
shape, batch and precision, side by side in one process.

Both sides do the same work per step: forward, fp32 cross-entropy over all targets, backward, gradient
clipping at 1.0 and an AdamW step, with fp32 weights and bf16 autocast when --precision=bf16. tlm's side
goes through its real backend (`PlainBackend.micro_step` / `optimizer_step`). Reports tokens/s, step time
(the two alternated step by step: fastest and median over `steps` after `warmup`, with the load average), MFU when the device has a stated peak, and peak memory (CUDA) or the
process's peak RSS (CPU). Prints a table on stderr and one JSON object on the last line of stdout.

    python benchmarks/train_speed.py                                   # tlm-26m, 4 x 256, bf16, CPU
    python benchmarks/train_speed.py --batch=32 --seq=512 --steps=20   # on a GPU
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
from pathlib import Path

import fire
import torch
import torch.nn.functional as F

from alternate import alternate
from tlm.training.backends.plain import PlainBackend
from tlm.training.distributed import DistInfo
from tlm.checkpointing.model_dir import save_model_dir
from tlm.model.config import get_preset
from tlm.checkpointing.export import export_hf
from tlm.model.flops import flops_per_token, peak_flops
from tlm.model.transformer import TransformerLM
from tlm.training.config import load_config


def main(preset: str = "tlm-26m", batch: int = 4, seq: int = 256, steps: int = 5, warmup: int = 2,
         precision: str = "bf16", device: str = "auto") -> dict:
    """Median step time and tokens/s of tlm and of transformers' Llama on the same batch."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    torch.manual_seed(0)
    config = load_config(None, {"model.preset": preset, "train.precision": precision, "train.backend": "single",
                                "batch.micro_batch_size": batch, "data.seq_len": seq})
    model = TransformerLM(get_preset(preset))
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(model, Path(tmp) / "tlm")
        export_hf(Path(tmp) / "tlm", Path(tmp) / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).to(dev).train()
    backend = PlainBackend(model, config, DistInfo(0, 1, 0, dev))
    ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1))
    tlm_batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    scale = 1.0 / (batch * seq)

    def tlm_step() -> None:
        backend.micro_step(tlm_batch, scale, last=True)
        backend.optimizer_step()

    hf_opt = torch.optim.AdamW(hf.parameters(), lr=5e-4, weight_decay=0.01)
    hf_ids = ids.to(dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def hf_step() -> None:
        with autocast:
            logits = hf(hf_ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), hf_ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    timed = alternate({"tlm": tlm_step, "transformers": hf_step}, steps, warmup,
                      sync=torch.cuda.synchronize if dev.type == "cuda" else lambda: None)
    results = {}
    for name in ("tlm", "transformers"):
        fastest, median = timed[name]["fastest"], timed[name]["median"]
        results[name] = {"step_time_fastest": round(fastest, 4), "step_time_median": round(median, 4),
                         "tokens_per_s": round(batch * seq / median, 1),
                         "tokens_per_s_fastest": round(batch * seq / fastest, 1)}
    flops = flops_per_token(model.config, seq)
    peak = peak_flops(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    for r in results.values():
        r["mfu"] = round(flops * r["tokens_per_s"] / peak, 4) if peak else None
    result = {
        "preset": preset, "batch": batch, "seq": seq, "precision": precision, "device": str(dev),
        "threads": torch.get_num_threads(), "flops_per_token": flops, **results,
        "ratio_tlm_vs_transformers": round(results["tlm"]["tokens_per_s"] / results["transformers"]["tokens_per_s"], 3),
        "ratio_fastest": round(results["tlm"]["tokens_per_s_fastest"] / results["transformers"]["tokens_per_s_fastest"], 3),
        "load_average": timed["load_average"],
        "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    for name in ("tlm", "transformers"):
        r = results[name]
        print(f"{name:>13}: median {r['step_time_median'] * 1000:8.1f} ms/step, fastest {r['step_time_fastest'] * 1000:8.1f}"
              f" {r['tokens_per_s']:>10,.0f} tokens/s" + (f"  MFU {r['mfu']:.1%}" if r["mfu"] else ""), file=sys.stderr)
    print(f"tlm / transformers: {result['ratio_tlm_vs_transformers']:.3f}x median, {result['ratio_fastest']:.3f}x fastest; "
          f"load average {timed['load_average']}", file=sys.stderr)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
