"""Compressed checkpoints (models/checkpoint.py, ``python -m models.compress``): a model compressed once,
written, and served from the directory must be the model startup compression makes, bit for bit.

Unit: tiny random models with an in-memory character tokenizer. Integration: the embedded models through
the CLI and the server's builder, against the session's startup-compressed runtime."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import BPE
from transformers import BertConfig, BertModel, LlamaConfig, PreTrainedTokenizerFast

from engine.classifier import Classifier, center_key
from models import checkpoint
from models.calibration import forward_sequence
from models.compress import CompressionReport, CompressionSpec, compress_causal_lm
from models.compress_cli import main as compress_main
from models.cpu_policy import cpu_policy
from models.llama import Llama
from models.loader import LoadedEncoder
from models.prune import prune_mlp
from models.quantize import QuantEmbedding, QuantLinear, quantize_modules
from models.sources import resolve_spec
from server.config import Settings
from server.runtime import Runtime
from tests.conftest import TEST_SETTINGS, TINY_BERT, app_client


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Printable ASCII, one token per character (ids 1-95), [UNK] 0 and [PAD] 96: fits the tiny vocab of 97."""
    vocab = {"[UNK]": 0, **{chr(c): c - 31 for c in range(32, 127)}, "[PAD]": 96}
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def lm_spec(method: str) -> CompressionSpec:
    smooth = 0.5 if method == "int8" else None
    return CompressionSpec(
        quantize=method,
        prune_mlp=0.25,
        prune_allocation="uniform",
        smooth_alpha=smooth,
        calib_tokens=256,
        eval_tokens=128,
    )


@torch.inference_mode()
def lm_logits(model: Llama) -> torch.Tensor:
    return model.logits(forward_sequence(model, torch.arange(1, 80)))


@pytest.mark.unit
@pytest.mark.parametrize("method", ["int8", "int8-wo", "fp8", "none"])
def test_lm_round_trip_is_bit_identical(tiny: tuple[LlamaConfig, dict], tmp_path: Path, method: str) -> None:
    config, state_dict = tiny
    tok = char_tokenizer()
    model, report = compress_causal_lm(Llama.from_hf(config, state_dict), config, tok, lm_spec(method), "tiny", None)
    out = tmp_path / "ckpt"
    plan = checkpoint.llama_plan(model)
    checkpoint.write_checkpoint(out, "generate", model, plan, config, tok, report.model_dump_json(), {"model": "tiny"})

    assert checkpoint.is_checkpoint(out) and resolve_spec(str(out), "generate").kind == "checkpoint"
    read = checkpoint.read_checkpoint(out, "generate", torch.float32, torch.device("cpu"))
    assert read.marker["task"] == "generate" and read.marker["made_from"] == {"model": "tiny"}
    mine, theirs = model.state_dict(), read.model.state_dict()
    assert mine.keys() == theirs.keys()
    for name, tensor in mine.items():
        assert theirs[name].dtype == tensor.dtype and torch.equal(theirs[name], tensor), name
    assert torch.equal(lm_logits(read.model), lm_logits(model))
    widths = [layer.mlp.down_proj.in_features for layer in read.model.layers]
    assert widths == report.intermediate_sizes and max(widths) < config.intermediate_size  # pruned widths kept
    assert CompressionReport.model_validate_json(read.report_json) == report
    assert read.tokenizer("Hello, world")["input_ids"] == tok("Hello, world")["input_ids"]
    if method != "none":  # quantized layers come back as saved 8-bit tensors, the tied table stored once
        assert isinstance(read.model.layers[0].self_attn.qkv_proj, QuantLinear)
        assert isinstance(read.model.embed_tokens, QuantEmbedding)
        assert read.model.embed_tokens.qweight.data_ptr() == read.model.lm_head.qweight.data_ptr()
    else:
        assert read.model.embed_tokens.weight is read.model.lm_head.weight


@pytest.mark.unit
def test_lm_checkpoint_serves_in_another_dtype(tiny: tuple[LlamaConfig, dict], tmp_path: Path) -> None:
    """Float parts follow the serving dtype; 8-bit weights and their float32 scales stay as written."""
    config, state_dict = tiny
    tok = char_tokenizer()
    model, _ = compress_causal_lm(Llama.from_hf(config, state_dict), config, tok, lm_spec("int8-wo"), "t", None)
    checkpoint.write_checkpoint(tmp_path, "generate", model, checkpoint.llama_plan(model), config, tok, "{}", {})
    read = checkpoint.read_checkpoint(tmp_path, "generate", torch.bfloat16, torch.device("cpu")).model
    assert read.norm.weight.dtype == torch.bfloat16
    qkv = read.layers[0].self_attn.qkv_proj
    assert qkv.qweight.dtype == torch.int8 and qkv.scale.dtype == torch.float32
    assert torch.equal(qkv.qweight, model.layers[0].self_attn.qkv_proj.qweight)


