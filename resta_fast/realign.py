"""Adapter realignment runs (Safe LoRA, SafeMERGE): inputs in, one atomic output out.

Each method decides per LoRA module what the adapter becomes (``safelora``,
``safemerge``); this module opens the inputs, scores the modules with a
progress bar, and hands the one executor (``executor``) either

- the per-module replacements of a PEFT adapter (``executor.AdapterWrite``: same
  tensor names, dtypes and order; unchanged tensors byte for byte), or
- with ``merge``, the full model: base + the realigned update (the replacements, or
  SafeMERGE's delta provider, merged in-stream by ``lora.LoraFinetuned``) as a copy
  plan the same engine writes as ``patch``'s (``merged_write``, ``plan.copy_plan``),

with ``resta_fast.json`` listing every module's cosine and decision beside the
provenance. Nothing is written on bad input, and an interrupted run leaves no
output.

Example:
    >>> report = safelora("ft", "safe-ft", aligned="chat", unaligned="base", threshold=0.5)  # doctest: +SKIP
    >>> [m["module"] for m in report["safelora"]["modules"] if m["projected"]]  # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np

from resta_fast import safelora as SL
from resta_fast import safemerge as SM
from resta_fast.api import Opener
from resta_fast.errors import OptionError, RestaError
from resta_fast.executor import AdapterWrite, EngineWrite, Output, write_one
from resta_fast.io.checkpoint import Checkpoint
from resta_fast.io.reader import NUMPY_STORAGE, torch_dtype
from resta_fast.io.writer import check_output_location
from resta_fast.kernels import BackendUnavailable, choose_backend
from resta_fast.lora import LoraFinetuned
from resta_fast.pipeline.job import Inputs
from resta_fast.plan import copy_plan
from resta_fast.report import provenance, with_paths
from resta_fast.roles import realign_inputs


def _view(opener: Opener, adapter, base: Checkpoint, **kw) -> LoraFinetuned:
    """The adapter read on ``base``; its errors name the flag ``base`` came from."""
    return opener.lora(adapter, base, base_flag=f"--{base.role}", **kw)


def _stored(b_proj: np.ndarray, dtype: str) -> np.ndarray:
    """An fp32 array rounded to an adapter dtype by docs/spec.md §2's rules, in numpy storage
    (BF16 as uint16 bits, which the adapter writer takes as is): the C++ kernel's rounding when
    it is built (no torch), else the torch reference's, the same bits."""
    flat = np.ascontiguousarray(b_proj, dtype=np.float32).reshape(-1)
    out = np.empty(flat.size, NUMPY_STORAGE[dtype])
    try:
        from resta_fast.kernels import cpp

        cpp.convert_arrays(out, flat, threads=1)
    except BackendUnavailable:
        import torch

        from resta_fast.kernels.reference import store

        target = torch.from_numpy(out).view(torch_dtype(dtype))
        store(target, torch.from_numpy(flat))
    return out.reshape(b_proj.shape)


def _as_tensor(arr, dtype: str):
    """A stored adapter array (``_stored``) as the torch tensor ``LoraFinetuned`` merges from."""
    if not isinstance(arr, np.ndarray):
        return arr
    import torch

    return torch.from_numpy(arr).view(torch_dtype(dtype))


def _scores_table(scores: list[SL.ModuleScore], threshold: float, what: str, strict: bool = False) -> str:
    lines = [f"{'cos':>8}  {what:9}  module"]
    for s in scores:
        cos = "n/a" if s.cos is None else f"{s.cos:.5f}"
        lines.append(f"{cos:>8}  {'yes' if s.projected else 'no':9}  {s.module}")
    n = sum(s.projected for s in scores)
    lines.append(f"{n} of {len(scores)} module(s) {what} (cos {'<' if strict else '<='} {threshold:g})")
    return "\n".join(lines)


def _module_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="module", desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


def _input_paths(*paths) -> list[Path]:
    return [Path(p) for p in paths if p is not None]


def merged_write(view: LoraFinetuned) -> EngineWrite:
    """base + the realigned update, as a full model in the base's layout and dtypes: the engine
    copies ``view``'s merged tensors (``plan.copy_plan``; the kernel is never called)."""
    plan = copy_plan(view)
    plan.notes.insert(0, view.summary())
    backend_name, kernel = choose_backend("auto", "cpu")
    return EngineWrite(plan, Inputs(view), kernel, backend_name, "cpu")


