"""A guard against silent garbage: does the float model as quantkit holds it still give the logits
of the model transformers built from the source?

Every command that measures quantized models against their float source trusts, unseen, that
quantkit's own swaps keep this architecture's float function: the 16-bit embedding table and
output head (`QuantEmbedding`, `QuantLinear`), the fp32 `QuantLinear`s, the save -> load round
trip. A family detail lost in a swap (Gemma's scaled word embedding, a tied head) would shift
every row of a table by the same unseen amount. The guard runs both models on a few tokens
(1 x 16) and stops with `SourceError` naming the difference and the first module where it
appears.

The reference and the tolerance are derived, not guessed:

* reference: the source itself, with its embedding table and head rounded to the held precision
  (plain torch casts for bf16/fp16/fp32; int8 per row through `formats`, the golden-tested number
  layer), passed as parameter overrides for one call (`torch.func.functional_call`): nothing is
  copied but those tables, no module is swapped, no quantkit module runs;
* a 16-bit head also computes in 16 bits (the float and packed kernels cast activations to the
  weight's or bf16 dtype and round the result): each of those roundings (activations, output and,
  for int8, the per-row scale) moves logit i by at most u * (|x| @ |w|^T)_i, with u the compute
  dtype's unit roundoff and x the head's input in the reference run. That bound is the allowance,
  per logit, plus fp32 slack (1e-4 of the largest logit) for reordered sums in the body;
* what the table rounding itself moved the logits (|reference - source|) is reported beside it.

The held model must match the reference within that allowance, and the source within the
rounding's effect plus it (implied, reported). On a mismatch both models run again with forward
hooks on every named submodule (quantkit keeps module names through its swaps) and the first
module, in execution order, whose output leaves its tolerance is named.

Memory: `check_reference` builds the held model on a structural copy that shares every parameter
and buffer with the source (the fp32 QuantLinears share the source's storage), so it costs about
the size of the converted tables, not a model; `roundtrip=True` adds the reloaded model.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import SourceError

log = logging.getLogger(__name__)

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and its river is"
PROBE_TOKENS = 16
BODY_RTOL = 1e-4  # fp32 slack, relative to the largest value of an output (reordered sums in the body)
ATOL = 1e-5
# head storage -> (compute dtype of the head's kernel, roundings there that the allowance counts)
_HEAD_ARITHMETIC = {"fp32": (torch.float32, 0), "bf16": (torch.bfloat16, 2), "fp16": (torch.float16, 2),
                    "int8": (torch.bfloat16, 3)}
GUARDED_HEADS = (*_HEAD_ARITHMETIC, "keep")
_TABLE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class GuardResult:
    """What the guard measured (all on the same probe tokens)."""

    head: str  # the table/head storage the held model was checked at
    tokens: int
    max_logit: float  # max |logit| of the reference
    diff_reference: float  # max |held - reference (tables rounded)|
    diff_source: float  # max |held - source as loaded|
    explained: float  # max |reference - source|: what the table rounding itself moved the logits
    allowance: float  # largest per-logit allowance for the head's 16-bit arithmetic, plus slack
    ok: bool
    first: str | None = None  # first module whose output differs (None when ok)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- small helpers


def _device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _first_tensor(out):
    """The first tensor of a module's output (a tensor, a tuple/list, or a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _logits(out) -> torch.Tensor:
    t = getattr(out, "logits", None)
    return (t if t is not None else _first_tensor(out)).detach().float().cpu()


@contextlib.contextmanager
def _eval(*models):
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, t in zip(models, modes):
            m.train(t)


def _head_parts(model: nn.Module):
    """(name, module) of the input embedding and output head, from transformers' own accessors."""
    names = {id(m): n for n, m in model.named_modules()}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    pick = lambda m: (names.get(id(m)), m) if m is not None and isinstance(getattr(m, "weight", None), torch.Tensor) \
        else (None, None)
    return pick(emb), pick(out)


