"""Mixed precision for the training loop: autocast, the fp16 loss scaler, and the parameter dtype.

``precision = "bf16"`` runs forward and backward under ``torch.autocast`` in bfloat16 (CUDA and
CPU); its range is float32's, so no loss scaling is needed. ``"fp16"`` autocasts to float16 and
scales the loss with a ``torch.amp.GradScaler`` (CUDA, and CPU where torch supports float16
autocast there) so small gradients do not flush to zero; the scaler's state is checkpointed with
the rest. ``param_dtype`` converts the model after it is built, for parameters stored in bfloat16
or float16 (half the memory and wire bytes, at the price of rounding every update).

Trade-off: autocast keeps float32 master parameters and costs nothing to adopt, but it saves
compute only where the device has fast low-precision kernels (a GPU); on a CPU it is mainly a
correctness path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from p2pdl.config import ParamDtype, Precision

__all__ = ["PARAM_DTYPES", "MixedPrecision"]

PARAM_DTYPES: dict[ParamDtype, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_AUTOCAST_DTYPES: dict[Precision, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


class MixedPrecision:
    """The autocast context and (for fp16) the loss scaler of one peer on ``device``."""

    def __init__(self, precision: Precision, device: torch.device) -> None:
        self.precision = precision
        self.device = device
        self.dtype = _AUTOCAST_DTYPES[precision]
        self.scaler: torch.amp.GradScaler | None = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Forward (and the loss) run in here; a no-op for ``fp32``."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.dtype):
            yield

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call ``backward()`` on: multiplied by the loss scale under fp16."""
        return self.scaler.scale(loss) if self.scaler is not None else loss
