"""Coverage-guided fuzzing of the safetensors reader with atheris (optional, for long runs).

Every input is written to a file and opened with ``SafetensorsFile``; every
tensor is read back. The run fails (atheris saves the input as ``crash-*``)
when anything other than ``CheckpointError`` escapes, when the process dies
(segfault, SIGBUS), or when we accept a file the official ``safetensors``
loader rejects or read different tensors from it. See README.md here.

    python tests/fuzz/fuzz_reader.py --make-seeds seeds/
    python tests/fuzz/fuzz_reader.py -atheris_runs=2000000 -max_len=4096 corpus/ seeds/
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
from pathlib import Path

_FILE = Path(tempfile.gettempdir()) / f"resta-fuzz-{os.getpid()}.safetensors"


def one_input(data: bytes) -> None:
    """The property checked for one input; raises on a finding."""
    import torch

    from resta_fast.errors import CheckpointError
    from resta_fast.io.reader import DTYPES, SafetensorsFile, torch_dtype

    _FILE.write_bytes(data)
    try:
        f = SafetensorsFile(_FILE)
    except CheckpointError:
        return
    try:
        ours = {n: (i.dtype, i.shape, f.view(n).view(torch.uint8).numpy().tobytes()) for n, i in f.tensors.items()}
    except CheckpointError:
        return
    finally:
        f.close()
    from safetensors.torch import load

    try:
        theirs = load(data)
    except Exception as exc:  # noqa: BLE001 - any official rejection is a finding here
        raise AssertionError(f"we accepted a file the official loader rejects: {exc!r}") from None
    names = {torch_dtype(name): name for name in DTYPES}
    theirs = {
        n: (names.get(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
        for n, t in theirs.items()
    }
    if ours != theirs:
        raise AssertionError("we read different tensors than the official loader")


def make_seeds(directory: Path) -> int:
    """Small valid files of every dtype, plus one hostile case per reader check."""
    import torch
    from safetensors.torch import save

    directory.mkdir(parents=True, exist_ok=True)
    seeds = {
        "empty": save({}),
        "one_f32": save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}),
        "mixed": save(
            {
                "a": torch.ones(3, dtype=torch.bfloat16),
                "b": torch.zeros(2, 2, dtype=torch.int64),
                "c": torch.tensor([True, False]),
                "d": torch.empty(0, 4, dtype=torch.float16),
            },
            metadata={"format": "pt"},
        ),
        "scalar": save({"s": torch.tensor(1.5, dtype=torch.float64)}),
    }
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    seeds["gap"] = struct.pack("<Q", len(header)) + header + b"\0" * 12
    for name, raw in seeds.items():
        (directory / name).write_bytes(raw)
    return len(seeds)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--make-seeds":
        print(f"wrote {make_seeds(Path(sys.argv[2]))} seeds to {sys.argv[2]}")
        return
    import atheris  # optional: pip install atheris
    import safetensors.torch  # noqa: F401 - imported first: only our code is instrumented
    import torch  # noqa: F401

    with atheris.instrument_imports(include=["resta_fast"]):
        import resta_fast.io.reader  # noqa: F401 - instrumented for coverage feedback
    atheris.Setup(sys.argv, one_input)
    try:
        atheris.Fuzz()
    finally:
        _FILE.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()
