"""Base class of every BLOOM model: config, weight init, device/dtype, loading and saving."""

from __future__ import annotations

import torch
from torch import nn

from .config import BloomConfig
from .hub import HubOptions


ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa", "flash_attention_2", "flex_attention")


def _device_from_map(device, device_map):
    """from_pretrained's one device from `device` or transformers' `device_map`."""
    if device_map is None:
        return device
    if device is not None:
        raise ValueError("pass device or device_map, not both")
    if isinstance(device_map, dict):
        raise NotImplementedError("device_map as a per-module dict is not supported: the model loads on one "
                                  "device (use tensor parallelism for models larger than one GPU)")
    if device_map == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map must be 'auto', a device (string, index or torch.device) or None; "
                         f"got {device_map!r}") from None


def _copy_rows(old: torch.Tensor, new: torch.Tensor) -> None:
    """Fill `new` (rows x dim, in place): old's rows where both have them, old's mean row after."""
    with torch.no_grad():
        kept = min(old.shape[0], new.shape[0])
        new[:kept] = old[:kept]
        if new.shape[0] > kept:
            new[kept:] = old.float().mean(0).to(new.dtype)


class BloomPreTrainedModel(nn.Module):
    config_class = BloomConfig
    base_model_prefix = "transformer"
    tp = None  # bloom.parallel.TPContext of a tensor-parallel model (set by bloom.parallel.tensor_parallel)

    def __init__(self, config: BloomConfig):
        super().__init__()
        if not isinstance(config, BloomConfig):
            raise TypeError(f"config must be a BloomConfig, got {type(config).__name__}")
        self.config = config

    def init_weights(self) -> None:
        """transformers' init: Linear/Embedding ~ N(0, initializer_range), zero biases, LN = identity."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if module.weight.device.type != "meta":
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None and module.bias.device.type != "meta":
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.weight.device.type != "meta":
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @classmethod
    def from_pretrained(cls, name_or_path, *model_args, config: BloomConfig | None = None, torch_dtype=None,
                        dtype=None, device=None, device_map=None, revision: str | None = None, cache_dir=None,
                        local_files_only: bool = False, token=None, subfolder: str | None = None,
                        quantization: str | None = None, output_loading_info: bool = False,
                        ignore_mismatched_sizes: bool = False, state_dict=None, low_cpu_mem_usage=None,
                        attn_implementation: str | None = None, tensor_parallel: bool = False,
                        **config_overrides):
        """Load a checkpoint from a local directory or a hub id (see bloom/loading.py), with
        transformers' keyword arguments:

        torch_dtype (or dtype): None = float32, "auto" = the checkpoint's dtype, or a dtype / its name.
        device / device_map: "cpu", "cuda", "cuda:1", a torch.device, or "auto" (the GPU if there is
            one); a per-module map (dict) is refused: the model is loaded on one device.
        output_loading_info=True: returns (model, {"missing_keys", "unexpected_keys", "mismatched_keys",
            "error_msgs"}). ignore_mismatched_sizes=True: a tensor whose shape differs from the config's
            is initialised afresh and reported, instead of an error.
        name_or_path=None with config= and state_dict=: the model from those tensors.
        quantization="int8": int8 weight-only, quantised tensor by tensor while loading.
        low_cpu_mem_usage: accepted; loading is always lean (built on the meta device, filled tensor by
            tensor). attn_implementation: "eager", "sdpa", "flash_attention_2", "flex_attention" accepted
            (the fused ALiBi kernels always run; BLOOM's attention has no other implementation here).
        tensor_parallel=True: Megatron-style tensor parallelism inside an initialised torch.distributed
            process group (run under torchrun): this rank loads and holds its slices only; device None
            or "cuda" is cuda:LOCAL_RANK with NCCL (else the CPU). See bloom/parallel.py.
        Remaining keyword arguments override config fields.
        """
        from .loading import load_pretrained

        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no positional model arguments; got "
                            f"{len(model_args)} (pass config=... and keyword arguments)")
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {', '.join(map(repr, ATTN_IMPLEMENTATIONS))}; "
                             f"got {attn_implementation!r}")
        device = _device_from_map(device, device_map)
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device={str(device)!r}: CUDA is not available here (torch {torch.__version__}, "
                               f"no usable GPU); load on 'cpu' or use device_map='auto'")
        hub = HubOptions(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                         subfolder=subfolder)
        model, info = load_pretrained(cls, name_or_path, config=config, torch_dtype=torch_dtype, dtype=dtype,
                                      device=device, hub=hub, quantization=quantization,
                                      ignore_mismatched_sizes=ignore_mismatched_sizes, state_dict=state_dict,
                                      tensor_parallel=tensor_parallel, **config_overrides)
        return (model, info) if output_loading_info else model

    def save_pretrained(self, save_directory, max_shard_size: int | str = "5GB") -> None:
        """config.json + safetensors (sharded with an index past max_shard_size), as transformers."""
        from .loading import save_pretrained

        save_pretrained(self, save_directory, max_shard_size)

    def to_transformers(self):
        """transformers' model of this class (transformers.BloomForCausalLM, ...) built around this model's
        own tensors — no copy: training either trains both. Needs transformers; an int8 model is refused.
        The other way: bloom.from_transformers(hf_model). See bloom/interop.py."""
        from .interop import to_transformers

        return to_transformers(self)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters counted once each (a tied lm_head is the embedding), as transformers counts them:
        only those requiring grad with only_trainable, none of an nn.Embedding with exclude_embeddings."""
        embeddings = {f"{name}.weight" for name, module in self.named_modules() if isinstance(module, nn.Embedding)}
        return sum(p.numel() for name, p in self.named_parameters()
                   if not (exclude_embeddings and name in embeddings) and (p.requires_grad or not only_trainable))

    # --- the model API transformers' PreTrainedModel gives every class ---------------------------
    @property
    def base_model(self) -> nn.Module:
        """The BloomModel inside a head (`transformer`), or the model itself."""
        return getattr(self, self.base_model_prefix, self)

    @classmethod
    def can_generate(cls) -> bool:
        return callable(getattr(cls, "generate", None))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.word_embeddings

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.base_model.word_embeddings = embeddings

    def get_output_embeddings(self) -> nn.Module | None:
        """The lm_head, or None for a model without one (as transformers)."""
        return getattr(self, "lm_head", None)

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        if not hasattr(self, "lm_head"):
            raise AttributeError(f"{type(self).__name__} has no output embeddings (no lm_head) to set")
        self.lm_head = new_embeddings

    def tie_weights(self) -> None:
        """Tie what the config says to tie (only a causal LM's lm_head has something to tie)."""

    def resize_token_embeddings(self, new_num_tokens: int | None = None,
                                pad_to_multiple_of: int | None = None) -> nn.Embedding:
        """Grow or shrink the vocabulary (after tokenizer.add_tokens): the kept rows are copied, new
        rows start at the mean of the old ones (transformers' mean resizing), an untied lm_head is
        resized alike, a tied one stays tied; config.vocab_size follows. Returns the input embeddings."""
        if self.tp is not None:
            raise NotImplementedError("resize_token_embeddings on a tensor-parallel model: resize in one process, "
                                      "save, and load that checkpoint with tensor_parallel=True")
        old = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return old
        size = old.num_embeddings if new_num_tokens is None else new_num_tokens
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"new_num_tokens must be a positive int, got {new_num_tokens!r}")
        if pad_to_multiple_of is not None:
            if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
                raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
            size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
        head = self.get_output_embeddings()
        tied = head is not None and getattr(head, "weight", None) is old.weight
        if head is not None and not tied and not isinstance(head, nn.Linear):
            raise NotImplementedError(f"resize_token_embeddings: cannot resize a {type(head).__name__} lm_head "
                                      "(an int8 one); resize before quantize_int8")
        new = nn.Embedding(size, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        new.weight.requires_grad_(old.weight.requires_grad)
        _copy_rows(old.weight, new.weight)
        self.set_input_embeddings(new)
        if head is not None and not tied:
            new_head = nn.Linear(head.in_features, size, bias=head.bias is not None, device=head.weight.device,
                                 dtype=head.weight.dtype)
            _copy_rows(head.weight, new_head.weight)
            if head.bias is not None:
                with torch.no_grad():
                    kept = min(head.out_features, size)
                    new_head.bias.zero_()
                    new_head.bias[:kept] = head.bias[:kept]
            self.set_output_embeddings(new_head)
        self.config.vocab_size = size
        self.tie_weights()
        return self.get_input_embeddings()

    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' output require grad, so that gradient checkpointing or adapters
        train with the embeddings frozen (transformers' hook)."""
        def make_output_require_grads(module, inputs, output):
            output.requires_grad_(True)

        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(make_output_require_grads)

    def disable_input_require_grads(self) -> None:
        hook = getattr(self, "_require_grads_hook", None)
        if hook is not None:
            hook.remove()
            self._require_grads_hook = None

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each block's activations in the backward instead of keeping them (training only;
        torch.utils.checkpoint, non-reentrant unless gradient_checkpointing_kwargs says otherwise)."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True
                module._checkpoint_kwargs = kwargs
        if kwargs["use_reentrant"]:
            self.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False
