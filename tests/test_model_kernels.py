"""The model on the Triton kernels equals the model on the references.

On CPU the kernels run through Triton's interpreter (fp32, small shapes); on a GPU (marker `gpu`) in
bf16/fp16 at a realistic width. Head dim 64: the smallest the attention kernel supports.
"""

import pytest
import torch

import bloom_kernels
from bloom import BloomConfig, BloomForCausalLM, quantize_int8
from helpers import HAS_CUDA, KERNEL_DEVICE, left_padded_batch, randomize_

CPU_CFG = dict(vocab_size=67, hidden_size=128, n_layer=2, n_head=2)


def pair_of_logits(model, ids, mask, monkeypatch, **kwargs):
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", "reference")
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, **kwargs).logits
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", "triton")
    before = dict(bloom_kernels._dispatch.dispatch_counts)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, **kwargs).logits
    ran = {op for (op, path), n in bloom_kernels._dispatch.dispatch_counts.items()
           if path == "triton" and n > before.get((op, path), 0)}
    return ref, got, ran


def cpu_model(**extra):
    model = BloomForCausalLM(BloomConfig(**CPU_CFG, **extra)).eval()
    randomize_(model)
    return model


def test_logits_on_kernels_equal_reference_on_cpu(force_triton, monkeypatch):
    model = cpu_model()
    ids, mask = left_padded_batch(CPU_CFG["vocab_size"], lengths=(7, 4))
    ref, got, ran = pair_of_logits(model, ids, mask, monkeypatch)
    assert {"alibi_attention_at", "bias_gelu", "layer_norm"} <= ran
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)


def test_incremental_decoding_on_kernels_equals_reference_on_cpu(force_triton, monkeypatch):
    model = cpu_model()
    ids, mask = left_padded_batch(CPU_CFG["vocab_size"], lengths=(9, 5))
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", "reference")
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", "triton")
    with torch.no_grad():
        out = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        pieces = [out.logits]
        for t in range(6, ids.shape[1]):  # Sq = 1 against a cache view: the decode kernel
            step = model(ids[:, t:t + 1], past_key_values=out.past_key_values, attention_mask=mask[:, :t + 1])
            pieces.append(step.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[real], full[real], atol=1e-4, rtol=1e-4)


def test_training_gradients_on_kernels_equal_reference_on_cpu(force_triton, monkeypatch):
    model = cpu_model()
    ids, mask = left_padded_batch(CPU_CFG["vocab_size"], lengths=(6, 6))
    grads = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("BLOOM_KERNELS_BACKEND", backend)
        model.zero_grad()
        model.train()
        model(ids, labels=ids).loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["reference"].items():
        torch.testing.assert_close(grads["triton"][name], g, atol=1e-4, rtol=1e-3, msg=name)


def test_int8_model_on_kernels_equals_reference_on_cpu(force_triton, monkeypatch):
    model = quantize_int8(cpu_model())
    ids, mask = left_padded_batch(CPU_CFG["vocab_size"], lengths=(5, 3))
    ref, got, ran = pair_of_logits(model, ids, mask, monkeypatch)
    assert "int8_linear" in ran
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)


# --- GPU -------------------------------------------------------------------------------------------
GPU_CFG = dict(vocab_size=1000, hidden_size=1024, n_layer=4, n_head=16)  # bloom-560m's width


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logits_on_kernels_equal_reference_on_gpu(dtype, monkeypatch):
    model = BloomForCausalLM(BloomConfig(**GPU_CFG)).eval()
    randomize_(model)
    model = model.to(KERNEL_DEVICE, dtype)
    ids, mask = left_padded_batch(GPU_CFG["vocab_size"], lengths=(300, 177, 64))
    ids, mask = ids.to(KERNEL_DEVICE), mask.to(KERNEL_DEVICE)
    ref, got, ran = pair_of_logits(model, ids, mask, monkeypatch)
    assert {"alibi_attention_at", "bias_gelu", "layer_norm"} <= ran
    real = mask.bool()
    # Both paths round activations to `dtype` between ops; after 4 blocks the logits differ by a few
    # ulps of their magnitude. Compare with an fp32 model as the yardstick: the kernels' error may
    # not exceed twice the reference path's own error.
    exact = model.float()(ids, attention_mask=mask).logits.detach()
    model.to(dtype)
    err_kernel = (got.float() - exact)[real].abs().max()
    err_ref = (ref.float() - exact)[real].abs().max()
    assert err_kernel <= 2 * err_ref + 1e-3, (err_kernel, err_ref)


@pytest.mark.gpu
def test_int8_generation_on_gpu_matches_reference_path(monkeypatch):
    model = BloomForCausalLM(BloomConfig(**GPU_CFG)).eval()
    randomize_(model)
    model = quantize_int8(model.to(KERNEL_DEVICE, torch.bfloat16))
    ids = torch.randint(4, GPU_CFG["vocab_size"], (2, 40), device=KERNEL_DEVICE)
    ref, got, ran = pair_of_logits(model, ids, torch.ones_like(ids), monkeypatch)
    assert "int8_linear" in ran
    torch.testing.assert_close(got.float(), ref.float(), atol=0.15, rtol=0.05)


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only check")
def test_auto_backend_uses_reference_on_cpu():
    before = bloom_kernels._dispatch.dispatch_counts[("layer_norm", "triton")]
    model = cpu_model()
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
    assert bloom_kernels._dispatch.dispatch_counts[("layer_norm", "triton")] == before
