"""The original trainer's step (MiniMind's train_pretrain.py on model_minimind.py) against tlm's, same run.

MiniMind's code is not part of tlm: point --minimind_dir at a checkout of jingyaogong/minimind (its model/
folder is imported from there). Its step is reproduced as train_pretrain.py does it: autocast, loss from the
model's forward (labels shifted inside), GradScaler (a no-op in bf16), clip 1.0, AdamW, zero_grad. The
model is configured as the 26M original (hidden 512, 8 layers, 8 heads, 2 KV heads, SwiGLU 1408, vocab
6400). tlm's side is its plain backend's step (tlm-26m) on the same batch and precision. The two are
alternated step by step in one process (benchmarks/alternate.py): fastest, median and the load average.

    python benchmarks/minimind_step.py --minimind_dir ../minimind --batch 32 --seq_len 512 --out minimind.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire
import torch

from alternate import alternate


def main(minimind_dir: str, batch: int = 32, seq_len: int = 512, steps: int = 10, warmup: int = 3,
         precision: str = "auto", compile_tlm: bool = False, out: str | None = None) -> dict:
    """Tokens/s of MiniMind's pretraining step and of tlm's, and their ratio."""
    sys.path.insert(0, str(Path(minimind_dir).resolve()))
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # their code, imported, not copied

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    config = MiniMindConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                            intermediate_size=1408, rms_norm_eps=1e-5, vocab_size=6400, flash_attn=True)
    model = MiniMindForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")
    ids = torch.randint(0, 6400, (batch, seq_len + 1), device=device)

    def step() -> torch.Tensor:
        with autocast:
            result = model(ids[:, :-1], labels=ids[:, :-1])  # train_pretrain.py passes labels = input ids
            loss = result.loss + (result.aux_loss if result.aux_loss is not None else 0)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    from tlm.model.transformer import TransformerLM
    from tlm.training.backends.plain import PlainBackend
    from tlm.training.distributed import DistInfo
    from tlm.training.config import load_config

    tlm_config = load_config(None, {"model.preset": "tlm-26m", "batch.micro_batch_size": batch, "data.seq_len": seq_len,
                                    "train.precision": "bf16" if precision == "bf16" else "fp32",
                                    "train.backend": "single", "train.compile": compile_tlm, "logging.wandb": "disabled"})
    tlm_model = TransformerLM(tlm_config.model)
    backend = PlainBackend(tlm_model, tlm_config, DistInfo(0, 1, 0, device))
    tlm_batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def tlm_step() -> None:
        backend.micro_step(tlm_batch, 1.0 / (batch * seq_len), last=True)
        backend.optimizer_step()

    timed = alternate({"minimind": step, "tlm": tlm_step}, steps, warmup,
                      sync=torch.cuda.synchronize if device.type == "cuda" else lambda: None)
    rows = {name: {"step_time_median": timed[name]["median"], "step_time_fastest": timed[name]["fastest"],
                   "tokens_per_s": batch * seq_len / timed[name]["median"],
                   "tokens_per_s_fastest": batch * seq_len / timed[name]["fastest"]} for name in ("minimind", "tlm")}
    rows["minimind"]["parameters"] = sum(p.numel() for p in model.parameters())
    rows["tlm"]["parameters"] = tlm_model.num_parameters()
    result = {"device": str(device), "batch": batch, "seq_len": seq_len, "precision": precision, **rows,
              "ratio_tlm_vs_minimind": rows["tlm"]["tokens_per_s"] / rows["minimind"]["tokens_per_s"],
              "ratio_fastest": rows["tlm"]["tokens_per_s_fastest"] / rows["minimind"]["tokens_per_s_fastest"],
              "load_average": timed["load_average"]}
    minimind, tlm_row = rows["minimind"], rows["tlm"]
    print(f"MiniMind step: {minimind['tokens_per_s']:,.0f} tokens/s; tlm: {tlm_row['tokens_per_s']:,.0f} tokens/s; "
          f"ratio {result['ratio_tlm_vs_minimind']:.2f}x", file=sys.stderr)
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
