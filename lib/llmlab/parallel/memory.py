"""Memory accounting: what training keeps per parameter, and what sharding it saves.

The ZeRO paper's bill for a model of P parameters trained with Adam: weights, gradients and
optimizer state. In fp32 that is 4 + 4 + (4 + 4) = 16 bytes per parameter (Adam keeps two
fp32 moments). Mixed precision keeps the weights and gradients the matmuls use in 16 bits,
plus an fp32 master copy the optimizer updates: 2 + 2 + (4 + 4 + 4) = 16 bytes again.
Mixed precision saves activations and time, not model state.

Sharding over `dp` data-parallel ranks divides one more part of the bill per ZeRO stage:
stage 1 the optimizer state (master copy included), stage 2 also the gradients, stage 3 also
the weights. Tensor (tp) and pipeline (pp) parallelism divide all of it by tp * pp.
"""
from __future__ import annotations

import math

ADAM_STATE = 8  # bytes per parameter: exp_avg and exp_avg_sq in fp32


def state_bytes_per_param(mixed_precision: bool, optimizer: str = "adam") -> dict[str, int]:
    """Bytes per parameter of weights, grads and optimizer state: {"weights", "grads", "optimizer"}."""
    moments = {"adam": ADAM_STATE, "sgd": 0, "momentum": 4}
    if optimizer not in moments:
        raise ValueError(f"optimizer must be one of {sorted(moments)}, got {optimizer!r}")
    if mixed_precision:  # 16-bit weights and grads, the optimizer owns an fp32 master copy
        return {"weights": 2, "grads": 2, "optimizer": 4 + moments[optimizer]}
    return {"weights": 4, "grads": 4, "optimizer": moments[optimizer]}


def bytes_per_device(n_params: int, zero_stage: int = 0, dp: int = 1, tp: int = 1, pp: int = 1,
                     mixed_precision: bool = True, optimizer: str = "adam") -> float:
    """Model-state bytes one device holds under ZeRO `zero_stage` over dp ranks and tp x pp model parallelism."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    per = state_bytes_per_param(mixed_precision, optimizer)
    local = n_params / (tp * pp)  # the slice of the model this device's model-parallel group owns
    return local * (per["weights"] / (dp if zero_stage >= 3 else 1)
                    + per["grads"] / (dp if zero_stage >= 2 else 1)
                    + per["optimizer"] / (dp if zero_stage >= 1 else 1))


def min_data_parallel(n_params: int, device_bytes: float, zero_stage: int, tp: int = 1, pp: int = 1,
                      mixed_precision: bool = True, optimizer: str = "adam") -> int | None:
    """Smallest dp at which the model state fits in device_bytes, or None when no dp is enough."""
    per = state_bytes_per_param(mixed_precision, optimizer)
    local = n_params / (tp * pp)
    split = {0: 0, 1: per["optimizer"], 2: per["optimizer"] + per["grads"], 3: sum(per.values())}[zero_stage]
    fixed = local * (sum(per.values()) - split)  # what sharding over dp never divides
    if split == 0:
        return 1 if fixed <= device_bytes else None
    room = device_bytes - fixed
    if room <= 0:
        return None
    return max(1, math.ceil(local * split / room))

