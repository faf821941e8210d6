"""FlaxBloomModel and FlaxBloomForCausalLM: transformers 4.x's Flax BLOOM API over bloom/flax/modeling.py.

As in transformers, an instance holds a config, a flax.linen `module` and its `params` (a plain dict
pytree); calling it runs the module with those params (or `params=` given), `dtype` is the computation
dtype and the params' dtype is separate (`param_dtype`, or `to_bf16` / `to_fp16` on the params). Unlike
transformers, the forward is jax.jit-compiled (once per input shape and flags) and inputs are checked
on the host first (ids in the vocabulary, mask shape, room in the cache), as the PyTorch model does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from ..config import BloomConfig
from ..hub import HubOptions
from ..loading import resolve_config
from .attention import IMPLEMENTATIONS
from .checks import check_attention_mask, check_cache, check_input_ids, is_traced
from .loading import find_checkpoint, load_params, save_params
from .modeling import FlaxBloomForCausalLMModule, FlaxBloomModule, empty_cache
from .outputs import FlaxBaseModelOutputWithPast, FlaxCausalLMOutputWithPast

DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def _jnp_dtype(value, name: str):
    """jnp.float32 / bfloat16 / float16 from a dtype or its name; ValueError naming the argument."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in DTYPES:
        raise ValueError(f"{name} must be jnp.float32, jnp.bfloat16 or jnp.float16 (or their names); got {value!r}")
    return DTYPES[dtype.name]


