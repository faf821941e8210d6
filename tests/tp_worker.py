"""One rank of the tensor-parallel tests (tests/test_tensor_parallel.py), started by torchrun:

    torchrun --standalone --nproc-per-node N tests/tp_worker.py WORKDIR [int8] [save] [compile] [heads] [errors]

WORKDIR holds `ckpt/` (a float checkpoint), `inputs.pt` (ids, mask); this rank writes rank{R}.pt with
what the parent compares against one process. gloo, CPU, fp32; the process group is destroyed in a
finally. Every rank seeds torch's RNG differently: sampling must agree anyway (rank 0's seed is shared).
"""

from __future__ import annotations

import gc
import os
import sys
import traceback

import torch
import torch.distributed as dist


class ReadCounter:
    """safetensors.safe_open, counting the bytes of every tensor (or slice) read."""

    read = 0

    def __init__(self, real):
        self.real = real

    def __call__(self, *args, **kwargs):
        counter = self

        class Reader:
            def __init__(self):
                self.inner = counter.real(*args, **kwargs)

            def __enter__(self):
                self.inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_tensor(self, name):
                t = self.inner.get_tensor(name)
                ReadCounter.read += t.numel() * t.element_size()
                return t

            def get_slice(self, name):
                inner = self.inner.get_slice(name)

                class Slice:
                    def get_shape(self):
                        return inner.get_shape()

                    def __getitem__(self, index):
                        t = inner[index]
                        ReadCounter.read += t.numel() * t.element_size()
                        return t

                return Slice()

        return Reader()


def main() -> None:
    workdir, flags = sys.argv[1], set(sys.argv[2:])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(1000 + rank)
    try:
        out = run(workdir, flags)
        torch.save(out, os.path.join(workdir, f"rank{rank}.pt"))
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        gc.collect()  # models left in reference cycles go before the group does (bloom.parallel.shutdown)
        dist.destroy_process_group()


def run(workdir: str, flags: set[str]) -> dict:
    import safetensors

    safetensors.safe_open = ReadCounter(safetensors.safe_open)

    from bloom import BloomForCausalLM, BloomModel, quantize_int8
    from bloom.parallel import local_bytes

    ckpt = os.path.join(workdir, "ckpt")
    ids, mask = torch.load(os.path.join(workdir, "inputs.pt"))
    out: dict = {}
    model = BloomForCausalLM.from_pretrained(ckpt, tensor_parallel=True)
    out["read_bytes"] = ReadCounter.read
    out["bytes"] = local_bytes(model)
    out["embedding_rows"] = model.transformer.word_embeddings.weight.shape[0]
    out["local_heads"] = model.transformer.h[0].self_attention.num_heads
    out["slopes"] = model.transformer.alibi_slopes(torch.device("cpu"))
    with torch.inference_mode():
        out["logits"] = model(ids, attention_mask=mask).logits
        # the cached path: prompt, then one more token through past_key_values
        first = model(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        out["cached_logits"] = model(ids[:, -1:], attention_mask=mask,
                                     past_key_values=first.past_key_values).logits
        probs = model(ids, attention_mask=mask, output_attentions=True).attentions
        out["attention_heads"] = probs[0].shape[1]
    out["greedy"] = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    out["sampled"] = model.generate(ids, mask, max_new_tokens=8, do_sample=True, top_k=20, eos_token_id=[])
    out["beams"] = model.generate(ids, mask, max_new_tokens=4, num_beams=2, eos_token_id=[])
    if "compile" in flags:
        out["compiled"] = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[], decode="compile",
                                         compile_backend="eager")
    with torch.inference_mode():
        base = BloomModel.from_pretrained(ckpt, tensor_parallel=True)
        out["base_hidden"] = base(ids, attention_mask=mask).last_hidden_state
    if "save" in flags:
        model.save_pretrained(os.path.join(workdir, "saved"))
    if "int8" in flags:
        q = BloomForCausalLM.from_pretrained(ckpt, tensor_parallel=True, quantization="int8")
        with torch.inference_mode():
            out["int8_logits"] = q(ids, attention_mask=mask).logits
        out["int8_greedy"] = q.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
        quantize_int8(model)  # a loaded float TP model quantised afterwards: the same int8 model
        with torch.inference_mode():
            out["int8_after_logits"] = model(ids, attention_mask=mask).logits
        if "save" in flags:
            q.save_pretrained(os.path.join(workdir, "saved_int8"))
    if "heads" in flags:  # the task heads: replicated, on the split base model
        from bloom import BloomForSequenceClassification, BloomForTokenClassification

        cls = BloomForSequenceClassification.from_pretrained(os.path.join(workdir, "cls"), tensor_parallel=True)
        # a head the checkpoint lacks is initialised afresh: rank 0's init on every rank
        token = BloomForTokenClassification.from_pretrained(ckpt, tensor_parallel=True, num_labels=5)
        with torch.inference_mode():
            out["cls_logits"] = cls(ids, attention_mask=mask).logits
            out["token_logits"] = token(ids, attention_mask=mask).logits
    if "errors" in flags:
        try:
            BloomForCausalLM.from_pretrained(ckpt, tensor_parallel=True, n_head=3)
        except ValueError as err:
            out["heads_error"] = str(err)
    return out


if __name__ == "__main__":
    main()
