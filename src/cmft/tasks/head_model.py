"""An encoder plus a task head, saved as one model folder: the encoder as AutoModel loads it, the head's weights in
safetensors and its settings in JSON. The tasks whose head is not a transformers class (ICD coding, assertion)
extend it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer

from cmft.errors import CmftError


class HeadModel(nn.Module):
    """`encoder` + `head` + `settings`. A subclass names its files and builds its head from the settings."""

    HEAD_WEIGHTS: ClassVar[str]
    HEAD_CONFIG: ClassVar[str]
    KIND: ClassVar[str]  # "an ICD coding model": what a folder without HEAD_CONFIG is not

    def __init__(self, encoder: nn.Module, settings: dict[str, Any]):
        super().__init__()
        self.encoder = encoder
        self.settings = settings
        self.head = self.build_head(encoder.config.hidden_size, settings)

    def build_head(self, hidden_size: int, settings: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    @property
    def config(self):
        return self.encoder.config

    def save_pretrained(self, folder: str | Path, **kwargs: Any) -> None:
        folder = Path(folder)
        self.encoder.save_pretrained(folder, **kwargs)
        head = {name: tensor.detach().contiguous().cpu() for name, tensor in self.head.state_dict().items()}
        save_file(head, str(folder / self.HEAD_WEIGHTS))
        (folder / self.HEAD_CONFIG).write_text(json.dumps(self.settings, indent=2), encoding="utf-8")

    @classmethod
    def read_settings(cls, folder: str | Path) -> dict[str, Any]:
        path = Path(folder) / cls.HEAD_CONFIG
        if not path.is_file():
            raise CmftError(f"{folder}: no {cls.HEAD_CONFIG}; not {cls.KIND} folder")
        return json.loads(path.read_text(encoding="utf-8"))

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs: Any):
        settings = cls.read_settings(folder)
        kwargs.setdefault("use_safetensors", True)  # weights load only from safetensors, never from pickles
        model = cls(AutoModel.from_pretrained(folder, **kwargs), settings)
        model.head.load_state_dict(load_file(str(Path(folder) / cls.HEAD_WEIGHTS)))
        model.tokenizer = AutoTokenizer.from_pretrained(folder)
        return model.eval()
