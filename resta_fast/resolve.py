"""The one resolve step: what the user typed, turned into resolved inputs.

Every command starts here: patch, vector, batch, safelora, safemerge, verify,
compare, inspect and eval. An input argument is a local path or a Hugging Face
Hub id (``ORG/NAME[@REV]``, ``hf://ORG/NAME[@REV]``: ``io.hub.HUB_RULE``), an
adapter or a full model, safetensors or ``.bin``. ``resolve`` turns it into an
``Input``, which knows

- its ``role`` (``finetuned``, ``aligned``, ``adapter`` ...),
- its local ``path``: as given for a local input, the cache snapshot for a Hub id,
- its Hub origin (``hub``: the ``io.hub.ResolvedInput`` with repo id, revision
  and commit; None for a local input),
- its ``kind``: ``adapter`` (a PEFT adapter directory) or ``model``.

``resolve_all`` resolves a command's inputs through one ``io.hub.Resolver``, so
each distinct Hub id is resolved once per run however many roles or jobs name it
(a batch shares one across its manifest). ``roles`` decides from these which
input plays which role for each command family (its defaults: a LoRA base is the
aligned model ...). Opened (``api.Opener``), an input's checkpoint gives its
identity (``fingerprint()``, ``io.identity``); ``Input.origin`` says where it
came from. ``report.provenance`` records the two side by side.

No checkpoint is opened and nothing heavy is imported (``huggingface_hub`` only
when a Hub id is resolved).

Example:
    >>> ft = resolve("./no-such-ft", "finetuned", accepts="any")
    >>> (ft.role, ft.path, ft.kind, ft.is_hub, ft.origin())
    ('finetuned', './no-such-ft', 'model', False, {'name': 'no-such-ft'})
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from resta_fast.io import identity
from resta_fast.io.adapter import is_adapter
from resta_fast.io.hub import ResolvedInput, Resolver

__all__ = ["Input", "Resolver", "resolve", "resolve_all"]


@dataclass(frozen=True)
class Input:
    """One input argument, resolved: its role, local path, Hub origin and kind.

    Args:
        role: the role it plays (``finetuned``, ``aligned``, ``dare_base`` ...).
        path: the local path as given (a string), or the snapshot directory of a Hub id.
        hub: where a Hub input came from (``io.hub.ResolvedInput``); None for a local one.
        kind: ``adapter`` when ``path`` is a PEFT adapter directory, else ``model``.

    Example:
        >>> Input("aligned", "chat").as_role("base")
        Input(role='base', path='chat', hub=None, kind='model')
    """

    role: str
    path: str
    hub: ResolvedInput | None = None
    kind: str = "model"

    @property
    def is_hub(self) -> bool:
        return self.hub is not None

    @property
    def is_adapter(self) -> bool:
        return self.kind == "adapter"

    @property
    def given(self) -> str:
        """The argument as the user typed it (a Hub id as named, ``org/name@v3``; a local path as given)."""
        return self.hub.spec if self.hub is not None else self.path

    @property
    def hub_origin(self) -> dict | None:
        """``{repo_id, revision, commit}`` of a Hub input (what ``resta_fast.json`` records), else None."""
        return self.hub.provenance() if self.hub is not None else None

    def origin(self, *, record_path: bool = False) -> dict:
        """Where it came from, for the report and the card (``io.identity.origin``; not its identity)."""
        return identity.origin(self.path, self.hub, record_path=record_path)

    def as_role(self, role: str) -> Input:
        """The same input playing ``role`` (a default: the LoRA base that is the aligned model)."""
        return self if role == self.role else replace(self, role=role)

    def __fspath__(self) -> str:
        return self.path


def resolve(arg, role: str, *, accepts: str = "model", resolver=None, local: bool = True) -> Input | None:
    """One argument as an ``Input`` (None stays None).

    Args:
        arg: a local path (``str`` or ``os.PathLike``), a Hub id, an ``io.hub.ResolvedInput``
            (already resolved: a batch manifest's) or an ``Input`` (returned in ``role``).
        role: the role it plays; errors name it (``dare_base`` as ``dare base``).
        accepts: what the role may be on the Hub: ``model``, ``adapter`` or ``any``
            (``io.hub.resolve_input``'s ``kind``; it decides which files a snapshot must hold).
        resolver: the run's ``io.hub.Resolver`` (each distinct Hub id once); None: a new one.
        local: an existing local path by that name wins (False: the caller looked, e.g.
            next to a batch manifest).
    Raises:
        RestaError: a Hub id that cannot be made available (one line naming it).
    """
    if arg is None:
        return None
    if isinstance(arg, Input):
        return arg.as_role(role)
    found = (resolver or Resolver())(arg, role.replace("_", " "), kind=accepts, local=local)
    if found.is_hub:
        path, hub = str(found.path), found
    else:  # a local path: kept as given (the provenance records it as given)
        path, hub = str(arg.path if isinstance(arg, ResolvedInput) else arg), None
    return Input(role, path, hub, "adapter" if is_adapter(path) else "model")


def resolve_all(given: dict, accepts: dict[str, str], resolver=None) -> dict[str, Input | None]:
    """Every role of ``given`` (role -> argument or None) resolved through one resolver, in order.

    ``accepts`` maps each role to what it may be on the Hub (``resolve``). One
    ``io.hub.Resolver`` serves them all (a new one when None), so an id named by
    two roles is resolved once.

    Example:
        >>> got = resolve_all({"aligned": "chat", "vector": None}, {"aligned": "model", "vector": "model"})
        >>> got["aligned"].path, got["vector"]
        ('chat', None)
    """
    resolver = resolver or Resolver()
    return {role: resolve(arg, role, accepts=accepts[role], resolver=resolver) for role, arg in given.items()}