class Session:
    """The inputs of adapter realignment, opened once and scored once.

    Scoring (reading every targeted weight of both models) is the expensive
    part and is the same for Safe LoRA and SafeMERGE, so a session scores on
    first use and then writes any number of outputs (``compare`` writes one per
    knob). Use it as a context manager.

    Args:
        adapter: the fine-tune's PEFT LoRA adapter (trained on ``aligned``).
        aligned, unaligned: the aligned model and the model it was aligned from.
        safety_adapter: SafeMERGE's safety adapter (optional).
        base: the model merges go into (default: ``aligned``).
        record_paths: its outputs record the inputs' local paths (``api.execute``).
    """

    def __init__(
        self,
        adapter,
        *,
        aligned,
        unaligned,
        safety_adapter=None,
        base=None,
        progress: bool = False,
        record_paths: bool = False,
    ):
        # What the user typed, resolved (roles.realign_inputs: Hub ids to their cache snapshots, each once;
        # the base defaults to the aligned model, Hub origin included); their origins go into the provenance.
        self.inputs = realign_inputs(
            adapter, aligned=aligned, unaligned=unaligned, safety_adapter=safety_adapter, base=base
        )
        self.hub = {role: i.hub for role, i in self.inputs.items() if i is not None and i.is_hub}
        self.paths = {role: (Path(i.path) if i is not None else None) for role, i in self.inputs.items()}
        base, aligned = self.paths["base"], self.paths["aligned"]
        self.progress = progress
        self.record_paths = record_paths
        self.stack = ExitStack()
        opener = Opener(self.stack)
        try:
            self.al = opener(aligned, "aligned")
            self.un = opener(self.paths["unaligned"], "unaligned")
            self.ft = _view(opener, self.paths["adapter"], self.al)
            self.mods = SL.linear_modules(self.ft)
            self.safety = self.pairs = None
            if safety_adapter is not None:
                self.safety = _view(opener, self.paths["safety_adapter"], self.al)
                self.pairs = SM.pair_modules(self.ft, self.safety, self.mods)
            same = Path(base).resolve() == Path(aligned).resolve()
            self.into = self.al if same else opener(base, "base")
        except BaseException:
            self.stack.close()
            raise
        self._scores: list[SL.ModuleScore] | None = None
        self._projections: dict = {}

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def scores(self) -> list[SL.ModuleScore]:
        """Every module's Safe LoRA cosine (a fresh copy per call: selections mark them)."""
        if self._scores is None:
            scores = []
            self._projections = SL.Spill()  # on disk, not in RSS: the adapter's size in B'
            self.stack.callback(self._projections.close)
            with _module_bar(len(self.mods), self.progress, "scoring LoRA modules") as bar:
                for score, b_proj in SL.score_modules(self.ft, self.un, on_module=lambda: bar.update(1)):
                    scores.append(score)
                    if b_proj is not None:  # B' is the adapter's size: kept for every selection
                        dtype = self.ft.adapter.file.tensors[score.lora_b].dtype
                        self._projections[score.lora_b] = _stored(b_proj, dtype)
            self._scores = scores
        return [SL.ModuleScore(**s.to_json()) for s in self._scores]

    def _checkpoints(self, *roles: str) -> dict:
        have = {
            "adapter": self.ft.adapter,
            "safety_adapter": self.safety and self.safety.adapter,
            "aligned": self.al,
            "unaligned": self.un,
            "base": self.into,
        }
        return {r: have[r] for r in roles}

    def _provenance(self, command: str, params: dict, roles) -> dict:
        cks = self._checkpoints(*roles)
        prov = provenance(command, params, cks, hub={r: h for r, h in self.hub.items() if r in roles})
        return with_paths(prov, cks) if self.record_paths else prov

    def _inputs(self, *roles: str) -> list[Path]:
        """The paths of ``roles`` (outputs must stay outside them); the base defaults to the aligned model."""
        return _input_paths(*(self.paths[r] for r in roles))

    def _write(
        self,
        out: Path,
        command: str,
        params: dict,
        roles,
        *,
        merge: bool,
        section: dict | None = None,
        replace=None,
        delta=None,
        config: dict | None = None,
        overwrite: bool,
        fsync: bool,
        command_line: str | None,
    ) -> dict:
        """``command``'s output: with ``merge``, base + the adapter's update (its tensors in
        ``replace``, or its update from ``delta``) as a full model; else the adapter with
        ``replace`` swapped in (and ``config``)."""
        extra = {command: section} if section is not None else {}

        def output(write, **kw) -> Output:
            return Output(
                out,
                write,
                self._provenance(command, params, roles),
                self._inputs(*roles),
                command=command,
                overwrite=overwrite,
                command_line=command_line,
                **kw,
            )

        if not merge:
            return write_one(
                output(AdapterWrite(self.paths["adapter"], replace or {}, config), extra=extra), fsync=fsync
            )
        if replace:
            stored = self.ft.adapter.file.tensors
            replace = {k: _as_tensor(v, stored[k].dtype) for k, v in replace.items()}
        with ExitStack() as stack:
            merged = _view(Opener(stack), self.paths["adapter"], self.into, replace=replace, delta=delta)
            bar = f"resta-fast -> {out.name}" if self.progress else None
            return write_one(output(merged_write(merged), extra={"output": "merged", **extra}, bar=bar), fsync=fsync)

    def finetune(self, out, *, overwrite: bool = False, fsync: bool = True) -> dict:
        """The fine-tune itself as a full model (base + the adapter, as peft's merge_and_unload):
        the baseline the realigned candidates are compared with."""
        return self._write(
            Path(out), "merge", {}, ("adapter", "base"), merge=True, overwrite=overwrite, fsync=fsync, command_line=None
        )

    @SL.SAFELORA.keywords
    def safelora(
        self,
        out,
        *,
        overwrite: bool = False,
        fsync: bool = True,
        dry_run: bool = False,
        command_line: str | None = None,
        **options,
    ) -> dict:
        """Write the Safe LoRA output (see ``safelora``; ``options``: the ``SAFELORA`` spec's)."""
        SL.check_selection(options.get("threshold"), options.get("num_layers"))
        options = _checked(SL.SAFELORA, options)
        threshold, num_layers, merge = options["threshold"], options["num_layers"], options["merge"]
        out = Path(out)
        roles = ("adapter", "aligned", "unaligned") + (("base",) if merge else ())
        if not dry_run:
            check_output_location(out, self._inputs(*roles), overwrite)  # before the scoring reads both models
        scores = self.scores()
        used = SL.select(scores, threshold=threshold, num_layers=num_layers)
        section = {
            "selection": {"threshold": threshold, "num_layers": num_layers, "threshold_used": used},
            "projected": sum(s.projected for s in scores),
            "modules": [s.to_json() for s in scores],
        }
        text = _scores_table(scores, used, "projected")
        if dry_run:
            return {"dry_run": True, "safelora": section, "text": text}
        replace = {s.lora_b: self._projections[s.lora_b] for s in scores if s.projected}
        params = SL.SAFELORA.params(options)
        report = self._write(
            out,
            "safelora",
            params,
            roles,
            merge=merge,
            section=section,
            replace=replace,
            overwrite=overwrite,
            fsync=fsync,
            command_line=command_line,
        )
        report["text"] = text
        return report

    @SM.SAFEMERGE.keywords
    def safemerge(
        self,
        out,
        *,
        overwrite: bool = False,
        fsync: bool = True,
        dry_run: bool = False,
        command_line: str | None = None,
        **options,
    ) -> dict:
        """Write the SafeMERGE output (see ``safemerge``; ``options``: the ``SAFEMERGE`` spec's)."""
        options = _checked(SM.SAFEMERGE, options)
        options["density"] = SM.check_combination(options["combination"], options["density"])
        tau, weights, combination, density, seed, merge = (
            options[k] for k in ("tau", "weights", "combination", "density", "seed", "merge")
        )
        if self.safety is None:
            raise OptionError("safety_adapter", "SafeMERGE needs {safety_adapter}")
        out = Path(out)
        roles = ("adapter", "safety_adapter", "aligned", "unaligned") + (("base",) if merge else ())
        config = None if merge else _adapter_space_config(self.ft, self.safety)
        if not dry_run:
            check_output_location(out, self._inputs(*roles), overwrite)
        scores = self.scores()
        SM.selected(scores, tau)
        section = {
            "selection": {
                "tau": tau,
                "weights": list(weights),
                "combination": combination,
                "density": density,
                "seed": seed,
            },
            "merged": sum(s.projected for s in scores),
            "modules": [s.to_json() for s in scores],
        }
        text = _scores_table(scores, tau, "merged", strict=True)
        if dry_run:
            return {"dry_run": True, "safemerge": section, "text": text}
        params = SM.SAFEMERGE.params(options)
        chosen = {s.module for s in scores if s.projected}
        delta, replace = None, {}
        if merge:
            # The delta reads only adapter tensors, so the views over the aligned model serve.
            delta = SM.weight_space_delta(self.ft, self.safety, self.pairs, chosen, weights, density=density, seed=seed)
        else:
            for mod in self.mods:
                w = SM.layer_weights(mod.module in chosen, weights)
                replace[mod.a], replace[mod.b] = SM.merge_adapter_space(
                    self.ft, self.safety, mod, self.pairs[mod.module], w, density=density, seed=seed
                )
        report = self._write(
            out,
            "safemerge",
            params,
            roles,
            merge=merge,
            section=section,
            replace=replace,
            delta=delta,
            config=config,
            overwrite=overwrite,
            fsync=fsync,
            command_line=command_line,
        )
        report["text"] = text
        return report


