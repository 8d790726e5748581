"""An exported ONNX model as the review's probability source: labels reviewed with a model
trained anywhere, over a data folder (`noisyseg review --model model.onnx --data DIR`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noisyseg.export.data_inputs import metadata_stride, open_data, pad_to_stride
from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner
from noisyseg.review.sources import ProbabilitySource


class OnnxSource(ProbabilitySource):
    """ONNX Runtime on the CPU over `split` of `data` (masks from `labels`' masks/ when given);
    the graph takes raw pixels and returns `probs` or `logits` (softmaxed here)."""

    def __init__(
        self,
        model: str | Path,
        data: str | Path,
        split: str = "train",
        labels: str | Path | None = None,
        layout: str = "auto",
        threads: int = 1,
        options: dict[str, Any] | None = None,
        allow_class_mismatch: bool = False,
    ) -> None:
        # No spinning: between two images the threads would only take the CPU from the scoring.
        self.runner = OnnxRuntimeRunner(
            model, providers=["CPUExecutionProvider"], intra_op_threads=threads, allow_spinning=False
        )
        outputs = [name for name in ("probs", "logits") if name in self.runner.output_names]
        if not outputs:
            raise ValueError(
                f"{model}: the model returns {self.runner.output_names}; "
                "the review needs 'probs' or 'logits' (export with --output probs)"
            )
        try:
            class_names = json.loads(self.runner.metadata["class_names"])
        except (KeyError, ValueError) as err:
            raise ValueError(f"{model}: no 'class_names' metadata (was it exported by noisyseg?)") from err
        self.output = outputs[0]
        self.stride = metadata_stride(self.runner.metadata)
        options = {**(options or {}), **({"labels_root": labels} if labels else {})}
        super().__init__(
            open_data(data, split, layout, options),
            class_names,
            torch.device("cpu"),
            allow_class_mismatch=allow_class_mismatch,
            model=model,
        )

    def probabilities(self, image: np.ndarray) -> torch.Tensor:
        height, width = image.shape[-2:]
        out = self.runner.run(pad_to_stride(image[None].astype(np.float32), self.stride))[self.output][
            0, :, :height, :width
        ]
        scores = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
        return scores if self.output == "probs" else torch.softmax(scores, dim=0)
