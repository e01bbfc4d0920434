"""Answer prompts with a finished checkpoint: transformers (default) or vLLM, greedy, batched.

Both engines share one contract: ``generate(texts) -> list[str]`` in input order,
the prompts formatted by resta_fast/eval/chat.py (the chat template when the
tokenizer has one, raw text otherwise), and ``perplexity(text) -> float``. The
runner saves the answers with resta_fast/eval/responses.py so judges can be
re-run later without touching the model again.
"""

from __future__ import annotations

import gc
import math
import sys
import weakref

from resta_fast.errors import RestaError
from resta_fast.eval.chat import check_model_dir, format_prompts, load_tokenizer
from resta_fast.eval.options import ENGINES, GENERATION_DTYPES

# Default batch sizes when the user says nothing: small on CPU where a batch costs
# latency, larger on GPU; on CUDA out-of-memory the batch is halved and retried.
DEFAULT_BATCH = {"cpu": 8, "cuda": 32}


def _torch_dtype(dtype: str):
    import torch

    if dtype == "auto":
        return "auto"
    if dtype not in GENERATION_DTYPES:
        raise RestaError(f"unknown --dtype {dtype!r}; choose one of {', '.join(GENERATION_DTYPES)}")
    return getattr(torch, dtype)


def _check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RestaError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise RestaError(f"unknown --device {device!r}; use cpu, cuda or cuda:N")
    return device


def default_batch_size(device: str) -> int:
    """Batch size used when none is given: 8 on CPU, 32 on GPU (halved on OOM).

    Args:
        device: ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        The batch size.

    Example:
        >>> default_batch_size("cpu")
        8
    """
    return DEFAULT_BATCH["cuda" if device.startswith("cuda") else "cpu"]


def _progress(total, desc, progress):
    from tqdm.auto import tqdm

    # disable=None lets tqdm switch itself off when stderr is not a terminal.
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=None if progress is None else not progress)


