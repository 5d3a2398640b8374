"""The `tlm` command line, built with fire.

Every command that produces figures prints them as one JSON object on the last line of stdout, so that
scripts can read them; logs and progress go to stderr. Errors in the user's input print one line
(`tlm: error: ...`) and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import fire
import torch

from tlm.errors import CheckpointError, ConfigError, TLMError
from tlm.fileio import disk_full, is_disk_full

log = logging.getLogger("tlm")


def emit(result: dict[str, Any]) -> None:
    """Print the command's figures as the last line of stdout."""
    print(json.dumps(result), flush=True)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device (use auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in choices:
        raise ConfigError(f"--dtype must be auto or one of {', '.join(choices)}, got {dtype!r}")
    return choices[dtype]


def check_int(flag: str, value: Any, low: int | None = None) -> None:
    """Refuse a flag value that is not an int (a bool, 1e8, a string) or is below `low`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{flag} must be a whole number, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{flag} must be at least {low}, got {value}")


def check_number(flag: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    """Refuse a flag value that is not a finite number in [low, high] ((low, high] with low_open)."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number, got {value!r}")
    if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
        span = f"in {'(' if low_open else '['}{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise ConfigError(f"{flag} must be {span}, got {value}")


def check_context(config: Any, trained: int | None, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation longer than the model's context (its KV cache is allocated for all of it); warn past
    the length it was trained at, naming YaRN, which stretches RoPE to longer contexts."""
    total = prompt_tokens + max_new_tokens
    if total > config.max_position_embeddings:
        raise ConfigError(f"prompt ({prompt_tokens} tokens) + --max-new-tokens ({max_new_tokens}) = {total} exceeds the "
                          f"model's context of {config.max_position_embeddings} (max_position_embeddings); lower "
                          "--max-new-tokens")
    scaling = config.rope_scaling
    usable = int(scaling["factor"] * scaling["original_max_position_embeddings"]) if scaling else trained
    if usable and total > usable and config.position_embedding == "rope":
        if scaling:
            log.warning("generating up to %d positions, past the %d YaRN stretches this model to: expect worse text",
                        total, usable)
        else:
            log.warning("generating up to %d positions, past the %d this model was trained at: expect worse text; "
                        "YaRN can stretch RoPE: --rope-scaling yarn:%d:%d", total, usable,
                        max(2, -(-total // usable)), usable)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class CLI:
    """tlm: pretrain and ablate small Llama-style language models.

    Model directories (written by `tlm init`, later by `tlm train`) are what the other commands read.
    Run `tlm COMMAND --help` for a command's flags.
    """

    def presets(self) -> None:
        """List the model presets with their parameter counts (JSON on the last line)."""
        from tlm.config import PRESETS, get_preset
        from tlm.model import TransformerLM

        table = {}
        for name in PRESETS:
            config = get_preset(name)
            with torch.device("meta"):
                table[name] = {"num_parameters": TransformerLM(config).num_parameters(), **config.to_dict()}
            print(f"{name:10s} {table[name]['num_parameters']:>12,d} parameters", file=sys.stderr)
        emit(table)

    def init(
        self,
        out: str,
        preset: str = "tlm-26m",
        tokenizer: str | None = None,
        seed: int = 0,
        overwrite: bool = False,
        **overrides: Any,
    ) -> None:
        """Write a freshly initialised model directory and print its parameter count.

        Args:
            out: the model directory to create.
            preset: a named preset (`tlm presets` lists them): tlm-26m (the 26M baseline) or debug.
            tokenizer: a folder holding tokenizer.json; its files are copied in and its special token
                ids (bos/eos/pad) fill the config unless given.
            seed: seed of the weight initialisation.
            overwrite: replace an existing model directory at OUT.
            overrides: any model config field, e.g. --num_key_value_heads=1 --norm=layernorm
                --norm_position=post --position_embedding=nope --mlp=silu
                --rope_scaling='{"factor": 4, "original_max_position_embeddings": 512}'.
        """
        from tlm.checkpoint import CONFIG_NAME, save_model_dir
        from tlm.config import get_preset, parse_rope_scaling
        from tlm.model import TransformerLM
        from tlm.tokenizer import load_tokenizer, special_token_ids

        overrides = {k.replace("-", "_"): v for k, v in overrides.items()}
        if "rope_scaling" in overrides:
            overrides["rope_scaling"] = parse_rope_scaling(overrides["rope_scaling"])
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
            for key, value in special_token_ids(tokenizer, tok).items():
                overrides.setdefault(key, value)
        config = get_preset(preset, **overrides)
        if tokenizer is not None and tok.get_vocab_size() > config.vocab_size:
            raise ConfigError(
                f"tokenizer '{tokenizer}' has {tok.get_vocab_size()} tokens but vocab_size is {config.vocab_size}"
            )
        out_path = Path(out)
        if (out_path / CONFIG_NAME).exists() and not overwrite:
            raise CheckpointError(f"'{out}' already holds a model; pass --overwrite to replace it")
        torch.manual_seed(seed)
        model = TransformerLM(config)
        save_model_dir(model, out_path, tokenizer_dir=tokenizer, extra={"init": {"preset": preset, "seed": seed}})
        log.info("wrote %s: preset %s, %s parameters", out, preset, f"{model.num_parameters():,}")
        emit({"out": str(out_path), "preset": preset, "num_parameters": model.num_parameters(), "config": config.to_dict()})

    def generate(
        self,
        checkpoint: str,
        prompt: Any = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        rope_scaling: Any = None,
        tokenizer: str | None = None,
        prompt_ids: Any = None,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        """Continue one or more prompts with a KV-cached decoder.

        Args:
            checkpoint: a tlm model directory.
            prompt: the text to continue, or a list of texts for a batch: --prompt='["a", "b"]'.
            max_new_tokens: most tokens generated per prompt (fewer when EOS comes first).
            temperature: 0 = greedy; otherwise the softmax temperature of sampling.
            top_k: sample among the k most likely tokens only (0 = all).
            top_p: sample from the smallest set of tokens whose probability reaches p (1.0 = all).
            seed: seed of the sampler.
            rope_scaling: switch YaRN on at inference, e.g. yarn:4:512 (factor 4 over a model trained
                at 512 tokens) or a JSON dict; `none` turns a stored YaRN off.
            tokenizer: a tokenizer folder, when the checkpoint holds none.
            prompt_ids: token ids instead of text (a list, or a list of lists for a batch).
            device: auto (CUDA when available), cpu, cuda, cuda:N.
            dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16.
        """
        from tlm.checkpoint import load_config, load_model_dir, read_model_meta
        from tlm.config import parse_rope_scaling
        from tlm.generate import generate
        from tlm.tokenizer import has_tokenizer, load_tokenizer

        check_int("--max-new-tokens", max_new_tokens, low=1)
        check_number("--temperature", temperature, low=0.0)
        check_int("--top-k", top_k, low=0)
        check_number("--top-p", top_p, low=0.0, high=1.0, low_open=True)
        check_int("--seed", seed, low=0)
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        meta = read_model_meta(checkpoint)
        config = load_config(checkpoint)
        changes = {}
        if rope_scaling is not None:
            changes["rope_scaling"] = parse_rope_scaling(rope_scaling)
            config = config.replace(**changes)
        tokenizer_dir = tokenizer or (checkpoint if has_tokenizer(checkpoint) else None)
        tok = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None

        if prompt_ids is not None:
            ids = _as_list(prompt_ids)
            batch = [list(map(int, p)) for p in ids] if ids and isinstance(ids[0], (list, tuple)) else [list(map(int, ids))]
        elif prompt is not None:
            if tok is None:
                raise CheckpointError(
                    f"checkpoint '{checkpoint}' has no tokenizer: pass --tokenizer DIR, or token ids with --prompt_ids"
                )
            texts = [str(p) for p in _as_list(prompt)]
            batch = [enc.ids for enc in tok.encode_batch(texts)]
        else:
            raise ConfigError("give --prompt TEXT (or --prompt_ids IDS)")
        for i, ids in enumerate(batch):
            if not ids:
                raise ConfigError(f"prompt {i} encodes to no tokens")
            bad = [t for t in ids if not 0 <= t < config.vocab_size]
            if bad:
                raise ConfigError(f"prompt {i} holds token id {bad[0]} outside the vocabulary (0..{config.vocab_size - 1})")
        check_context(config, meta.get("trained_seq_len"), max(len(ids) for ids in batch), max_new_tokens)

        model = load_model_dir(checkpoint, device=dev, dtype=torch_dtype, **changes)
        generator = torch.Generator(device=dev).manual_seed(seed)
        start = time.perf_counter()
        new_tokens = generate(
            model,
            batch,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
            generator=generator,
        )
        seconds = time.perf_counter() - start
        count = sum(len(t) for t in new_tokens)
        completions = [tok.decode(t) for t in new_tokens] if tok is not None else None
        if completions is not None:
            for text, completion in zip([tok.decode(p) for p in batch], completions):
                print(text + completion)
        log.info("generated %d tokens in %.2f s (%.1f tokens/s)", count, seconds, count / max(seconds, 1e-9))
        emit(
            {
                "completions": completions,
                "new_token_ids": new_tokens,
                "new_tokens": count,
                "seconds": round(seconds, 4),
                "tokens_per_s": round(count / max(seconds, 1e-9), 2),
                "rope_scaling": model.config.rope_scaling,
            }
        )

    def tokenizer(
        self,
        out: str,
        data: Any = None,
        vocab_size: int = 6400,
        text_field: str = "text",
        sample_by: str = "document",
        on_error: str = "raise",
        max_chars: int | None = None,
        min_frequency: int = 2,
        overwrite: bool = False,
    ) -> None:
        """Train a byte-level BPE tokenizer (tokenizers) from a streamed source.

        Special tokens: <|endoftext|> (0: document separator, EOS, padding), <|im_start|> (1) and
        <|im_end|> (2) (ChatML turn markers for a later chat corpus). `transformers.AutoTokenizer`
        loads the result.

        Args:
            out: the folder to write tokenizer.json, tokenizer_config.json, special_tokens_map.json to.
            data: files, folders, globs or a Hugging Face dataset name (a list for several); JSONL, JSON,
                Parquet, CSV/TSV or text, optionally .gz/.xz/.zst/.bz2. Default: the bundled Gutenberg
                demo corpus.
            vocab_size: size of the vocabulary, special tokens and the 256 bytes included.
            text_field: the field (JSON) or column (Parquet, CSV) holding the text.
            sample_by: for text files: document (the whole file), paragraph or line.
            on_error: raise (stop at the first bad record, naming file and line) or skip (count it).
            max_chars: train on the first MAX_CHARS characters only.
            min_frequency: smallest count for a pair to be merged.
            overwrite: replace an existing tokenizer in OUT.
        """
        from data_pipeline import DEMO_TRAIN
        from data_pipeline.sources import DocumentReader, resolve_sources
        from data_pipeline.tokenizer import SPECIAL_TOKENS, save_tokenizer, tokenizer_sha256, train_tokenizer

        from tlm.locks import FolderLock

        data = str(DEMO_TRAIN) if data is None else data
        check_int("--vocab-size", vocab_size, low=259)
        if (Path(out) / "tokenizer.json").exists() and not overwrite:
            raise CheckpointError(f"'{out}' already holds a tokenizer; pass --overwrite to replace it")
        reader = DocumentReader(resolve_sources(data), text_field=text_field, sample_by=sample_by, on_error=on_error)
        start = time.perf_counter()
        with FolderLock(out, "tokenizer output", hint="wait for that `tlm tokenizer` to finish, or choose another --out"):
            trained = train_tokenizer(reader, vocab_size=vocab_size, min_frequency=min_frequency, max_chars=max_chars,
                                      show_progress=sys.stderr.isatty())
            save_tokenizer(trained, out)
        seconds = time.perf_counter() - start
        if reader.skips.total():
            log.warning("skipped %d records: %s", reader.skips.total(), reader.skips.to_dict()["by_reason"])
        log.info("trained a %d-token BPE in %.1f s -> %s", trained.get_vocab_size(), seconds, out)
        emit({"out": out, "vocab_size": trained.get_vocab_size(), "special_tokens": list(SPECIAL_TOKENS),
              "sha256": tokenizer_sha256(out), "documents": sum(reader.documents_per_source),
              "skipped": reader.skips.to_dict(), "seconds": round(seconds, 2)})

    def prepare(
        self,
        out: str,
        data: Any = None,
        tokenizer: str | None = None,
        seq_len: int = 512,
        pack: bool = True,
        val: float | int | None = None,
        val_data: Any = None,
        text_field: str = "text",
        sample_by: str = "document",
        on_error: str = "raise",
        hf_split: str = "train",
        seed: int = 0,
        shard_mb: float = 256.0,
        num_workers: int = 1,
        worker_index: int = 0,
        merge: bool = False,
        overwrite: bool = False,
    ) -> None:
        """Tokenize, pack and shard a corpus into Arrow files plus manifest.json.

        Rerunning an interrupted prepare with the same flags resumes it; the output is byte-identical
        to an uninterrupted run. For a corpus too large for one machine run N workers
        (--num_workers N --worker_index I, e.g. a Slurm job array), then once `--merge`.

        Args:
            out: the output folder.
            data: files, folders, globs or a Hugging Face dataset name (a list for several); JSONL, JSON,
                Parquet, CSV/TSV or text, optionally .gz/.xz/.zst/.bz2. Default: the bundled Gutenberg demo
                corpus, with the bundled validation books as --val_data.
            tokenizer: a tokenizer folder (from `tlm tokenizer`).
            seq_len: tokens a training row predicts; rows hold seq_len + 1 tokens.
            pack: pack documents, separated by <|endoftext|>, into full rows; --nopack: one document per
                row, truncated and padded, with a loss mask.
            val: documents held out for validation: a fraction (0.01) or a count (100, one worker only).
                Default: 0.01, or 0 when --val_data is given.
            val_data: a separate validation source instead of held-out documents.
            text_field: the field (JSON) or column (Parquet, CSV) holding the text.
            sample_by: for text files: document (the whole file), paragraph or line.
            on_error: raise (stop at the first bad record, naming file and line) or skip (count and
                report it in the manifest).
            hf_split: the split of a Hugging Face dataset.
            seed: seed of the validation hold-out.
            shard_mb: size of one shard file.
            num_workers: split the sources across this many workers.
            worker_index: which worker this is (0-based).
            merge: merge the finished workers' outputs in OUT into one manifest.
            overwrite: replace a prepared dataset (or an interrupted one) in OUT.
        """
        from data_pipeline import DEMO_TRAIN, DEMO_VAL
        from data_pipeline.prepare import PrepareConfig, prepare
        from data_pipeline.workers import merge_workers

        start = time.perf_counter()
        if merge:
            manifest = merge_workers(out)
        else:
            if tokenizer is None:
                raise ConfigError("give --tokenizer DIR (from `tlm tokenizer`), or --merge to combine worker outputs")
            if data is None:  # the bundled corpus, with its held-out books for validation
                data = str(DEMO_TRAIN)
                val_data = str(DEMO_VAL) if val is None and val_data is None else val_data
            if val is None:
                val = 0.0 if val_data is not None else 0.01
            config = PrepareConfig(
                data=[str(d) for d in _as_list(data)], tokenizer=str(tokenizer), out=str(out), seq_len=seq_len,
                pack=pack, text_field=text_field, sample_by=sample_by, on_error=on_error, hf_split=hf_split,
                val=val, val_data=[str(d) for d in _as_list(val_data)] if val_data is not None else None,
                seed=seed, shard_mb=shard_mb, num_workers=num_workers, worker_index=worker_index,
            )
            manifest = prepare(config, overwrite=overwrite, progress=sys.stderr.isatty())
        seconds = time.perf_counter() - start
        splits = {k: {f: v[f] for f in ("rows", "tokens", "documents")} | {"shards": len(v["shards"])}
                  for k, v in manifest["splits"].items()}
        tokens = sum(v["tokens"] for v in manifest["splits"].values())
        log.info("prepared %s: %s", out, ", ".join(f"{k} {v['rows']} rows / {v['tokens']} tokens" for k, v in splits.items()))
        reused = manifest.get("reused", False)
        emit({"out": out, "seq_len": manifest["seq_len"], "mode": manifest["mode"], "splits": splits,
              "skipped": manifest["skipped"], "reused": reused, "seconds": round(seconds, 2),
              "tokens_per_s": None if reused else round(tokens / max(seconds, 1e-9)),
              "mb_per_s": None if reused else round(manifest["characters"] / 1e6 / max(seconds, 1e-9), 2)})

    def train(self, config: str | None = None, **overrides: Any) -> None:
        """Train a model: one process, or every rank under torchrun / deepspeed / srun.

        Without --config: configs/tlm-26m.yaml (the 26M baseline) when a GPU is present, otherwise
        configs/cpu-demo.yaml (about five minutes on 2 CPU cores), on the bundled corpus, which is
        tokenized and prepared on first use. A rerun resumes from the newest complete checkpoint.

        Args:
            config: a YAML recipe (see configs/).
            overrides: any config key as --section.key=value, e.g. --train.max_steps=100
                --batch.micro_batch_size=8 --train.backend=fsdp2 --model.num_key_value_heads=1
                --checkpoint.resume=none --logging.wandb=offline.
        """
        from tlm.preemption import INTERRUPTED
        from tlm.train import shutdown, train
        from tlm.train_config import load_config

        if config is None:
            recipe = "tlm-26m.yaml" if torch.cuda.is_available() else "cpu-demo.yaml"
            config = str(Path(__file__).resolve().parent.parent / "configs" / recipe)
            log.info("no --config: using %s", config)
        summary = train(load_config(config, overrides))
        # The checkpoint is written: a late stop signal (srun forwards USR1 to every task) must not turn
        # this clean exit into a crash.
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        history = summary.pop("history")
        rank0 = int(os.environ.get("RANK", "0")) == 0
        if rank0:
            if summary.get("sample"):
                print(summary["sample"])
            summary["losses"] = [h["loss"] for h in history if "loss" in h]
            emit(summary)
        shutdown()
        if summary["stopped"] == INTERRUPTED:
            if rank0:
                print(f"tlm: interrupted at step {summary['steps']} of {summary['total_steps']}: checkpoint written to "
                      f"{summary['checkpoint']}; rerun the same command to resume", file=sys.stderr, flush=True)
            sys.exit(130)

    def ablate(
        self,
        study: str,
        scale: str = "cpu",
        seeds: int = 3,
        out: str | None = None,
        report: str | None = None,
        slurm: bool = False,
        sbatch_args: str = "",
        **overrides: Any,
    ) -> None:
        """Run an ablation study (each variant x seeds), then write its plots and report.

        Studies: lr, batch, norm, norm_position, position, mlp, kv_heads, yarn, or all; `report` only
        regenerates the report from the runs' metrics files. Finished runs are not trained again;
        several processes started on the same --out share the runs (each is claimed with a file lock).

        Args:
            study: lr | batch | norm | norm_position | position | mlp | kv_heads | yarn | all | report.
            scale: cpu (configs/ablations/cpu.yaml, minutes per run on a CPU) or h200 (the 26M recipe).
            seeds: seeds per variant (each seed fixes the initial weights and the data order).
            out: the folder of the runs (default runs/ablations/SCALE); runs go in OUT/runs.
            report: where report.md and the PNGs go (default OUT/report).
            slurm: submit the unfinished runs as one job array (slurm/ablate.sbatch) instead of running here.
            sbatch_args: extra sbatch flags with --slurm, e.g. "--partition=gpu --gpus-per-node=1".
            overrides: --section.key=value applied to every run, e.g. --data.source=corpus.jsonl.
        """
        from tlm.ablate import plan, resolve_studies, run_local, submit_slurm, unigram_reference
        from tlm.ablate_report import write_report

        out_dir = Path(out or f"runs/ablations/{scale}")
        report_dir = Path(report) if report else out_dir / "report"
        names = resolve_studies("all" if study == "report" else study)
        trained: list[str] = []
        if study != "report":
            runs = plan(names, scale, seeds, overrides)
            if "norm_position" in names:
                unigram_reference(scale, out_dir, overrides)
            if slurm:
                job = submit_slurm(runs, scale, out_dir, sbatch_args)
                log.info("submitted job array %s (%d runs); then: tlm ablate report --scale %s --out %s", job or "-",
                         len(runs), scale, out_dir)
                emit({"job": job, "runs": [r["name"] for r in runs]})
                return
            trained = run_local(runs, scale, out_dir)
            log.info("trained %d of %d runs", len(trained), len(runs))
        path = write_report(out_dir / "runs", report_dir, scale, seeds, names)
        log.info("report: %s", path)
        emit({"report": str(path), "studies": names, "trained": trained})

    def bench(
        self,
        preset: str = "tlm-26m",
        backend: str = "single",
        batch: int = 32,
        seq_len: int = 512,
        precision: str = "auto",
        steps: int = 10,
        warmup: int = 3,
        compile: bool = False,
        fused_adamw: bool | None = None,
        loss_chunk: int = 0,
        zero_stage: int = 1,
        matrix: bool = False,
        out: str | None = None,
    ) -> None:
        """Training speed on synthetic tokens: tokens/s, step time, MFU and peak memory (a table; JSON last).

        MFU is given against the device's datasheet peak (989 TFLOP/s dense bf16 for H100/H200) and against
        the matmul rate measured on the same device in the same run (docs/training.md has the FLOPs formula).

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
            matrix: run the whole matrix instead (eager, compiled, compiled + chunked loss, ZeRO-1, ZeRO-2,
                FSDP2) with the same preset, batch and precision.
            out: also write the JSON to this file.
        """
        from tlm.bench import MATRIX, bench, dump, print_table

        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() else "fp32"
        base = {"model.preset": preset, "batch.micro_batch_size": batch, "data.seq_len": seq_len,
                "train.precision": precision, "logging.wandb": "disabled"}
        single = {"train.backend": backend, "train.compile": compile, "train.fused_adamw": fused_adamw,
                  "train.loss_chunk": loss_chunk, "train.zero_stage": zero_stage}
        result = bench(MATRIX if matrix else {backend: single}, base, steps, warmup)
        print_table(result)
        dump(result, out)
        emit(result)

    def eval(
        self,
        checkpoint: str,
        data: Any,
        seq_len: int = 512,
        split: str | None = None,
        batch_size: int = 8,
        max_batches: int | None = None,
        text_field: str = "text",
        device: str = "auto",
    ) -> None:
        """Validation loss and perplexity of a model directory (JSON on the last line).

        Args:
            checkpoint: a model directory (e.g. RUN/checkpoints/step-N/model).
            data: a prepared folder (its val split, else train), or raw text (files, folders, globs),
                tokenized with the checkpoint's tokenizer and packed into rows of seq_len + 1.
            seq_len: row length for raw text (a prepared folder has its own).
            split: the split of a prepared folder.
            batch_size: sequences per forward.
            max_batches: evaluate at most this many batches.
            text_field: the field or column of raw JSON / Parquet / CSV holding the text.
            device: auto, cpu, cuda.
        """
        from tlm.evaluate import evaluate_checkpoint

        check_int("--seq-len", seq_len, low=1)
        check_int("--batch-size", batch_size, low=1)
        if max_batches is not None:
            check_int("--max-batches", max_batches, low=1)

        result = evaluate_checkpoint(checkpoint, data, seq_len=seq_len, split=split, batch_size=batch_size,
                                     max_batches=max_batches, device=resolve_device(device), text_field=text_field)
        log.info("%s: loss %.4f, perplexity %.2f over %d tokens", checkpoint, result["loss"], result["perplexity"],
                 result["tokens"])
        emit(result)

    def export(self, checkpoint: str, out: str, dtype: str = "float32") -> None:
        """Write a Hugging Face LlamaForCausalLM folder (config.json, safetensors, tokenizer files).

        Args:
            checkpoint: a tlm model directory.
            out: the folder to write; `AutoModelForCausalLM.from_pretrained(OUT)` loads it.
            dtype: weight dtype in the export: float32, bfloat16 or float16.
        """
        from tlm.export import export_hf

        path = export_hf(checkpoint, out, dtype=dtype)
        files = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
        log.info("exported %s -> %s (%s)", checkpoint, out, ", ".join(files))
        emit({"out": str(path), "files": files, "architecture": "LlamaForCausalLM"})


def check_command_line(args: list[str]) -> None:
    """Refuse, before any work, arguments the command would not consume (fire reports them only after the
    command has run) and values given to switches (`--overwrite extra`)."""
    if not args or args[0].startswith("-") or not callable(getattr(CLI, args[0], None)):
        return
    command, rest = args[0], args[1:]
    if "--" in rest:  # what follows is for fire itself (--help)
        rest = rest[: rest.index("--")]
    import inspect

    try:
        from fire.core import _MakeParseFn

        (positional, _), _, remaining, _ = _MakeParseFn(getattr(CLI(), command), {})(rest)
    except Exception:  # fire's own error (e.g. a missing value) is clear enough; let it report
        return
    if remaining:
        hint = f"; did you mean --config {remaining[0]}?" if command == "train" and remaining[0].endswith(".yaml") else ""
        raise ConfigError(f"tlm {command}: unexpected argument {remaining[0]!r}{hint} (flags take the form --name=value; "
                          f"see tlm {command} --help)")
    params = [p for p in inspect.signature(getattr(CLI, command)).parameters.values()
              if p.name != "self" and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    for param, value in zip(params, positional):
        if isinstance(param.default, bool) and not isinstance(value, bool):
            raise ConfigError(f"--{param.name} is a switch and takes no value (got {value!r}); write --{param.name} "
                              f"or --no{param.name}")


def _report(error: BaseException, line: str) -> None:
    if os.environ.get("TLM_DEBUG") == "1":
        import traceback

        traceback.print_exception(error)
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point of `tlm`.

    A user error (TLMError: a bad flag, a file that fails its checks, a full disk) is one `tlm: error:` line and
    exit status 2 (TLM_DEBUG=1 adds the traceback); Ctrl-C outside training is `tlm: interrupted` and 130; a bug
    shows its traceback.
    """
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher adds --local_rank=N (before the command when run with --module); the rank
    # is also in the environment, so drop the flag wherever it is.
    for arg in [a for a in args if a.split("=")[0] in ("--local_rank", "--local-rank")]:
        args.remove(arg)
        if "=" in arg:
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
    # fire reads `--help` after a command that takes **overrides as one more override; its own
    # spelling is `COMMAND -- --help`. Accept the usual one.
    if ("--help" in args or "-h" in args) and "--" not in args:
        args = [a for a in args if a not in ("--help", "-h")] + ["--", "--help"]
    try:
        check_command_line(args)
        fire.Fire(CLI(), command=args, name="tlm")
    except TLMError as e:
        if e.reported_by_rank0 and os.environ.get("RANK", "0") != "0":
            sys.exit(2)  # rank 0 says it
        _report(e, f"tlm: error: {e}")
        sys.exit(2)
    except KeyboardInterrupt as e:
        _report(e, "tlm: interrupted")
        sys.exit(130)
    except OSError as e:
        if not is_disk_full(e):
            raise
        _report(e, f"tlm: error: {disk_full(e, e.filename or Path.cwd())}")
        sys.exit(2)


if __name__ == "__main__":
    main()
