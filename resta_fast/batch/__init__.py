"""Batch realignment: manifests (manifest.py), the fused local executor (local.py),
Ray (ray.py) and Slurm (slurm.py) executors, and the `batch` subcommand (cli.py)."""
