"""Post-norm, root-caused: tlm's post-norm model beside an independent post-LN reference built from torch's own
layers, trained by one loop on the same data, at the same learning rates, with and without warmup, and longer.

    python scripts/postln_reference.py run            # train what is missing (one process)
    python scripts/postln_reference.py run 0 2 & python scripts/postln_reference.py run 1 2   # two cores
    python scripts/postln_reference.py report         # docs/ablations/cpu/postln.md + postln.png from the curves

The reference: `nn.TransformerEncoder` of `nn.TransformerEncoderLayer(norm_first=False)` (post-LN, LayerNorm,
GELU, 4 x hidden feed-forward, torch's default init), a causal mask, learned absolute positions, the same width
(128), depth (4), heads (8), vocabulary and tied embeddings as the CPU-scale recipe (configs/ablations/cpu.yaml).
tlm's model is built from that recipe with `norm_position: post`, once with its current post-norm init
(LeCun scale) and once with the pre-norm init it used to share (N(0, 0.02), residual projections scaled by
1/sqrt(2 x layers)). All train with AdamW (betas 0.9/0.999, weight decay 0.01), clipping at 1.0, a cosine
schedule to 0.1 x lr after `warmup` linear steps, 16 x 128 tokens per step, bf16 autocast, seed 0. Each curve
(validation loss on 16 held-out batches every 150 steps, then 64 at the end) is kept as JSON Lines in
docs/ablations/cpu/postln/, from which `report` regenerates the table and the figure.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OUT = REPO / "docs" / "ablations" / "cpu"
CURVES = OUT / "postln"
STEPS, LONG = 900, 2700
# (model, lr, warmup steps, steps)
GRID = [(m, lr, w, STEPS) for m in ("torch-postln", "tlm-post") for lr in (6e-4, 3e-3) for w in (0, 60)]
GRID += [("tlm-post-old-init", lr, 60, STEPS) for lr in (6e-4, 3e-3)]
GRID += [(m, 6e-4, 60, LONG) for m in ("torch-postln", "tlm-post")]


class ReferencePostLN(nn.Module):
    """A post-LN causal language model from torch's own layers (nothing of tlm's model is used)."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.positions = nn.Embedding(seq_len, hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as tlm's
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        seq = ids.shape[1]
        x = self.embed(ids) + self.positions(torch.arange(seq, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(seq, device=ids.device)
        return self.head(self.encoder(x, mask=mask, is_causal=True))


def name_of(model: str, lr: float, warmup: int, steps: int) -> str:
    return f"{model}-lr{lr:g}-warmup{warmup}-steps{steps}"


def build(model: str, config) -> nn.Module:
    from tlm.model.transformer import TransformerLM

    mc = config.model.replace(norm_position="post")
    if model == "torch-postln":
        return ReferencePostLN(mc.vocab_size, mc.hidden_size, mc.num_hidden_layers, mc.num_attention_heads,
                               config.data.seq_len)
    net = TransformerLM(mc)
    if model == "tlm-post-old-init":  # the pre-norm init post-norm used to get
        std, residual = mc.initializer_range, mc.initializer_range / math.sqrt(2 * mc.num_hidden_layers)
        for n, module in net.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=residual if n.endswith(("o_proj", "down_proj")) else std)
        nn.init.normal_(net.embed_tokens.weight, std=std)
    return net


def loss_of(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(batch["input_ids"])
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())


@torch.no_grad()
def validate(net: nn.Module, rows, batches: int) -> float:
    from data_pipeline.stream import make_batch

    net.eval()
    losses = [loss_of(net, make_batch(rows, np.arange(i * 16, (i + 1) * 16))).item() for i in range(batches)]
    net.train()
    return float(np.mean(losses))


def train_one(model: str, lr: float, warmup: int, steps: int, rows, val) -> list[dict]:
    from data_pipeline.stream import TokenStream
    from tlm.training.config import load_config

    config = load_config(REPO / "configs" / "ablations" / "cpu.yaml")
    torch.manual_seed(0)
    net = build(model, config)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
    stream = TokenStream(rows, 16, seed=0, prefetch=2)
    records, start = [{"step": 0, "val_loss": validate(net, val, 16)}], time.perf_counter()
    for step in range(steps):
        if step < warmup:
            factor = (step + 1) / warmup
        else:
            progress = (step - warmup) / max(1, steps - warmup)
            factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        loss = loss_of(net, next(stream))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 150 == 0 or step + 1 == steps:
            final = step + 1 == steps
            records.append({"step": step + 1, "loss": loss.item(), "val_loss": validate(net, val, 64 if final else 16),
                            "final": final, "seconds": round(time.perf_counter() - start, 1)})
            print(f"{name_of(model, lr, warmup, steps)} step {step + 1}: val {records[-1]['val_loss']:.4f}", flush=True)
    stream.close()
    return records


def run(part: int = 0, parts: int = 1) -> None:
    """Train every missing curve of the grid (each written when done, so a rerun continues); with `parts`
    processes, this one takes every parts-th setting from `part`."""
    from data_pipeline.dataset import TokenRows
    from tlm.training.config import load_config
    from tlm.training.data import resolve_data

    torch.set_num_threads(1)
    prepared, _ = resolve_data(load_config(REPO / "configs" / "ablations" / "cpu.yaml"), True)
    rows, val = TokenRows(prepared, "train", verify="size"), TokenRows(prepared, "val", verify="size")
    CURVES.mkdir(parents=True, exist_ok=True)
    for model, lr, warmup, steps in GRID[part::parts]:
        path = CURVES / f"{name_of(model, lr, warmup, steps)}.jsonl"
        if path.is_file():
            continue
        records = train_one(model, lr, warmup, steps, rows, val)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(path)


def report(out: Path = OUT) -> Path:
    """postln.md and postln.png (in `out`) from the curves in docs/ablations/cpu/postln/."""
    from tlm.studies.plots import figure

    unigram = json.loads((OUT / "unigram.json").read_text())["unigram_loss"] if (OUT / "unigram.json").is_file() else None
    curves = {}
    for model, lr, warmup, steps in GRID:
        path = CURVES / f"{name_of(model, lr, warmup, steps)}.jsonl"
        if path.is_file():
            curves[(model, lr, warmup, steps)] = [json.loads(line) for line in path.read_text().splitlines()]
    lines = ["# Post-norm beside an independent post-LN reference", "",
             "Regenerate: `python scripts/postln_reference.py report` (the curves are in postln/; "
             "`python scripts/postln_reference.py run` trains the missing ones). What was trained and how: the "
             "docstring of scripts/postln_reference.py. One seed per setting (0).", ""]
    if unigram is not None:
        lines += [f"Unigram loss of the validation split: {unigram:.4f} nats (the plateau of a model that ignores "
                  "its context).", ""]
    lines += ["| model | lr | warmup | steps | final val loss | below unigram by |", "|---|---|---|---|---|---|"]
    for (model, lr, warmup, steps), records in curves.items():
        final = records[-1]["val_loss"]
        gap = f"{unigram - final:.3f}" if unigram is not None else "-"
        lines.append(f"| {model} | {lr:g} | {warmup} | {steps} | {final:.4f} | {gap} |")
    lines += ["", "Validation every 150 steps is on 16 held-out batches (32K tokens), the final one on 64 (131K): the last "
              "step of each curve is partly the other sample. The unigram loss is of the whole split, so a plateaued "
              "run's final loss sits a little above it.", ""]
    styles = {"torch-postln": "-", "tlm-post": "--", "tlm-post-old-init": ":"}
    title = "Post-norm: tlm beside torch's own post-LN layers (CPU scale, seed 0)"
    with figure(Path(out) / "postln.png", title, panels=2, size=(13, 4.8)) as axes:
        for ax, lr in zip(axes, (6e-4, 3e-3)):
            for (model, rate, warmup, steps), records in curves.items():
                if rate != lr:
                    continue
                xs = [r["step"] * 16 * 128 / 1e6 for r in records]
                ax.plot(xs, [r["val_loss"] for r in records], styles[model], marker="o", markersize=3,
                        label=f"{model}, warmup {warmup}{'' if steps == STEPS else f', {steps} steps'}")
            if unigram is not None:
                ax.axhline(unigram, color="grey", linewidth=0.8)
                ax.text(0.02, unigram + 0.03, "unigram loss", color="grey", fontsize=8,
                        transform=ax.get_yaxis_transform())
            ax.set_title(f"lr {lr:g}")
            ax.set_xlabel("tokens seen (millions)")
        axes[0].set_ylabel("validation loss (nats)")
    lines += ["![post-norm beside the reference](postln.png)", ""]
    path = Path(out) / "postln.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    command, numbers = (sys.argv[1] if len(sys.argv) > 1 else "run"), [int(a) for a in sys.argv[2:]]
    {"run": run, "report": report}[command](*numbers)
