"""Hugging Face export: transformers' own LlamaForCausalLM must compute what tlm computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import debug_config
from tlm.checkpointing.model_dir import save_model_dir
from tlm.model.config import get_preset
from tlm_base.errors import ExportError
from tlm.checkpointing.export import export_hf
from tlm.model.generate import generate
from tlm.model.transformer import TransformerLM

transformers = pytest.importorskip("transformers")

PARITY_VARIANTS = {
    "tlm-26m": {},
    "yarn": {"rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 128}},
    "kv1": {"num_key_value_heads": 1},
    "kv8": {"num_key_value_heads": 8},
    "untied": {"tie_word_embeddings": False},
}


def export(model: TransformerLM, tmp_path: Path, tokenizer_dir: Path | None = None) -> Path:
    save_model_dir(model, tmp_path / "tlm", tokenizer_dir=tokenizer_dir)
    return export_hf(tmp_path / "tlm", tmp_path / "hf")


def load_hf(path: Path, attn: str = "sdpa"):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    return model.eval()


@pytest.mark.parametrize("variant", PARITY_VARIANTS, ids=str)
def test_logits_match_transformers(variant: str, tmp_path: Path) -> None:
    model = TransformerLM(get_preset("tlm-26m", **PARITY_VARIANTS[variant])).eval()
    path = export(model, tmp_path)
    ids = torch.randint(0, 6400, (2, 320))
    with torch.no_grad():
        ours = model(ids)
        for attn in ("sdpa", "eager"):  # eager: transformers' own repeat_kv + softmax, no SDPA shared with us
            hf = load_hf(path, attn)
            assert type(hf).__name__ == "LlamaForCausalLM"
            assert sum(p.numel() for p in hf.parameters()) == model.num_parameters()
            theirs = hf(ids).logits
            rel = ((ours - theirs).norm() / theirs.norm()).item()
            assert rel <= 1e-5, f"{variant}/{attn}: relative error {rel:.2e}"


def test_exported_config_states_yarn(tmp_path: Path) -> None:
    model = TransformerLM(debug_config(**PARITY_VARIANTS["yarn"]))
    config = json.loads((export(model, tmp_path) / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    assert config["max_position_embeddings"] == 512
    hf = load_hf(tmp_path / "hf")
    assert hf.model.rotary_emb.attention_scaling == pytest.approx(model.rotary_emb.attention_scaling)
    torch.testing.assert_close(hf.model.rotary_emb.inv_freq, model.rotary_emb.inv_freq, rtol=0, atol=0)


def test_greedy_generation_matches_transformers_generate(tmp_path: Path) -> None:
    model = TransformerLM(debug_config(tie_word_embeddings=False, initializer_range=0.3)).eval()
    hf = load_hf(export(model, tmp_path))
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    ours = generate(model, prompts, max_new_tokens=16)
    for prompt, mine in zip(prompts, ours):
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == mine
    # Left-padded batch, as transformers pads it, against tlm's own padded batch.
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16, pad_token_id=0)
    assert out[:, width:].tolist() == ours
    assert len(set(ours[0])) > 3


def test_eos_stop_matches_transformers(tmp_path: Path) -> None:
    model = TransformerLM(debug_config(tie_word_embeddings=False, initializer_range=0.3)).eval()
    hf = load_hf(export(model, tmp_path))
    prompt = [5, 6, 7, 8]
    eos = generate(model, [prompt], max_new_tokens=8)[0][4]
    ours = generate(model, [prompt], max_new_tokens=16, eos_token_id=eos)[0]
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, eos_token_id=eos, pad_token_id=eos)
    assert out[0, len(prompt):].tolist() == ours and ours[-1] == eos


def test_tokenizer_files_are_exported_and_load(tmp_path: Path, tokenizer_dir: Path) -> None:
    model = TransformerLM(debug_config(eos_token_id=0, bos_token_id=1, pad_token_id=0))
    path = export(model, tmp_path, tokenizer_dir)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    from data_pipeline.tokenizer_files import load_tokenizer

    text = "The king walked slowly to the river, she said."
    assert tok(text)["input_ids"] == load_tokenizer(tokenizer_dir).encode(text).ids
    assert tok.eos_token == "<|endoftext|>"
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 0, "pad_token_id": 0}


def test_bf16_export(tmp_path: Path) -> None:
    model = TransformerLM(debug_config())
    save_model_dir(model, tmp_path / "tlm")
    export_hf(tmp_path / "tlm", tmp_path / "hf", dtype="bfloat16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ExportError, match="--dtype must be one of"):
        export_hf(tmp_path / "tlm", tmp_path / "hf2", dtype="int8")


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"norm_position": "post"}, "norm_position='post'"),
        ({"norm": "none"}, "norm='none'"),
        ({"norm": "layernorm"}, "norm='layernorm'"),
        ({"position_embedding": "nope"}, "position_embedding='nope'"),
        ({"mlp": "silu"}, "mlp='silu'"),
    ],
)
def test_non_llama_variants_are_refused_with_the_reason(overrides: dict, reason: str, tmp_path: Path) -> None:
    save_model_dir(TransformerLM(debug_config(**overrides)), tmp_path / "tlm")
    with pytest.raises(ExportError, match=f"cannot export as LlamaForCausalLM: {reason}"):
        export_hf(tmp_path / "tlm", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_never_overwrites_a_tlm_model_directory(tmp_path: Path) -> None:
    save_model_dir(TransformerLM(debug_config()), tmp_path / "tlm")
    before = (tmp_path / "tlm" / "model.safetensors").read_bytes()
    with pytest.raises(ExportError, match="holds a tlm model directory"):
        export_hf(tmp_path / "tlm", tmp_path / "tlm")
    assert (tmp_path / "tlm" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("preset,count", [("tlm-26m", 25_829_888), ("minimind2-104m", 104_030_976),
                                          ("gpt2-small-shape", 89_869_056), ("llama-1b-shape", 986_253_312),
                                          ("debug", 508_224)])
def test_every_preset_counts_as_transformers_llama_counts(preset: str, count: int) -> None:
    transformers = pytest.importorskip("transformers")
    from tlm.checkpointing.export import hf_config

    config = get_preset(preset)
    hf = {k: v for k, v in hf_config(config).items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    with torch.device("meta"):
        ours = TransformerLM(config).num_parameters()
        theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
    unique = {id(p): p.numel() for p in theirs.parameters()}  # tied embeddings counted once
    assert ours == sum(unique.values()) == count


def test_eval_of_an_export_equals_its_source_with_default_arguments(trained_run: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """The export records the length its model was trained at (it used to default to 512 against the source's 64:
    5.5324 against 5.4660)."""
    pytest.importorskip("transformers")
    from data_pipeline import TINYSHAKESPEARE
    from hostile import cli

    model = trained_run / "checkpoints" / "step-00000008" / "model"
    assert cli(["export", "--checkpoint", model, "--out", tmp_path / "hf"], capsys)[0] == 0
    results = []
    for checkpoint in (model, tmp_path / "hf"):
        status, out, err = cli(["eval", "--checkpoint", checkpoint, "--data", TINYSHAKESPEARE, "--max_batches", 2], capsys)
        assert status == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    ours, theirs = results
    assert theirs["tokens"] == ours["tokens"] == 2 * 8 * 64  # default batch 8, the trained length 64
    assert theirs["loss"] == pytest.approx(ours["loss"], abs=1e-4)
