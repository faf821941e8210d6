"""Tensor parallelism (bloom/parallel.py) on CPU processes: gloo, fp32, launched by torchrun.

One checkpoint (hidden 96, 12 heads, 2 layers, vocabulary 501: not divisible by 2 or 4, so the last
rank holds fewer vocabulary rows) is loaded by 2 and by 4 ranks (tests/tp_worker.py); each rank writes
what it computed and the tests compare it with one process. 12 heads on 4 ranks: each rank's ALiBi
slopes must be its slice of the 12 global slopes, which differ from alibi_slopes(3). Every torchrun
is time-bounded (start-up included) and killed with its workers past the bound; the workers destroy
their process group in a finally.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bloom_kernels as bk
from bloom import BloomConfig, BloomForCausalLM, BloomForSequenceClassification, BloomModel
from bloom.parallel import NO_GROUP, check_devices, check_heads, local_bytes
from helpers import left_padded_batch, randomize_

HERE = Path(__file__).resolve().parent
WORKER = HERE / "tp_worker.py"
CONFIG = dict(hidden_size=96, n_layer=2, n_head=12, vocab_size=501)
TIME_LIMIT_S = {2: 120, 4: 180}  # each torchrun, process start-up included (2 shared CPU cores)


def torchrun(workdir: Path, world: int, *flags: str) -> list[dict]:
    """Run tests/tp_worker.py on `world` gloo ranks; every rank's results."""
    for old in workdir.glob("rank*.pt"):
        old.unlink()
    launch(world, [str(WORKER), str(workdir), *flags])
    return [torch.load(workdir / f"rank{r}.pt") for r in range(world)]