def resolve_head(head: str | None, source: nn.Module) -> str:
    """The stored form a head choice means for `source`: "keep" -> its own dtype's name."""
    head = "keep" if head is None else str(head).lower()
    if head == "keep":
        (_, emb), (_, out) = _head_parts(source)
        ref = emb if emb is not None else out
        dt = ref.weight.dtype if ref is not None else torch.float32
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, "fp32")
    if head not in _HEAD_ARITHMETIC:
        raise ValueError(f"the guard checks heads stored as {', '.join(_HEAD_ARITHMETIC)} or keep, not {head!r}")
    return head


def _rounded(w: torch.Tensor, head: str) -> torch.Tensor:
    """`w` as the held table stores it, back in w's dtype."""
    w = w.detach()
    if head in _TABLE_DTYPES:
        return w.to(_TABLE_DTYPES[head]).to(w.dtype)
    from ..formats import dequantize, quantize  # int8 per row: the number layer, golden-tested in tests/formats
    from ..scheme import parse_scheme

    return dequantize(quantize(w.float(), parse_scheme(head))).to(w.dtype)


def probe_ids(model: nn.Module, tokenizer=None, n: int = PROBE_TOKENS, seed: int = 0) -> torch.Tensor:
    """[1, n] token ids: a fixed sentence through `tokenizer`, else seeded random ids in the vocabulary."""
    if tokenizer is not None:
        try:
            ids = tokenizer(PROBE_TEXT, return_tensors="pt", add_special_tokens=False).input_ids[:, :n]
            if ids.shape[1] >= 2:
                return ids.long()
        except Exception as e:  # a tokenizer that cannot encode text: random ids still probe the model
            log.debug("probe text not tokenized (%s); random ids instead", e)
    (_, emb), _ = _head_parts(model)
    vocab = int(emb.weight.shape[0]) if emb is not None else int(model.config.vocab_size)
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the reference


def _overrides(source: nn.Module, head: str) -> dict[str, torch.Tensor]:
    """Parameter overrides: the embedding table and head weight rounded to `head` (tied: once)."""
    (emb_name, emb), (out_name, out) = _head_parts(source)
    over = {}
    if emb is not None:
        over[f"{emb_name}.weight"] = _rounded(emb.weight, head)
    if out is not None and not (emb is not None and out.weight is emb.weight):
        over[f"{out_name}.weight"] = _rounded(out.weight, head)
    return over


def _reference_run(source: nn.Module, ids: torch.Tensor, head: str, trace: bool = False):
    """Logits of the source with its tables rounded, the head's input and output, and (trace) every
    module's output."""
    from torch.func import functional_call

    _, (_, out) = _head_parts(source)
    seen: dict[str, torch.Tensor] = {}
    hooks = []

    def head_in(mod, args):  # first call only; returns None, so the input is left as it is
        if "x" not in seen:
            seen["x"] = args[0].detach()

    def head_out(mod, args, o):
        if "y" not in seen:
            seen["y"] = _first_tensor(o).detach()

    if out is not None:
        hooks += [out.register_forward_pre_hook(head_in), out.register_forward_hook(head_out)]
    records = _TraceRecorder(source) if trace else contextlib.nullcontext()
    try:
        with records:
            y = functional_call(source, _overrides(source, head), args=(), kwargs={"input_ids": ids.to(_device(source))},
                                tie_weights=True)
    finally:
        for h in hooks:
            h.remove()
    return _logits(y), seen, (records.records if trace else None)


