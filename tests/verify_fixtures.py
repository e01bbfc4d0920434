"""What the verify tests (tests/test_verify_*.py) share: the patched output they check."""

from checkpoints import three_models

from resta_fast import api

SMALL = {"vocab": 16, "hidden": 8, "layers": 1, "inter": 12}


def checks(result) -> dict:
    return {c["name"]: c for c in result["checks"]}


def patched_output(root, *, record_paths: bool = True):
    """A sharded DARE patch with per-pattern β and an exclude, and its inputs: (root, ft, al, un, out).

    ``record_paths``: the output records where its inputs lay, so ``verify --against`` finds them alone.
    """
    ft, al, un = three_models(root, shards=2, **SMALL)
    out = root / "out"
    api.patch(
        ft,
        out,
        aligned=al,
        unaligned=un,
        beta=0.5,
        dare=0.3,
        seed=7,
        beta_rules=[r"mlp\.=0.25"],
        exclude=["norm"],
        backend="torch",
        fsync=False,
        record_paths=record_paths,
    )
    return root, ft, al, un, out