def launch(world: int, args: list[str]) -> str:
    """torchrun --standalone --nproc-per-node=world ARGS, within TIME_LIMIT_S[world]; its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group: killed whole past the bound
    try:
        output, errors = proc.communicate(timeout=TIME_LIMIT_S[world])
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, errors = proc.communicate()
        pytest.fail(f"torchrun with {world} ranks took more than {TIME_LIMIT_S[world]} s:\n{errors[-4000:]}")
    assert proc.returncode == 0, f"torchrun with {world} ranks failed:\n{output[-2000:]}\n{errors[-6000:]}"
    print(f"torchrun {world} ranks: {time.monotonic() - start:.1f} s")
    return output


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tensor_parallel")
    model = BloomForCausalLM(BloomConfig(**CONFIG)).eval()
    randomize_(model, seed=0)
    model.save_pretrained(path / "ckpt")
    ids, mask = left_padded_batch(CONFIG["vocab_size"], lengths=(7, 4))
    torch.save((ids, mask), path / "inputs.pt")
    classifier = BloomForSequenceClassification(BloomConfig(**CONFIG, num_labels=3, pad_token_id=3)).eval()
    randomize_(classifier, seed=1)
    classifier.save_pretrained(path / "cls")
    return path


@pytest.fixture(scope="module")
def single(workdir) -> dict:
    """What one process computes from the same checkpoint."""
    ids, mask = torch.load(workdir / "inputs.pt")
    model = BloomForCausalLM.from_pretrained(workdir / "ckpt")
    int8 = BloomForCausalLM.from_pretrained(workdir / "ckpt", quantization="int8")
    with torch.inference_mode():
        out = dict(
            model=model, ids=ids, mask=mask,
            logits=model(ids, attention_mask=mask).logits,
            base_hidden=BloomModel.from_pretrained(workdir / "ckpt")(ids, attention_mask=mask).last_hidden_state,
            int8_logits=int8(ids, attention_mask=mask).logits,
            cls_logits=BloomForSequenceClassification.from_pretrained(workdir / "cls")(ids, attention_mask=mask).logits,
        )
    out["greedy"] = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    out["beams"] = model.generate(ids, mask, max_new_tokens=4, num_beams=2, eos_token_id=[])
    out["int8_greedy"] = int8.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    out["int8_state"] = int8.state_dict()
    out["bytes"] = local_bytes(model)
    return out


@pytest.fixture(scope="module")
def ranks2(workdir, single) -> list[dict]:
    return torchrun(workdir, 2, "int8", "save", "compile", "heads", "errors")


@pytest.fixture(scope="module")
def ranks4(workdir, single) -> list[dict]:
    return torchrun(workdir, 4, "errors")


@pytest.fixture(params=[2, 4])
def ranks(request) -> list[dict]:
    return request.getfixturevalue(f"ranks{request.param}")


# --------------------------------------------------------------------------------------------------
def test_logits_equal_one_process(ranks, single):
    for rank, out in enumerate(ranks):
        torch.testing.assert_close(out["logits"], single["logits"], rtol=0, atol=1e-5, msg=f"rank {rank}")
        assert torch.equal(out["logits"], ranks[0]["logits"])  # every rank holds the same gathered logits
        # a cached step (past_key_values of this rank's heads) and the base model alike
        torch.testing.assert_close(out["cached_logits"][:, -1], single["logits"][:, -1], rtol=0, atol=1e-5)
        torch.testing.assert_close(out["base_hidden"], single["base_hidden"], rtol=0, atol=1e-5)
        assert out["attention_heads"] == CONFIG["n_head"]  # output_attentions: every head, gathered


def test_greedy_generation_is_identical(ranks, single):
    for out in ranks:
        assert torch.equal(out["greedy"], single["greedy"])
        assert torch.equal(out["beams"], single["beams"])


def test_compiled_decode_step_traces_the_collectives(ranks2, single):
    for out in ranks2:  # torch.compile(fullgraph=True) of the step: the functional collectives trace
        assert torch.equal(out["compiled"], single["greedy"])


def test_task_heads_on_the_split_model(ranks2, single):
    for out in ranks2:
        torch.testing.assert_close(out["cls_logits"], single["cls_logits"], rtol=0, atol=1e-5)
        assert torch.equal(out["token_logits"], ranks2[0]["token_logits"])  # a fresh head: rank 0's everywhere


def test_sampling_is_the_same_on_every_rank(ranks):
    # every rank's torch RNG is seeded differently; generate shares rank 0's seed
    for out in ranks[1:]:
        assert torch.equal(out["sampled"], ranks[0]["sampled"])


def test_alibi_slopes_are_slices_of_the_global_heads(ranks4):
    every = bk.alibi_slopes(CONFIG["n_head"])
    per_rank = CONFIG["n_head"] // 4
    assert not torch.equal(every[:per_rank], bk.alibi_slopes(per_rank))  # a local recomputation would be wrong
    for rank, out in enumerate(ranks4):
        assert out["local_heads"] == per_rank
        assert torch.equal(out["slopes"], every[rank * per_rank:(rank + 1) * per_rank])


def test_each_rank_holds_and_reads_about_one_world_th(ranks, single):
    world = len(ranks)
    whole = single["bytes"]
    replicated = 4 * (2 * CONFIG["n_layer"] * 2 * CONFIG["hidden_size"] + 4 * CONFIG["hidden_size"]
                      + 2 * CONFIG["n_layer"] * CONFIG["hidden_size"])  # LayerNorms, row-parallel biases
    rows = [out["embedding_rows"] for out in ranks]
    assert sum(rows) == CONFIG["vocab_size"] and max(rows) - min(rows) <= world  # embeddings split too
    for out in ranks:
        assert out["bytes"] <= whole / world + replicated
        assert out["bytes"] >= whole / world - 4 * CONFIG["hidden_size"] * world  # the last rank's fewer rows
        # read from the safetensors file: the rank's slices (and the small replicated tensors) only
        assert out["read_bytes"] == out["bytes"]
    assert sum(out["bytes"] for out in ranks) == whole + (world - 1) * replicated  # only those replicated


def test_int8_on_two_ranks_equals_int8_on_one(ranks2, single):
    for out in ranks2:
        torch.testing.assert_close(out["int8_logits"], single["int8_logits"], rtol=0, atol=1e-5)
        assert torch.equal(out["int8_greedy"], single["int8_greedy"])
        # a float model split, then quantize_int8: the same
        torch.testing.assert_close(out["int8_after_logits"], single["int8_logits"], rtol=0, atol=1e-5)


def test_save_from_two_ranks_loads_in_one_process(ranks2, single, workdir):
    assert sorted(p.name for p in (workdir / "saved").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]  # the whole checkpoint, once
    saved = BloomForCausalLM.from_pretrained(workdir / "saved")
    for key, tensor in single["model"].state_dict().items():
        assert torch.equal(saved.state_dict()[key], tensor), key
    with torch.inference_mode():
        assert torch.equal(saved(single["ids"], attention_mask=single["mask"]).logits, single["logits"])
    # int8 saved from 2 ranks: exactly the tensors of int8 in one process (whole-row scales)
    int8 = BloomForCausalLM.from_pretrained(workdir / "saved_int8")
    for key, tensor in single["int8_state"].items():
        assert torch.equal(int8.state_dict()[key], tensor), key


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def test_no_process_group_is_a_clear_error(workdir):
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="torchrun") as info:
        BloomForCausalLM.from_pretrained(workdir / "ckpt", tensor_parallel=True)
    assert "init_process_group" in str(info.value) and str(info.value) == NO_GROUP


def test_heads_not_divisible_by_the_world_is_a_clear_error(ranks):
    world = len(ranks)
    for out in ranks:  # n_head=3 on 2 and on 4 ranks
        assert "n_head=3" in out["heads_error"] and f"world size {world}" in out["heads_error"]
    with pytest.raises(ValueError, match=r"n_head=112 is not divisible by the world size 5"):
        check_heads(112, 5)
    check_heads(112, 8)


@pytest.mark.parametrize("devices, backend, words", [
    ([("a", "cpu"), ("a", "cuda:1")], "nccl", "same kind of device"),
    ([("a", "cuda:0"), ("a", "cuda:0")], "nccl", "ranks 0 and 1 both use cuda:0"),
    ([("a", "cpu"), ("a", "cpu")], "nccl", "gloo"),
])
def test_mismatched_devices_are_a_clear_error(devices, backend, words):
    with pytest.raises(ValueError, match=words):
        check_devices(devices, backend)


def test_matching_devices_pass():
    check_devices([("a", "cuda:0"), ("a", "cuda:1"), ("b", "cuda:0"), ("b", "cuda:1")], "nccl")
    check_devices([("a", "cpu"), ("b", "cpu")], "gloo")
    check_devices([("a", "cpu"), ("a", "cpu")], "cpu:gloo,cuda:nccl")


def test_tensor_parallel_must_be_a_bool(workdir):
    with pytest.raises(ValueError, match="tensor_parallel must be True or False"):
        BloomForCausalLM.from_pretrained(workdir / "ckpt", tensor_parallel="yes")


def test_single_process_model_is_untouched(single):
    model = single["model"]
    assert model.tp is None and model.transformer.tp is None
    assert type(model.lm_head).__name__ == "BloomLinear"
    assert type(model.transformer.h[0].self_attention.dense).__name__ == "BloomLinear"


def test_cli_generate_tensor_parallel_under_torchrun(tmp_path):
    from bloom import BloomTokenizerFast
    from helpers import BLOOM_CONFIG, train_bloom_like_tokenizer, write_tokenizer_dir

    backend = train_bloom_like_tokenizer()
    write_tokenizer_dir(tmp_path, backend, BLOOM_CONFIG)
    model = BloomForCausalLM(BloomConfig(vocab_size=backend.get_vocab_size(), hidden_size=32, n_layer=2,
                                         n_head=4, pad_token_id=3, eos_token_id=2)).eval()
    randomize_(model, seed=2)
    model.save_pretrained(tmp_path)
    printed = launch(2, ["-m", "bloom.cli", "generate", str(tmp_path), "Hello world", "--max-new-tokens", "6",
                         "--tensor-parallel", "--device", "cpu", "--temperature", "0.9", "--seed", "5"])
    tokenizer = BloomTokenizerFast.from_pretrained(tmp_path)
    ids = tokenizer("Hello world", return_tensors="pt")["input_ids"]
    # the CLI's generator is seeded with --seed on every rank; rank 0 draws the shared seed from it
    seed = torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5))
    expected = model.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.9,
                              generator=torch.Generator().manual_seed(int(seed)))
    assert printed == tokenizer.decode(expected[0], skip_special_tokens=True) + "\n"  # rank 0 prints, once


def test_bench_under_torchrun_reports_latency_and_all_reduce_share(tmp_path):
    import json

    out = tmp_path / "bench.json"
    printed = launch(2, ["-m", "bloom.cli", "bench", "--shape", "tiny", "--tensor-parallel", "--device", "cpu",
                         "--new-tokens", "16", "--repeats", "3", "--batch", "1", "--json", str(out)])
    assert "all-reduce share" in printed and printed.count("bloom bench --tensor-parallel") == 1  # rank 0 only
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["backend"] == "gloo"
    row = result["batches"][0]
    assert row["token_ms"] > 0 and row["collectives_ms_per_token"] > 0 and 0 < row["all_reduce_share"]