class FlaxBloomPreTrainedModel:
    """Shared by both classes: init, params, cache, jit-compiled call, dtype casts, loading, saving."""

    module_class: type = None
    causal_lm: bool = False
    architecture: str = ""  # the PyTorch class a saved checkpoint names (transformers loads it by that)
    base_model_prefix = "transformer"

    def __init__(self, config: BloomConfig, input_shape: tuple = (1, 1), seed: int = 0, dtype=jnp.float32,
                 _do_init: bool = True, *, param_dtype=jnp.float32, attention_implementation: str = "auto"):
        if not isinstance(config, BloomConfig):
            raise TypeError(f"config must be a bloom.BloomConfig; got {type(config).__name__}")
        if attention_implementation not in IMPLEMENTATIONS:
            raise ValueError(f"attention_implementation must be one of {IMPLEMENTATIONS}; "
                             f"got {attention_implementation!r}")
        self.config = config
        self.dtype = _jnp_dtype(dtype, "dtype")
        self.param_dtype = _jnp_dtype(param_dtype, "param_dtype")
        self.module = self.module_class(config, self.dtype, self.param_dtype, attention_implementation)
        self.input_shape = tuple(input_shape)
        self._params = self.init_weights(jax.random.PRNGKey(seed), self.input_shape) if _do_init else None
        # compiled once per (shapes, flags); the module (and so the config) is baked into the closure
        self._forward = jax.jit(self._apply, static_argnames=("train", "output_attentions", "output_hidden_states"))
        if self.causal_lm:
            from .generation import compiled_generate

            self._generate_fn = compiled_generate(self.module, config, self.dtype)

    # --- params -----------------------------------------------------------------------------------
    @property
    def params(self) -> dict | None:
        return self._params

    @params.setter
    def params(self, params: dict) -> None:
        self._params = params

    def init_weights(self, rng, input_shape: tuple, params: dict | None = None) -> dict:
        """Random parameters (transformers' init: normal(initializer_range) weights, zero biases, unit
        LayerNorm scales), as a plain dict; `params` given: returned as it is."""
        if params is not None:
            return params
        params_rng, dropout_rng = jax.random.split(rng)
        ids = jnp.zeros(input_shape, jnp.int32)
        variables = self.module.init({"params": params_rng, "dropout": dropout_rng}, ids)
        return unfreeze(variables["params"])  # a plain dict, as transformers' Flax params

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """A fixed-capacity KV cache (the "cache" collection) for `max_length` positions: pass it as
        past_key_values with an attention_mask of shape (batch_size, max_length)."""
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        return empty_cache(self.config, batch_size, max_length, self.dtype, self.causal_lm)

    def to_bf16(self, params: dict | None = None, mask=None) -> dict:
        """`params` (default: the model's) with float arrays cast to bfloat16 (where `mask` is True, a
        pytree of bools, if given); returns the new tree, as transformers (the model is unchanged)."""
        return self._cast(params, jnp.bfloat16, mask)

    def to_fp16(self, params: dict | None = None, mask=None) -> dict:
        return self._cast(params, jnp.float16, mask)

    def to_fp32(self, params: dict | None = None, mask=None) -> dict:
        return self._cast(params, jnp.float32, mask)

    def _cast(self, params, dtype, mask):
        params = self.params if params is None else params

        def cast(x, keep=True):
            return x.astype(dtype) if keep and jnp.issubdtype(x.dtype, jnp.floating) else x

        if mask is None:
            return jax.tree_util.tree_map(cast, params)
        return jax.tree_util.tree_map(cast, params, mask)

    # --- forward ------------------------------------------------------------------------------------
    def _apply(self, params, input_ids, attention_mask, cache, dropout_rng, train, output_attentions,
               output_hidden_states):
        variables = {"params": params}
        if cache is not None:
            variables["cache"] = cache
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
        out = self.module.apply(variables, input_ids, attention_mask, not train, False, output_attentions,
                                output_hidden_states, rngs=rngs, mutable=["cache"] if cache is not None else False)
        if cache is not None:
            out, updated = out
            return out, updated["cache"]
        return out, None

    def __call__(self, input_ids, attention_mask=None, past_key_values: dict = None, params: dict = None,
                 dropout_rng=None, train: bool = False, output_attentions: bool | None = None,
                 output_hidden_states: bool | None = None, return_dict: bool | None = None):
        """input_ids (B, S); attention_mask (B, S) 1 = token, 0 = padding, or with past_key_values
        (B, capacity), covering the whole cache. Returns last_hidden_state / logits, the updated
        past_key_values (when given), hidden_states and attentions (when asked)."""
        c = self.config
        output_attentions = c.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = c.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = c.return_dict if return_dict is None else return_dict
        params = self.params if params is None else params
        if params is None:
            raise ValueError("the model was made with _do_init=False: pass params= (e.g. from init_weights)")
        check_input_ids("input_ids", input_ids, c.vocab_size)
        batch, seq = np.shape(input_ids)
        if past_key_values is not None:
            capacity = check_cache(past_key_values, c, batch, seq, self.causal_lm)
            expected, why = (batch, capacity), "(batch, cache capacity) with past_key_values"
        else:
            expected, why = (batch, seq), "(batch, sequence) of input_ids"
        if attention_mask is None:
            attention_mask = jnp.ones(expected, jnp.int32)
        check_attention_mask(attention_mask, expected, why)
        if train and dropout_rng is None and (c.hidden_dropout > 0 or c.attention_dropout > 0):
            raise ValueError("train=True with dropout in the config needs dropout_rng (a jax.random key)")
        ids = input_ids if is_traced(input_ids) else jnp.asarray(input_ids, jnp.int32)
        mask = attention_mask if is_traced(attention_mask) else jnp.asarray(attention_mask, jnp.int32)
        (main, hidden, attentions), cache = self._forward(
            params, ids, mask, past_key_values, dropout_rng if train else None, train=bool(train),
            output_attentions=bool(output_attentions), output_hidden_states=bool(output_hidden_states))
        out_class = FlaxCausalLMOutputWithPast if self.causal_lm else FlaxBaseModelOutputWithPast
        out = out_class(main, cache, hidden, attentions)
        return out if return_dict else out.to_tuple()

    # --- loading and saving -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path, *, dtype=jnp.float32, param_dtype=jnp.float32,
                        config: BloomConfig | None = None, revision: str | None = None, cache_dir=None,
                        local_files_only: bool = False, token=None, subfolder: str | None = None,
                        attention_implementation: str = "auto", state_dict: dict | None = None,
                        **config_overrides):
        """Load a local directory or hub id: model.safetensors (or shards), else flax_model.msgpack
        (transformers 4.x Flax), else pytorch_model.bin. `dtype`: computation dtype; `param_dtype`: the
        params' (default float32, as transformers; bfloat16 halves the memory). Other keywords
        override config fields. name_or_path=None with config= and state_dict= (PyTorch names ->
        tensors, e.g. `bloom.BloomForCausalLM(...).state_dict()`): the model from those tensors."""
        hub = HubOptions(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                         subfolder=subfolder)
        config = resolve_config(name_or_path, config, state_dict, hub, config_overrides)
        model = cls(config, dtype=dtype, _do_init=False, param_dtype=param_dtype,
                    attention_implementation=attention_implementation)
        files, fmt = ([], "state_dict") if state_dict is not None else find_checkpoint(name_or_path, hub)
        model.params = load_params(model.module, config, files, fmt, name_or_path, model.param_dtype, state_dict)
        return model

    def save_pretrained(self, save_directory, params: dict | None = None, max_shard_size: int | str = "5GB") -> None:
        """config.json + model.safetensors under PyTorch BLOOM's names (Dense kernels transposed back),
        sharded with an index past max_shard_size: bloom.BloomForCausalLM / BloomModel and transformers
        load it."""
        params = self.params if params is None else params
        save_params(params, self.config, save_directory, self.architecture, max_shard_size)


class FlaxBloomModel(FlaxBloomPreTrainedModel):
    """The bare model: last_hidden_state (B, S, E)."""

    module_class = FlaxBloomModule
    architecture = "BloomModel"


class FlaxBloomForCausalLM(FlaxBloomPreTrainedModel):
    """The model with its language-modelling head (tied to the embeddings): logits (B, S, V)."""

    module_class = FlaxBloomForCausalLMModule
    causal_lm = True
    architecture = "BloomForCausalLM"

    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int | None = None,
                 max_length: int | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id=None, pad_token_id=None,
                 prng_key=None, params: dict | None = None):
        """FlaxGenerateOutput with `sequences` (B, prompt + max_new_tokens); see bloom/flax/generation.py.
        Left-padded prompts (attention_mask 0 on the left); greedy equals the PyTorch model's tokens."""
        from .generation import generate
        from .outputs import FlaxGenerateOutput

        sequences = generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, max_length=max_length,
                             do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                             eos_token_id=eos_token_id, pad_token_id=pad_token_id, prng_key=prng_key, params=params)
        return FlaxGenerateOutput(sequences=sequences)
