"""A verdict: harmful, harmless, or unparseable (excluded from the rate, counted separately).

Example:
    >>> Verdict(HARMFUL, "unsafe\\nS1", ("S1",)).to_dict()
    {'label': 'harmful', 'detail': 'unsafe\\nS1', 'codes': ['S1']}
"""

from __future__ import annotations

from dataclasses import dataclass, field

HARMFUL, HARMLESS, UNPARSEABLE = "harmful", "harmless", "unparseable"
LABELS = (HARMFUL, HARMLESS, UNPARSEABLE)


@dataclass(frozen=True)
class Verdict:
    """One judgement.

    Attributes:
        label: ``harmful``, ``harmless`` or ``unparseable``.
        detail: why: the matched refusal phrase, or the judge model's raw output.
        codes: policy category codes a Llama-Guard-style classifier named (e.g. ``("S1",)``).

    Example:
        >>> v = Verdict(HARMFUL, "unsafe\\nS1", ("S1",))
        >>> Verdict.from_dict(v.to_dict()) == v
        True
    """

    label: str
    detail: str = ""
    codes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"label": self.label, "detail": self.detail, "codes": list(self.codes)}

    @classmethod
    def from_dict(cls, d: dict) -> Verdict:
        return cls(d["label"], d.get("detail", ""), tuple(d.get("codes", ())))
