"""Tensor names across checkpoints that name the same tensors differently (docs/spec.md §4).

One model's ``model.layers.0.mlp.weight`` is another's ``layers.0.mlp.weight``
or ``transformer.layers.0.mlp.weight``. The planner maps the fine-tune's names
onto the aligned/unaligned pair, the LoRA merge maps an adapter's module names
onto its base, and Safe LoRA maps the aligned model's names onto the unaligned
one, all with ``prefix_mapping``; it lives here, below all three, because it is
about names alone (no tensor is read).

Example:
    >>> prefix_mapping(["model.norm.weight"], {"norm.weight"})
    {'model.norm.weight': 'norm.weight'}
"""

from __future__ import annotations

from collections import Counter


def _cuts(name: str):
    """Split points of ``name`` leaving a suffix of at least two dotted parts."""
    starts = [0] + [i + 1 for i, c in enumerate(name) if c == "."]
    return [i for i in starts if "." in name[i:]]


def prefix_mapping(wanted, available) -> dict[str, str]:
    """Map ``wanted`` names to ``available`` ones that differ only by a leading prefix.

    (old, new) prefix pairs (``model.x`` vs ``x``, ``transformer.x`` vs
    ``model.x``) are found from suffixes naming exactly one available tensor
    and applied best-supported first; prefixes with a numeric part are never
    used, so layer 1 is never mapped onto layer 0.

    Returns:
        {wanted name: available name} for every wanted name the pair maps.
    Example:
        >>> prefix_mapping(["transformer.h.weight"], {"model.h.weight"})
        {'transformer.h.weight': 'model.h.weight'}
    """
    available = set(available)
    by_suffix: dict[str, str | None] = {}
    for s in available:
        for i in _cuts(s):
            rest = s[i:]
            by_suffix[rest] = s if by_suffix.get(rest, s) == s else None  # unique suffixes only
    votes: Counter = Counter()
    for w in wanted:
        for j in _cuts(w):
            s = by_suffix.get(w[j:])
            if s is not None:
                old, new = w[:j], s[: len(s) - (len(w) - j)]
                if not any(part.isdigit() for part in (old + new).split(".")):
                    votes[(old, new)] += 1
                break
    mapping: dict[str, str] = {}
    for (old, new), _ in votes.most_common():  # best-supported pair first
        for w in wanted:
            if w not in mapping and w.startswith(old) and new + w[len(old) :] in available:
                mapping[w] = new + w[len(old) :]
    return mapping
