"""The `tlm` commands: each parses its flags (fire hands them over) and calls one domain function.

Every command that produces figures prints them as one JSON object on the last line of stdout; logs go to
stderr. Docstrings are the help (`tlm COMMAND --help`): a summary, then the flags under "Args:".
"""

from __future__ import annotations

import json
import sys
from typing import Any


def emit(result: dict[str, Any]) -> None:
    """Print the command's figures as the last line of stdout."""
    print(json.dumps(result), flush=True)


def presets() -> None:
    """List the model presets with their parameter counts and training FLOPs per token (JSON on the last line)."""
    from tlm.model.flops import preset_table

    table = preset_table()
    print(f"{'preset':18s} {'parameters':>14s} {'layers':>6s} {'hidden':>6s} {'heads q/kv':>10s} "
          f"{'GFLOPs/token (train, seq 512)':>30s}", file=sys.stderr)
    for name, row in table.items():
        print(f"{name:18s} {row['num_parameters']:>14,d} {row['num_hidden_layers']:>6d} {row['hidden_size']:>6d} "
              f"{row['num_attention_heads']:>5d}/{row['num_key_value_heads']:<4d} "
              f"{row['train_flops_per_token_at_512'] / 1e9:>30.3f}", file=sys.stderr)
    emit(table)


def plan(preset: str | None = None, config: str | list[str] | None = None, gpus: int = 1, gpu_mem: Any = "80GiB",
         seq_len: int | None = None, micro_batch: int | None = None, loss_chunk: int | None = None,
         margin: float = 0.1, max_config_mb: float = 1.0, **overrides: Any) -> None:
    """Per-GPU memory of each backend / ZeRO stage / checkpointing setting, the cheapest that fits, and which backend
    tlm recommends for which model size.

    For every setting: parameters, gradients, optimizer states and activations per GPU and whether they fit (a
    table; JSON on the last line).

    Model states follow DeepSpeed's own estimators' accounting (equal to them at ZeRO-2 and ZeRO-3); activations
    are counted tensor by tensor for a bf16 Llama block; the formulas are in tlm/training/plan.py. The cheapest is the
    least recomputation (checkpointing none, selective, full), then the least sharding (single/DDP, ZeRO-0, 1, 2,
    FSDP2, ZeRO-3): each costs time in every step (docs/performance.md). With --config, the recipe's own setting is
    compared with it.

    Args:
        preset: a model preset (tlm presets lists them); or give --config.
        config: a training recipe: its model, seq_len, micro-batch and loss_chunk (flags override them); several
            compose as in tlm train.
        gpus: GPUs in all (ZeRO and FSDP2 shard over them).
        gpu_mem: memory of one GPU: 80GiB, 141GB, ...
        seq_len: tokens per sequence (default: the recipe's, else 512).
        micro_batch: sequences per GPU per forward (default: the recipe's, else 8).
        loss_chunk: tokens per chunk of the chunked loss (0: all logits at once).
        margin: added to every total for fragmentation and communication buffers (0.1 = 10%).
        max_config_mb: the most a config file may hold, in MiB.
        overrides: --SECTION.KEY=VALUE on the recipe, as in tlm train (e.g. --train.zero_stage=2); needs --config.
    """
    from tlm.inference import check_int
    from tlm.model.config import get_preset
    from tlm_base.errors import ConfigError
    from tlm.training.plan import (compare_with_recipe, parse_bytes, plan_rows, plan_table, recommend, row_line,
                                   size_guide, size_guide_line)

    check_int("--gpus", gpus, low=1)
    capacity = parse_bytes(gpu_mem)
    if config is not None:
        from tlm.training.config import load_config

        recipe = load_config(config, {**({"model.preset": preset} if preset else {}), **overrides}, max_config_mb)
        model = recipe.model
        seq_len = seq_len or recipe.data.seq_len
        micro_batch = micro_batch or recipe.batch.micro_batch_size
        loss_chunk = recipe.train.loss_chunk if loss_chunk is None else loss_chunk
    else:
        if overrides:
            raise ConfigError(f"tlm plan: --{next(iter(overrides))} sets a recipe key; give the recipe with --config")
        model = get_preset(preset or "tlm-26m")
    optimizer = recipe.optim.name if config is not None else "adamw"
    seq_len, micro_batch, loss_chunk = seq_len or 512, micro_batch or 8, loss_chunk or 0
    for name, value in (("--seq_len", seq_len), ("--micro_batch", micro_batch)):
        check_int(name, value, low=1)
    rows = plan_rows(model, gpus, capacity, micro_batch, seq_len, loss_chunk, margin, optimizer)
    best = recommend(rows)
    print(f"{gpus} GPU(s) of {capacity / 2**30:.1f} GiB, micro-batch {micro_batch} x {seq_len} tokens, loss chunk "
          f"{loss_chunk or 'off'}{'; Muon: DeepSpeed ZeRO 1-3 left out (refused with it)' if optimizer == 'muon' else ''}"
          "; GiB per GPU:", file=sys.stderr)
    print(f"{'setting':44s} {'params':>7s} {'grads':>7s} {'optim':>7s} {'activ.':>7s} {'total':>7s}  fits",
          file=sys.stderr)
    g = 2**30
    for row in rows:
        print(f"{row.name:44s} {row.parameters / g:7.2f} {row.gradients / g:7.2f} {row.optimizer_states / g:7.2f} "
              f"{row.activations / g:7.2f} {row.total / g:7.2f}  {'yes' if row.fits else 'no'}", file=sys.stderr)
    print(f"recommended: {row_line(best)}" if best else "nothing fits: more GPUs, a smaller micro-batch or "
          "--loss_chunk", file=sys.stderr)
    print(size_guide_line(gpus, capacity, margin), file=sys.stderr)
    result: dict[str, Any] = {}
    if config is not None:
        mine, line = compare_with_recipe(rows, recipe.train.backend, recipe.train.zero_stage,
                                         recipe.train.activation_checkpointing, gpus)
        print(line, file=sys.stderr)
        result = {"recipe_setting": mine.name, "recipe_setting_fits": mine.fits}
    emit({**result, "gpus": gpus, "gpu_bytes": capacity, "seq_len": seq_len, "micro_batch": micro_batch, "loss_chunk": loss_chunk,
          "rows": plan_table(rows), "recommended": best.name if best else None,
          "by_model_size": size_guide(gpus, capacity, margin)})


