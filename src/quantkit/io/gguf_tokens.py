"""GGUF tokenizer metadata (`tokenizer.ggml.*`) built from a transformers fast tokenizer.

Supported: byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2, SmolLM style), which llama.cpp
calls model "gpt2". The vocab is written in id order, merges as "a b" strings, and token
types as llama.cpp reads them: special added tokens CONTROL, other added tokens
USER_DEFINED, the rest NORMAL; ids past the tokenizer's length (padding rows of the
embedding) become "[PAD{id}]" tokens of type UNUSED.

llama.cpp picks its pre-tokenizer regex by the `tokenizer.ggml.pre` name, which a tokenizer
file does not state. It is taken, in this order, from the `tokenizer_pre` argument, from
`config.gguf_tokenizer_pre` (set when the model was loaded from a GGUF file, and saved with
quantkit checkpoints), or from the pre-tokenizer of tokenizer.json when it is one of the
known ones below; otherwise export stops and asks for it.
"""
from __future__ import annotations

import json

from ..errors import SourceError

# pre-tokenizer split regex of tokenizer.json -> llama.cpp's pre-tokenizer name
_KNOWN_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}
PRE_NAMES = ("gpt-2", "llama-bpe", "qwen2", "smollm", "default")


def _backend(tok) -> dict:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise SourceError(f"GGUF export needs a fast (tokenizers) tokenizer; got {type(tok).__name__}")
    return json.loads(backend.to_str())


def _guess_pre(j: dict) -> str | None:
    pre = j.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    for s in steps:
        if s.get("type") == "Split":
            rx = (s.get("pattern") or {}).get("Regex")
            if rx in _KNOWN_SPLITS:
                return _KNOWN_SPLITS[rx]
    return None


def _merges(model: dict) -> list[str]:
    out = []
    for m in model.get("merges", []):
        out.append(" ".join(m) if isinstance(m, (list, tuple)) else str(m))
    return out


def tokenizer_fields(tok, config, pre: str | None = None) -> dict:
    """{key: (value, GGUFValueType, array sub-type or None)} for the `tokenizer.*` keys."""
    import gguf

    V = gguf.GGUFValueType
    T = gguf.TokenType
    j = _backend(tok)
    model = j.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(j.get("pre_tokenizer")):
        raise SourceError(f"GGUF export supports byte-level BPE tokenizers (GPT-2/Llama-3/Qwen2 style); "
                          f"this one is {model.get('type')!r} with pre-tokenizer "
                          f"{(j.get('pre_tokenizer') or {}).get('type')!r}")
    pre = pre or getattr(config, "gguf_tokenizer_pre", None) or _guess_pre(j)
    if pre is None:
        raise SourceError("cannot tell which llama.cpp pre-tokenizer this tokenizer needs; pass it with "
                          f"--tokenizer-pre NAME (e.g. {', '.join(PRE_NAMES)}; see llama.cpp's llama-vocab.cpp)")
    n_vocab = int(getattr(config, "vocab_size", 0) or len(tok))
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in j.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(T.UNUSED))
            continue
        tokens.append(by_id[i])
        a = added.get(i)
        types.append(int(T.NORMAL if a is None else (T.CONTROL if a.get("special") else T.USER_DEFINED)))
    if len(tok) > n_vocab:
        raise SourceError(f"the tokenizer has {len(tok)} tokens but the model's vocab_size is {n_vocab}")
    kv = {
        "tokenizer.ggml.model": ("gpt2", V.STRING, None),
        "tokenizer.ggml.pre": (pre, V.STRING, None),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": (_merges(model), V.ARRAY, V.STRING),
        "tokenizer.ggml.add_bos_token": (bool(getattr(tok, "add_bos_token", False)), V.BOOL, None),
    }
    for key, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unknown", tok.unk_token_id),
                     ("padding", tok.pad_token_id)):
        if tid is not None:
            kv[f"tokenizer.ggml.{key}_token_id"] = (int(tid), V.UINT32, None)
    if getattr(tok, "chat_template", None):
        kv["tokenizer.chat_template"] = (str(tok.chat_template), V.STRING, None)
    return kv
