"""Precomputed teacher targets: the teacher's top-k log-probabilities at the scored
positions of each sample, stored once so later epochs and runs skip the teacher.

Approximation: the KL is then taken over the teacher's top-k tokens only,
sum_{i in top-k} p_i (log p_i - log q_i); the dropped tail mass is typically 1-2 % at
k = 64. Entries are keyed by a hash of the sample's tokens and mask, so a changed data
set never reads stale targets.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..files import atomic_temp_file, normal_permissions
from .data import Sample


def sample_key(sample: Sample) -> str:
    h = hashlib.sha256()
    h.update(torch.tensor(sample.input_ids, dtype=torch.int64).numpy().tobytes())
    h.update(torch.tensor(sample.loss_mask, dtype=torch.int8).numpy().tobytes())
    return h.hexdigest()[:32]


class TeacherCache:
    def __init__(self, directory: str | Path, k: int):
        self.dir, self.k = Path(directory), k
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, sample: Sample) -> Path:
        key = sample_key(sample)
        return self.dir / key[:2] / f"{key}.k{self.k}.safetensors"

    def get(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self._path(sample)
        if not path.is_file():
            return None
        t = load_file(str(path))
        return t["index"], t["logp"]

    def put(self, sample: Sample, index: torch.Tensor, logp: torch.Tensor) -> None:
        path = self._path(sample)
        path.parent.mkdir(exist_ok=True)
        tmp = atomic_temp_file(path.parent, path.name)
        save_file({"index": index.contiguous().cpu(), "logp": logp.contiguous().cpu()}, tmp)
        normal_permissions(tmp)
        os.replace(tmp, path)