def init(out: str, preset: str = "tlm-26m", tokenizer: str | None = None, seed: int = 0, overwrite: bool = False,
         **overrides: Any) -> None:
    """Write a freshly initialised model directory and print its parameter count.

    Args:
        out: the model directory to create.
        preset: a named preset (tlm presets lists them), e.g. tlm-26m (the 26M baseline) or debug.
        tokenizer: a folder holding tokenizer.json; its files are copied in and its special token ids
            (bos/eos/pad) fill the config unless given.
        seed: seed of the weight initialisation.
        overwrite: replace an existing model directory at OUT (or a folder holding other files: they are deleted).
        overrides: any model config field as --FIELD=VALUE, e.g. --num_key_value_heads=1 --norm=layernorm
            --norm_position=post --position_embedding=nope --mlp=silu --rope_scaling=yarn:4:512.
    """
    from tlm.checkpointing.model_dir import init_model_dir
    from tlm.inference import check_int

    check_int("--seed", seed, 0, 2**64)  # what torch.manual_seed takes
    emit(init_model_dir(out, preset, tokenizer, seed, overwrite, overrides))


def generate(checkpoint: str, prompt: Any = None, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 50,
             top_p: float = 1.0, seed: int = 0, rope_scaling: Any = None, tokenizer: str | None = None,
             prompt_ids: Any = None, device: str = "auto", dtype: str = "auto") -> None:
    """Continue one or more prompts with a KV-cached decoder; print the texts, then the figures.

    Args:
        checkpoint: a model folder (RUN/checkpoints/step-N/model), a checkpoint (RUN/checkpoints/step-N), or a run
            folder (RUN: the model of its newest complete checkpoint).
        prompt: the text to continue, or a JSON list of texts for a batch.
        max_new_tokens: most tokens generated per prompt (fewer when EOS comes first); prompt plus these must
            fit the model's context.
        temperature: the softmax temperature of sampling (default 0.8, as litgpt's); 0 = greedy, which repeats
            itself on a small model ("and the other, and the other, ...").
        top_k: sample among the k most likely tokens only (default 50; 0 = all).
        top_p: sample from the smallest set of tokens whose probability reaches p (1.0 = all).
        seed: seed of the sampler.
        rope_scaling: switch YaRN on at inference, e.g. yarn:4:512 (factor 4 over a model trained at 512
            tokens) or a JSON dict; none turns a stored YaRN off.
        tokenizer: a tokenizer folder, when the checkpoint holds none.
        prompt_ids: token ids instead of text (a list, or a list of lists for a batch).
        device: auto (CUDA when available), cpu, cuda, cuda:N.
        dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16.
    """
    from tlm.checkpointing.lineage import resolve_model_dir
    from tlm.inference import complete

    result = complete(resolve_model_dir(checkpoint), prompt, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, rope_scaling,
                      tokenizer, device, dtype)
    prompts = result.pop("prompts")
    if result["completions"] is not None:
        for i, (text, completion) in enumerate(zip(prompts, result["completions"])):
            if len(prompts) > 1:  # a line between the texts of a batch, which would otherwise run together
                print(f"----- {i + 1}/{len(prompts)} -----")
            print(text + completion)
    emit(result)


