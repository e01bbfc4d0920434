"""A PEFT adapter directory on disk: its file names, and how one is recognised.

The reading side (``lora``), the writing side (``io.adapter_writer``), Hub
downloads (``io.hub``) and input-role resolution (``roles``) all need these
names; they live here, below all of them, so the writer and the Hub need not
import the LoRA merge to know what an adapter's files are called. Light on
purpose (no numpy): the CLI's start-up path reaches it through ``io.hub``.

Example:
    >>> is_adapter("no/such/dir")
    False
"""

from __future__ import annotations

from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter(path) -> bool:
    """True when ``path`` is a PEFT adapter directory (has ``adapter_config.json``)."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()