def _adapter_space_config(ft: LoraFinetuned, safety: LoraFinetuned) -> dict:
    """The merged adapter's config, as peft's add_weighted_adapter writes it (lora_alpha = r,
    patterns cleared); adapters it cannot merge that way are refused."""
    for view in (ft, safety):
        ad = view.adapter
        if ad.rank_pattern:
            raise RestaError(
                f"{ad.path}: rank_pattern gives modules different ranks; the adapter-space merge "
                "needs one rank. Use --merge (exact, in weight space)"
            )
        if ad.use_rslora:
            raise RestaError(
                f"{ad.path}: use_rslora; peft's adapter-space merge would rescale the merged "
                "adapter by sqrt(r). Use --merge (exact, in weight space)"
            )
    if ft.adapter.r != safety.adapter.r:
        raise RestaError(
            f"safety adapter {safety.adapter.path}: r = {safety.adapter.r} but the fine-tune's is "
            f"{ft.adapter.r}; SafeMERGE needs adapters of the same rank"
        )
    return {**ft.adapter.config, "lora_alpha": ft.adapter.r, "alpha_pattern": {}, "rank_pattern": {}}


def _checked(spec, options: dict) -> dict:
    """Every option of ``spec`` (defaults filled in), checked once by its own check; the first problem raises."""
    kept, problems = spec.check(options)
    if problems:
        raise problems[0]
    return kept


