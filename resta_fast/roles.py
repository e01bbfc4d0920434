"""Which input plays which role, for each command family; no checkpoint opened.

The resolve step's rules. ``resolve.resolve_all`` turns what the user typed
into ``resolve.Input`` records (Hub ids resolved to their cache snapshots,
adapters recognised); this module decides from them, and from the arguments,
which input is the fine-tune, the aligned/unaligned pair or the vector, a LoRA
adapter's base and DARE's base, with the defaults the docs promise: a LoRA base
defaults to the aligned model (for a patch and for adapter realignment alike),
DARE's base to the LoRA base or else the aligned model. A defaulted role is the
same input, Hub origin included. Nothing heavy is imported: ``api.prepare``,
``api.prepare_vector``, the batch manifest, ``realign.Session``, verify, compare
and inspect all start here.

- ``resolve_roles``: a patch (``patch``, ``batch``, ``verify``, ``inspect``);
- ``vector_roles``: the safety vector's pair (``vector``, ``verify``);
- ``realign_inputs``: adapter realignment (``safelora``, ``safemerge``, ``compare``).

Example:
    >>> resolve_roles("ft", aligned="chat", unaligned="shadow").vector is None
    True
    >>> realign_inputs("lora", aligned="chat", unaligned="shadow")["base"]
    Input(role='base', path='chat', hub=None, kind='model')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from resta_fast.errors import OptionError
from resta_fast.resolve import Input, resolve_all


@dataclass(frozen=True)
class Roles:
    """Which path plays which role in one patch.

    ``base`` is set only for a LoRA fine-tune (the model its adapter merges
    into); ``dare_base`` is DARE's base once defaulted (the LoRA base, else the
    aligned model), or the path given even without DARE (it is then opened,
    checked and guarded as an input, but not used).
    """

    finetuned: str
    aligned: str | None = None
    unaligned: str | None = None
    vector: str | None = None
    base: str | None = None
    dare_base: str | None = None
    lora: bool = False
    # role -> where a Hub input came from (repo id, revision, commit); local inputs are not listed.
    hub: dict = field(default_factory=dict, compare=False, hash=False)
    # role -> its resolve.Input (role, path, Hub origin, kind), defaults included; unset roles are not listed.
    inputs: dict = field(default_factory=dict, compare=False, hash=False)

    def paths(self) -> list[Path]:
        """Every input path (outputs must stay outside all of them)."""
        return [
            Path(p)
            for p in (self.finetuned, self.aligned, self.unaligned, self.vector, self.dare_base, self.base)
            if p is not None
        ]


# What each input role of a patch may be on the Hub (``resolve.resolve``'s ``accepts``).
ROLE_KINDS = {
    "finetuned": "any",
    "aligned": "model",
    "unaligned": "model",
    "vector": "model",
    "base": "model",
    "dare_base": "model",
}


def resolve_roles(
    finetuned,
    *,
    aligned=None,
    unaligned=None,
    vector=None,
    base=None,
    dare_base=None,
    dare: bool = False,
    resolver=None,
) -> Roles:
    """Decide the roles of the input paths (no checkpoint is opened).

    Each input may be a local path or a Hub id (``io.hub.HUB_RULE``): Hub ids
    are resolved here to their cache snapshot (downloaded when not cached).

    Args:
        finetuned: the fine-tune, or a PEFT LoRA adapter directory.
        aligned, unaligned: the pair defining the safety vector; or vector.
        base: a LoRA adapter's base (default: aligned); an error for a full fine-tune.
        dare_base: DARE's base (default: the LoRA base, else aligned).
        dare: DARE is on.
        resolver: ``io.hub.Resolver`` shared by the jobs of a batch (each
            distinct input resolved once); None: a new one for these inputs.
    Returns:
        The Roles, local paths as strings (as given), Hub ids as their
        snapshot directories with ``Roles.hub`` saying where they came from,
        and ``Roles.inputs`` each role's ``resolve.Input``.

    Example:
        >>> resolve_roles("ft", aligned="chat", unaligned="shadow", dare=True).dare_base
        'chat'
    """
    found = resolve_all(
        {
            "finetuned": finetuned,
            "aligned": aligned,
            "unaligned": unaligned,
            "vector": vector,
            "base": base,
            "dare_base": dare_base,
        },
        ROLE_KINDS,
        resolver,
    )
    if found["vector"] is not None and found["unaligned"] is not None:
        raise OptionError("vector", "give either {aligned} and {unaligned}, or {vector} (not both)")
    ft = found["finetuned"]
    lora = ft.is_adapter
    if found["base"] is not None and not lora:
        raise OptionError(
            "base",
            "{base} is only for LoRA adapters, and {ft} has no adapter_config.json; drop {base} for a full fine-tune",
            ft=ft.path,
        )
    if lora and found["base"] is None:
        if found["aligned"] is None:
            raise OptionError(
                "base",
                "{ft} is a LoRA adapter: pass {base}, the model it was trained on "
                "(with {vector} there is no {aligned} to default to)",
                ft=ft.path,
            )
        _default(found, "base", "aligned")
    if dare and found["dare_base"] is None:
        if found["aligned"] is None and found["base"] is None:
            raise OptionError(
                "dare", "{dare} needs the model the fine-tune started from: pass {dare_base} (or {aligned})"
            )
        _default(found, "dare_base", "base" if lora else "aligned")
    if found["vector"] is None and (found["aligned"] is None or found["unaligned"] is None):
        raise OptionError("vector", "give either {aligned} and {unaligned}, or {vector} (not both)")
    return _roles(found, lora)


def vector_roles(aligned, unaligned, *, resolver=None) -> Roles:
    """The roles of ``make_vector``'s two inputs (V = aligned − unaligned); Hub ids resolved.

    Example:
        >>> r = vector_roles("chat", "shadow")
        >>> (r.aligned, r.unaligned, sorted(r.inputs))
        ('chat', 'shadow', ['aligned', 'unaligned'])
    """
    found = resolve_all({"aligned": aligned, "unaligned": unaligned}, ROLE_KINDS, resolver)
    return Roles(
        found["aligned"].path,
        aligned=found["aligned"].path,
        unaligned=found["unaligned"].path,
        hub=_hub(found),
        inputs={r: i for r, i in found.items() if i is not None},
    )


# What each input of adapter realignment may be on the Hub.
REALIGN_KINDS = {
    "adapter": "adapter",
    "safety_adapter": "adapter",
    "aligned": "model",
    "unaligned": "model",
    "base": "model",
}


def realign_inputs(adapter, *, aligned, unaligned, safety_adapter=None, base=None, resolver=None) -> dict:
    """The inputs of adapter realignment (Safe LoRA, SafeMERGE), role -> ``resolve.Input`` or None.

    The base merges go into defaults to the aligned model, as a LoRA patch's
    base does: the same input, Hub origin included.
    """
    found = resolve_all(
        {
            "adapter": adapter,
            "safety_adapter": safety_adapter,
            "aligned": aligned,
            "unaligned": unaligned,
            "base": base,
        },
        REALIGN_KINDS,
        resolver,
    )
    if found["base"] is None:
        _default(found, "base", "aligned")
    return found


def _default(found: dict, role: str, source: str) -> None:
    """``role`` defaults to the input playing ``source``: the same path and the same Hub origin."""
    found[role] = found[source].as_role(role) if found[source] is not None else None


def _hub(found: dict) -> dict:
    return {role: i.hub for role, i in found.items() if i is not None and i.is_hub}


def _roles(found: dict[str, Input | None], lora: bool) -> Roles:
    if not lora:
        found = dict(found, base=None)

    def path(role):
        return found[role].path if found[role] is not None else None

    return Roles(
        path("finetuned"),
        path("aligned"),
        path("unaligned"),
        path("vector"),
        path("base"),
        path("dare_base"),
        lora,
        _hub(found),
        {r: i for r, i in found.items() if i is not None},
    )
