"""Model checkpoints: weights as safetensors, with the model's description in the header.

A model file is self-describing: the safetensors metadata holds `noisyseg.model` (JSON: the
architecture name and constructor arguments, class names, input normalisation, training
method, noisyseg version), so `load_model` rebuilds the network without executing any pickled
code. A training run directory holds its selected model as `RUN_DIR/model.safetensors`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from noisyseg import __version__
from noisyseg.io import atomic_write_bytes

log = logging.getLogger(__name__)

# torch is imported where a model is built or saved: serving an ONNX model needs only the names here.
if TYPE_CHECKING:
    import torch

METADATA_KEY = "noisyseg.model"
# sha256 of the description and the weights (`content_hash`), checked by `load_model`.
CONTENT_HASH_KEY = "noisyseg.sha256"


@dataclass
class ModelInfo:
    """Everything needed to rebuild a model and use it on new images."""

    architecture: str
    model_kwargs: dict[str, Any]
    class_names: list[str]
    # How images are normalised before the network sees them: "zscore" per image and channel
    # (CT slices), "imagenet" (RGB 0-255 to [0, 1], minus the ImageNet mean, over its std; the
    # constants of `noisyseg.data.folder`), "none" (as is).
    normalization: str = "zscore"
    method: str = "unknown"
    noisyseg_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def checkpoint_description(self) -> str:
        """Which checkpoint of its run this is: 'epoch 12 (selected by noisy-val)'. Model files
        written before the selection rules kept the best validation epoch (`clean-val`)."""
        epoch = self.extra.get("epoch")
        if epoch is None:
            return "epoch unknown (not written by a noisyseg training run)"
        return f"epoch {epoch} (selected by {self.extra.get('selection', 'clean-val')})"

    @property
    def in_channels(self) -> int:
        return int(self.model_kwargs.get("in_channels", 1))

    def build(self) -> torch.nn.Module:
        """The network at random initialisation (`load_model` then loads the checkpoint's weights).

        A `pretrained` argument (a backbone's ImageNet weights: hub or file) is turned off, since
        the checkpoint's own weights replace them: serving a model needs neither network nor the
        file it was trained from.
        """
        from noisyseg.models import create_model

        kwargs = dict(self.model_kwargs)
        if "pretrained" in kwargs:
            kwargs["pretrained"] = False
        return create_model(self.architecture, **kwargs)


def save_model(path: str | Path, model: torch.nn.Module, info: ModelInfo) -> None:
    """Write `model`'s weights, `info` and their content hash atomically to a safetensors file."""
    from safetensors.torch import save as safetensors_save

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    description = json.dumps(asdict(info))
    metadata = {METADATA_KEY: description, CONTENT_HASH_KEY: content_hash(tensors, description)}
    atomic_write_bytes(path, safetensors_save(tensors, metadata=metadata))


def content_hash(tensors: dict[str, torch.Tensor], description: str) -> str:
    """sha256 over the model description and every tensor's name, dtype, shape and bytes (in
    name order): what a model file means, independent of how safetensors lays it out."""
    import torch

    digest = hashlib.sha256(description.encode("utf-8"))
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str | Path, network: str) -> None:
    """`module.load_state_dict(state)`, strict; a mismatch is one line naming `where` (torch's
    own message lists every tensor, dozens of lines)."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [str(err)]
        first = problems[0] if len(problems[0]) <= 200 else problems[0][:200] + " ..."
        raise ValueError(
            f"{where}: weights do not fit the {network} network ({len(problems)} problem(s); first: {first})"
        ) from err


def check_model_file(path: str | Path) -> Path:
    """`path` as a Path, refused unless it is a file (`runs.run_dir.resolve_model_file` also
    takes a run directory)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model checkpoint (expected a .safetensors file)")
    return path


def read_model_info(path: str | Path) -> ModelInfo:
    path = check_model_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({err})") from err
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path}: safetensors file has no '{METADATA_KEY}' metadata; it was not written by noisyseg")
    try:
        return ModelInfo(**json.loads(metadata[METADATA_KEY]))
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: malformed '{METADATA_KEY}' metadata ({err})") from err


def load_model(path: str | Path, map_location: str = "cpu") -> tuple[torch.nn.Module, ModelInfo]:
    """Rebuild the model described in the checkpoint and load its weights (eval mode)."""
    path = check_model_file(path)
    info = read_model_info(path)
    model = info.build()
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=map_location) as handle:
            metadata = handle.metadata() or {}
            for key in handle.keys():
                state[key] = handle.get_tensor(key)
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({err})") from err
    # Files written before the hash existed carry none: they load unchecked, as they always did.
    expected = metadata.get(CONTENT_HASH_KEY)
    if expected is not None and content_hash(state, metadata[METADATA_KEY]) != expected:
        raise ValueError(
            f"{path}: damaged model file (its weights do not match the "
            "content hash written with them); retrain or restore it"
        )
    load_weights(model, state, path, info.architecture)
    log.info("%s: %s model, %s", path, info.method, info.checkpoint_description())
    return model.eval(), info