def tokenizer(out: str, data: Any = None, vocab_size: int = 6400, text_field: str = "text", sample_by: str = "document",
              on_error: str = "raise", max_chars: int | None = None, min_frequency: int = 2,
              overwrite: bool = False, from_dir: str | None = None) -> None:
    """Train a byte-level BPE tokenizer (tokenizers) from a streamed source, or import one (--from DIR).

    --from DIR takes another project's tokenizer (any folder with a tokenizer.json, e.g. the original MiniMind
    tokenizer) so that a recipe can be reproduced with its own tokenizer: it is checked (it loads; it has an
    end-of-text token to separate documents: <|endoftext|>, else its config's eos_token) and copied to OUT;
    the model's bos / eos / pad ids follow it.

    Special tokens: <|endoftext|> (0: document separator, EOS, padding), <|im_start|> (1) and <|im_end|> (2)
    (ChatML turn markers for a later chat corpus). transformers' AutoTokenizer loads the result.

    Args:
        out: the folder to write tokenizer.json, tokenizer_config.json, special_tokens_map.json to.
        data: files, folders, globs or a Hugging Face dataset name (a list for several); JSONL, JSON, Parquet,
            CSV/TSV or text, optionally .gz/.xz/.zst/.bz2. Default: the bundled Gutenberg demo corpus.
        vocab_size: size of the vocabulary, special tokens and the 256 bytes included.
        text_field: the field (JSON) or column (Parquet, CSV) holding the text.
        sample_by: for text files: document (the whole file), paragraph or line.
        on_error: raise (stop at the first bad record, naming file and line) or skip (count it).
        max_chars: train on the first MAX_CHARS characters only.
        min_frequency: smallest count for a pair to be merged.
        overwrite: replace an existing tokenizer in OUT.
        from_dir: (--from) import the tokenizer in this folder instead of training one.
    """
    if from_dir is not None:
        from data_pipeline.tokenizer import import_tokenizer

        emit(import_tokenizer(from_dir, out, overwrite))
        return
    from data_pipeline.tokenizer import train_and_save
    from tlm.inference import check_int

    check_int("--vocab_size", vocab_size, low=259)
    emit(train_and_save(out, data, vocab_size, text_field, sample_by, on_error, max_chars, min_frequency, overwrite,
                        progress=sys.stderr.isatty()))


