"""--device cuda: the fold's GEMMs on a GPU through torch; everything else stays numpy on the CPU.

The GEMMs are where a conversion's time goes (vocabulary x d x table width multiply-adds, and the FFN for parallel
blocks); norms, activations and rounding are memory-bound passes the CPU keeps up with. So only ops.linear's
product moves: each weight goes to the device once, each chunk's rows go there and back.
"""

from __future__ import annotations

import numpy as np


class TorchMatmul:
    """x @ weight.T on a torch device, for ops.gemms_with."""

    def __init__(self, device: str):
        import torch  # only here: converting on the CPU never imports torch

        self.torch, self.device = torch, torch.device(device)
        self._weights: dict[int, tuple[np.ndarray, object]] = {}  # the array is kept so that its id stays unique

    def __call__(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        key = id(weight)
        if key not in self._weights:
            self._weights[key] = (weight, self.torch.from_numpy(np.ascontiguousarray(weight)).to(self.device))
        on_device = self._weights[key][1]
        y = self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device) @ on_device.T
        return y.cpu().numpy()
