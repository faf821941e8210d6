"""BloomCache: a key/value cache allocated once, (B, H, capacity, D) per layer, written in place.

Each forward writes the new keys/values at [length, length + S) and attends over the view [:length + S]
— no concatenation. `generate` sizes it once for prompt + max_new_tokens (fixed capacity: nothing is
reallocated while it decodes). A cache the model creates on its own (plain `forward(use_cache=True)`)
or reads from legacy tuples may grow (to at least twice its capacity, copying what it holds), so a
hand-written decoding loop works like with transformers.

Layout: `cache[i]` is (key, value) of layer i, each (B, H, length, D). `to_legacy_cache()` gives
transformers 4.x's BLOOM tuples: key (B*H, D, L), value (B*H, L, D); `from_legacy_cache` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class CacheOverflowError(ValueError):
    """A forward would write past the end of a fixed-capacity cache, or `generate` past the model's
    length limit."""


@dataclass(frozen=True)
class CacheLayer:
    """One layer of a cache as transformers 5's code reads it."""

    keys: Tensor
    values: Tensor


class BloomCache:
    """Per-layer key and value buffers (B, H, capacity, D) and the number of positions filled."""

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        head_dim: int,
        capacity: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        growable: bool = False,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        shape = (batch_size, n_head, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.length = 0  # positions filled, shared by every layer once a forward completes
        self.growable = growable
        # True while every slot that is not a token holds zeros or what the model wrote there: on the CPU
        # attention route the model writes a padded position's key/value as zeros (unchecked.
        # zero_padded_new; the kernels and the reference mask padded keys as they read them instead), and
        # new buffers are zeros. Then the CPU route need not copy the cache to mask its padded slots in
        # every layer of every step. False for a cache filled from outside.
        self.padding_zeroed = True

    # --- shape ------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    def get_seq_length(self) -> int:
        return self.length

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.keys[layer][:, :, : self.length], self.values[layer][:, :, : self.length]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def layers(self) -> list[CacheLayer]:
        """transformers 5's view: `cache.layers[i].keys / .values`, (B, H, length, D) views."""
        return [CacheLayer(*self[i]) for i in range(len(self))]

    # --- writing ----------------------------------------------------------------------------------
    def reserve(self, new_tokens: int) -> None:
        """Make room for `new_tokens` more positions (grow, or refuse if the capacity is fixed)."""
        needed = self.length + new_tokens
        if needed <= self.capacity:
            return
        if not self.growable:
            raise CacheOverflowError(
                f"the KV cache holds {self.capacity} positions; {self.length} are used and this call "
                f"adds {new_tokens} (would need {needed})"
            )
        new_capacity = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_zeros(old.shape[:2] + (new_capacity,) + old.shape[3:])
                grown[:, :, : self.length] = old[:, :, : self.length]
                store[i] = grown

    def update(self, layer: int, key: Tensor, value: Tensor,
               at: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Write key/value (B, H, S, D) at the current end; return views of all L + S positions.

        `reserve` must have been called for this step; `advance` moves the end after the last layer.
        With `at` (long (S,) slots, a static decode step) they go to those slots instead and the whole
        buffers come back: same shapes and addresses every step, no host-side length.
        """
        if at is not None:
            self.keys[layer].index_copy_(2, at, key)
            self.values[layer].index_copy_(2, at, value)
            return self.keys[layer], self.values[layer]
        end = self.length + key.shape[2]
        self.keys[layer][:, :, self.length : end] = key
        self.values[layer][:, :, self.length : end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens

    def crop(self, length: int) -> None:
        """Forget every position from `length` on (the buffers are kept)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop length must be in [0, {self.length}], got {length}")
        self.length = length

    # --- transformers' 4.x tuple format -------------------------------------------------------------
    def to_legacy_cache(self) -> tuple[tuple[Tensor, Tensor], ...]:
        batch, heads = self.keys[0].shape[:2]
        out = []
        for key, value in self:
            head_dim = key.shape[-1]
            out.append((
                key.reshape(batch * heads, self.length, head_dim).transpose(1, 2),
                value.reshape(batch * heads, self.length, head_dim),
            ))
        return tuple(out)

    @classmethod
    def from_legacy_cache(cls, past, n_head: int, *, growable: bool = True) -> "BloomCache | None":
        """Read transformers 4.x BLOOM tuples (key (B*H, D, L), value (B*H, L, D)), (B, H, L, D) pairs, or
        a transformers Cache object (DynamicCache: 5.x `layers`, 4.x `key_cache`/`value_cache`); None
        for an empty one (nothing cached yet)."""
        past = _layer_pairs(past)
        if not past:
            return None
        for i, pair in enumerate(past):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)):
                raise TypeError(f"past_key_values[{i}] must be a (key, value) pair of tensors; got "
                                f"{type(pair).__name__}")
        first_key = past[0][0]
        if first_key.dim() == 3:
            batch_heads, head_dim, length = first_key.shape
            if batch_heads % n_head != 0:
                raise ValueError(
                    f"past_key_values keys have {batch_heads} rows, not a multiple of n_head={n_head}"
                )
            batch = batch_heads // n_head

            def unpack(key, value):
                return (key.transpose(1, 2).reshape(batch, n_head, length, head_dim),
                        value.reshape(batch, n_head, length, head_dim))
        elif first_key.dim() == 4:
            batch, _, length, head_dim = first_key.shape

            def unpack(key, value):
                return key, value
        else:
            raise ValueError(
                "past_key_values must be a BloomCache or per-layer (key, value) tuples: key (B*H, D, L) "
                f"and value (B*H, L, D), or both (B, H, L, D); got a key of shape {tuple(first_key.shape)}"
            )
        key_shape = tuple(past[0][0].shape)
        want_value = (key_shape[0], key_shape[2], key_shape[1]) if first_key.dim() == 3 else key_shape
        for i, (key, value) in enumerate(past):  # every layer the first one's layout, keys and values alike
            if tuple(key.shape) != key_shape or tuple(value.shape) != want_value:
                raise ValueError(f"past_key_values[{i}]: key {tuple(key.shape)} and value {tuple(value.shape)} "
                                 f"do not match layer 0's layout (key {key_shape}, value {want_value})")
        cache = cls(len(past), batch, n_head, head_dim, max(length, 1), dtype=first_key.dtype,
                    device=first_key.device, growable=growable)
        for i, (key, value) in enumerate(past):
            k, v = unpack(key, value)
            cache.keys[i][:, :, :length] = k
            cache.values[i][:, :, :length] = v
        cache.length = length
        cache.padding_zeroed = False  # the caller's tensors: their padded slots may hold anything
        return cache


def _layer_pairs(past) -> list[tuple[Tensor, Tensor]]:
    """Per-layer (key, value) of legacy tuples or a transformers Cache object; [] when it holds nothing."""
    if hasattr(past, "layers") and not isinstance(past, (tuple, list)):  # transformers 5 Cache
        return [(layer.keys, layer.values) for layer in past.layers
                if getattr(layer, "keys", None) is not None and layer.keys.numel()]
    if hasattr(past, "key_cache"):  # transformers 4.x DynamicCache
        return [(k, v) for k, v in zip(past.key_cache, past.value_cache) if k is not None and k.numel()]
    return list(past)