def _allowance(source: nn.Module, head: str, seen: dict, logits: torch.Tensor) -> torch.Tensor:
    """Per-logit bound on what the head's 16-bit arithmetic may add: k * u * (|x| @ |w|^T)."""
    dt, k = _HEAD_ARITHMETIC[head]
    _, (_, out) = _head_parts(source)
    if k == 0 or out is None or "x" not in seen:
        return torch.zeros_like(logits)
    u = torch.finfo(dt).eps / 2
    x = seen["x"].float().abs()
    w = _rounded(out.weight, head).float().abs().to(x.device)
    if w.shape[-1] != x.shape[-1]:  # transformers' Conv1D stores [in, out]
        w = w.t()
    bound = (x @ w.t()).cpu()  # [..., V]: sum_j |x_j| |w_ij|
    if bound.shape != logits.shape:
        return torch.full_like(logits, k * u * float(bound.max()))
    y = seen["y"].float().abs().max().clamp(min=1e-30).cpu()
    scale = max(1.0, float(logits.abs().max() / y))  # a logit scale after the head (softcapping only shrinks)
    return k * u * bound * scale


def _compute_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _slack(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """Reordered sums: 1e-4 of the largest value in fp32, 4 eps in a 16-bit body (a bf16 source)."""
    rtol = BODY_RTOL if dtype in (torch.float32, torch.float64) else 4 * torch.finfo(dtype).eps
    return rtol * float(t.abs().max()) + ATOL


# ---------------------------------------------------------------- finding the first module


class _TraceRecorder:
    """Forward hooks on every named submodule (a shared module under each of its names): records
    (name, call index, first output tensor, class name) in the order the modules finish."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.records: list[tuple[str, int, torch.Tensor | None, str, torch.dtype | None]] = []
        self._hooks = []

    def __enter__(self):
        counts: dict[str, int] = {}

        def hook(name):
            def fn(mod, args, out):
                t = _first_tensor(out)
                k = counts.get(name, 0)
                counts[name] = k + 1
                self.records.append((name, k, None if t is None else t.detach().float().cpu(), type(mod).__name__,
                                     None if t is None else t.dtype))
            return fn

        for name, mod in self.model.named_modules(remove_duplicate=False):
            self._hooks.append(mod.register_forward_hook(hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return False


def _first_difference(source, held, ids, head, head_allow, logits_allow) -> tuple[str, str]:
    """(name, description) of the first module whose held output leaves its tolerance."""
    _, (out_name, _) = _head_parts(source)
    _, _, ref = _reference_run(source, ids, head, trace=True)
    with _TraceRecorder(held) as rec:
        held(input_ids=ids.to(_device(held)))
    want = {(n, k): (t, cls) for n, k, t, cls, _ in ref}
    for name, k, t, cls, dt in rec.records:
        if (name, k) not in want:
            continue
        r, rcls = want[(name, k)]
        if r is None or t is None:
            continue
        label = name or "the model's output"
        classes = f"{cls} vs {rcls}" if cls != rcls else cls
        if r.shape != t.shape:
            return label, f"{label} ({classes}): output shape {tuple(t.shape)} instead of {tuple(r.shape)}"
        d = (t - r).abs()
        allow = logits_allow if name == "" else head_allow if name == out_name else None
        if allow is not None and allow.shape != d.shape:
            allow = None
        tol = _slack(r, dt) + (0 if allow is None else allow)
        if bool((~(d <= tol)).any()):
            return label, (f"{label} ({classes}): max |Δ| {float(d.max()):.4g} where its largest output is "
                           f"{float(r.abs().max()):.4g}")
    return "the output logits", "the output logits (no single module's output leaves its tolerance)"


# ---------------------------------------------------------------- the checks


def check_float_model(source: nn.Module, held: nn.Module, ids: torch.Tensor | None = None, head: str | None = None,
                      tokenizer=None, what: str | None = None, raise_on_error: bool = True) -> GuardResult:
    """Compare `held` (the float model as quantkit holds it: `quantize_model(.., make_config("fp32",
    head=head))`, maybe saved and reloaded) with `source` (the model transformers built) on `ids`
    ([1, 16] probe tokens by default). `head`: the held table/head storage (bf16, fp16, fp32, int8,
    keep; default: what `held.quantkit` records). Raises SourceError on a mismatch (or returns the
    failed GuardResult with raise_on_error=False)."""
    if head is None:
        head = (getattr(held, "quantkit", None) and held.quantkit.head.get("scheme")) or "keep"
    head = resolve_head(head, source)
    ids = probe_ids(source, tokenizer) if ids is None else ids
    with _eval(source, held):
        src = _logits(source(input_ids=ids.to(_device(source))))
        ref, seen, _ = _reference_run(source, ids, head)
        got = _logits(held(input_ids=ids.to(_device(held))))
        if got.shape != ref.shape:
            raise SourceError(f"{what or 'the float model as quantkit holds it'} gives logits of shape "
                              f"{tuple(got.shape)}, the source {tuple(ref.shape)}")
        allow = _allowance(source, head, seen, ref)
        slack = _slack(ref, _compute_dtype(source))
        d_ref, d_src = (got - ref).abs(), (got - src).abs()
        explained = float((ref - src).abs().max())
        allowance = float(allow.max()) + slack
        ok = bool((d_ref <= allow + slack).all()) and float(d_src.max()) <= explained + allowance
        res = GuardResult(head, int(ids.numel()), float(ref.abs().max()), float(d_ref.max()), float(d_src.max()),
                          explained, allowance, ok)
        if ok:
            log.info("guard: %s reproduces the source (head %s): max |Δlogit| %.3g vs the rounded reference "
                     "(allowed %.3g), %.3g vs the source", what or "the held float model", head, res.diff_reference,
                     allowance, res.diff_source)
            return res
        head_allow = None
        if "y" in seen:
            head_allow = _allowance(source, head, seen, seen["y"].float().cpu())
        res.first, where = _first_difference(source, held, ids, head, head_allow, allow)
    msg = (f"{what or 'the float model as quantkit holds it'} (embeddings/head {head}) does not reproduce the source: "
           f"max |Δlogit| {res.diff_reference:.4g} against the source with its tables rounded to {head} "
           f"(a {head} head's arithmetic and fp32 rounding allow {allowance:.3g}), {res.diff_source:.4g} against the "
           f"source as loaded "
           f"({head} rounding explains {explained:.3g}; largest logit {res.max_logit:.4g}); first differs at {where}. "
           "quantkit would measure against a broken reference: report this architecture")
    if raise_on_error:
        raise SourceError(msg)
    log.error("%s", msg)
    return res


def check_reference(source: nn.Module, head: str | None = "bf16", roundtrip: bool = False, tokenizer=None,
                    ids: torch.Tensor | None = None, raise_on_error: bool = True) -> GuardResult:
    """Hold `source` the way quantkit does (the fp32 scheme with `head` embeddings/head, and with
    `roundtrip` saved and reloaded through a temporary folder) and `check_float_model` it.

    The held model is built on a structural copy sharing every parameter and buffer with `source`
    (nothing in quantize_model writes to them), so only the converted tables are new memory."""
    from ..pipeline import quantize_model
    from ..config import make_config

    head = resolve_head(head, source)
    ids = probe_ids(source, tokenizer) if ids is None else ids
    shared = {id(t): t for t in itertools.chain(source.parameters(), source.buffers())}
    held = copy.deepcopy(source, shared)
    held = quantize_model(held, make_config("fp32", head=head), inplace=True, progress=False)
    what = "the float model as quantkit holds it"
    if not roundtrip:
        return check_float_model(source, held, ids, head, what=what, raise_on_error=raise_on_error)
    from ..io.checkpoint import load_checkpoint, save

    dtype = _compute_dtype(source)
    with tempfile.TemporaryDirectory(prefix="quantkit-guard-") as d:
        save(held, Path(d) / "model")
        del held
        held, _ = load_checkpoint(Path(d) / "model", dtype=dtype)
    return check_float_model(source, held, ids, head, what=what + " after save -> load", raise_on_error=raise_on_error)