def prepare(out: str, data: Any = None, tokenizer: str | None = None, seq_len: int = 512, pack: bool = True,
            val: float | int | None = None, val_data: Any = None, text_field: str = "text", sample_by: str = "document",
            on_error: str = "raise", hf_split: str = "train", hf_config: str | None = None,
            max_tokens: int | None = None, seed: int = 0, shard_mb: float = 256.0, num_proc: int | None = None, num_workers: int = 1, worker_index: int = 0, merge: bool = False,
            overwrite: bool = False, max_line_mb: float = 128.0, max_document_mb: float = 1024.0) -> None:
    """Tokenize, pack and shard a corpus into Arrow files plus manifest.json.

    Rerunning an interrupted prepare with the same flags resumes it; the output is byte-identical to an
    uninterrupted run. Tokenizing uses every core (--num_proc). For a corpus too large for one machine run N workers (--num_workers N --worker_index I,
    e.g. a Slurm job array), then once --merge.

    Args:
        out: the output folder.
        data: files, folders, globs or a Hugging Face dataset name (ORG/NAME or hf:NAME, streamed; hf:FOLDER
            streams a local folder of Parquet / JSON files the same way) (a list for several); JSONL, JSON,
            Parquet, CSV/TSV or text, optionally .gz/.xz/.zst/.bz2. Default: the bundled Gutenberg demo corpus,
            with the bundled validation books as --val_data.
        tokenizer: a tokenizer folder (from tlm tokenizer).
        seq_len: tokens a training row predicts; rows hold seq_len + 1 tokens.
        pack: pack documents, separated by <|endoftext|>, into full rows; --nopack: one document per row,
            truncated and padded, with a loss mask.
        val: documents held out for validation: a fraction (0.01) or a count (100, one worker only).
            Default: 0.01, or 0 when --val_data is given.
        val_data: a separate validation source instead of held-out documents.
        text_field: the field (JSON) or column (Parquet, CSV) holding the text.
        sample_by: for text files: document (the whole file), paragraph or line.
        on_error: raise (stop at the first bad record, naming file and line) or skip (count and report it in
            the manifest).
        hf_split: the split of a Hugging Face dataset.
        hf_config: the configuration (subset) of a Hugging Face dataset (e.g. sample-10BT).
        max_tokens: stop once the train split holds this many tokens (rounded up to whole rows); with a hub dataset
            (streamed, never downloaded whole) the rest is never read. Resumable like any other run.
        seed: seed of the validation hold-out.
        shard_mb: size of one shard file.
        num_proc: processes that tokenize (default: the cores available to this process). The output is
            byte-identical for every count, and an interrupted run may resume with another.
        num_workers: split the sources across this many workers (separate commands, e.g. on several nodes).
        worker_index: which worker this is (0-based).
        merge: merge the finished workers' outputs in OUT into one manifest.
        overwrite: replace a prepared dataset in OUT (only once the new one is whole: a kill keeps the old one), or
            start an interrupted prepare of other inputs afresh.
        max_line_mb: the longest line parsed whole (a JSON Lines record, a CSV row, a whole JSON array file), in
            MiB; a longer one is refused (or skipped with --on_error skip).
        max_document_mb: the longest document, in MiB of characters (a text file with --sample_by document is one
            document); a longer one is refused (or, with --on_error skip, cut there).
    """
    from data_pipeline.prepare import prepare_command

    emit(prepare_command(out, data, tokenizer, val, val_data, merge, overwrite, progress=sys.stderr.isatty(),
                         seq_len=seq_len, pack=pack, text_field=text_field, sample_by=sample_by, on_error=on_error,
                         hf_split=hf_split, hf_config=hf_config, max_tokens=max_tokens, seed=seed, shard_mb=shard_mb,
                         num_workers=num_workers,
                         worker_index=worker_index, num_proc=num_proc,
                         max_line_mb=max_line_mb, max_document_mb=max_document_mb))


def train(config: str | list[str] | None = None, show_config: bool = False, max_config_mb: float = 1.0,
          **overrides: Any) -> None:
    """Train a model: one process, or every rank under torchrun / deepspeed / srun.

    Without --config: configs/tlm-26m.yaml (the 26M baseline) when a GPU is present, otherwise
    configs/cpu-demo.yaml (about five minutes on 2 CPU cores), on the bundled corpus, which is tokenized and
    prepared on first use. A rerun resumes from the newest complete checkpoint. Ctrl-C checkpoints and exits
    with status 130.

    Args:
        config: a YAML recipe, or the name of a bundled one (debug, cpu-demo, tlm-26m, ...; see configs/). Several --config compose key by key: a later file overrides the
            keys an earlier one set (a key it does not give keeps the earlier value); the run is named after the
            last file; the --SECTION.KEY flags come last. Recipes are read strictly: UTF-8, no key twice, no YAML
            aliases, at most --max_config_mb each.
        show_config: print the resolved config (the recipe with every override and default) as YAML and exit.
        max_config_mb: the most a config file may hold, in MiB (a larger one is refused; 1 MiB is some thousand
            times a recipe).
        overrides: any config key as --SECTION.KEY=VALUE, e.g. --train.max_steps=100 --batch.micro_batch_size=8
            --train.backend=fsdp2 --model.num_key_value_heads=1 --checkpoint.resume=none --logging.wandb=offline.
    """
    if show_config:
        from tlm.training.config import load_config, to_yaml
        from tlm.training.run import default_recipe

        print(to_yaml(load_config(config or str(default_recipe()), overrides, max_config_mb)), end="")
        return
    from tlm.training.run import run_training

    status = run_training(config, overrides, max_config_mb)
    if status:
        sys.exit(status)


