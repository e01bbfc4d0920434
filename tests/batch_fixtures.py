"""Shared by the batch tests (test_batch_*.py): a world of checkpoints, manifests
written from job dicts, the per-job `patch` reference, and a batch slowed down
in a child process so a test can signal it mid-job."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from checkpoints import llama_tensors, three_models, write_model

from resta_fast import api
from resta_fast.batch import local
from resta_fast.batch.manifest import load_manifest
from resta_fast.card import CARD_NAME

REPO = Path(__file__).resolve().parent.parent


def files_of(out: Path) -> dict[str, bytes]:
    """Every file of an output except the report (which has a timestamp) and the model card
    (which says how it was written: by a batch job or a patch)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name not in (local.REPORT_NAME, CARD_NAME)}


def reference(job, root: Path) -> dict[str, bytes]:
    """The job run alone through api.patch."""
    out = root / "ref" / job.name
    out.parent.mkdir(exist_ok=True)
    api.patch(job.finetuned, out, **job.patch_kwargs(), fsync=False)
    return files_of(out)


def make_world(root: Path) -> Path:
    """Shared pair + three fine-tunes with different layouts: sharded, single
    file, and one with an extra tensor and extra vocabulary rows."""
    ft, al, un = three_models(root, shards=2)
    write_model(root / "ft_single", {k: (v.float() * 1.01).to(v.dtype) for k, v in llama_tensors(7).items()})
    extra = llama_tensors(8, extra_rows=3)
    extra["model.extra_scale"] = torch.ones(4, dtype=torch.bfloat16)
    write_model(root / "ft_extra", extra)
    api.make_vector(al, un, root / "vec", fsync=False)
    (root / "outs").mkdir()
    return root


def write_manifest(root: Path, jobs: list[dict], name="batch.yaml", **top) -> Path:
    import yaml

    doc = {"aligned": "aligned", "unaligned": "unaligned", "beta": 0.5, "fsync": False, **top, "jobs": jobs}
    path = root / name
    path.write_text(json.dumps(doc) if name.endswith(".json") else yaml.safe_dump(doc))
    return path


JOBS = [
    {"finetuned": "ft", "out": "outs/plain"},
    {"finetuned": "ft_single", "out": "outs/dare", "beta": 0.7, "dare": 0.3, "seed": 4},
    {
        "finetuned": "ft",
        "out": "outs/sweep",
        "beta": 1.25,
        "dare": 0.1,
        "beta_rules": {"mlp": 0.2},
        "exclude": ["norm"],
    },
    {"finetuned": "ft_extra", "out": "outs/extra", "beta": 0.25, "dtype": "float32"},
    {
        "finetuned": "ft",
        "out": "outs/vec",
        "vector": "vec",
        "unaligned": None,
        "dare_base": "aligned",
        "dare": 0.2,
        "seed": 9,
    },
]


def load_and_run(path, **kw):
    return local.run_batch(load_manifest(path), **kw)


def slow_batch(path, **popen_kw) -> subprocess.Popen:
    """`resta-fast batch path` in a child process, 0.1 s slower per tensor of the engine's pass,
    so a test can signal it mid-job."""
    script = (
        f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
        "import resta_fast.pipeline.engine as engine\n"
        "orig = engine._Pass._finish_tensor\n"
        "def slow(*a, **k):\n"
        "    orig(*a, **k); time.sleep(0.1)\n"
        "engine._Pass._finish_tensor = slow\n"
        "from resta_fast.cli import main\n"
        f"sys.exit(main(['batch', {str(path)!r}, '--no-progress']))\n"
    )
    return subprocess.Popen([sys.executable, "-c", script], **popen_kw)
