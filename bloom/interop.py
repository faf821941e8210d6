"""Hand a model between bloom and transformers without copying its weights.

`from_transformers(hf_model)` returns bloom's model of the same class (BloomModel, BloomForCausalLM, or a
task head) and `model.to_transformers()` transformers' one. The new model is built on the meta device
(no memory, no random init) and then given the other model's Parameter and buffer objects themselves,
so the two are one set of weights seen through two classes: an optimizer step, a `.grad`, a
`requires_grad_` or a `.to(device)` through either shows in the other (`Module.to` replaces
`param.data` in place), and tied embeddings stay tied. Device, dtype and each module's train/eval mode
are the other model's; the config is converted (a copy: changing one config does not change the other).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import BloomConfig

# The model classes both libraries have, under the same names.
CLASS_NAMES = ("BloomModel", "BloomForCausalLM", "BloomForSequenceClassification",
               "BloomForTokenClassification", "BloomForQuestionAnswering")


def from_transformers(hf_model: nn.Module):
    """bloom's model of `hf_model`'s class (a transformers BLOOM model) sharing its tensors: no copy."""
    name = _class_name(hf_model, _transformers_classes())
    if name is None:
        raise TypeError(f"from_transformers(hf_model): expected a transformers BLOOM model "
                        f"({_expected('transformers')}); got {_describe(hf_model)}")
    _refuse_quantized_transformers(hf_model)
    config = BloomConfig.from_dict(hf_model.config.to_dict())
    model = _share(hf_model, _bloom_classes()[name], config)
    if hasattr(hf_model, "generation_config") and hasattr(model, "generation_config"):
        from .generation_config import GenerationConfig

        model.generation_config = GenerationConfig.from_any(hf_model.generation_config)
    return model


def to_transformers(model: nn.Module):
    """transformers' model of `model`'s class (one of bloom's) sharing its tensors: no copy."""
    name = _class_name(model, _bloom_classes())
    if name is None:
        raise TypeError(f"to_transformers(model): expected a bloom model ({_expected('bloom')}); got "
                        f"{_describe(model)}")
    _refuse_int8(model)
    try:
        import transformers
    except ImportError:
        raise ImportError("to_transformers() needs the transformers package, which is not installed here "
                          "(pip install transformers)") from None
    config = transformers.BloomConfig.from_dict(model.config.to_dict())
    hf_model = _share(model, getattr(transformers, name), config)
    if hasattr(model, "generation_config") and hasattr(hf_model, "generation_config"):
        hf_model.generation_config = transformers.GenerationConfig(**model.generation_config.to_dict())
    return hf_model


# --------------------------------------------------------------------------------------------------
# Which class
# --------------------------------------------------------------------------------------------------
def _bloom_classes() -> dict[str, type]:
    from . import heads, model

    return {name: getattr(model, name, None) or getattr(heads, name) for name in CLASS_NAMES}


def _transformers_classes() -> dict[str, type]:
    """transformers' BLOOM classes; none without transformers (then nothing can be one of them)."""
    try:
        import transformers
    except ImportError:
        return {}
    return {name: getattr(transformers, name) for name in CLASS_NAMES}


def _class_name(obj, classes: dict[str, type]) -> str | None:
    """The name of the most specific of `classes` that obj is an instance of (a subclass of
    BloomForCausalLM is a BloomForCausalLM, not a BloomPreTrainedModel)."""
    by_class = {cls: name for name, cls in classes.items()}
    return next((by_class[cls] for cls in type(obj).__mro__ if cls in by_class), None)


def _expected(library: str) -> str:
    return ", ".join(f"{library}.{name}" for name in CLASS_NAMES)


def _describe(obj) -> str:
    from .pretrained import BloomPreTrainedModel

    kind = type(obj)
    text = f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(obj, BloomPreTrainedModel):
        text += " (already a bloom model; its to_transformers() goes the other way)"
    elif kind.__module__.startswith("transformers."):
        text += " (a transformers model, but not one of these BLOOM classes)"
    return text


# --------------------------------------------------------------------------------------------------
# What cannot be shared
# --------------------------------------------------------------------------------------------------
def _refuse_quantized_transformers(hf_model: nn.Module) -> None:
    quantization = getattr(hf_model.config, "quantization_config", None)
    if quantization is not None or getattr(hf_model, "is_quantized", False):
        raise ValueError(f"from_transformers(hf_model): the model is quantised by transformers "
                         f"(quant_method={_quant_method(quantization)}); bloom shares floating-point weights "
                         "only — convert the unquantised model, then bloom.quantize_int8(model) for int8")


def _quant_method(quantization) -> str:
    """transformers' quantization_config is a dict or an object; its quant_method may be an enum."""
    method = quantization.get("quant_method") if isinstance(quantization, dict) else \
        getattr(quantization, "quant_method", None)
    return str(getattr(method, "value", method))


def _refuse_int8(model: nn.Module) -> None:
    from .quantization import QUANTIZATION_KEY, Int8Linear

    int8 = [name for name, module in model.named_modules() if isinstance(module, Int8Linear)]
    if int8 or getattr(model.config, QUANTIZATION_KEY, None):
        raise ValueError(f"to_transformers(model): this {type(model).__name__} is int8-quantised (Int8Linear: "
                         f"{', '.join(int8[:3])}{', ...' if len(int8) > 3 else ''}); transformers' BLOOM has no "
                         "such layer to share its int8 weights and scales with — convert before quantize_int8, "
                         "or load the checkpoint without quantization='int8'")


# --------------------------------------------------------------------------------------------------
# Sharing
# --------------------------------------------------------------------------------------------------
def _share(source: nn.Module, cls: type, config) -> nn.Module:
    """A `cls(config)` holding `source`'s own Parameter and buffer objects, in source's modes."""
    with torch.device("meta"):  # nothing allocated, nothing initialised: every tensor is replaced below
        target = cls(config)
    _adopt_tensors(target, source)
    _copy_modes(target, source)
    return target


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # remove_duplicate=False: a tied lm_head is listed under its own name too, so that it is set too
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def _adopt_tensors(target: nn.Module, source: nn.Module) -> None:
    """Put each of source's tensors in target under the same name; ValueError if the two do not have the
    same names, kinds (parameter or buffer) and shapes."""
    wanted, given = _tensors(target), _tensors(source)
    missing, extra = sorted(wanted.keys() - given.keys()), sorted(given.keys() - wanted.keys())
    if missing or extra:
        raise ValueError(f"cannot share the weights of {type(source).__name__} with {type(target).__name__}: "
                         f"tensors only in {type(target).__name__}: {missing or 'none'}; only in "
                         f"{type(source).__name__}: {extra or 'none'}")
    for name, tensor in given.items():
        expected = wanted[name]
        if tensor.shape != expected.shape or isinstance(tensor, nn.Parameter) != isinstance(expected, nn.Parameter):
            raise ValueError(f"cannot share {name}: {type(source).__name__} has a {_kind(tensor)} of shape "
                             f"{tuple(tensor.shape)}, {type(target).__name__}'s config expects a "
                             f"{_kind(expected)} of shape {tuple(expected.shape)}")
        module_name, _, attr = name.rpartition(".")
        # nn.Module.__setattr__ registers a Parameter as a parameter and a tensor under a buffer's name as
        # that buffer (persistence kept): the object itself, not a copy, and requires_grad untouched
        # (load_state_dict(assign=True) would set it on source's parameter to the meta one's)
        setattr(target.get_submodule(module_name), attr, tensor)


def _kind(tensor: torch.Tensor) -> str:
    return "parameter" if isinstance(tensor, nn.Parameter) else "buffer"


def _copy_modes(target: nn.Module, source: nn.Module) -> None:
    """source's train/eval mode, module by module where the names match (e.g. one Dropout in eval)."""
    target.train(source.training)
    modes = {name: module.training for name, module in source.named_modules()}
    for name, module in target.named_modules():
        if name in modes:
            module.training = modes[name]
