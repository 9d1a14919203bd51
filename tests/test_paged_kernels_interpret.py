"""The CUDA decode path's Triton kernels (models/paged_attention.py: paged decode and verification attention,
RoPE fused with the KV-cache write; models/quant_kernels.py: GEMMs with the norm, SwiGLU or residual add folded
in) run through Triton's interpreter on CPU tensors, in a child process (the interpreter is chosen when the
kernels are defined, at import): their self-checks pass, and decode and verification steps of a tiny Llama
through them, with and without the fused GEMMs (batch-1 steps), equal the gather + SDPA path; through the fused
GEMMs a batch-1 verification step equals one-token steps bit for bit. Skipped where
Triton is not installed (CPU-only installs, as CI's); on CUDA the same self-check guards the kernels at startup."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

pytest.importorskip("triton")

CHILD = r"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.cuda_graphs import DecodeConfig, DecodeGraphs
from models import paged_attention, quant_kernels
from models.llama import Llama

cpu = torch.device("cpu")
for heads, kv_heads, head_dim in ((9, 3, 64), (4, 1, 128)):
    assert paged_attention.self_check(cpu, torch.float32, heads, kv_heads, head_dim, 16) is None
assert quant_kernels._fused_agrees(cpu, torch.float32, quantized=True)
assert quant_kernels._fused_agrees(cpu, torch.float32, quantized=False)
quant_kernels._checked["fused-float", "cpu", torch.float32] = True  # fused GEMMs in fp32 on CPU, interpreted

torch.manual_seed(0)
config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
model = Llama.from_hf(config, LlamaForCausalLM(config).state_dict())
with torch.no_grad():  # norm weights other than HF's ones, so the fused kernels' use of them is checked too
    for layer in model.layers:
        layer.input_layernorm.weight.uniform_(0.5, 1.5)
        layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
model.fuse_projections()
tokens = torch.randint(0, 300, (3, 40)).tolist()
tables = [list(range(1 + 4 * i, 5 + 4 * i)) for i in range(3)]
assert all(layer.fused_gemms for layer in model.layers)
logits, exact = {}, {}
for paged, fused in ((False, False), (True, False), (True, True)):
    for layer in model.layers:
        layer.fused_gemms = fused
    cache = (torch.zeros(2, 64 * 16, 2, 32), torch.zeros(2, 64 * 16, 2, 32))
    graphs = DecodeGraphs(model, cache, 16, DecodeConfig(max_num_seqs=4, max_model_len=256), cpu)
    graphs.paged_kernel = paged
    out = []
    with torch.inference_mode():
        for pos in range(30):  # one token at a time, then a verification step four tokens wide
            rows = [(tokens[b][pos : pos + 1], pos, tables[b]) for b in range(3)]
            out.append(graphs.replay(*graphs.stage_rows(rows, 1), 1)[1][:3].clone())
        rows = [(tokens[b][30:34], 30, tables[b]) for b in range(3)]
        out.append(graphs.replay(*graphs.stage_rows(rows, 4), 4)[1][:12].clone())
        for pos in range(34, 40):  # the first sequence alone: batch-1 steps, where the fused GEMMs run
            alone = graphs.stage_rows([(tokens[0][pos : pos + 1], pos, tables[0])], 1)
            out.append(graphs.replay(*alone, 1)[1][:1].clone())
        # The second sequence alone: a verification step four tokens wide, then one-token steps at its positions
        # (over the keys and values it wrote), which the fused GEMMs must reproduce bit for bit.
        verified = graphs.replay(*graphs.stage_rows([(tokens[1][30:34], 30, tables[1])], 4), 4)[1][:4].clone()
        steps = [graphs.replay(*graphs.stage_rows([(tokens[1][p : p + 1], p, tables[1])], 1), 1)[1][:1].clone()
                 for p in range(30, 34)]
        exact[paged, fused] = torch.equal(verified, torch.cat(steps))
        out += [verified, *steps]
    logits[paged, fused] = torch.cat(out)
paged = float((logits[True, False] - logits[False, False]).abs().max())
fused = float((logits[True, True] - logits[True, False]).abs().max() / logits[True, False].abs().max())
assert paged < 1e-4 and fused < 1e-5, (paged, fused)
assert exact[True, True], "a batch-1 verification step through the fused GEMMs differs from one-token steps"
print("ok", paged, fused)
"""


def test_paged_kernels_match_the_sdpa_path_under_the_interpreter() -> None:
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(filter(None, (str(root), os.environ.get("PYTHONPATH"))))  # Triton may come from there
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
