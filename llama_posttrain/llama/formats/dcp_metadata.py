"""DCP's `.metadata`, read without running what it names: torch.distributed.checkpoint pickles it, and
`pickle.load` of a planted file runs any command. `SafeReader` is DCP's FileSystemReader with an
unpickler that builds only what a DCP metadata file holds (its metadata classes, torch dtypes and
sizes, paths) and refuses anything else, naming it.

    dcp.load(state, checkpoint_id=str(step_dir), storage_reader=SafeReader(str(step_dir)))
"""

from __future__ import annotations

import pickle
import sys

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what DCP's .metadata holds: its metadata classes, torch dtypes and sizes, paths."""

    ALLOWED = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    }

    def find_class(self, module: str, name: str):
        if "." not in name:  # a dotted name reaches attributes of attributes (a module's `os.system`)
            obj = getattr(sys.modules.get(module), name, None)  # only modules already loaded: nothing imported
            if (
                (module, name) in self.ALLOWED
                or isinstance(obj, torch.dtype)
                or (
                    module == "torch.distributed.checkpoint.metadata"
                    and isinstance(obj, type)
                    and obj.__module__ == module
                )
            ):
                return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata; refusing to load it")


class SafeReader(dcp.FileSystemReader):
    """DCP's FileSystemReader, reading .metadata with `_MetadataUnpickler` instead of pickle.load."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{self.path}: .metadata holds a {type(metadata).__name__}, not Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
