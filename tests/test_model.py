"""BloomModel / BloomForCausalLM against transformers' BLOOM on the same random weights (CPU, fp32)."""

import pytest
import torch

import bloom
from bloom import BloomCache, BloomConfig, BloomForCausalLM, BloomModel
from bloom.model import BloomLinear
from helpers import left_padded_batch, randomize_

transformers = pytest.importorskip("transformers")

# fp32 on the CPU: both models run the same math in a slightly different order (fused residual add,
# matmul vs baddbmm for the scores), so logits agree to ~1e-6; 1e-4 is the bound.
ATOL = 1e-4

CONFIGS = {
    # n_head not a power of two: the interleaved ALiBi slopes
    "heads3": dict(vocab_size=97, hidden_size=24, n_layer=2, n_head=3),
    "post_ln_residual": dict(vocab_size=97, hidden_size=32, n_layer=3, n_head=4,
                             apply_residual_connection_post_layernorm=True),
    "tp2_slow_exact": dict(vocab_size=97, hidden_size=32, n_layer=2, n_head=4, pretraining_tp=2,
                           slow_but_exact=True),
    "heads12": dict(vocab_size=61, hidden_size=48, n_layer=2, n_head=12),
}


def model_pair(cfg: dict, cls=BloomForCausalLM, hf_cls=None, zero_tp_biases=False, **extra):
    hf_cls = hf_cls or getattr(transformers, cls.__name__)
    theirs = hf_cls(transformers.BloomConfig(**cfg, **extra)).eval()
    randomize_(theirs)
    if zero_tp_biases:
        # transformers drops the biases of dense / dense_4h_to_h when pretraining_tp > 1 and
        # slow_but_exact (a bug: Megatron adds them); we keep them, so compare with them zeroed.
        with torch.no_grad():
            for block in theirs.transformer.h:
                block.self_attention.dense.bias.zero_()
                block.mlp.dense_4h_to_h.bias.zero_()
    ours = cls(BloomConfig(**cfg, **extra)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def assert_close_on_tokens(a, b, mask, atol=ATOL):
    """Compare (B, S, ...) tensors at real-token positions only (padded queries are undefined)."""
    real = mask.bool()
    assert torch.allclose(a[real], b[real], atol=atol, rtol=0), (a[real] - b[real]).abs().max()


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers_on_left_padded_batch(name):
    cfg = CONFIGS[name]
    ours, theirs = model_pair(cfg, zero_tp_biases="tp2" in name)
    ids, mask = left_padded_batch(cfg["vocab_size"])
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = theirs(ids, attention_mask=mask).logits
    assert a.shape == b.shape == (*ids.shape, cfg["vocab_size"])
    assert_close_on_tokens(a, b, mask)


@pytest.mark.parametrize("name", CONFIGS)
def test_loss_with_labels_matches_transformers(name):
    cfg = CONFIGS[name]
    ours, theirs = model_pair(cfg, zero_tp_biases="tp2" in name)
    ids, mask = left_padded_batch(cfg["vocab_size"])
    labels = ids.masked_fill(mask == 0, -100)
    # The first real token of a padded row is predicted from a padded position, whose output is
    # undefined (transformers and we fill fully-masked attention rows differently): ignore it.
    first_real = mask.argmax(1)
    labels[torch.arange(len(ids)), first_real] = -100
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, labels=labels).loss
        b = theirs(ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(a, b, atol=ATOL), (a, b)
    # and against an independent computation: mean CE of the next token over labelled positions
    logits = ours(ids, attention_mask=mask).logits.detach()
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    expected = -lp[keep].gather(-1, tgt[keep][:, None]).mean()
    assert torch.allclose(a.double(), expected, atol=1e-5)


def test_tp_slow_but_exact_keeps_the_biases():
    """With non-zero dense biases our tp=2 path equals the tp=1 model (Megatron's math, biases kept)."""
    cfg = CONFIGS["tp2_slow_exact"]
    exact = BloomForCausalLM(BloomConfig(**cfg)).eval()
    randomize_(exact)
    plain = BloomForCausalLM(BloomConfig(**{**cfg, "slow_but_exact": False})).eval()
    plain.load_state_dict(exact.state_dict())
    ids, mask = left_padded_batch(cfg["vocab_size"])
    with torch.no_grad():
        assert_close_on_tokens(exact(ids, attention_mask=mask).logits,
                               plain(ids, attention_mask=mask).logits, mask, atol=1e-5)
        assert exact.transformer.h[0].self_attention.dense.bias.abs().sum() > 0


@pytest.mark.parametrize("name", ["heads3", "post_ln_residual"])
def test_kv_cache_incremental_decoding_equals_full_forward(name):
    cfg = CONFIGS[name]
    ours, theirs = model_pair(cfg)
    ids, mask = left_padded_batch(cfg["vocab_size"])
    prompt = 4
    with torch.no_grad():
        out = ours(ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, BloomCache) and cache.get_seq_length() == prompt
        pieces = [out.logits]
        for t in range(prompt, ids.shape[1]):
            step = ours(ids[:, t:t + 1], past_key_values=cache, attention_mask=mask[:, :t + 1])
            cache = step.past_key_values
            pieces.append(step.logits)
        incremental = torch.cat(pieces, 1)
        full_hf = theirs(ids, attention_mask=mask).logits
    assert cache.get_seq_length() == ids.shape[1]
    assert_close_on_tokens(incremental, full_hf, mask)


def test_chunked_prefill_and_legacy_tuple_cache():
    cfg = CONFIGS["heads12"]
    ours, _ = model_pair(cfg)
    ids, mask = left_padded_batch(cfg["vocab_size"], lengths=(8, 5))
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        first = ours(ids[:, :3], attention_mask=mask[:, :3], use_cache=True)
        # transformers 4.x BLOOM tuple layout: key (B*H, D, L), value (B*H, L, D)
        legacy = first.past_key_values.to_legacy_cache()
        assert legacy[0][0].shape == (2 * 12, 4, 3) and legacy[0][1].shape == (2 * 12, 3, 4)
        second = ours(ids[:, 3:], past_key_values=legacy, attention_mask=mask)
    assert_close_on_tokens(torch.cat([first.logits, second.logits], 1), full, mask)


def test_hidden_states_and_attentions_match_transformers():
    cfg = CONFIGS["heads3"]
    ours, theirs = model_pair(cfg, cls=BloomModel)
    ids, mask = left_padded_batch(cfg["vocab_size"])
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        b = theirs(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert len(a.hidden_states) == len(b.hidden_states) == cfg["n_layer"] + 1
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert_close_on_tokens(x, y, mask)
    assert_close_on_tokens(a.last_hidden_state, b.last_hidden_state, mask)
    assert len(a.attentions) == cfg["n_layer"]
    for x, y in zip(a.attentions, b.attentions):
        real_q = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
        real_q = real_q.expand_as(x)
        assert torch.allclose(x[real_q], y[real_q], atol=1e-5)


def test_training_dropout_matches_transformers_under_the_same_seed():
    cfg = dict(CONFIGS["heads3"], hidden_dropout=0.2, attention_dropout=0.3)
    ours, theirs = model_pair(cfg)
    ours.train()
    theirs.train()
    ids = torch.randint(4, cfg["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    a = ours(ids, labels=ids)
    torch.manual_seed(123)
    b = theirs(ids, labels=ids)
    assert torch.allclose(a.logits, b.logits, atol=ATOL)
    assert torch.allclose(a.loss, b.loss, atol=ATOL)
    # dropout really acts in training, and not in eval
    ours.eval()
    with torch.no_grad():
        c = ours(ids).logits
        assert not torch.allclose(a.logits.detach(), c, atol=1e-3)
        assert torch.equal(c, ours(ids).logits)
    a.loss.backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)


def test_return_dict_false_gives_transformers_tuple_order():
    cfg = CONFIGS["heads3"]
    ours, _ = model_pair(cfg)
    ids, mask = left_padded_batch(cfg["vocab_size"])
    with torch.no_grad():
        d = ours(ids, attention_mask=mask, labels=ids, use_cache=True, output_hidden_states=True)
        t = ours(ids, attention_mask=mask, labels=ids, use_cache=True, output_hidden_states=True,
                 return_dict=False)
    assert isinstance(t, tuple) and len(t) == 4
    assert torch.equal(t[0], d.loss) and torch.equal(t[1], d.logits)
    assert isinstance(t[2], BloomCache) and len(t[3]) == cfg["n_layer"] + 1
    assert torch.equal(d["logits"], d.logits) and d.to_tuple()[1] is d.logits


def test_inputs_embeds_equals_input_ids():
    cfg = CONFIGS["heads3"]
    ours, _ = model_pair(cfg)
    ids, mask = left_padded_batch(cfg["vocab_size"])
    with torch.no_grad():
        embeds = ours.get_input_embeddings()(ids)
        assert torch.equal(ours(inputs_embeds=embeds, attention_mask=mask).logits,
                           ours(ids, attention_mask=mask).logits)


def test_head_mask_zeroes_a_heads_contribution():
    cfg = CONFIGS["heads3"]
    ours, _ = model_pair(cfg)
    ids, _ = left_padded_batch(cfg["vocab_size"], lengths=(7, 7))
    head_dim = cfg["hidden_size"] // cfg["n_head"]
    masked_head = 1
    head_mask = torch.ones(cfg["n_layer"], cfg["n_head"])
    head_mask[:, masked_head] = 0
    # The same effect by construction: zero that head's value projection (v = 0 -> its context = 0).
    zeroed = BloomForCausalLM(ours.config).eval()
    zeroed.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for block in zeroed.transformer.h:
            qkv = block.self_attention.query_key_value
            rows = slice(masked_head * 3 * head_dim + 2 * head_dim, masked_head * 3 * head_dim + 3 * head_dim)
            qkv.weight[rows] = 0
            qkv.bias[rows] = 0
        a = ours(ids, head_mask=head_mask).logits
        b = zeroed(ids).logits
        c = ours(ids, head_mask=torch.ones(cfg["n_head"])).logits
        d = ours(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(c, d)
    assert not torch.allclose(a, d, atol=1e-3)


def test_lm_head_is_tied_and_state_dict_names_match_transformers():
    cfg = CONFIGS["heads3"]
    ours, theirs = model_pair(cfg)
    assert ours.lm_head.weight is ours.transformer.word_embeddings.weight
    assert set(ours.state_dict()) == set(theirs.state_dict())
    base = BloomModel(BloomConfig(**cfg))
    base.load_state_dict(transformers.BloomModel(transformers.BloomConfig(**cfg)).state_dict(), strict=True)


def test_initialisation_follows_transformers():
    model = BloomForCausalLM(BloomConfig(vocab_size=500, hidden_size=64, n_layer=2, n_head=4,
                                         initializer_range=0.02))
    w = model.transformer.h[0].mlp.dense_h_to_4h.weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert torch.equal(model.transformer.h[0].mlp.dense_h_to_4h.bias, torch.zeros(256))
    assert torch.equal(model.transformer.ln_f.weight, torch.ones(64))


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(input_ids=torch.tensor([[1, 2, 97]])), ValueError, ["input_ids", "97", "[0, 97)"]),
        (dict(input_ids=torch.tensor([[1, -1, 2]])), ValueError, ["input_ids", "-1"]),
        (dict(input_ids=torch.tensor([[1.0, 2.0]])), TypeError, ["input_ids", "integer"]),
        (dict(input_ids=torch.tensor([1, 2, 3])), ValueError, ["input_ids", "(batch, sequence)"]),
        (dict(), ValueError, ["exactly one", "neither"]),
        (dict(input_ids=torch.tensor([[1, 2]]), inputs_embeds=torch.zeros(1, 2, 24)), ValueError,
         ["exactly one", "both"]),
        (dict(inputs_embeds=torch.zeros(1, 2, 23)), ValueError, ["inputs_embeds", "24"]),
        (dict(inputs_embeds=torch.zeros(1, 2, 24, dtype=torch.float64)), TypeError, ["inputs_embeds", "dtype"]),
        (dict(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3)), ValueError,
         ["attention_mask", "(1, 2)"]),
        (dict(input_ids=torch.tensor([[1, 2]]), head_mask=torch.ones(5)), ValueError, ["head_mask"]),
        (dict(input_ids=torch.tensor([[1, 2]]), labels=torch.tensor([[1, 2, 3]])), ValueError, ["labels"]),
        (dict(input_ids=torch.tensor([[1, 2]]), labels=torch.tensor([[1, 200]])), ValueError, ["labels"]),
        (dict(input_ids=torch.tensor([[1, 2]]), bogus=1), TypeError, ["bogus"]),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, error, words):
    model = BloomForCausalLM(BloomConfig(**CONFIGS["heads3"])).eval()
    with pytest.raises(error) as info:
        model(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_cache_batch_mismatch_and_overflow_are_refused():
    model = BloomForCausalLM(BloomConfig(**CONFIGS["heads3"])).eval()
    cache = model.transformer.new_cache(2, 4, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="batch of 2"):
        model(torch.tensor([[1, 2]]), past_key_values=cache)
    with pytest.raises(bloom.CacheOverflowError, match="holds 4 positions"):
        model(torch.tensor([[1, 2, 3, 4, 5]] * 2), past_key_values=cache)
    assert cache.get_seq_length() == 0  # nothing half-written counted


def test_model_calls_only_bloom_kernels_ops(monkeypatch):
    """Attention, GeLU and LayerNorm go through bloom_kernels' unchecked entries (kernels slot in there):
    the inputs are checked once at the model's boundary, never again per layer by the public ops."""
    import bloom_kernels

    calls = []
    for module in (bloom_kernels, bloom_kernels.unchecked):
        for op in ("alibi_attention", "bias_gelu", "layer_norm", "prepare_attention"):
            if hasattr(module, op):
                real = getattr(module, op)
                name = op if module is bloom_kernels.unchecked else f"public {op}"
                monkeypatch.setattr(module, op, lambda *a, _real=real, _op=name, **k: calls.append(_op) or _real(*a, **k))
    model = BloomForCausalLM(BloomConfig(**CONFIGS["heads3"])).eval()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[0, 1, 1]]))
    n = CONFIGS["heads3"]["n_layer"]
    assert calls.count("prepare_attention") == 1  # key positions and slopes: once per forward
    assert calls.count("alibi_attention") == n
    assert calls.count("bias_gelu") == n
    assert calls.count("layer_norm") == 2 * n + 2  # 2 per block, embedding LN, ln_f
    assert not [c for c in calls if c.startswith("public")]


