"""Inference: per-slice (2D plans) or sliding-window (all plans) prediction with optional mirroring TTA.

``Predictor.predict_probabilities(image, meta)`` takes an image as read from disk ``(C, *spatial)``
and returns class probabilities ``(K, *spatial)`` on the same grid; ``predict`` returns the label
map in the dataset's label values.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medalloy.data.io import ImageMeta
from medalloy.data.preprocess import from_network_space, to_network_space
from medalloy.engine.precision import autocast, resolve_precision
from medalloy.planning.plan import Plan


class Predictor:
    """Sliding-window prediction of a segmentation network under a plan."""

    def __init__(
        self,
        model: nn.Module,
        plan: Plan,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        tta: bool = False,
        overlap: float = 0.5,
        slice_batch: int = 16,
        channels_last: bool = False,  # measured slower than contiguous here (benchmarks/results/speed/results.md)
        activation: str = "softmax",
    ):
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be softmax or sigmoid, not {activation!r}")
        self.activation = activation
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.plan = plan
        self.model = model.to(self.device).eval()
        self.channels_last = channels_last and plan.dim == 2
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.tta = tta
        self.overlap = overlap
        self.slice_batch = slice_batch

    def _window(self, x: torch.Tensor) -> torch.Tensor:
        def net(inp: torch.Tensor) -> torch.Tensor:
            if self.channels_last:
                inp = inp.contiguous(memory_format=torch.channels_last)
            with autocast(self.precision, self.device):
                out = self.model(inp)
            return out.float()

        return sliding_window_inference(x, roi_size=self.plan.patch_size, sw_batch_size=4, predictor=net, overlap=self.overlap, mode="gaussian")

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, 1) if self.activation == "softmax" else torch.sigmoid(logits)

    def _logits_to_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, C, *spatial) network input -> probabilities (N, K, *spatial): softmax over
        classes, or one sigmoid per task (universal models)."""
        probs = self._activate(self._window(x))
        if not self.tta:
            return probs
        axes = list(range(2, x.ndim))
        n = 1
        for r in range(1, len(axes) + 1):
            for flip in itertools.combinations(axes, r):
                probs += self._activate(self._window(torch.flip(x, flip))).flip(flip)
                n += 1
        return probs / n

    @torch.inference_mode()
    def predict_network_space(self, image: np.ndarray) -> torch.Tensor:
        """Image already in network space -> probabilities in network space."""
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
        if self.plan.dim == 2:
            slices = x.permute(1, 0, 2, 3)  # (S, C, H, W): slices batched through the 2D network
            out = [self._logits_to_probs(slices[i : i + self.slice_batch]) for i in range(0, slices.shape[0], self.slice_batch)]
            return torch.cat(out).permute(1, 0, 2, 3)
        return self._logits_to_probs(x[None])[0]

    def predict_probabilities(self, image: np.ndarray, meta: ImageMeta, path: object = None) -> torch.Tensor:
        net_image, _ = to_network_space(image, None, meta, self.plan, path)
        probs = self.predict_network_space(net_image)
        return from_network_space(probs.cpu(), meta, self.plan)

    def predict(self, image: np.ndarray, meta: ImageMeta, path: object = None) -> np.ndarray:
        """Label map in the dataset's label values, on the input grid."""
        probs = self.predict_probabilities(image, meta, path)
        return self.to_labels(probs)

    def to_classes(self, probs: torch.Tensor) -> torch.Tensor:
        """Class indices (0 = background). Softmax: the most probable class. Sigmoid (one channel
        per task, in the order of ``plan.label_values[1:]``): the most probable task where its
        probability exceeds 0.5, else background."""
        if self.activation == "sigmoid":
            probs = torch.cat([torch.full_like(probs[:1], 0.5), probs])
        return probs.argmax(0)

    def to_labels(self, probs: torch.Tensor) -> np.ndarray:
        """Label map in the dataset's label values (see :meth:`to_classes`)."""
        lut = np.asarray(self.plan.label_values, dtype=np.int64)
        return lut[self.to_classes(probs).numpy()]
