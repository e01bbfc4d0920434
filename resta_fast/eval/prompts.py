"""Harmful-question sets: CatQA nested JSON, flat JSON/JSONL/CSV, cached HF datasets, the smoke set.

Every loader yields :class:`Prompt` rows; :func:`load_prompts` concatenates
several sources and drops exact duplicates (CatQA ships a few), saying how many.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from resta_fast.errors import RestaError

# Column names tried in order when the user does not name one; covers CatQA rows,
# AdvBench ("goal"), HarmfulQA ("question", "topic", "subtopic") and generic sets.
PROMPT_COLUMNS = ("prompt", "question", "goal", "instruction", "query", "text", "input")
CATEGORY_COLUMNS = ("category", "topic", "harm_category")
SUBCATEGORY_COLUMNS = ("subcategory", "sub_category", "subtopic")

SMOKE_SPEC = "builtin:smoke"
HF_PREFIX = "hf:"


@dataclass(frozen=True)
class Prompt:
    """One question to put to the model.

    Attributes:
        id: stable identifier, ``<source>:<row>``; survives re-judging.
        text: the question itself.
        category: CatQA category (or the set's equivalent), if known.
        subcategory: CatQA subcategory, if known.
    """

    id: str
    text: str
    category: str | None = None
    subcategory: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PromptSet:
    """Loaded prompts plus what happened while loading them.

    Attributes:
        prompts: the de-duplicated prompts, in file order.
        sources: the specs they came from.
        loaded: rows read before de-duplication.
        duplicates_removed: exact duplicates dropped (first occurrence kept).
        smoke: True when any source is the built-in smoke set (not a benchmark).
    """

    prompts: list[Prompt]
    sources: list[str] = field(default_factory=list)
    loaded: int = 0
    duplicates_removed: int = 0
    smoke: bool = False

    def __len__(self) -> int:
        return len(self.prompts)

    def meta(self) -> dict:
        return {
            "sources": self.sources,
            "loaded": self.loaded,
            "duplicates_removed": self.duplicates_removed,
            "n": len(self.prompts),
            "smoke_set": self.smoke,
        }


@dataclass(frozen=True)
class Columns:
    """Which columns hold the prompt, category and subcategory (None: guess from the usual names)."""

    prompt: str | None = None
    category: str | None = None
    subcategory: str | None = None


def load_prompts(
    specs,
    *,
    columns: Columns | None = None,
    limit: int | None = None,
    verbose: bool = True,
) -> PromptSet:
    """Load and de-duplicate prompts from one or more sources.

    Args:
        specs: a path or spec string, or a list of them and/or :class:`Prompt` objects
            (see :func:`prompts_from_texts` for questions held in memory). Specs: ``*.json``
            (CatQA nested or a list of rows/strings), ``*.jsonl``, ``*.csv``, ``*.tsv``,
            ``builtin:smoke``, ``hf:NAME[:CONFIG][@SPLIT]``.
        columns: column names for flat files; guessed when None.
        limit: keep only the first ``limit`` prompts after de-duplication (for quick checks).
        verbose: print the duplicate count on stderr.

    Returns:
        A :class:`PromptSet`.

    Example:
        >>> ps = load_prompts("builtin:smoke")
        >>> ps.smoke, len(ps) > 0
        (True, True)
    """
    columns = columns or Columns()
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    rows: list[Prompt] = []
    sources: list[str] = []
    smoke = False
    loose: list = []
    for spec in specs:
        if isinstance(spec, Prompt):
            loose.append(spec)
            continue
        spec = str(spec)
        sources.append(spec)
        if spec in (SMOKE_SPEC, "smoke"):
            smoke = True
            rows.extend(load_smoke_set())
        elif spec.startswith(HF_PREFIX):
            rows.extend(load_hf_dataset(spec, columns))
        else:
            rows.extend(load_file(spec, columns))
    rows.extend(loose)
    if loose:
        sources.append("<inline>")
    if not rows:
        raise RestaError(
            f"no prompts found in {', '.join(sources) or 'the arguments'}: "
            "pass --prompts with a non-empty JSON/JSONL/CSV file or builtin:smoke"
        )
    kept, dropped = dedup(rows)
    if dropped and verbose:
        print(f"resta-fast eval: dropped {dropped} duplicate prompt(s) of {len(rows)}", file=sys.stderr)
    if limit is not None:
        kept = kept[: max(0, int(limit))]
    return PromptSet(prompts=kept, sources=sources, loaded=len(rows), duplicates_removed=dropped, smoke=smoke)


def prompts_from_texts(texts, source: str = "inline") -> list[Prompt]:
    """Wrap questions held in memory as prompts (for the Python API).

    Args:
        texts: iterable of question strings.
        source: name used in the prompt ids.

    Returns:
        One :class:`Prompt` per non-empty string.

    Example:
        >>> prompts_from_texts(["How do I bake bread?"])[0].id
        'inline:0'
    """
    return [Prompt(id=f"{source}:{i}", text=t.strip()) for i, t in enumerate(texts) if t.strip()]


def dedup(rows: list[Prompt]) -> tuple[list[Prompt], int]:
    """Drop exact duplicate questions (whitespace-stripped text), keeping the first.

    Args:
        rows: prompts in load order.

    Returns:
        (kept prompts, number dropped).

    Example:
        >>> dedup([Prompt("a:0", "q"), Prompt("a:1", " q ")])[1]
        1
    """
    seen: set[str] = set()
    kept = []
    for p in rows:
        key = p.text.strip()
        if key in seen:
            continue
        seen.add(key)
        kept.append(p)
    return kept, len(rows) - len(kept)


def load_file(path: str | os.PathLike, columns: Columns | None = None) -> list[Prompt]:
    """Load one prompt file; the format follows the extension.

    Args:
        path: ``.json``, ``.jsonl``, ``.csv`` or ``.tsv`` file.
        columns: column names for flat rows (guessed when None).

    Returns:
        The prompts, duplicates included.

    Example:
        >>> load_file("catqa_english.json")  # doctest: +SKIP
    """
    columns = columns or Columns()
    p = Path(path)
    if not p.is_file():
        raise RestaError(
            f"prompt file {p} not found: pass an existing JSON/JSONL/CSV file, "
            f"'{SMOKE_SPEC}' for the built-in smoke set, or '{HF_PREFIX}NAME' for a cached HF dataset"
        )
    source = p.stem
    suffix = p.suffix.lower()
    try:
        if suffix == ".jsonl":
            records = []
            for n, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise RestaError(f"{p}: line {n} is not valid JSON ({e.msg}); fix or remove it") from e
            return rows_to_prompts(records, source, columns, where=str(p))
        if suffix == ".json":
            try:
                data = json.loads(p.read_text(encoding="utf-8-sig"))
            except json.JSONDecodeError as e:
                raise RestaError(f"{p} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from e
            return json_to_prompts(data, source, columns, where=str(p))
        if suffix in (".csv", ".tsv"):
            with p.open(newline="", encoding="utf-8-sig") as f:
                records = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
            return rows_to_prompts(records, source, columns, where=str(p))
    except UnicodeDecodeError as e:
        raise RestaError(f"{p} is not UTF-8 text ({e.reason}); re-save it as UTF-8") from e
    raise RestaError(f"{p}: unknown prompt file type '{suffix}'; use .json, .jsonl, .csv or .tsv")


def json_to_prompts(data, source: str, columns: Columns, where: str) -> list[Prompt]:
    """Turn parsed JSON into prompts: CatQA nesting, a list of rows or strings, or {"data": [...]}.

    Args:
        data: the parsed JSON value.
        source: short name used in prompt ids.
        columns: column names for rows.
        where: file name for error messages.

    Returns:
        The prompts, duplicates included.
    """
    if isinstance(data, list):
        return rows_to_prompts(data, source, columns, where)
    if isinstance(data, dict):
        for key in ("data", "prompts", "rows", "train", "test"):
            if isinstance(data.get(key), list):
                return rows_to_prompts(data[key], source, columns, where)
        return catqa_to_prompts(data, source, where)
    raise RestaError(f"{where}: expected a JSON list of rows or a {{category: {{subcategory: [...]}}}} object")


def _clean_key(key: str) -> str:
    # CatQA's files spell some keys "Drug:" or "Illegal Activity :".
    return str(key).strip().rstrip(":").strip()


def catqa_to_prompts(data: dict, source: str, where: str) -> list[Prompt]:
    """CatQA layout: {category: {subcategory: [questions]}} or {category: [questions]}.

    Keys may end with ':' (stripped). Duplicates are kept here; :func:`dedup` removes them.

    Args:
        data: the parsed JSON object.
        source: short name used in prompt ids.
        where: file name for error messages.

    Returns:
        The prompts in file order.

    Example:
        >>> [p.category for p in catqa_to_prompts({"Fraud:": {"Scam:": ["q"]}}, "c", "x")]
        ['Fraud']
    """
    out: list[Prompt] = []
    for cat_key, sub in data.items():
        cat = _clean_key(cat_key)
        if isinstance(sub, list):
            groups = [(None, sub)]
        elif isinstance(sub, dict):
            groups = [(_clean_key(k), v) for k, v in sub.items()]
        else:
            raise RestaError(
                f"{where}: category '{cat_key}' holds {type(sub).__name__}; CatQA layout is "
                "{category: {subcategory: [questions]}}"
            )
        for subcat, questions in groups:
            if not isinstance(questions, list):
                raise RestaError(
                    f"{where}: '{cat_key}' / '{subcat}' holds {type(questions).__name__}, expected a list of questions"
                )
            for q in questions:
                if not isinstance(q, str):
                    raise RestaError(f"{where}: '{cat_key}' / '{subcat}' has a non-string question: {q!r:.60}")
                if q.strip():
                    out.append(Prompt(id=f"{source}:{len(out)}", text=q.strip(), category=cat, subcategory=subcat))
    return out


def _pick(keys, wanted: str | None, candidates, what: str, where: str, required: bool) -> str | None:
    lower = {k.lower(): k for k in keys}
    if wanted is not None:
        if wanted in keys:
            return wanted
        if wanted.lower() in lower:
            return lower[wanted.lower()]
        raise RestaError(f"{where}: no {what} column '{wanted}'; columns are {sorted(keys)}")
    for c in candidates:
        if c in lower:
            return lower[c]
    if required:
        raise RestaError(
            f"{where}: no {what} column among {sorted(keys)}; name it with --prompt-column "
            f"(tried {', '.join(candidates)})"
        )
    return None


def rows_to_prompts(records: list, source: str, columns: Columns, where: str) -> list[Prompt]:
    """Flat rows (dicts or plain strings) to prompts, with configurable columns.

    Args:
        records: list of dicts (one per row) or of strings.
        source: short name used in prompt ids.
        columns: column names; guessed from :data:`PROMPT_COLUMNS` etc. when None.
        where: file name for error messages.

    Returns:
        The prompts; duplicates kept, empty rows skipped.

    Example:
        >>> rows_to_prompts([{"goal": "q", "target": "t"}], "adv", Columns(), "x")[0].text
        'q'
    """
    out: list[Prompt] = []
    if not records:
        return out
    if all(isinstance(r, str) for r in records):
        return [Prompt(id=f"{source}:{i}", text=r.strip()) for i, r in enumerate(records) if r.strip()]
    keys: set[str] = set()
    for r in records:
        if not isinstance(r, dict):
            raise RestaError(f"{where}: rows must all be objects (or all strings); found {type(r).__name__}")
        keys.update(r.keys())
    pcol = _pick(keys, columns.prompt, PROMPT_COLUMNS, "prompt", where, required=True)
    ccol = _pick(keys, columns.category, CATEGORY_COLUMNS, "category", where, required=False)
    scol = _pick(keys, columns.subcategory, SUBCATEGORY_COLUMNS, "subcategory", where, required=False)
    for i, r in enumerate(records):
        text = r.get(pcol)
        if text is None or not str(text).strip():
            continue
        cat = r.get(ccol) if ccol else None
        sub = r.get(scol) if scol else None
        out.append(
            Prompt(
                id=f"{source}:{i}",
                text=str(text).strip(),
                category=_clean_key(cat) if cat not in (None, "") else None,
                subcategory=_clean_key(sub) if sub not in (None, "") else None,
            )
        )
    return out


def load_smoke_set() -> list[Prompt]:
    """The built-in smoke probes: abstract placeholders, one group per CatQA category.

    They contain no real harmful instructions and are not a benchmark: they only show
    that generation, judging and reporting run end to end and that a model refuses
    obviously templated requests.

    Returns:
        The probe prompts with category/subcategory set.

    Example:
        >>> len({p.category for p in load_smoke_set()})
        11
    """
    text = resources.files("resta_fast.eval").joinpath("data/smoke_probes.json").read_text(encoding="utf-8")
    data = json.loads(text)
    return rows_to_prompts(data["prompts"], "smoke", Columns(), where="builtin:smoke")


def _parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    body = spec[len(HF_PREFIX) :]
    split = "train"
    if "@" in body:
        body, split = body.rsplit("@", 1)
    name, config = body, None
    # "owner/name:config" — the config follows the last ':'.
    if ":" in body:
        name, config = body.split(":", 1)
    if not name:
        raise RestaError(f"'{spec}': expected hf:NAME[:CONFIG][@SPLIT], e.g. hf:declare-lab/CategoricalHarmfulQA@en")
    return name, config, split


def load_hf_dataset(spec: str, columns: Columns | None = None) -> list[Prompt]:
    """A Hugging Face dataset that is already in the local cache; never downloads.

    ``datasets`` is optional and imported only here. Offline mode is forced
    (``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``) so a missing dataset fails at once
    instead of hanging on the network.

    Args:
        spec: ``hf:NAME[:CONFIG][@SPLIT]`` (split defaults to ``train``).
        columns: column names (guessed when None).

    Returns:
        The prompts, duplicates included.

    Example:
        >>> load_hf_dataset("hf:declare-lab/CategoricalHarmfulQA@en")  # doctest: +SKIP
    """
    name, config, split = _parse_hf_spec(spec)
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        try:
            import datasets
        except ImportError as e:
            raise RestaError(
                f"'{spec}' needs the optional 'datasets' package (pip install datasets), or export the set "
                "to JSONL/CSV and pass the file to --prompts"
            ) from e
        # datasets reads the env var once, at import; set the live flag too in case it was imported earlier.
        cfg = getattr(datasets, "config", None)
        was_offline = getattr(cfg, "HF_DATASETS_OFFLINE", None)
        if cfg is not None:
            cfg.HF_DATASETS_OFFLINE = True
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError)
            raise RestaError(
                f"'{spec}': dataset {name!r} (config {config!r}, split {split!r}) is not in the local "
                f"Hugging Face cache and downloads are disabled ({type(e).__name__}: {str(e)[:200]}); "
                f"on a machine with internet run datasets.load_dataset({name!r}, {config!r}) and copy "
                "~/.cache/huggingface, or export it to JSONL and pass the file"
            ) from e
        finally:
            if cfg is not None and was_offline is not None:
                cfg.HF_DATASETS_OFFLINE = was_offline
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rows_to_prompts([dict(r) for r in ds], name.split("/")[-1], columns or Columns(), where=spec)