class TransformersEngine:
    """Greedy batched generation and perplexity with a transformers causal LM.

    Args:
        model_dir: local model directory (config.json, weights, tokenizer).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto`` (the checkpoint's dtype), ``float32``, ``bfloat16`` or ``float16``.
        seed: seeds torch; greedy decoding does not sample, this only pins anything stochastic.
        progress: False hides transformers' weight-loading bar.

    Example:
        (skipped: needs a checkpoint on disk)

        >>> eng = TransformersEngine("out/restored")  # doctest: +SKIP
        >>> eng.generate(["How do I pick a lock?"], max_new_tokens=32)  # doctest: +SKIP
    """

    name = "transformers"

    def __init__(
        self,
        model_dir,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        seed: int = 0,
        progress: bool | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM

        self.model_dir = str(model_dir)
        self.device = _check_device(device)
        self.tokenizer = load_tokenizer(model_dir)
        from transformers.utils import logging as hf_logging

        torch.manual_seed(seed)
        # transformers draws its own weight-loading bar; honour --no-progress for it too.
        bars_were_on = hf_logging.is_progress_bar_enabled()
        if progress is False:
            hf_logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.model_dir, dtype=_torch_dtype(dtype), local_files_only=True
            )
        except (OSError, ValueError) as e:
            raise RestaError(f"{self.model_dir}: could not load the model ({e})") from e
        finally:
            if bars_were_on:
                hf_logging.enable_progress_bar()
        self.model = model.to(self.device).eval()

    def _gen_config(self, max_new_tokens: int):
        from transformers import GenerationConfig

        # A fresh config, not the checkpoint's: chat checkpoints often ship do_sample=True
        # with a temperature, and the evaluation must be greedy and reproducible.
        mcfg = getattr(self.model, "generation_config", None)
        eos = getattr(mcfg, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return GenerationConfig(
            max_new_tokens=int(max_new_tokens),
            do_sample=False,
            num_beams=1,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=eos,
            bos_token_id=getattr(mcfg, "bos_token_id", None),
        )

    def generate(
        self,
        texts,
        *,
        max_new_tokens: int = 128,
        batch_size: int | None = None,
        raw: bool = False,
        add_special_tokens: bool = True,
        system_prompt: str | None = None,
        chat_template: bool | None = None,
        progress: bool | None = None,
        desc: str = "generate",
    ) -> list[str]:
        """Greedy completions, in input order.

        Args:
            texts: questions (or, with ``raw=True``, fully formatted prompts).
            max_new_tokens: bound on each completion.
            batch_size: rows per forward pass; halved on CUDA out-of-memory.
            raw: skip the chat template (the caller formatted the text, e.g. a judge prompt).
            add_special_tokens: with ``raw``, whether the tokenizer adds BOS etc. (False when the
                text came out of a chat template that already has them).
            system_prompt: optional system message.
            chat_template: force/skip the chat template (None: use it when present).
            progress: tqdm bar on stderr (None: only on a terminal).
            desc: progress bar label.

        Returns:
            The stripped completions.
        """
        import torch

        texts = list(texts)
        if raw:
            formatted, add_special = texts, add_special_tokens
        else:
            formatted, add_special = format_prompts(
                self.tokenizer, texts, system_prompt=system_prompt, chat_template=chat_template
            )
        enc = [self.tokenizer(t, add_special_tokens=add_special)["input_ids"] for t in formatted]
        # Longest first: similar lengths share a batch (less padding) and an OOM shows up at once.
        order = sorted(range(len(enc)), key=lambda i: (-len(enc[i]), i))
        bs = int(batch_size or default_batch_size(self.device))
        gcfg = self._gen_config(max_new_tokens)
        out: list[str | None] = [None] * len(enc)
        pos = 0
        # torch.OutOfMemoryError is new in torch 2.5; the CUDA alias exists since 1.13.
        oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
        with _progress(len(enc), desc, progress) as bar, torch.inference_mode():
            while pos < len(order):
                idx = order[pos : pos + bs]
                batch = self.tokenizer.pad({"input_ids": [enc[i] for i in idx]}, return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                try:
                    gen = self.model.generate(**batch, generation_config=gcfg)
                except oom as e:
                    if bs == 1:
                        raise RestaError(
                            f"{self.model_dir}: out of memory generating one row; lower --max-new-tokens "
                            "or use a larger device"
                        ) from e
                    bs = max(1, bs // 2)
                    torch.cuda.empty_cache()
                    continue
                new = gen[:, batch["input_ids"].shape[1] :]
                decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
                for i, text in zip(idx, decoded, strict=True):
                    out[i] = text.strip()
                pos += len(idx)
                bar.update(len(idx))
        return out  # type: ignore[return-value]

    def perplexity(self, text: str, *, window: int = 1024, progress: bool | None = None) -> float:
        """Perplexity of a text, over consecutive non-overlapping windows.

        Args:
            text: the held-out text.
            window: tokens per forward pass (capped at the model's context length).
            progress: tqdm bar on stderr.

        Returns:
            exp(mean negative log-likelihood per predicted token).
        """
        import torch

        ids = self.tokenizer(text, add_special_tokens=True, return_tensors="pt")["input_ids"][0]
        limit = getattr(self.model.config, "max_position_embeddings", None) or window
        window = max(2, min(int(window), int(limit)))
        if ids.numel() < 2:
            raise RestaError("the perplexity text has fewer than 2 tokens; pass a longer held-out text file")
        nll, count = 0.0, 0
        starts = list(range(0, ids.numel() - 1, window))
        with _progress(len(starts), "perplexity", progress) as bar, torch.inference_mode():
            for s in starts:
                chunk = ids[s : s + window].unsqueeze(0).to(self.device)
                if chunk.shape[1] < 2:
                    break
                logits = self.model(chunk).logits.float()
                logp = torch.log_softmax(logits[0, :-1], dim=-1)
                tgt = chunk[0, 1:]
                nll -= logp.gather(1, tgt.unsqueeze(1)).sum().item()
                count += tgt.numel()
                bar.update(1)
        return math.exp(nll / count)

    def close(self) -> None:
        """Free the model (and GPU memory) before the next one is loaded."""
        import torch

        model = weakref.ref(self.model)
        del self.model
        # Usually the last reference is gone now. Only a model caught in a reference
        # cycle needs the cyclic collector, whose full pass cost ~0.2 s per model
        # even for tiny ones (a quarter of the demo's warm run when done always).
        if model() is not None:
            gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class VLLMEngine:
    """The same contract on vLLM (``--engine vllm``); needs vLLM and a GPU.

    Args:
        model_dir: local model directory.
        device: ignored except for validation (vLLM picks the GPU).
        dtype: passed to vLLM (``auto`` keeps the checkpoint's).
        seed: vLLM engine seed.

    Example:
        (skipped: needs vLLM, a GPU and a checkpoint on disk)

        >>> eng = VLLMEngine("out/restored")  # doctest: +SKIP
    """

    name = "vllm"

    def __init__(self, model_dir, *, device: str = "cuda", dtype: str = "auto", seed: int = 0, **llm_kwargs):
        try:
            import vllm
        except ImportError as e:
            raise RestaError(
                "--engine vllm needs vLLM, which is not installed here (pip install vllm, on a CUDA "
                "machine); or use --engine transformers"
            ) from e
        if dtype not in GENERATION_DTYPES:
            raise RestaError(f"unknown --dtype {dtype!r}; choose one of {', '.join(GENERATION_DTYPES)}")
        self._vllm = vllm
        self.model_dir = str(check_model_dir(model_dir))
        self.device = device
        self.llm = vllm.LLM(model=self.model_dir, tokenizer=self.model_dir, dtype=dtype, seed=seed, **llm_kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(
        self,
        texts,
        *,
        max_new_tokens: int = 128,
        batch_size: int | None = None,
        raw: bool = False,
        add_special_tokens: bool = True,
        system_prompt: str | None = None,
        chat_template: bool | None = None,
        progress: bool | None = None,
        desc: str = "generate",
    ) -> list[str]:
        """Greedy completions in input order (vLLM schedules its own batches; batch_size is ignored)."""
        texts = list(texts)
        if raw:
            formatted, add_special = texts, add_special_tokens
        else:
            formatted, add_special = format_prompts(
                self.tokenizer, texts, system_prompt=system_prompt, chat_template=chat_template
            )
        # Token ids, not strings: vLLM would add BOS again to an already templated prompt.
        reqs = [{"prompt_token_ids": self.tokenizer(t, add_special_tokens=add_special)["input_ids"]} for t in formatted]
        params = self._vllm.SamplingParams(temperature=0.0, max_tokens=int(max_new_tokens))
        outs = self.llm.generate(reqs, params, use_tqdm=bool(progress))
        return [o.outputs[0].text.strip() for o in outs]

    def perplexity(self, text: str, *, window: int = 1024, progress: bool | None = None) -> float:
        """Perplexity from vLLM's prompt log-probabilities, over non-overlapping windows."""
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) < 2:
            raise RestaError("the perplexity text has fewer than 2 tokens; pass a longer held-out text file")
        chunks = [ids[s : s + window] for s in range(0, len(ids) - 1, window)]
        chunks = [c for c in chunks if len(c) >= 2]
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outs = self.llm.generate([{"prompt_token_ids": c} for c in chunks], params, use_tqdm=bool(progress))
        nll, count = 0.0, 0
        for chunk, o in zip(chunks, outs, strict=True):
            for tok, lp in zip(chunk[1:], o.prompt_logprobs[1:], strict=True):
                nll -= lp[tok].logprob
                count += 1
        return math.exp(nll / count)

    def close(self) -> None:
        """Drop the engine so the next model can load."""
        del self.llm
        gc.collect()


def load_engine(
    model_dir,
    *,
    engine: str = "transformers",
    device: str = "cpu",
    dtype: str = "auto",
    seed: int = 0,
    progress: bool | None = None,
):
    """Open a generation engine on a local checkpoint.

    Args:
        model_dir: local model directory.
        engine: ``transformers`` or ``vllm``.
        device: ``cpu``, ``cuda``, ``cuda:N``.
        dtype: ``auto``, ``float32``, ``bfloat16``, ``float16``.
        seed: generation seed.
        progress: False hides loading bars.

    Returns:
        An engine with ``generate``, ``perplexity`` and ``close``.

    Example:
        (skipped: needs a checkpoint on disk)

        >>> with_engine = load_engine("out/restored", device="cpu")  # doctest: +SKIP
    """
    if engine == "transformers":
        return TransformersEngine(model_dir, device=device, dtype=dtype, seed=seed, progress=progress)
    if engine == "vllm":
        return VLLMEngine(model_dir, device=device, dtype=dtype, seed=seed)
    raise RestaError(f"unknown --engine {engine!r}; choose one of {', '.join(ENGINES)}")
