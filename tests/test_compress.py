"""Compression passes (models/quantize.py, prune.py, compress.py) and GET /info, at unit scale: tiny
dummy models and a few hundred tokens, so the suite stays fast; the full-size table is
load_tests/compression_table.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.classifier import Classifier
from models import quant_kernels
from models.calibration import forward_sequence
from models.compress import CompressionSpec, compress_causal_lm, compress_encoder, weight_bytes
from models.cpu_policy import cpu_policy
from models.llama import Llama
from models.loader import LoadedEncoder, load_causal_lm, load_encoder
from models.prune import CHANNEL_ALIGN, kept_width, prune_mlp
from models.quantize import QuantEmbedding, QuantLinear, smooth_into_norm

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}


@pytest.mark.unit
@pytest.mark.parametrize("method", ["int8", "int8-wo", "fp8"])
@pytest.mark.parametrize("rows", [1, 33])
def test_quant_linear_close_to_float(method: str, rows: int) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(128, 96, bias=True)
    x = torch.randn(rows, 128)
    q = QuantLinear.from_linear(lin, method)
    assert q.qweight.dtype == (torch.float8_e4m3fn if method == "fp8" else torch.int8)
    ref, out = lin(x), q(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    rel = (out - ref).norm() / ref.norm()
    assert rel < (0.08 if method == "fp8" else 0.02), rel


@pytest.mark.unit
def test_int8_rows_do_not_depend_on_the_batch() -> None:
    """Per-token activation scales + exact integer accumulation: a request computes the same alone or batched."""
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(128, 64), "int8")
    x = torch.randn(9, 128)
    batched = q(x)
    for i in range(9):
        assert torch.equal(q(x[i : i + 1]), batched[i : i + 1])


@pytest.mark.unit
@pytest.mark.parametrize("method", ["int8", "int8-wo", "fp8"])
def test_concatenated_quant_linears_compute_the_parts_exactly(method: str) -> None:
    torch.manual_seed(0)
    parts = [QuantLinear.from_linear(nn.Linear(64, n), method) for n in (64, 32, 32)]
    x = torch.randn(5, 64)
    fused = QuantLinear.concat(parts)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))


@pytest.mark.unit
def test_prune_mlp_shapes_and_least_squares_refit() -> None:
    torch.manual_seed(0)
    width, hidden = 256, 32
    up, gate = nn.Linear(hidden, width, bias=False), nn.Linear(hidden, width, bias=False)
    down = nn.Linear(width, hidden)
    h = torch.randn(2048, 16) @ torch.randn(16, width)  # correlated channels: the refit can recover a lot
    gram = h.double().T @ h.double()
    keep = kept_width(width, 0.3)
    assert keep % CHANNEL_ALIGN == 0 and keep < width
    (new_up, new_gate), refit, idx = prune_mlp([up, gate], down, gram, keep, reconstruct=True)
    _, sliced, _ = prune_mlp([up, gate], down, gram, keep, reconstruct=False)
    assert new_up.weight.shape == (keep, hidden) and new_gate.weight.shape == (keep, hidden)
    assert refit.weight.shape == (hidden, keep) and torch.equal(refit.bias, down.bias)
    assert torch.equal(new_up.weight, up.weight[idx]) and idx.numel() == keep
    with torch.no_grad():
        ref = down(h)
        err_refit = (refit(h[:, idx]) - ref).norm()
        err_sliced = (sliced(h[:, idx]) - ref).norm()
    assert err_refit < 0.5 * err_sliced


@pytest.mark.unit
def test_smoothing_is_exact_before_quantization() -> None:
    torch.manual_seed(0)
    norm_w = torch.rand(64) + 0.5
    lins = [nn.Linear(64, 32, bias=False) for _ in range(2)]
    x = torch.randn(10, 64) * torch.linspace(0.1, 20, 64)  # outlier channels
    before = [lin(x * norm_w) for lin in lins]
    smooth_into_norm(norm_w, lins, x.abs().amax(0), alpha=0.5)
    with torch.no_grad():
        for lin, ref in zip(lins, before, strict=True):
            torch.testing.assert_close(lin(x * norm_w), ref, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return load_causal_lm(f"dummy:{path}", cache_dir, torch.float32)


def _fresh(loaded) -> Llama:
    memo: dict[int, torch.Tensor] = {}
    return Llama.from_hf(loaded.config, {k: memo.setdefault(id(v), v.clone()) for k, v in loaded.state_dict.items()})


@pytest.mark.integration
def test_compress_causal_lm_report_and_cache(tiny_lm, tmp_path: Path) -> None:
    spec = CompressionSpec(
        quantize="int8", prune_mlp=0.25, prune_allocation="uniform", smooth_alpha=0.5, calib_tokens=256, eval_tokens=128
    )
    uncompressed = _fresh(tiny_lm)
    before = weight_bytes(uncompressed)
    model, report = compress_causal_lm(uncompressed, tiny_lm.config, tiny_lm.tokenizer, spec, tiny_lm.source, tmp_path)
    assert not report.cached
    assert report.intermediate_sizes == [192, 192]
    assert [layer.mlp.down_proj.in_features for layer in model.layers] == [192, 192]
    assert report.quantized_layers == 2 * 7 + 2 and report.float_layers == []  # every Linear, lm_head, table
    assert isinstance(model.embed_tokens, QuantEmbedding)  # tied table stored once, in int8
    assert isinstance(model.layers[0].self_attn.qkv_proj, QuantLinear)  # one activation quantization for q/k/v
    assert isinstance(model.layers[0].mlp.gate_up_proj, QuantLinear)
    assert report.weight_bytes_before == before and report.weight_bytes_cut > 0.7
    fid = report.fidelity
    assert set(fid) == {"perplexity_before", "perplexity_after", "perplexity_change", "top1_agreement", "eval_tokens"}
    assert 0.0 <= fid["top1_agreement"] <= 1.0 and fid["eval_tokens"] > 100
    ids = torch.arange(100, 140)
    logits = model.logits(forward_sequence(model, ids))
    assert torch.isfinite(logits).all()

    lm = tiny_lm
    cached, again = compress_causal_lm(_fresh(lm), lm.config, lm.tokenizer, spec, lm.source, tmp_path)
    assert again.cached and again.fidelity == report.fidelity
    assert [layer.mlp.down_proj.in_features for layer in cached.layers] == [192, 192]
    torch.testing.assert_close(cached.logits(forward_sequence(cached, ids)), logits, rtol=0, atol=0)


@pytest.mark.integration
def test_compress_encoder_report_and_cache(cache_dir: Path, tmp_path: Path) -> None:
    original = load_encoder("dummy:minilm-l6", cache_dir, torch.float32)
    spec = CompressionSpec(quantize="int8", prune_mlp=0.25, prune_allocation="uniform")

    def embedder(enc: LoadedEncoder):
        return Classifier(enc, "cpu").embed

    def fresh() -> LoadedEncoder:
        return LoadedEncoder(copy.deepcopy(original.model), original.tokenizer, None, original.source)

    first = fresh()
    report = compress_encoder(first, spec, tmp_path, embedder)
    assert report.intermediate_sizes == [1152] * 6 and report.weight_bytes_cut > 0.6
    assert {"embedding_cosine", "label_agreement", "accuracy_before", "accuracy_after"} <= set(report.fidelity)
    assert 0.9 < report.fidelity["embedding_cosine"] <= 1.0 + 1e-6
    second = fresh()
    again = compress_encoder(second, spec, tmp_path, embedder)
    assert again.cached
    texts = ["where is my parcel", "I was charged twice"]
    torch.testing.assert_close(embedder(second)(texts), embedder(first)(texts), rtol=0, atol=0)


@pytest.mark.integration
async def test_info_serves_the_compression_reports(client) -> None:
    r = await client.get("/info")
    assert r.status_code == 200, r.text
    models = {m["task"]: m for m in r.json()["models"]}
    assert set(models) == {"generate", "classify"}
    gen = models["generate"]["compression"]
    quantize = cpu_policy().quantize  # int8 w8a8 where the CPU has 8-bit dot products, else float
    assert gen["spec"]["quantize"] == quantize
    if quantize == "int8":
        assert gen["weight_bytes_cut"] >= 0.4
        assert gen["fidelity"]["top1_agreement"] > 0.8 and gen["fidelity"]["perplexity_change"] < 0.05
    cls = models["classify"]["compression"]
    assert cls["spec"]["quantize"] == "none" and cls["weight_bytes_cut"] == 0  # float: see server/hardware.py
    hardware = r.json()["hardware"]  # what `auto` meant here, and why
    assert (hardware["device"], hardware["gen_quantize"], hardware["cls_quantize"]) == ("cpu", quantize, "none")
    assert "gen_quantize" in hardware["why"]


@pytest.mark.integration
async def test_v1_models_carries_the_compression_report(client) -> None:
    cards = {c["task"]: c for c in (await client.get("/v1/models")).json()["data"]}
    for task in ("generate", "classify"):
        report = cards[task]["details"]["compression"]
        assert report["task"] == task and report["weight_bytes_after"] <= report["weight_bytes_before"]
    gen = cards["generate"]["details"]["compression"]
    # Generation's weights shrink where this CPU's kind quantizes them (models/cpu_policy.py); the classifier stays
    # float (server/hardware.py).
    assert (gen["weight_bytes_after"] < gen["weight_bytes_before"]) == (cpu_policy().quantize != "none")


@pytest.mark.unit
def test_triton_kernels_stay_off_without_cuda() -> None:
    """CPU (and CPU-only installs without Triton) take QuantLinear's PyTorch paths; the kernels are
    checked on the GPU by their startup self-check and load_tests/quant_kernel_bench.py."""
    for dtype in (torch.float32, torch.bfloat16):
        assert not quant_kernels.usable(torch.device("cpu"), dtype)
        assert not quant_kernels.fp8_usable(torch.device("cpu"), dtype)


@pytest.mark.unit
def test_self_check_covers_every_tile_the_kernel_may_pick() -> None:
    """usable() compiles and checks PICKABLE_CONFIGS; a tile outside it would first compile mid-request."""
    shapes = [(m, n, k) for m in (1, 5, 16, 17, 33, 64, 65, 128, 256, 300, 2048, 8192)
              for n in (200, 384, 576, 960, 2048, 6144, 49152) for k in (328, 576, 1536, 8192)]  # fmt: skip
    assert {quant_kernels.pick_config(m, n, k) for m, n, k in shapes} <= set(quant_kernels.PICKABLE_CONFIGS)


@pytest.mark.unit
def test_fused_gemms_only_where_every_gemm_takes_the_fused_kernel() -> None:
    """Batch-1 steps fold norms, SwiGLU and residual adds into the GEMMs (CUDA) for layers of plain or int8
    weight-only projections whose weights are small enough for the fused row-by-row kernel to pay; a larger
    model's layers, and other formats, keep the separate kernels. The logits follow the same rule."""
    from models.llama import ModelArgs
    from models.quantize import fuse_quantized_projections, quantize_modules

    def built(hidden: int, inter: int, method: str = "none", vocab: int = 256) -> Llama:
        args = ModelArgs(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=hidden // 4, rms_norm_eps=1e-5, rope_theta=1e4,
                         max_position=64, tie_word_embeddings=False)  # fmt: skip
        with torch.device("meta"):
            model = Llama(args)
        if method != "none":
            quantize_modules(model, method, keep=lambda name: name == "lm_head", embeddings=False)
            fuse_quantized_projections(model)
        model.fuse_projections()
        return model

    assert all(layer.fused_gemms for layer in built(576, 1536).layers)  # the 135M model's shapes
    assert built(576, 1536, vocab=49152).fused_head  # its logits too, in bf16
    assert not built(2048, 8192, vocab=49152).fused_head  # the 1.7B model's bf16 logits: too large to pay
    assert all(layer.fused_gemms for layer in built(64, 256, "int8-wo").layers)
    assert not any(layer.fused_gemms for layer in built(64, 256, "int8").layers)  # activations quantized per token
    mixed = built(64, 256, "int8-wo")
    mixed.layers[0].mlp.down_proj = nn.Linear(256, 64, bias=False, device="meta")
    mixed.fuse_projections()
    assert [layer.fused_gemms for layer in mixed.layers] == [False, True]  # one weight kind per fused layer
    assert all(layer.fused_gemms for layer in built(2048, 8192).layers)  # the 1.7B model's shapes in bf16
    assert not any(layer.fused_gemms for layer in built(2048, 8192, "int8-wo").layers)  # its int8 qkv, gate_up
    model = built(64, 256)  # the switch a benchmark turns off
    model.fold_into_gemms = False
    model.fuse_projections()
    assert not any(layer.fused_gemms for layer in model.layers) and not model.fused_head
