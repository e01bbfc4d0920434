"""What an output copies or records of its run, made safe to publish: local paths become their last part.

Outputs copy their input's side files (config, tokenizer, an adapter's config).
Two fields of those files commonly hold where the input lay on its author's
machine: ``_name_or_path`` (``config.json``, written by older transformers) and
``base_model_name_or_path`` (PEFT's ``adapter_config.json``). A Hub id there is
kept; an absolute or home-relative path is replaced by its last part, like
every other input name in an output, and the file is rewritten in
transformers' own style (2-space indent, sorted keys). Any other file is
copied byte for byte. The validation gate's verdict (``public_verdict``) names
the models it evaluated by path; those become names too.

Example:
    >>> public_json({"base_model_name_or_path": "/home/ana/llama", "r": 8})
    {'base_model_name_or_path': 'llama', 'r': 8}
    >>> public_json({"_name_or_path": "meta-llama/Llama-2-7b-hf"}) is None
    True
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from resta_fast.io.writer import TMP_MARKER

# The fields of an input's JSON side files that name a model by where it was loaded from.
PATH_FIELDS = ("_name_or_path", "base_model_name_or_path")


def is_local_path(value) -> bool:
    """An absolute or ``~`` path (a Hub id or a relative name is not)."""
    return isinstance(value, str) and (os.path.isabs(value) or value.startswith("~") or value[1:3] == ":\\")


def public_json(config) -> dict | None:
    """``config`` with its local paths replaced by their last part, or None when it holds none."""
    if not isinstance(config, dict) or not any(is_local_path(config.get(k)) for k in PATH_FIELDS):
        return None
    return {
        k: (Path(v.replace("\\", "/").rstrip("/")).name if k in PATH_FIELDS and is_local_path(v) else v)
        for k, v in config.items()
    }


def copy_public(src: Path, dst: Path) -> None:
    """Copy side file ``src`` to ``dst``; a JSON file naming a local path is rewritten without it."""
    if src.suffix == ".json":
        try:
            cleaned = public_json(json.loads(src.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            cleaned = None  # not ours to judge: copied as it is
        if cleaned is not None:
            dst.write_text(json.dumps(cleaned, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            return
    shutil.copyfile(src, dst)


def public_verdict(verdict, tmp: Path):
    """``verdict`` with local paths replaced by names, so it can be published: the output's temporary
    directory (its name holds the host name) becomes the output's name, any other absolute path its
    last part.

    Example:
        >>> tmp = Path("/x/.restored.resta-tmp-host-1-ab")
        >>> public_verdict({"model": str(tmp), "ref": "/data/ft", "reason": f"{tmp}: ok"}, tmp)
        {'model': 'restored', 'ref': 'ft', 'reason': 'restored: ok'}
    """
    name = tmp.name.split(TMP_MARKER, 1)[0].removeprefix(".")
    temps = sorted({str(tmp), str(tmp.absolute()), os.path.realpath(tmp)}, key=len, reverse=True)

    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if not isinstance(v, str):
            return v
        for t in temps:
            v = v.replace(t, name)
        return Path(v).name if os.path.isabs(v) and not any(c.isspace() for c in v) else v

    return clean(verdict)