def test_block_projections_are_linears_computed_by_bloom_kernels(monkeypatch):
    """Every projection is an nn.Linear (BloomLinear) whose forward is bloom_kernels' linear (unchecked
    entry); h->4h runs without its bias, which goes to the fused bias-GeLU."""
    import bloom_kernels

    cfg = CONFIGS["heads3"]
    model = BloomForCausalLM(BloomConfig(**cfg)).eval()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 4 * cfg["n_layer"] + 1
    assert all(isinstance(m, BloomLinear) for m in linears.values())
    calls = []
    real_linear, real_bias_gelu = bloom_kernels.unchecked.linear, bloom_kernels.unchecked.bias_gelu

    def linear(x, weight, bias=None):
        calls.append((weight.shape, bias is not None))
        return real_linear(x, weight, bias)

    def bias_gelu(x, bias):
        calls.append(("bias_gelu", bias.shape))
        return real_bias_gelu(x, bias)

    monkeypatch.setattr(bloom_kernels.unchecked, "linear", linear)
    monkeypatch.setattr(bloom_kernels.unchecked, "bias_gelu", bias_gelu)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    E = cfg["hidden_size"]
    block = [((3 * E, E), True), ((E, E), True),  # query_key_value, dense
             ((4 * E, E), False), ("bias_gelu", (4 * E,)), ((E, 4 * E), True)]  # the MLP
    assert calls == block * cfg["n_layer"] + [((cfg["vocab_size"], E), False)]


