"""Conversion inputs: where a checkpoint is (local directory or hub id), its config, and its tensors.

Tensors are read lazily, one at a time: safetensors through `safe_open`, PyTorch `.bin` files with
`torch.load(weights_only=True)` (never arbitrary unpickling), memory-mapped when the file format allows it.
"""

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ConversionError


# "owner/name" as the hub spells repository ids; anything else that is not a directory is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# Files worth fetching from a hub repository besides weights: configs, tokenizer and processor files, the card.
_METADATA_PATTERNS = ["*.json", "*.txt", "*.model", "*.md", "*.jinja", "*.tiktoken"]
WEIGHT_FILE_NAMES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def is_hub_id(reference: str) -> bool:
    return bool(_HUB_ID.match(reference)) and not reference.startswith((".", "/", "~"))


def looks_like_local_path(value) -> bool:
    """True for strings that name a place on a file system rather than a hub repository."""
    if not isinstance(value, str) or not value:
        return False
    return value.startswith(("/", "./", "../", "~", "\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", value)) or (
        not is_hub_id(value) and os.sep in value
    )


def snapshot(repo_id: str, *, weights: bool = True) -> str:
    """Download a hub repository's metadata (and weights, preferring safetensors) and return the local copy."""
    from huggingface_hub import snapshot_download

    try:
        if not weights:
            return snapshot_download(repo_id, allow_patterns=_METADATA_PATTERNS)
        local = snapshot_download(repo_id, allow_patterns=[*_METADATA_PATTERNS, "*.safetensors"])
        if not any(Path(local).glob("*.safetensors")):
            local = snapshot_download(repo_id, allow_patterns=[*_METADATA_PATTERNS, "*.bin"])
        return local
    except Exception as error:  # noqa: BLE001 - any hub failure becomes one readable line
        reason = " ".join(str(error).split())
        raise ConversionError(f"cannot fetch {repo_id!r} from the Hugging Face hub: {reason}") from None


def resolve_checkpoint(reference: str, what: str, *, weights: bool = True) -> Path:
    """A local checkpoint directory for `reference` (a directory, or a hub id that is downloaded)."""
    path = Path(os.path.expanduser(str(reference)))
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"{what} {reference!r} is a file; expected a checkpoint directory or a hub id")
    if not is_hub_id(str(reference)):
        raise ConversionError(f"{what} {reference!r} not found: no such directory, and not a hub id (owner/name)")
    return Path(snapshot(str(reference), weights=weights))


def read_config(directory: Path, what: str) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{what} {directory} has no config.json (missing file)")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise ConversionError(f"{what} config {path} is not readable JSON: {error}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{what} config {path} is not a JSON object")
    return config


def _load_pickled_tensors(path: Path, what: str) -> dict:
    """A `torch.save`d dict of tensors, loaded with `weights_only=True` (memory-mapped when possible)."""
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(error):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - pickle errors of every kind
        reason = " ".join(str(error).split())[:300]
        raise ConversionError(
            f"{what} {path} is not a plain PyTorch tensor file (refusing to unpickle anything else): {reason}"
        ) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in data.items()):
        raise ConversionError(f"{what} {path} must hold a dict of name -> tensor, got {type(data).__name__}")
    return data


class TensorSource:
    """The tensors of one checkpoint (a directory, possibly sharded, or a single file), by their stored names."""

    def __init__(self, files: list[Path], label: str):
        self.label = label
        self.files = [Path(f) for f in files]
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._pickled: dict[Path, dict] = {}
        for file in self.files:
            if not file.is_file():
                raise ConversionError(f"{label}: weight file {file} is missing")
            for key in self._keys_in(file):
                if key in self._file_of:
                    raise ConversionError(
                        f"{label}: tensor {key!r} appears in both {self._file_of[key].name} and {file.name}"
                    )
                self._file_of[key] = file

    @classmethod
    def from_directory(cls, directory: Path, label: str) -> "TensorSource":
        directory = Path(directory)
        for name in WEIGHT_FILE_NAMES:
            path = directory / name
            if not path.is_file():
                continue
            if name.endswith(".index.json"):
                try:
                    with open(path, encoding="utf-8") as handle:
                        weight_map = json.load(handle)["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as error:
                    raise ConversionError(f"{label}: index {path} is unreadable: {error}") from None
                files = sorted({directory / shard for shard in weight_map.values()})
                return cls(files, label)
            return cls([path], label)
        raise ConversionError(
            f"{label} {directory} has no weights (missing file: expected one of {', '.join(WEIGHT_FILE_NAMES)})"
        )

    @classmethod
    def from_file(cls, path: Path, label: str) -> "TensorSource":
        path = Path(path)
        if path.is_dir():
            raise ConversionError(f"{label} {path} is a directory; expected the projector file itself (e.g. "
                                  f"{path / 'mm_projector.bin'} or a .safetensors file)")
        if not path.is_file():
            raise ConversionError(f"{label} {path} not found (missing file)")
        return cls([path], label)

    def _is_safetensors(self, file: Path) -> bool:
        with open(file, "rb") as handle:
            head = handle.read(9)
        # safetensors: 8-byte little-endian header length, then a JSON object.
        return file.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")

    def _keys_in(self, file: Path) -> list[str]:
        if self._is_safetensors(file):
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as error:  # noqa: BLE001
                raise ConversionError(f"{self.label}: {file} is not a valid safetensors file: {error}") from None
            self._handles[file] = handle
            return list(handle.keys())
        self._pickled[file] = _load_pickled_tensors(file, self.label)
        return list(self._pickled[file])

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype without reading the data."""
        file = self._file_of[key]
        if file in self._handles:
            tensor_slice = self._handles[file].get_slice(key)
            return tuple(tensor_slice.get_shape()), _SAFETENSORS_DTYPES[tensor_slice.get_dtype()]
        tensor = self._pickled[file][key]
        return tuple(tensor.shape), tensor.dtype

    def get(self, key: str) -> torch.Tensor:
        file = self._file_of[key]
        if file in self._handles:
            return self._handles[file].get_tensor(key)
        return self._pickled[file][key]

    def main_float_dtype(self) -> torch.dtype | None:
        """The floating dtype holding most of the parameters (the checkpoint's dtype)."""
        counts: dict[torch.dtype, int] = {}
        for key in self._file_of:
            shape, dtype = self.info(key)
            if dtype.is_floating_point:
                counts[dtype] = counts.get(dtype, 0) + int(torch.Size(shape).numel())
        return max(counts, key=counts.get) if counts else None


__all__ = [
    "TensorSource", "resolve_checkpoint", "read_config", "is_hub_id", "looks_like_local_path", "snapshot",
    "WEIGHT_FILE_NAMES",
]