@pytest.mark.unit
def test_encoder_round_trip_is_bit_identical(tmp_path: Path) -> None:
    config = BertConfig(**{**TINY_BERT, "vocab_size": 97, "intermediate_size": 128, "pad_token_id": 96})
    torch.manual_seed(0)
    tok = char_tokenizer()
    encoder = LoadedEncoder(BertModel(config).eval(), tok, None, "tiny-bert")
    widths = []
    for layer in encoder.model.encoder.layer:  # the passes compress_encoder runs, without its calibration
        x = torch.randn(256, 128)
        (layer.intermediate.dense,), layer.output.dense, _ = prune_mlp(
            [layer.intermediate.dense], layer.output.dense, x.T @ x, 64, True
        )
        widths.append(64)
    quantize_modules(encoder.model, "int8")
    plan = checkpoint.encoder_plan(encoder.model, widths)
    checkpoint.write_checkpoint(tmp_path, "classify", encoder.model, plan, config, tok, "{}", {})

    read = checkpoint.read_checkpoint(tmp_path, "classify", torch.float32, torch.device("cpu"))
    mine, theirs = encoder.model.state_dict(), read.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    texts = ["I was charged twice", "where is my parcel"]
    served = Classifier(LoadedEncoder(read.model, read.tokenizer, read.id2label, "ckpt"), "cpu")
    assert torch.equal(served.embed(texts), Classifier(encoder, "cpu").embed(texts))
    with pytest.raises(ValueError, match="classify checkpoint: serve it with --cls-model"):
        checkpoint.read_checkpoint(tmp_path, "generate", torch.float32, torch.device("cpu"))


@pytest.mark.unit
def test_classifier_serves_the_center_written_with_the_checkpoint(tmp_path: Path) -> None:
    config = BertConfig(**{**TINY_BERT, "vocab_size": 97, "pad_token_id": 96})
    torch.manual_seed(0)
    tok = char_tokenizer()
    encoder = LoadedEncoder(BertModel(config).eval(), tok, None, "tiny-bert")
    computed = Classifier(encoder, "cpu").center()
    plan = checkpoint.encoder_plan(encoder.model, [config.intermediate_size] * config.num_hidden_layers)
    checkpoint.write_checkpoint(
        tmp_path, "classify", encoder.model, plan, config, tok, "{}", {}, (computed, center_key())
    )

    read = checkpoint.read_checkpoint(tmp_path, "classify", torch.float32, torch.device("cpu"))
    assert read.center is not None and torch.equal(read.center[0], computed) and read.center[1] == center_key()
    served = Classifier(LoadedEncoder(read.model, read.tokenizer, None, "ckpt"), "cpu")
    assert served.use_center(*read.center) and served.center() is not None and torch.equal(served.center(), computed)
    # Another background or pooling (key), or another width: refused, computed from the weights on first use.
    for center, key in ((computed, center_key(("other text",))), (computed[:-1], center_key())):
        fresh = Classifier(LoadedEncoder(read.model, read.tokenizer, None, "ckpt"), "cpu")
        assert not fresh.use_center(center, key)
        assert torch.equal(fresh.center(), computed)


@pytest.mark.unit
def test_checkpoint_tokenizer_reads_back_the_same(tiny: tuple[LlamaConfig, dict], tmp_path: Path) -> None:
    config, state_dict = tiny
    tok = char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    model = Llama.from_hf(config, state_dict)
    checkpoint.write_checkpoint(tmp_path, "generate", model, checkpoint.llama_plan(model), config, tok, "{}", {})
    # Recorded in tokenizer_config.json, so that loading need not parse tokenizer.json for them.
    assert "added_tokens_decoder" in json.loads((tmp_path / "tokenizer_config.json").read_text())
    read = checkpoint.read_checkpoint(tmp_path, "generate", torch.float32, torch.device("cpu")).tokenizer
    assert read.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert read.added_tokens_decoder == tok.added_tokens_decoder and read.special_tokens_map == tok.special_tokens_map
    text = "<|im_start|>user hi<|im_end|>"
    assert read(text).input_ids == tok(text).input_ids and read.decode(read(text).input_ids, skip_special_tokens=True)