def test_block_hands_on_the_residual_stream():
    """BloomBlock: output hidden state = mlp_out + residual_stream, equal to transformers' block output."""
    for name in ("heads3", "post_ln_residual"):
        cfg = CONFIGS[name]
        ours, theirs = model_pair(cfg, cls=BloomModel)
        ids = torch.tensor([[4, 8, 15, 16, 23]])
        with torch.no_grad():
            a = ours(ids, output_hidden_states=True).hidden_states
            b = theirs(ids, output_hidden_states=True).hidden_states
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


def test_outputs_behave_like_transformers_model_output():
    """The same user code on transformers' output and ours, same weights: attribute, key and integer
    access, slices, len, keys/values/items, get, in, iteration and unpacking (keys, as an OrderedDict),
    to_tuple, setting a key; a None field is absent."""
    transformers = pytest.importorskip("transformers")
    from bloom import BloomConfig, BloomForCausalLM

    cfg = dict(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    theirs = transformers.BloomForCausalLM(transformers.BloomConfig(**cfg)).eval()
    ours = BloomForCausalLM(BloomConfig(**cfg)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=False)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = [m(ids, labels=ids, use_cache=False) for m in (theirs, ours)]

    def observe(out):
        first, second = out  # unpacking: the keys
        return dict(keys=list(out.keys()), len=len(out), iter=list(out), unpacked=(first, second),
                    contains=("logits" in out, "past_key_values" in out),
                    get=out.get("past_key_values", "absent"), tuple_len=len(out.to_tuple()),
                    values=[v.shape for v in out.values()], items=[k for k, _ in out.items()],
                    slice=[v.shape for v in out[:2]], first=out[0].shape, logits=out["logits"].shape)

    assert observe(outs[1]) == observe(outs[0])
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-5, rtol=1e-5)
    for out in outs:
        with pytest.raises(KeyError):
            out["past_key_values"]
    new = torch.zeros(1)
    outs[1]["loss"] = new
    assert outs[1].loss is new and outs[1][0] is new
    with pytest.raises(KeyError, match="no field 'lost'"):
        outs[1]["lost"] = new