def ablate(study: str, scale: str = "cpu", seeds: int = 3, out: str | None = None, report: str | None = None,
           slurm: bool = False, sbatch_args: str = "", **overrides: Any) -> None:
    """Run an ablation study (each variant x seeds), then write its plots and report.

    Studies: lr, batch, norm, norm_position, position, mlp, kv_heads, yarn, documents, or all; report only regenerates
    the report from the runs' files. Finished runs are not trained again; several processes started on the
    same --out share the runs (each is claimed with a file lock).

    Args:
        study: lr | batch | norm | norm_position | position | mlp | kv_heads | yarn | documents | all | report.
        scale: cpu (configs/ablations/cpu.yaml, minutes per run on a CPU) or h200 (the 26M recipe).
        seeds: seeds per variant (each seed fixes the initial weights and the data order).
        out: the folder of the runs (default runs/ablations/SCALE); runs go in OUT/runs.
        report: where report.md and the PNGs go (default OUT/report).
        slurm: submit the unfinished runs as one job array (slurm/ablate.sbatch) instead of running here.
        sbatch_args: extra sbatch flags with --slurm, e.g. --sbatch_args=--partition=gpu.
        overrides: --SECTION.KEY=VALUE applied to every run, e.g. --data.source=corpus.jsonl.
    """
    from tlm.studies.ablate import run_studies

    emit(run_studies(study, scale, seeds, out, report, slurm, sbatch_args, overrides))


def bench(preset: str = "tlm-26m", backend: str = "single", batch: int = 32, seq_len: int = 512,
          precision: str = "auto", steps: int = 10, warmup: int = 3, compile: bool = False,
          fused_adamw: bool | None = None, loss_chunk: int = 0, zero_stage: int = 1, matrix: bool = False,
          out: str | None = None) -> None:
    """Training speed on synthetic tokens: tokens/s, step time, MFU and peak memory (a table; JSON last).

    MFU is given against the device's datasheet peak (989 TFLOP/s dense bf16 for H100/H200) and against the
    matmul rate measured on the same device in the same run (docs/training.md has the FLOPs formula).

    Args:
        preset: model preset.
        backend: single | deepspeed | fsdp2 (one process).
        batch: sequences per step.
        seq_len: tokens per sequence.
        precision: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32.
        steps: timed steps (after warmup).
        warmup: untimed steps first (compilation happens there).
        compile: torch.compile the model.
        fused_adamw: torch's fused AdamW (default: on CUDA).
        loss_chunk: chunked cross-entropy, tokens per chunk (0 = off).
        zero_stage: DeepSpeed ZeRO stage with --backend deepspeed.
        matrix: run the whole matrix instead (eager, compiled, compiled + chunked loss, ZeRO-1, ZeRO-2, FSDP2)
            with the same preset, batch and precision.
        out: also write the JSON to this file.
    """
    from tlm.studies.bench import bench_command

    emit(bench_command(preset, backend, batch, seq_len, precision, steps, warmup, compile, fused_adamw, loss_chunk,
                       zero_stage, matrix, out))


