"""Decode speed: tlm's KV-cached `generate` against transformers' `generate` on the same weights.

Both run greedy decoding in one process, on the same exported checkpoint, with the same prompts,
dtype and thread count, producing exactly `new_tokens` tokens per sequence (no EOS). The contenders are
alternated run by run (benchmarks/alternate.py): the best of `repeats` each after one warm-up, and the median. Prints a table on stderr and one JSON object on the
last line of stdout.

    python benchmarks/decode_speed.py                      # tlm-26m, batch 1 and 8, CPU fp32
    python benchmarks/decode_speed.py --batch_sizes='[1]' --new_tokens=64
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import fire
import torch

from alternate import alternate
from tlm.checkpointing.model_dir import save_model_dir
from tlm.model.config import get_preset
from tlm.checkpointing.export import export_hf
from tlm.model.generate import generate
from tlm.model.transformer import TransformerLM


def main(
    preset: str = "tlm-26m",
    batch_sizes: tuple[int, ...] = (1, 8),
    prompt_len: int = 32,
    new_tokens: int = 128,
    repeats: int = 5,
    threads: int = 0,
    device: str = "cpu",
) -> dict:
    """Measure tokens/s of tlm and transformers greedy decoding; print a table and a JSON line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = TransformerLM(get_preset(preset)).eval().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(model, Path(tmp) / "tlm")
        export_hf(Path(tmp) / "tlm", Path(tmp) / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval().to(device)

    rows = []
    for batch in batch_sizes:
        prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len))
        tokens = batch * new_tokens

        def run_tlm() -> None:
            out = generate(model, prompts.tolist(), max_new_tokens=new_tokens)
            assert all(len(o) == new_tokens for o in out)

        def run_hf(cache: str | None) -> None:
            kwargs = {"cache_implementation": cache} if cache else {}
            with torch.inference_mode():
                out = hf.generate(
                    prompts.to(device), do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    pad_token_id=0, eos_token_id=None, **kwargs,
                )
            assert out.shape[1] == prompt_len + new_tokens

        timed = alternate({"tlm": run_tlm, "hf_dynamic": lambda: run_hf(None), "hf_static": lambda: run_hf("static")},
                          repeats, warmup=1)
        row = {"batch_size": batch, "load_average": timed["load_average"]}
        for name in ("tlm", "hf_dynamic", "hf_static"):
            row[f"{name}_tokens_per_s"] = tokens / timed[name]["fastest"]
            row[f"{name}_tokens_per_s_median"] = tokens / timed[name]["median"]
        row["ratio_vs_hf_dynamic"] = row["tlm_tokens_per_s"] / row["hf_dynamic_tokens_per_s"]
        row["ratio_vs_hf_static"] = row["tlm_tokens_per_s"] / row["hf_static_tokens_per_s"]
        rows.append(row)

    print(f"{'batch':>5} {'tlm tok/s':>10} {'hf dyn tok/s':>13} {'hf static':>10} {'tlm/hf dyn':>11} {'tlm/hf static':>14}", file=sys.stderr)
    for r in rows:
        print(
            f"{r['batch_size']:>5} {r['tlm_tokens_per_s']:>10.1f} {r['hf_dynamic_tokens_per_s']:>13.1f} "
            f"{r['hf_static_tokens_per_s']:>10.1f} {r['ratio_vs_hf_dynamic']:>11.2f} {r['ratio_vs_hf_static']:>14.2f}",
            file=sys.stderr,
        )
    result = {
        "preset": preset,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "dtype": "float32",
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "rows": [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
