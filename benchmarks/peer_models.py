"""Every row of benchmarks/peers.py: how each library (quantkit and its peers) quantizes SmolLM2 and runs it.

A builder takes a :class:`Source` (the float model in the forms the peers start from) and returns a
:class:`Runner`: the quantized model behind four measurements that are the same for every row,
so the worker (benchmarks/peer_worker.py) measures all of them with one piece of code:

- ``log_probs(window)``: float32 log-softmax of the next-token logits of one window [ctx] -> [ctx-1, vocab];
- ``prefill(ids)``: seconds of one forward of ``ids`` [1, L] into a fresh KV cache;
- ``decode(prompt, steps)``: seconds of ``steps`` greedy decode steps with a KV cache, batch 1, after
  an untimed prefill of ``prompt`` [1, p];
- ``greedy(prompt, n)``: the ``n`` greedy next-token ids after ``prompt`` (generations side by side).

``size_bytes`` is what the quantized model occupies as its library stores it (the saved file: quantkit's
model.safetensors, ``torch.save`` of the state dict for torch-level peers, the .onnx files, the .gguf);
``quantize_s`` is the wall time of the library's own quantization call(s), loading excluded.

Builders run inside the peer environment (benchmarks/setup_peers.sh) or the main one; each imports
its library lazily, and raises :class:`PeerUnavailable` with the reason when it cannot run here.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


class PeerUnavailable(RuntimeError):
    """This row cannot run on this machine; the message says why (shown in the table's notes)."""


@dataclass
class Source:
    hf_dir: Path          # float32 Hugging Face folder (config.json, model.safetensors, tokenizer)
    f16_gguf: Path        # the same weights as an F16 GGUF (llama.cpp's quantizer starts from it)
    calib_text: str       # calibration text (last-quarter articles of WikiText, never the evaluated part)
    work: Path            # scratch folder for this row's files
    threads: int = 2
    budget: int | None = None  # quantkit plan rows: the size to plan for (a peer row's measured size)


class Runner:
    """Base: a transformers causal LM in ``self.model`` (any dtype); peers override what differs."""

    label: str = ""
    library: str = ""          # e.g. "torchao 0.14.1"
    size_bytes: int = 0
    quantize_s: float | None = None
    notes: str = ""            # configuration details shown in the table (activation dtype, group size, ...)
    model: torch.nn.Module | None = None

    @torch.inference_mode()
    def log_probs(self, window: torch.Tensor) -> torch.Tensor:
        from quantkit.evaluate.quality import _log_probs  # the loop `quantkit eval` scores with

        return _log_probs(self.model, window)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> float:
        from quantkit.evaluate.speed import new_cache

        cache = new_cache(self.model)
        t0 = time.perf_counter()
        self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def _greedy(self, prompt: torch.Tensor, steps: int) -> tuple[list[int], float]:
        from quantkit.evaluate.speed import _greedy  # the decode loop `quantkit eval --speed` times

        self.model.eval()
        tokens, seconds = _greedy(self.model, prompt, steps)
        return tokens.tolist(), seconds

    def decode(self, prompt: torch.Tensor, steps: int) -> float:
        return self._greedy(prompt, steps)[1]

    def greedy(self, prompt: torch.Tensor, n: int) -> list[int]:
        return self._greedy(prompt, n - 1)[0]


def state_dict_bytes(model: torch.nn.Module, work: Path) -> int:
    """Bytes of ``torch.save(model.state_dict())``: how a torch-level peer's quantized model is stored."""
    fd, name = tempfile.mkstemp(suffix=".pt", dir=work)
    os.close(fd)
    try:
        torch.save(model.state_dict(), name)
        return os.path.getsize(name)
    finally:
        os.unlink(name)


def hf_float(src: Source, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(src.hf_dir, dtype=dtype).eval()


# ------------------------------------------------------------------------------------------ quantkit

class QuantkitRunner(Runner):
    def __init__(self, src: Source, scheme: str, method: str = "rtn", head: str | None = None,
                 calib_samples: int = 32, compiled: bool = False, int8_act: bool = False):
        import quantkit as qk
        from quantkit.evaluate.size import disk_bytes

        model, tok = qk.load(str(src.hf_dir))
        out = src.work / "quantkit"
        kw = {"head": head} if head else {}
        if method == "gptq":
            kw.update(calib=src.calib_text, tokenizer=tok, calib_samples=calib_samples)
        t0 = time.perf_counter()
        model = qk.quantize(model, scheme=scheme, method=method, progress=False, **kw)
        self.quantize_s = time.perf_counter() - t0
        qk.save(model, out, tok)
        self.size_bytes = disk_bytes(out)
        del model
        self.model, _ = qk.load(str(out))  # what a user runs: the saved model reloaded
        self.library = f"quantkit {qk.__version__}"
        self.label = f"quantkit {scheme}" + (f" {method}" if method != "rtn" else "") + (f", head {head}" if head else "")
        self.notes = "quantkit kernels (native fp32 where built, else torch ops)"
        self.compiled = compiled
        self.int8_act = int8_act
        if int8_act:  # the option's quality is measured on every row (log_probs), its speed at decode
            qk.set_activations(self.model, "int8")
            self.label += ", int8 activations"
            self.notes += "; int8 activations (quantkit.set_activations; quality through them on every row)"
        if compiled:
            self.label += ", compiled decode"
            self.notes += "; decode steps through torch.compile with a StaticCache (compiled untimed, first)"

    def log_probs(self, window: torch.Tensor) -> torch.Tensor:
        if not self.int8_act:
            return super().log_probs(window)
        import quantkit as qk

        qk.set_activations(self.model, "int8-all")  # each row on its own: the numerics of decoding the window
        try:
            return super().log_probs(window)
        finally:
            qk.set_activations(self.model, "int8")

    @torch.inference_mode()
    def _greedy(self, prompt: torch.Tensor, steps: int) -> tuple[list[int], float]:
        if not self.compiled:
            return super()._greedy(prompt, steps)
        from quantkit.evaluate.speed import _greedy_compiled  # what `quantkit generate` decodes with

        self.model.eval()
        cache_len = prompt.shape[1] + 129  # one shape for every call (decode and greedy), so one graph
        if not getattr(self, "_warm", False):
            _greedy_compiled(self.model, prompt, 2, cache_len)  # compiles, untimed
            self._warm = True
        tokens, seconds = _greedy_compiled(self.model, prompt, steps, cache_len)
        return tokens.tolist(), seconds


class QuantkitPlanRunner(QuantkitRunner):
    """quantkit's mixed precision at a given size: the Hessian-proxy sensitivity on calibration samples,
    an exact-knapsack plan of int8/int4-g128/int3-g128 per layer (and bf16/int8 for the tied embedding/head)
    whose checkpoint fits `src.budget` bytes, applied with `method`. Time of all three is `quantize_s`."""

    def __init__(self, src: Source, method: str = "gptq", calib_samples: int = 32,
                 schemes: str = "int8,int4-g128,int3-g128"):
        import quantkit as qk
        from quantkit.data import calib_samples as sample
        from quantkit.evaluate.size import disk_bytes
        from quantkit.plan import plan_for_budget, proxy_sensitivity

        if not src.budget:
            raise PeerUnavailable("no size to plan for: the peer row it is matched to did not run")
        model, tok = qk.load(str(src.hf_dir))
        t0 = time.perf_counter()
        ids = sample(tok, src.calib_text, calib_samples, 512, 0)
        sens = proxy_sensitivity(model, ids[: min(8, calib_samples)], schemes, progress=False)
        plan = plan_for_budget(model, sens, src.budget, None, method)
        model = qk.quantize(model, plan.config(), calib=ids if method != "rtn" else None, progress=False)
        self.quantize_s = time.perf_counter() - t0
        out = src.work / "quantkit"
        qk.save(model, out, tok)
        self.size_bytes = disk_bytes(out)
        del model
        self.model, _ = qk.load(str(out))
        self.library = f"quantkit {qk.__version__}"
        counts = ", ".join(f"{s} x{n}" for s, n in sorted(plan.counts().items()))
        self.label = f"quantkit mixed {method} @{src.budget / 1e6:.1f} MB"
        self.notes = (f"planned per layer under {src.budget:,} bytes (Hessian proxy on {min(8, calib_samples)} x 512 "
                      f"tokens): {counts}; head {plan.head}; {method} with {calib_samples} x 512 calibration tokens")


def quantkit_builder(scheme: str, **kw) -> Callable[[Source], Runner]:
    return lambda src: QuantkitRunner(src, scheme, **kw)


# ------------------------------------------------------------------------------------------ torch

class FloatRunner(Runner):
    def __init__(self, src: Source, dtype=torch.float32):
        self.model = hf_float(src, dtype)
        self.quantize_s = None
        self.size_bytes = state_dict_bytes(self.model, src.work)
        self.library = f"torch {torch.__version__}"
        self.label = {torch.float32: "fp32 (reference)", torch.bfloat16: "bf16"}[dtype]


class TorchDynamicInt8(Runner):
    def __init__(self, src: Source):
        from torch.ao.quantization import quantize_dynamic

        model = hf_float(src)
        t0 = time.perf_counter()
        self.model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.quantize_s = time.perf_counter() - t0
        self.size_bytes = state_dict_bytes(self.model, src.work)
        self.library = f"torch {torch.__version__}"
        self.label = "torch quantize_dynamic int8"
        self.notes = "every nn.Linear (lm_head included), fp32 activations quantized per tensor at run time"


# ------------------------------------------------------------------------------------------ peers
# Each peer's quantization is timed alone (the float model is loaded before the clock starts); a
# missing library or an unsupported machine raises PeerUnavailable with the concrete reason.

def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        raise PeerUnavailable(f"{dist} is not installed here (bash benchmarks/setup_peers.sh makes .venv-peers)")


def _need(module: str, dist: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise PeerUnavailable(f"{dist} cannot be imported: {e}") from e


def _untied_head(model) -> bool:
    """True when lm_head no longer shares the embedding's storage (a quantizer replaced its weight)."""
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    return head is not emb


def _float_linears(model) -> list[str]:
    """Names of the nn.Linear modules whose weight is still a plain float tensor (not quantized)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and type(m.weight) is torch.nn.Parameter and m.weight.dtype.is_floating_point]


def _summary(names: list[str]) -> str:
    """'q_proj, k_proj, ... (N modules)' from full module names."""
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
    return f"{'/'.join(kinds)} ({len(names)} linears)"


class TorchaoRunner(Runner):
    """torchao ``quantize_`` on every nn.Linear (lm_head included, as quantize_'s default filter does), eager."""

    def __init__(self, src: Source, kind: str, dtype=torch.bfloat16, group_size: int = 128):
        _need("torchao", "torchao")
        from torchao.quantization import quantize_

        if kind == "int8-wo":
            from torchao.quantization import Int8WeightOnlyConfig

            config, self.label = Int8WeightOnlyConfig(), "torchao int8 weight-only"
            what = "int8 per-channel weights (Int8WeightOnlyConfig)"
        elif kind == "int4-wo":
            if dtype != torch.bfloat16:
                raise ValueError("torchao's CPU int4 kernel (_weight_int4pack_mm_for_cpu) takes bf16 activations")
            # torchao 0.18's Int4WeightOnlyConfig has no CPU packing any more (its formats are CUDA/XPU/NPU);
            # the CPU layout (Int4OpaqueTensor, aten._weight_int4pack_mm_for_cpu) is this prototype config.
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            g = group_size
            config, self.label = PrototypeInt4WeightOnlyConfig(group_size=g), f"torchao int4 weight-only g{g}"
            what = f"int4 asymmetric g{g} weights, CPU opaque packing (PrototypeInt4WeightOnlyConfig / Int4OpaqueTensor)"
        elif kind == "int8-dyn":
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig

            config, self.label = Int8DynamicActivationInt8WeightConfig(), "torchao int8 dynamic act + int8 weight"
            what = "int8 per-channel weights, activations quantized per token at run time (Int8DynamicActivationInt8WeightConfig)"
        else:
            raise ValueError(kind)
        model = hf_float(src, dtype)
        t0 = time.perf_counter()
        quantize_(model, config)
        self.quantize_s = time.perf_counter() - t0
        self.model = model
        self.size_bytes = state_dict_bytes(model, src.work)
        self.library = f"torchao {_version('torchao')}"
        act = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        head = "lm_head quantized (untied from the float embedding)" if _untied_head(model) else "lm_head tied"
        skipped = _float_linears(model)
        where = (f"{act} left: {_summary(skipped)} (in_features not a multiple of the group; torchao skips them)"
                 if skipped else f"every nn.Linear, {head}")
        self.notes = f"{what}; {act} activations; {where}; embeddings {act}; eager (no torch.compile)"


class HqqRunner(Runner):
    """HQQ (calibration-free half-quadratic quantization) via hqq's own AutoHQQHFModel, PyTorch backend on CPU."""

    def __init__(self, src: Source, nbits: int, group_size: int, dtype=torch.float32):
        _need("hqq", "hqq")
        from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
        from hqq.models.hf.base import AutoHQQHFModel

        model = hf_float(src, dtype)
        cfg = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
        t0 = time.perf_counter()
        AutoHQQHFModel.quantize_model(model, quant_config=cfg, compute_dtype=dtype, device="cpu")
        self.quantize_s = time.perf_counter() - t0
        # CPU: the ATEN backend needs hqq's CUDA extension; PYTORCH (dequantize + matmul) is the CPU path
        HQQLinear.set_backend(HQQBackend.PYTORCH)
        self.model = model
        self.size_bytes = state_dict_bytes(model, src.work)
        self.library = f"hqq {_version('hqq')}"
        self.label = f"hqq {nbits}-bit g{group_size}"
        act = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        self.notes = (f"{nbits}-bit asymmetric g{group_size} (scale/zero per group), decoder linears only; "
                      f"lm_head and embeddings {act} (hqq skips lm_head); backend PYTORCH "
                      f"(dequantize then matmul); {act} activations")


class QuantoRunner(Runner):
    """optimum-quanto quantize + freeze of the weights (every nn.Linear, lm_head included by default)."""

    def __init__(self, src: Source, bits: int, dtype=torch.bfloat16):
        _need("optimum.quanto", "optimum-quanto")
        from optimum.quanto import freeze, qint4, qint8, quantize

        model = hf_float(src, dtype)
        t0 = time.perf_counter()
        quantize(model, weights={8: qint8, 4: qint4}[bits])
        freeze(model)
        self.quantize_s = time.perf_counter() - t0
        self.model = model
        self.size_bytes = state_dict_bytes(model, src.work)
        self.library = f"optimum-quanto {_version('optimum-quanto')}"
        self.label = f"quanto int{bits} weights"
        act = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        what = "int8 per-channel symmetric" if bits == 8 else \
            "int4 asymmetric groups of 128 (96 where in_features is 576: quanto takes the largest multiple of 32 <= 128 that divides it)"
        head = "lm_head quantized (untied)" if _untied_head(model) else "lm_head tied"
        self.notes = f"{what} weights; {act} activations (not quantized); every nn.Linear, {head}; embeddings {act}"
        if bits == 4:
            self.notes += "; runs under no_grad (quanto's int4 linear is an autograd Function that fails in inference_mode)"

    # quanto's qint4 matmul goes through torch.autograd.Function, which raises "Cannot set version_counter
    # for inference tensor" under torch.inference_mode: run the base methods with inference mode off.
    def log_probs(self, window: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad():
            return Runner.log_probs.__wrapped__(self, window.clone())

    def prefill(self, ids: torch.Tensor) -> float:
        with torch.inference_mode(False), torch.no_grad():
            return Runner.prefill.__wrapped__(self, ids.clone())

    def _greedy(self, prompt: torch.Tensor, steps: int) -> tuple[list[int], float]:
        with torch.inference_mode(False), torch.no_grad():
            return Runner._greedy.__wrapped__(self, prompt.clone(), steps)


class BnbRunner(Runner):
    """bitsandbytes Linear4bit (NF4) / Linear8bitLt (LLM.int8) on its CPU backend, as transformers'
    BitsAndBytesConfig lays them out (decoder linears; lm_head kept float)."""

    def __init__(self, src: Source, kind: str, dtype=torch.float32):
        bnb = _need("bitsandbytes", "bitsandbytes")
        model = hf_float(src, dtype)
        linears = [(n, m) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
        try:
            t0 = time.perf_counter()
            for name, lin in linears:
                parent = model.get_submodule(name.rsplit(".", 1)[0])
                if kind == "nf4":
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          compute_dtype=dtype, quant_type="nf4", device="meta")
                    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
                else:
                    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                            has_fp16_weights=False, threshold=6.0, device="meta")
                    q.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
                if lin.bias is not None:
                    q.bias = lin.bias
                q = q.to("cpu")  # bitsandbytes quantizes when the parameters move to the device
                setattr(parent, name.rsplit(".", 1)[1], q)
            self.quantize_s = time.perf_counter() - t0
            self.model = model
            with torch.inference_mode():  # fail here, not in the worker's first measurement
                self.model(input_ids=torch.tensor([[1, 2, 3]]))
        except Exception as e:
            raise PeerUnavailable(f"bitsandbytes {_version('bitsandbytes')} {kind} on CPU: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        self.size_bytes = state_dict_bytes(model, src.work)
        self.library = f"bitsandbytes {_version('bitsandbytes')}"
        act = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        if kind == "nf4":
            self.label = "bitsandbytes NF4"
            self.notes = f"NF4 weights, blocksize 64, fp32 absmax; {act} compute; decoder linears only, lm_head and embeddings {act}"
        else:
            self.label = "bitsandbytes LLM.int8"
            self.notes = (f"int8 per-row weights, int8 activations with fp outlier columns (threshold 6.0); {act} "
                          f"otherwise; decoder linears only, lm_head and embeddings {act}")


# ONNX Runtime. optimum-onnx (ORTModelForCausalLM) pins transformers<4.58 while quantkit needs
# transformers>=5, so the model is exported here with torch.onnx (dynamo exporter) as one graph with
# a KV cache: inputs input_ids [1, T] + past key/value per layer [1, kv_heads, P, head_dim], outputs
# logits [1, T, vocab] + the present key/values [1, kv_heads, P+T, head_dim]. The same graph serves the
# prefill (P=0) and each decode step (T=1).

class _KVGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.n_layers = model.config.num_hidden_layers

    def forward(self, input_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def export_onnx_kv(src: Source, path: Path) -> Path:
    """Export the float32 model to `path` (+ `path`.data) with the KV cache as explicit inputs/outputs."""
    _need("onnxscript", "onnxscript")
    model = hf_float(src)
    model.config._attn_implementation = "eager"  # plain MatMul/Softmax attention: quantizable, no SDPA op
    cfg = model.config
    kv, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    ids = torch.randint(0, cfg.vocab_size, (1, 7))
    past = [torch.randn(1, kv, 5, hd) for _ in range(2 * cfg.num_hidden_layers)]
    T, P = torch.export.Dim("T", max=4096), torch.export.Dim("P", max=4096)
    names = [f"past.{i}.{kv_}" for i in range(cfg.num_hidden_layers) for kv_ in ("key", "value")]
    dyn = {"input_ids": {1: T}, "past": tuple({2: P} for _ in names)}
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(_KVGraph(model).eval(), (ids, *past), str(path), dynamo=True, dynamic_shapes=dyn,
                          input_names=["input_ids", *names],
                          output_names=["logits", *[n.replace("past", "present") for n in names]],
                          external_data=True, optimize=True, verbose=False)
    return path


def _onnx_producers(path: Path, outputs: list[str]) -> list[str]:
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in g.node if set(n.output) & set(outputs)]


def _onnx_matmuls_by_weight(path: Path, shape: tuple[int, int]) -> list[str]:
    """Names of the MatMul nodes whose constant B has `shape` ([in, out]: e.g. every down_proj)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    shapes = {i.name: tuple(i.dims) for i in g.initializer}
    return [n.name for n in g.node if n.op_type == "MatMul" and shapes.get(n.input[1]) == tuple(shape)]


def _onnx_int8_weights(path: Path) -> str:
    """Which MatMul weights the quantizer turned into int8 initializers, e.g. '210 decoder MatMuls (lm_head fp32)'."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    init = {i.name for i in g.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    n = sum(1 for node in g.node if (node.op_type == "MatMulInteger" and node.input[1] in init)
            or (node.op_type == "DequantizeLinear" and node.input[0] in init))
    head = [node for node in g.node if node.op_type == "MatMul" and node.output[0] == "logits"]
    return f"{n} weight MatMuls" + (" (lm_head, on the transposed tied embedding, fp32)" if head else "")


def _onnx_bytes(path: Path) -> int:
    """The .onnx file plus its external-data files (everything the exporter/quantizer wrote beside it)."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


class OrtRunner(Runner):
    """ONNX Runtime int8 of the exported graph: dynamic (weights int8, activations quantized per call) or
    static QDQ (activation ranges calibrated on `src.calib_text`)."""

    def __init__(self, src: Source, mode: str, calib_samples: int = 8, calib_len: int = 256):
        ort = _need("onnxruntime", "onnxruntime")
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

        d = src.work / "onnx"
        d.mkdir(parents=True, exist_ok=True)
        # the float graph is exported once and cached beside the float folder (a conversion of the source,
        # like the folder itself), shared by the ORT rows and later runs
        shared = src.hf_dir.parent / f"{src.hf_dir.name}-onnx"
        fp32 = shared / "model.onnx"
        if not fp32.exists():  # exported into a temporary folder renamed at the end: never half a graph
            import shutil

            t0 = time.perf_counter()
            tmp = Path(tempfile.mkdtemp(dir=shared.parent, prefix=shared.name + ".tmp-"))
            try:
                export_onnx_kv(src, tmp / "model.onnx")
                shutil.rmtree(shared, ignore_errors=True)
                tmp.rename(shared)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self.export_s = time.perf_counter() - t0
        out = d / f"model-int8-{mode}.onnx"
        cfg = _config(src)
        self.n_layers, self.kv, self.hd = cfg.num_hidden_layers, cfg.num_key_value_heads, \
            cfg.hidden_size // cfg.num_attention_heads
        # x86 without AVX512-VNNI (this AVX2 CPU) saturates in ORT's u8s8 int8 kernels: ORT's docs recommend
        # reduce_range (7-bit weights) there; per-channel weights. Measured on SmolLM2's window (KL vs fp32):
        # per-tensor 0.63, per-channel 14.3 (saturated), per-channel + reduce_range 0.55, per-channel u8u8 0.54.
        # lm_head multiplies by the transposed tied embedding (no constant weight): left out by name, else
        # static QDQ quantizes its activations and even the logits to uint8.
        opts = dict(weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                    op_types_to_quantize=["MatMul"], nodes_to_exclude=_onnx_producers(fp32, ["logits"]))
        if mode == "dynamic":
            t0 = time.perf_counter()
            quantize_dynamic(fp32, out, extra_options={"MatMulConstBOnly": True}, **opts)
            self.quantize_s = time.perf_counter() - t0
            self.label = "ONNX Runtime int8 dynamic"
            self.notes = (f"int8 per-channel weights (reduce_range: 7-bit, ORT's advice for AVX2 without VNNI) of "
                          f"{_onnx_int8_weights(out)}; uint8 activations quantized per tensor per call "
                          f"(DynamicQuantizeLinear + MatMulInteger); attention matmuls, norms and embeddings fp32; "
                          f"graph exported by torch.onnx (not timed)")
        elif mode == "static":
            from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod

            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(src.hf_dir)
            ids = tok(src.calib_text[: 400 * calib_len * calib_samples], add_special_tokens=False)["input_ids"]
            step = max(calib_len, (len(ids) - calib_len) // calib_samples)
            samples = [ids[i: i + calib_len] for i in range(0, len(ids) - calib_len + 1, step)][:calib_samples]
            runner = self

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.it = iter(samples)

                def get_next(self):
                    s = next(self.it, None)
                    return None if s is None else runner._feed(torch.tensor([s]), None)

            # SmolLM2's down_proj inputs carry huge outlier activations: one fixed per-tensor uint8 range for
            # them wrecks the model (all 210 MatMuls static: KL 1.43 vs fp32 on the probe window; down_proj
            # left fp32: KL 0.16), so the down_proj MatMuls ([intermediate, hidden] weights) stay fp32.
            down = _onnx_matmuls_by_weight(fp32, (cfg.intermediate_size, cfg.hidden_size))
            opts["nodes_to_exclude"] = opts["nodes_to_exclude"] + down
            t0 = time.perf_counter()
            quantize_static(fp32, out, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                            extra_options={"MatMulConstBOnly": True}, **opts)
            self.quantize_s = time.perf_counter() - t0
            self.label = "ONNX Runtime int8 static (QDQ), down_proj fp32"
            self.notes = (f"int8 per-channel weights (reduce_range: 7-bit) of {_onnx_int8_weights(out)}; "
                          f"down_proj ({len(down)} MatMuls) fp32 because of its activation outliers; uint8 activations "
                          f"per tensor with fixed MinMax ranges from {len(samples)} x {calib_len} calibration tokens "
                          f"(calibration inside quantize_s); QDQ format; attention matmuls, norms and embeddings fp32; "
                          f"graph exported by torch.onnx (not timed)")
        else:
            raise ValueError(mode)
        self.size_bytes = _onnx_bytes(out)
        so = ort.SessionOptions()
        so.intra_op_num_threads = src.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.library = f"onnxruntime {ort.__version__}"

    def _feed(self, ids: torch.Tensor, past) -> dict:
        import numpy as np

        feed = {"input_ids": ids.numpy().astype(np.int64)}
        for i in range(self.n_layers):
            for j, kv in enumerate(("key", "value")):
                feed[f"past.{i}.{kv}"] = np.zeros((1, self.kv, 0, self.hd), np.float32) if past is None \
                    else past[2 * i + j]
        return feed

    def _run(self, ids: torch.Tensor, past=None):
        res = self.sess.run(self.outputs, self._feed(ids, past))
        return res[0], res[1:]

    def log_probs(self, window: torch.Tensor) -> torch.Tensor:
        logits, _ = self._run(window[None, :-1])
        return torch.log_softmax(torch.from_numpy(logits[0]).float(), dim=-1)

    def prefill(self, ids: torch.Tensor) -> float:
        t0 = time.perf_counter()
        self._run(ids)
        return time.perf_counter() - t0

    def _greedy(self, prompt: torch.Tensor, steps: int) -> tuple[list[int], float]:
        logits, past = self._run(prompt)
        tok = int(logits[0, -1].argmax())
        toks = [tok]
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, past = self._run(torch.tensor([[tok]]), past)
            tok = int(logits[0, -1].argmax())
            toks.append(tok)
        return toks, time.perf_counter() - t0


def _config(src: Source):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(src.hf_dir)


def _gguf_types(path: Path) -> str:
    from collections import Counter

    import gguf

    c = Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors)
    return " ".join(f"{k}:{v}" for k, v in sorted(c.items()))


class LlamaCppRunner(Runner):
    """llama.cpp's quantizer (llama_model_quantize) on the F16 GGUF; llama.cpp runs the file."""

    N_CTX = 512

    def __init__(self, src: Source, ftype: str):
        llama_cpp = _need("llama_cpp", "llama-cpp-python")
        import ctypes

        from quantkit.io.ggml_mix import FTYPES

        out = src.work / f"llamacpp-{ftype}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = {**FTYPES, "IQ4_NL": 25}[ftype]  # llama.cpp's LLAMA_FTYPE_MOSTLY_IQ4_NL
        params.nthread = src.threads
        t0 = time.perf_counter()
        rc = llama_cpp.llama_model_quantize(str(src.f16_gguf).encode(), str(out).encode(), ctypes.byref(params))
        self.quantize_s = time.perf_counter() - t0
        if rc != 0:
            raise PeerUnavailable(f"llama_model_quantize({src.f16_gguf.name} -> {ftype}) returned {rc}")
        self.size_bytes = out.stat().st_size
        self.llm = llama_cpp.Llama(model_path=str(out), n_ctx=self.N_CTX, n_batch=self.N_CTX, logits_all=True,
                                   n_threads=src.threads, n_threads_batch=src.threads, verbose=False)
        self.library = f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"
        self.label = f"llama.cpp {ftype}"
        self.notes = (f"llama-quantize {ftype} from the F16 GGUF, its default tensor mix ({_gguf_types(out)}; the "
                      f"tied token embedding doubles as the output); llama.cpp CPU kernels, n_ctx {self.N_CTX}")

    def log_probs(self, window: torch.Tensor) -> torch.Tensor:
        import numpy as np

        w = window.tolist()
        self.llm.reset()
        self.llm.eval(w[:-1])
        logits = torch.from_numpy(np.array(self.llm.scores[: len(w) - 1], dtype=np.float32))
        return torch.log_softmax(logits, dim=-1)

    def prefill(self, ids: torch.Tensor) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids[0].tolist())
        return time.perf_counter() - t0

    def _greedy(self, prompt: torch.Tensor, steps: int) -> tuple[list[int], float]:
        import numpy as np

        self.llm.reset()
        self.llm.eval(prompt[0].tolist())
        tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        toks = [tok]
        t0 = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([tok])
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            toks.append(tok)
        return toks, time.perf_counter() - t0


# Registry: row key -> builder. The peers are added below by the peer section (torchao, HQQ, quanto,
# ONNX Runtime, llama.cpp, bitsandbytes); keys are what `peers.py --rows` takes.
BUILDERS: dict[str, Callable[[Source], Runner]] = {
    "fp32": lambda s: FloatRunner(s, torch.float32),
    "bf16": lambda s: FloatRunner(s, torch.bfloat16),
    "torch-dynamic-int8": TorchDynamicInt8,
    "quantkit-int8": quantkit_builder("int8"),
    "quantkit-int8-head-int8": quantkit_builder("int8", head="int8"),
    "quantkit-int4-g128": quantkit_builder("int4-g128"),
    "quantkit-int4-g128-gptq": quantkit_builder("int4-g128", method="gptq"),
    "quantkit-int4-g128-head-int8": quantkit_builder("int4-g128", head="int8"),
    "quantkit-nf4-dq-head-int8": quantkit_builder("nf4-b64-dq", head="int8"),
    "quantkit-gguf-q4_0": quantkit_builder("gguf-q4_0"),
    "quantkit-int4-g128-head-int8-compiled": quantkit_builder("int4-g128", head="int8", compiled=True),
    "quantkit-nf4-dq-head-int8-compiled": quantkit_builder("nf4-b64-dq", head="int8", compiled=True),
    "quantkit-int4-g128-head-int8-a8-compiled": quantkit_builder("int4-g128", head="int8", compiled=True, int8_act=True),
    "quantkit-nf4-dq-head-int8-a8-compiled": quantkit_builder("nf4-b64-dq", head="int8", compiled=True, int8_act=True),
    "quantkit-gguf-q4_0-a8-compiled": quantkit_builder("gguf-q4_0", compiled=True, int8_act=True),
    # peers (benchmarks/setup_peers.sh installs them into .venv-peers)
    "torchao-int8-wo": lambda s: TorchaoRunner(s, "int8-wo"),
    "torchao-int4-wo-g128": lambda s: TorchaoRunner(s, "int4-wo", group_size=128),
    "torchao-int4-wo-g64": lambda s: TorchaoRunner(s, "int4-wo", group_size=64),
    "torchao-int8-dyn": lambda s: TorchaoRunner(s, "int8-dyn"),
    "hqq-4bit-g64": lambda s: HqqRunner(s, 4, 64),
    "hqq-8bit-g128": lambda s: HqqRunner(s, 8, 128),
    "quanto-int8": lambda s: QuantoRunner(s, 8),
    "quanto-int4": lambda s: QuantoRunner(s, 4),
    "ort-int8-dynamic": lambda s: OrtRunner(s, "dynamic"),
    "ort-int8-static": lambda s: OrtRunner(s, "static"),
    "llamacpp-Q8_0": lambda s: LlamaCppRunner(s, "Q8_0"),
    "llamacpp-Q4_0": lambda s: LlamaCppRunner(s, "Q4_0"),
    "llamacpp-Q4_K_M": lambda s: LlamaCppRunner(s, "Q4_K_M"),
    "llamacpp-IQ4_NL": lambda s: LlamaCppRunner(s, "IQ4_NL"),
    "bitsandbytes-nf4": lambda s: BnbRunner(s, "nf4"),
    "bitsandbytes-int8": lambda s: BnbRunner(s, "int8"),
}


def builder(row: str) -> Callable[[Source], Runner]:
    """The builder of a row key: a BUILDERS key, or `quantkit-mixed-{rtn|gptq}@PEER_ROW` (quantkit's
    mixed precision planned for the size PEER_ROW measured; peers.py passes that size as the budget)."""
    if row in BUILDERS:
        return BUILDERS[row]
    head, _, peer = row.partition("@")
    if head in ("quantkit-mixed-gptq", "quantkit-mixed-rtn") and peer:
        method = head.rsplit("-", 1)[1]
        return lambda src: QuantkitPlanRunner(src, method=method)
    raise KeyError(f"unknown row {row!r}; known: {', '.join(sorted(BUILDERS))}, quantkit-mixed-gptq@ROW")