def eval(checkpoint: str, data: Any, seq_len: int | None = None, split: str | None = None, batch_size: int = 8,
         max_batches: int | None = None, text_field: str = "text", device: str = "auto") -> None:
    """Loss, perplexity and bits per byte of a model (JSON on the last line).

    Bits per byte (the loss of the evaluated tokens over the UTF-8 bytes of their text, in bits) does not depend
    on the tokenizer: evaluate a tlm model and any other causal LM on the same raw text and compare it.

    Args:
        checkpoint: a tlm model folder (RUN/checkpoints/step-N/model), a checkpoint (RUN/checkpoints/step-N), a run
            folder (RUN: its newest complete checkpoint), or a transformers model folder (e.g. from `tlm export`,
            or any causal LM saved locally), scored with its own tokenizer.
        data: a prepared folder (its val split, else train), or raw text (files, folders, globs), tokenized with
            the checkpoint's tokenizer and packed into rows of seq_len + 1.
        seq_len: row length for raw text (default: the length the model was trained at, else 512; a prepared
            folder has its own).
        split: the split of a prepared folder.
        batch_size: sequences per forward.
        max_batches: evaluate at most this many batches.
        text_field: the field or column of raw JSON / Parquet / CSV holding the text.
        device: auto, cpu, cuda.
    """
    import logging

    from tlm.checkpointing.lineage import resolve_model_dir
    from tlm.inference import check_int, resolve_device
    from tlm.training.evaluate import evaluate_checkpoint

    if seq_len is not None:
        check_int("--seq_len", seq_len, low=1)
    check_int("--batch_size", batch_size, low=1)
    if max_batches is not None:
        check_int("--max_batches", max_batches, low=1)
    checkpoint = resolve_model_dir(checkpoint)
    result = evaluate_checkpoint(checkpoint, data, seq_len=seq_len, split=split, batch_size=batch_size,
                                 max_batches=max_batches, device=resolve_device(device), text_field=text_field)
    bpb = f", {result['bits_per_byte']:.4f} bits/byte" if result["bits_per_byte"] is not None else ""
    logging.getLogger("tlm").info("%s: loss %.4f, perplexity %.2f%s over %d tokens", checkpoint, result["loss"],
                                  result["perplexity"], bpb, result["tokens"])
    emit(result)


def export(checkpoint: str, out: str, dtype: str = "float32", overwrite: bool = False) -> None:
    """Write a Hugging Face LlamaForCausalLM folder (config.json, safetensors, tokenizer files).

    Args:
        checkpoint: a model folder (RUN/checkpoints/step-N/model), a checkpoint (RUN/checkpoints/step-N), or a run
            folder (RUN: the model of its newest complete checkpoint).
        out: the folder to write; AutoModelForCausalLM.from_pretrained(OUT) loads it. An earlier export there is
            replaced whole (built beside it, then swapped in).
        dtype: weight dtype in the export: float32, bfloat16 or float16.
        overwrite: replace OUT even when it holds files an export does not write (they are deleted).
    """
    import logging

    from tlm.checkpointing.export import export_hf
    from tlm.checkpointing.lineage import resolve_model_dir

    checkpoint = resolve_model_dir(checkpoint)
    path = export_hf(checkpoint, out, dtype=dtype, overwrite=overwrite)
    files = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    logging.getLogger("tlm").info("exported %s -> %s (%s)", checkpoint, out, ", ".join(files))
    emit({"out": str(path), "files": files, "architecture": "LlamaForCausalLM"})


def plot(*runs: str, out: str = "curves.png") -> None:
    """Overlay runs' curves into one PNG: loss (training, and validation dashed) and learning rate against tokens.

    Each RUN is a run folder (runs/NAME, holding metrics.jsonl) or a metrics.jsonl. The x axis is tokens seen, so
    runs of other batch sizes, world sizes or data mixtures line up; a run resumed or rolled back shows its line as
    it stands (the steps it redid replace the ones before). A training run also keeps its own RUN/curves.png,
    redrawn at each evaluation (logging.curves). Needs no terminal, display or network.

    Args:
        runs: run folders or metrics.jsonl files, one or more.
        out: the PNG to write (replaced whole; default curves.png here).
    """
    from pathlib import Path

    from tlm.training.curves import plot_runs
    from tlm_base.errors import ConfigError
    from tlm_base.fileio import check_output_folder

    if not runs:
        raise ConfigError("tlm plot needs at least one run folder: tlm plot runs/NAME [runs/OTHER ...] --out FILE.png")
    target = Path(str(out))
    if target.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name ending in .png")
    if target.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the figure is a PNG; give a name ending in .png")
    check_output_folder(target.parent if str(target.parent) else ".", "--out's folder", "--out")
    drawn = plot_runs([str(r) for r in runs], target)
    print(f"wrote {target} ({len(drawn)} run{'s' if len(drawn) > 1 else ''})", file=sys.stderr)
    emit({"out": str(target), "runs": drawn})


COMMANDS = {"train": train, "prepare": prepare, "tokenizer": tokenizer, "eval": eval, "generate": generate,
            "init": init, "export": export, "presets": presets, "plan": plan, "ablate": ablate, "bench": bench,
            "plot": plot}