@pytest.mark.unit
def test_write_refuses_a_directory_that_is_not_a_checkpoint(tiny: tuple[LlamaConfig, dict], tmp_path: Path) -> None:
    config, state_dict = tiny
    (tmp_path / "notes.txt").write_text("mine")
    model = Llama.from_hf(config, state_dict)
    with pytest.raises(ValueError, match="not a compressed checkpoint"):
        checkpoint.write_checkpoint(tmp_path, "generate", model, {}, config, char_tokenizer(), "{}", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing left behind


# ------------------------------------------------------------------------------------------ embedded models


@pytest.fixture(scope="module")
def written(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both embedded models through ``python -m models.compress`` with the server's defaults (the
    compression cache the session's runtime fills makes this quick when it ran first)."""
    out = tmp_path_factory.mktemp("checkpoints")
    for task in ("generate", "classify"):
        assert compress_main(["--task", task, "--model", "default", "--out", str(out / task), "--device", "cpu",
                              "--cache-dir", str(cache_dir)]) == 0  # fmt: skip
    return {"generate": out / "generate", "classify": out / "classify"}


@pytest.fixture(scope="module")
async def served(written: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """A runtime over the two checkpoints, with an empty cache dir: nothing to convert or calibrate."""
    empty = tmp_path_factory.mktemp("empty-cache")
    settings = Settings(cache_dir=empty, gen_model=str(written["generate"]), cls_model=str(written["classify"]),
                        **TEST_SETTINGS)  # fmt: skip
    runtime = Runtime.load(settings)
    await runtime.start()
    async with app_client(settings, runtime) as c:
        yield runtime, c, empty
    await runtime.stop()


@pytest.mark.integration
async def test_checkpoint_serves_the_startup_compressed_models(served, runtime: Runtime, client) -> None:
    ckpt, ckpt_client, empty_cache = served
    assert not any(empty_cache.iterdir())  # no GGUF conversion, no compression cache entry
    ref_model, ckpt_model = runtime.llm.engine.runner.model, ckpt.llm.engine.runner.model
    ref, mine = ref_model.state_dict(), ckpt_model.state_dict()
    assert ref.keys() == mine.keys() and all(torch.equal(ref[k], mine[k]) for k in ref)
    ref_enc, ckpt_enc = runtime.classifier.model.state_dict(), ckpt.classifier.model.state_dict()
    assert ref_enc.keys() == ckpt_enc.keys() and all(torch.equal(ref_enc[k], ckpt_enc[k]) for k in ref_enc)

    # Same answers: a prompt neither server has seen (no prefix-cache hit on either side), greedy.
    body = {"prompt": f"Ticket {uuid.uuid4().hex[:8]}: my order has not arrived.", "max_tokens": 24}
    expected, got = (
        (await client.post("/generate", json=body)).json(),
        (await ckpt_client.post("/generate", json=body)).json(),
    )
    assert got == expected
    body = {"inputs": ["I was charged twice"], "labels": ["billing problem", "delivery problem"]}
    expected, got = (
        (await client.post("/classify", json=body)).json(),
        (await ckpt_client.post("/classify", json=body)).json(),
    )
    assert got == expected

    info = {m["task"]: m for m in (await ckpt_client.get("/info")).json()["models"]}
    for task in ("generate", "classify"):
        startup = runtime.served.reports[task]
        assert info[task]["model"].startswith("compressed checkpoint ")
        served = info[task]["compression"]
        assert served["checkpoint"] and served["spec"] == startup.spec.model_dump(mode="json")
        assert served["fidelity"] == startup.fidelity  # measured when it was written
        assert served["fidelity"] or startup.spec.quantize == "none"  # the float classifier: nothing changed
    assert ckpt.served.policy.why["gen_quantize"] == "as written in the compressed checkpoint"
    assert (
        ckpt.served.policy.gen_prune
        == runtime.served.reports["generate"].spec.prune_mlp
        == runtime.served.policy.gen_prune
    )


@pytest.mark.integration
def test_cli_keeps_an_up_to_date_checkpoint(written: dict[str, Path], cache_dir: Path, capsys) -> None:
    marker = (written["generate"] / checkpoint.MARKER).read_text()
    args = ["--model", "default", "--out", str(written["generate"]), "--device", "cpu", "--cache-dir", str(cache_dir)]
    assert compress_main(args) == 0
    assert "already a checkpoint of the same model and settings" in capsys.readouterr().out
    assert (written["generate"] / checkpoint.MARKER).read_text() == marker
    made_from = json.loads(marker)["made_from"]
    assert made_from["spec"]["quantize"] == cpu_policy().quantize and made_from["device"] == "cpu"


@pytest.mark.integration
def test_explicit_quantization_must_match_the_checkpoint(written: dict[str, Path], tmp_path: Path) -> None:
    made = cpu_policy().quantize  # the server's default on this CPU, as the checkpoint was written
    asked = "none" if made != "none" else "int8"
    settings = Settings(cache_dir=tmp_path, gen_model=str(written["generate"]), gen_quantize=asked,
                        enable_classify=False, **TEST_SETTINGS)  # fmt: skip
    with pytest.raises(ValueError, match=f"checkpoint is quantized '{made}' but '{asked}' was asked for"):
        Runtime.load(settings)


# What a replica's start from checkpoints must not import: transformers' auto-model machinery and modeling code,
# and dynamo (seconds each on some hosts: load_tests/results/ready_time/README.md).
HEAVY_MODULES = (
    "transformers.models.auto.auto_factory",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.modeling_utils",
    "torch._dynamo",
)


@pytest.mark.integration
def test_building_from_checkpoints_imports_no_heavy_module(written: dict[str, Path], tmp_path: Path) -> None:
    """In a fresh interpreter, as an engine core builds: the server's modules, then both models from their
    checkpoints, with an empty cache dir."""
    script = (
        "import json, sys\n"
        "from server.config import Settings\n"
        "from server.runtime import Engines\n"
        f"Engines.build(Settings(gen_model={str(written['generate'])!r}, cls_model={str(written['classify'])!r},"
        f" cache_dir={str(tmp_path)!r}, compile_decode='off'))\n"
        f"print(json.dumps([m for m in {HEAVY_MODULES!r} if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
