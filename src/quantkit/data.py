"""Text sources, the eval/calib split, and tokenization into evaluation windows and calibration samples.

Text sources: a UTF-8 text file, or a `datasets` spec `hf:NAME[:CONFIG][:SPLIT]`
(e.g. `hf:wikitext:wikitext-2-raw-v1:test`; SPLIT defaults to "test"), or, with nothing else
at hand, text the model generates itself (`generate_reference_text`). `read_text` turns CRLF
and CR line ends into LF.

The split rule (`split_text`) keeps calibration and evaluation text apart: the calibration part
is the articles in the last quarter of the text, the evaluation part is everything before it.
The cut starts at 75% of the characters and moves forward to the start of the next WikiText
top-level article heading (a line ` = Title = `, not the ` = = Sub = = ` sub-headings); with no
such heading after it, to the start of the next line; on a text of one line, to the next space.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("eval", "calib", "all")
CALIB_FRACTION = 0.25
_ARTICLE_HEADING = re.compile(r"^ = [^=].* = \r?$", re.MULTILINE)

DEFAULT_PROMPTS = (
    "The history of the city begins",
    "In the early morning, the farmers",
    "Scientists studying the ocean have found",
    "The library opened its doors to",
    "During the winter of that year, the river",
    "The new railway line connected",
    "Many of the songs on the album",
    "The team's first season in the league",
)


# ---------------------------------------------------------------- text sources


def _read_hf(spec: str) -> str:
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"bad dataset spec {spec!r}: write hf:NAME[:CONFIG][:SPLIT], e.g. hf:wikitext:wikitext-2-raw-v1:test")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), \
        (parts[2] if len(parts) > 2 and parts[2] else "test")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec} needs the `datasets` package: pip install 'quantkit[datasets]', "
                        "or pass a local text file") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"could not load dataset {spec} (offline? pass a local text file instead): {msg}") from None
    columns = [c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
    if not columns:
        raise DataError(f"dataset {spec} has no text column")
    column = "text" if "text" in columns else columns[0]
    rows = ds[column]
    return "".join(r if r.endswith("\n") else r + "\n" for r in rows)


def read_text(source: str | Path) -> str:
    """The text of a UTF-8 file, or of a `hf:NAME[:CONFIG][:SPLIT]` dataset; line ends become "\\n"."""
    if isinstance(source, str) and source.startswith("hf:"):
        text = _read_hf(source)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"no such text file: {path}")
        if not path.is_file():
            raise DataError(f"{path} is not a file: pass a UTF-8 text file")
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror}") from None
    if not text.strip():
        raise DataError(f"{source} is empty: pass a text with content")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def calib_offset(text: str) -> int:
    """Character offset where the calibration part starts (see the module docstring)."""
    start = int(len(text) * (1 - CALIB_FRACTION))
    m = _ARTICLE_HEADING.search(text, start)
    if m:
        return m.start()
    nl = text.find("\n", start)
    if nl != -1 and nl + 1 < len(text):
        return nl + 1
    sp = text.find(" ", start)
    return sp + 1 if sp != -1 and sp + 1 < len(text) else start


def split_text(text: str, part: str) -> str:
    """`part` of `text`: "eval" (before the cut), "calib" (from the cut on) or "all"."""
    if part not in SPLITS:
        raise DataError(f"unknown split {part!r}; choose one of {', '.join(SPLITS)}")
    if not text.strip():
        raise DataError("the text is empty: pass a text with content")
    if part == "all":
        return text
    cut = calib_offset(text)
    out = text[:cut] if part == "eval" else text[cut:]
    if not out.strip():
        raise DataError(f"the text is too short to hold a separate {part} part; pass a longer text or split='all'")
    return out


def text(source: str | Path, split: str = "eval") -> str:
    """Read a text source and return its `split` part ("eval", "calib" or "all")."""
    return split_text(read_text(source), split)


# ---------------------------------------------------------------- tokens


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of ids, without special tokens."""
    if not text or not text.strip():
        raise DataError("the text is empty: pass a text with content")
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return torch.tensor(enc["input_ids"], dtype=torch.long)


def windows_from_ids(ids: torch.Tensor | Sequence[int], ctx: int = 512) -> torch.Tensor:
    """Cut 1-D ids into non-overlapping windows [n, ctx]; the incomplete tail is dropped."""
    if ctx < 2:
        raise DataError(f"--ctx must be at least 2 (a window of ctx tokens scores ctx-1 predictions), got {ctx}")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise DataError("the text is empty: pass a text with content")
    n = ids.numel() // ctx
    if n < 1:
        raise DataError(f"text too short to evaluate: {ids.numel()} tokens, need at least {ctx}; "
                        "pass a longer text or a smaller --ctx")
    return ids[: n * ctx].reshape(n, ctx)