def _check_base(base, merge: bool) -> None:
    if base is not None and not merge:
        raise OptionError("base", "{base} is the model a merge goes into; it needs {merge}")


@SL.SAFELORA.keywords
def safelora(
    adapter,
    out,
    *,
    aligned,
    unaligned,
    base=None,
    overwrite: bool = False,
    fsync: bool = True,
    dry_run: bool = False,
    progress: bool = False,
    command_line: str | None = None,
    record_paths: bool = False,
    **options,
) -> dict:
    """Safe LoRA: project the LoRA modules whose update points away from alignment.

    Args:
        adapter: PEFT LoRA adapter trained on ``aligned``.
        out: output directory: the projected adapter, or with ``merge`` the full
            model base + (alpha/r)·B'·A (base defaults to ``aligned``).
        aligned, unaligned: the aligned model and the model it was aligned from.
        threshold: project modules with cos ≤ T (paper default 0.5); or
        num_layers: project the K modules with the lowest cos.
        dry_run: score and select only; nothing is written.
        record_paths: record the inputs' local paths in ``resta_fast.json`` (``api.execute``).
    Returns:
        The report (also ``out/resta_fast.json``); ``report["safelora"]["modules"]``
        holds every module's cosine and decision.
    """
    SL.check_selection(options.get("threshold"), options.get("num_layers"))
    options = _checked(SL.SAFELORA, options)
    _check_base(base, options["merge"])
    with Session(
        adapter, aligned=aligned, unaligned=unaligned, base=base, progress=progress, record_paths=record_paths
    ) as session:
        return session.safelora(
            out, **options, overwrite=overwrite, fsync=fsync, dry_run=dry_run, command_line=command_line
        )


@SM.SAFEMERGE.keywords
def safemerge(
    adapter,
    safety_adapter,
    out,
    *,
    aligned,
    unaligned,
    base=None,
    overwrite: bool = False,
    fsync: bool = True,
    dry_run: bool = False,
    progress: bool = False,
    command_line: str | None = None,
    record_paths: bool = False,
    **options,
) -> dict:
    """SafeMERGE: where the fine-tune's Safe LoRA cosine is below ``tau``, merge in the safety adapter.

    Args:
        adapter: the fine-tune's PEFT LoRA adapter (trained on ``aligned``).
        safety_adapter: a LoRA safety-tuned from the same base, same modules and rank.
        aligned, unaligned: the pair whose difference defines Safe LoRA's projection.
        tau: merge layers with cos < tau (default 0.35).
        weights: (fine-tune, safety) weights of a merged layer (default (0.8, 0.2)).
        combination: ``linear`` or ``dare_linear`` (with ``density``, the fraction kept, and ``seed``).
        merge: write the full model, merged exactly in weight space (see ``safemerge``);
            without it, the adapter-space merge as published.
        record_paths: record the inputs' local paths in ``resta_fast.json`` (``api.execute``).
    Returns:
        The report; ``report["safemerge"]["modules"]`` holds every layer's cosine and decision.
    """
    options = _checked(SM.SAFEMERGE, options)
    SM.check_combination(options["combination"], options["density"])
    _check_base(base, options["merge"])
    with Session(
        adapter,
        aligned=aligned,
        unaligned=unaligned,
        safety_adapter=safety_adapter,
        base=base,
        progress=progress,
        record_paths=record_paths,
    ) as session:
        return session.safemerge(
            out, **options, overwrite=overwrite, fsync=fsync, dry_run=dry_run, command_line=command_line
        )
