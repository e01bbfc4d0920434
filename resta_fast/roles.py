"""Which input path plays which role in one patch, decided from the paths alone.

``resolve_roles`` resolves Hub ids to their cache snapshots (``io.hub``) and
decides, from the arguments and whether the fine-tune is a PEFT adapter
directory, which model is the fine-tune, the aligned/unaligned pair or the
vector, a LoRA adapter's base and DARE's base, with the defaults the docs
promise (a LoRA base defaults to the aligned model, DARE's base to the LoRA
base or else the aligned model). No checkpoint is opened and nothing heavy is
imported: ``api.prepare``, the batch manifest, verify and inspect all start here.

Example:
    >>> resolve_roles("ft", aligned="chat", unaligned="shadow").vector is None
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from resta_fast.errors import OptionError
from resta_fast.io.adapter import is_adapter
from resta_fast.io.hub import ResolvedInput, resolve_input


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

    def paths(self) -> list[Path]:
        """Every input path (outputs must stay outside all of them)."""
        return [
            Path(p)
            for p in (self.finetuned, self.aligned, self.unaligned, self.vector, self.dare_base, self.base)
            if p is not None
        ]


# What each input role may be on the Hub (``io.hub.resolve_input``'s kind).
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
            distinct input resolved once); None: ``io.hub.resolve_input``.
    Returns:
        The Roles, local paths as strings (as given), Hub ids as their
        snapshot directories with ``Roles.hub`` saying where they came from.

    Example:
        >>> resolve_roles("ft", aligned="chat", unaligned="shadow", dare=True).dare_base
        'chat'
    """
    resolve = resolver or resolve_input
    s, hub = {}, {}
    for key, value in (
        ("finetuned", finetuned),
        ("aligned", aligned),
        ("unaligned", unaligned),
        ("vector", vector),
        ("base", base),
        ("dare_base", dare_base),
    ):
        got = None if value is None else resolve(value, key.replace("_", " "), kind=ROLE_KINDS[key])
        if got is not None and got.is_hub:
            s[key], hub[key] = str(got.path), got
        else:  # a local path: kept as given (it is recorded in the provenance as given)
            s[key] = None if value is None else str(value.path if isinstance(value, ResolvedInput) else value)
    if s["vector"] is not None and s["unaligned"] is not None:
        raise OptionError("vector", "give either {aligned} and {unaligned}, or {vector} (not both)")
    lora = is_adapter(s["finetuned"])
    if s["base"] is not None and not lora:
        raise OptionError(
            "base",
            "{base} is only for LoRA adapters, and {ft} has no adapter_config.json; drop {base} for a full fine-tune",
            ft=s["finetuned"],
        )
    if lora and s["base"] is None:
        if s["aligned"] is None:
            raise OptionError(
                "base",
                "{ft} is a LoRA adapter: pass {base}, the model it was trained on "
                "(with {vector} there is no {aligned} to default to)",
                ft=s["finetuned"],
            )
        s["base"] = s["aligned"]
        if "aligned" in hub:
            hub["base"] = hub["aligned"]
    if dare and s["dare_base"] is None:
        if s["aligned"] is None and s["base"] is None:
            raise OptionError(
                "dare", "{dare} needs the model the fine-tune started from: pass {dare_base} (or {aligned})"
            )
        source = "base" if lora else "aligned"
        s["dare_base"] = s[source]
        if source in hub:
            hub["dare_base"] = hub[source]
    if s["vector"] is None and (s["aligned"] is None or s["unaligned"] is None):
        raise OptionError("vector", "give either {aligned} and {unaligned}, or {vector} (not both)")
    if not lora:
        hub.pop("base", None)
    return Roles(
        s["finetuned"],
        s["aligned"],
        s["unaligned"],
        s["vector"],
        s["base"] if lora else None,
        s["dare_base"],
        lora,
        hub,
    )