PREFIX_MARGIN = 256  # tokens tokenized past what is needed: the cut cannot change the ids before it


def tokenize_prefix(tokenizer, text: str, n_tokens: int) -> torch.Tensor:
    """The first `n_tokens` ids of `tokenize(tokenizer, text)`, tokenizing only as much of the
    text as that needs: a prefix cut at a line end, doubled until it yields `PREFIX_MARGIN`
    tokens more than asked (the tokens before a cut that far back do not depend on it)."""
    chars = max(1 << 14, 8 * (n_tokens + PREFIX_MARGIN))
    while chars < len(text):
        cut = text.find("\n", chars)
        if cut == -1:
            break
        ids = tokenize(tokenizer, text[:cut + 1])
        if ids.numel() >= n_tokens + PREFIX_MARGIN:
            return ids[:n_tokens]
        chars *= 2
    return tokenize(tokenizer, text)[:n_tokens]


def eval_windows(tokenizer, text: str, ctx: int = 512, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize `text` (with `max_tokens`, only the part that holds them) and cut it into
    non-overlapping windows: LongTensor [n, ctx]."""
    if max_tokens is not None:
        if max_tokens < 1:
            raise DataError(f"max_tokens must be positive, got {max_tokens}")
        if not text or not text.strip():
            raise DataError("the text is empty: pass a text with content")
        ids = tokenize_prefix(tokenizer, text, max_tokens)
    else:
        ids = tokenize(tokenizer, text)
    return windows_from_ids(ids, ctx)


def calib_samples(tokenizer, text: str, n: int = 128, length: int = 512, seed: int = 0) -> torch.Tensor:
    """`n` random spans of `length` tokens from `text`: LongTensor [n, length], reproducible by seed."""
    return calib_samples_from_ids(tokenize(tokenizer, text), n, length, seed)


def calib_samples_from_ids(ids: torch.Tensor, n: int = 128, length: int = 512, seed: int = 0) -> torch.Tensor:
    """`n` random spans of `length` tokens from 1-D `ids`: LongTensor [n, length], reproducible by seed."""
    if n < 1 or length < 1:
        raise DataError(f"calibration needs n >= 1 samples of length >= 1, got n={n}, length={length}")
    if ids.numel() < length:
        raise DataError(f"text too short to calibrate: {ids.numel()} tokens, need at least {length}; "
                        "pass a longer text or a smaller sample length")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length + 1, (n,), generator=g)  # [n]
    return torch.stack([ids[s: s + length] for s in starts.tolist()])


def calibration(tokenizer, source=None, model=None, n: int = 128, length: int = 512, seed: int = 0) -> torch.Tensor:
    """Calibration token ids [n, length]: from the calibration part of a text source (for the
    WikiText file, its last-quarter articles), or — when `source` is None — from text `model`
    generates itself (data-free fallback, logged as a warning)."""
    if source is not None:
        return calib_samples(tokenizer, text(source, "calib"), n, length, seed)
    if model is None:
        raise DataError("no calibration text: pass --calib PATH (or a model to generate text from)")
    log.warning("no calibration text given: calibrating on text the model generates itself (data-free fallback); "
                "pass --calib PATH for real text")
    ids = generate_reference_text(model, tokenizer, seed=seed)
    return calib_samples_from_ids(ids, n, min(length, ids.numel()), seed)


@torch.no_grad()
def generate_reference_text(model, tokenizer, prompts: Sequence[str] = DEFAULT_PROMPTS,
                            max_new_tokens: int = 224, seed: int = 0) -> torch.Tensor:
    """Greedy continuations of `prompts`, each prompt + continuation, joined by the ids of a blank line.

    Returns a 1-D LongTensor. For the offline demo, when no text is given: cut it with
    `windows_from_ids`.
    """
    from transformers import GenerationConfig

    if not prompts:
        raise DataError("generate_reference_text needs at least one prompt")

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(model.config, "eos_token_id", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sep = torch.tensor(tokenizer("\n\n", add_special_tokens=False)["input_ids"], dtype=torch.long)
    pieces = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for prompt in prompts:
                enc = tokenizer(prompt, return_tensors="pt")
                out = model.generate(input_ids=enc["input_ids"].to(device),
                                     attention_mask=enc["attention_mask"].to(device), generation_config=gen)
                pieces.append(out[0].to("cpu", torch.long))  # [prompt + continuation]
    finally:
        model.train(was_training)
    joined = [pieces[0]]
    for piece in pieces[1:]:
        joined += [sep, piece]
    return torch.cat(joined)
