"""A damaged or edited quantkit checkpoint is refused with a SourceError, never a traceback.

One real checkpoint (a tiny random Llama quantized int4-g32 with its tokenizer, saved by
qk.save) is tampered with in each way a file can go wrong; qk.load must raise SourceError,
and the CLI must print one `error:` line and exit 2.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import quantkit as qk
from quantkit.cli import main
from quantkit.errors import SourceError
from quantkit.io.checkpoint import METADATA, WEIGHTS_FILE

L0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         vocab_size=len(tiny_tokenizer), tie_word_embeddings=False)).eval()
    q = qk.quantize(model, "int4-g32", progress=False)
    return qk.save(q, tmp_path_factory.mktemp("ckpt") / "c", tiny_tokenizer)


@pytest.fixture
def ckpt(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "c"))


# ----------------------------------------------------------------------------- tampering
def _config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _qc(edit):
    return lambda path: _config(path, lambda cfg: edit(cfg["quantization_config"]))


def _tensors(edit):
    def run(path):
        f = path / WEIGHTS_FILE
        with safe_open(str(f), "pt") as h:
            sd = {k: h.get_tensor(k) for k in h.keys()}
        edit(sd)
        save_file(sd, str(f), metadata=METADATA)
    return run


def _set(d, key, value):
    d[key] = value


def _poison(key):
    def edit(sd):
        sd[key] = sd[key].clone()
        sd[key].view(-1)[1] = float("nan")
    return edit


TAMPER = {  # name -> (how, a fragment of the error)
    "format_version string": (_qc(lambda qc: _set(qc, "format_version", "1")), "format_version must be a positive integer"),
    "format_version null": (_qc(lambda qc: _set(qc, "format_version", None)), "format_version must be a positive integer"),
    "format_version missing": (_qc(lambda qc: qc.pop("format_version")), "has no format_version"),
    "format_version newer": (_qc(lambda qc: _set(qc, "format_version", 99)), "newer quantkit"),
    "config not an object": (_qc(lambda qc: _set(qc, "config", "int4-g32")), "must be an object with a scheme"),
    "config scheme unknown": (_qc(lambda qc: qc["config"].update(scheme="int9-g32")), "config is invalid"),
    "layers a list": (_qc(lambda qc: _set(qc, "layers", list(qc["layers"]))), "layers must map names to str"),
    "layer not a module": (_qc(lambda qc: qc["layers"].update({"model.layers.7.mlp.up_proj": "int4-g32"})),
                           "'model.layers.7.mlp.up_proj' is not a module"),
    "layer not a Linear": (_qc(lambda qc: qc["layers"].update({"model.layers.0.input_layernorm": "int4-g32"})),
                           "is a LlamaRMSNorm, not a Linear layer"),
    "layer scheme invalid": (_qc(lambda qc: qc["layers"].update({L0: "int4-g33"})), f"layer {L0} has an invalid scheme"),
    "layer scheme not a string": (_qc(lambda qc: qc["layers"].update({L0: 4})), "layers must map names to str"),
    "layer scheme other than stored": (_qc(lambda qc: qc["layers"].update({L0: "int8"})),
                                       f"{L0} (int8) stores parts"),
    "layer missing from config": (_qc(lambda qc: qc["layers"].pop(L0)), "no place for"),
    "head embedding not a module": (_qc(lambda qc: qc["head"].update(embedding="model.nope")), "names embedding 'model.nope'"),
    "head name not a string": (_qc(lambda qc: qc["head"].update(head=3)), "head.head must be a module name"),
    "head tied not a bool": (_qc(lambda qc: qc["head"].update(tied="yes")), "head.tied must be true or false"),
    "head tied flipped": (_qc(lambda qc: qc["head"].update(tied=True)), "tied True but this model has"),
    "head scheme invalid": (_qc(lambda qc: qc["head"].update(scheme="bf17")), "the head has an invalid scheme"),
    "head a list": (_qc(lambda qc: _set(qc, "head", ["lm_head"])), "head must be an object"),
    "methods a list": (_qc(lambda qc: _set(qc, "methods", ["rtn"])), "methods must map names"),
    "errors not numbers": (_qc(lambda qc: qc["errors"].update({L0: "small"})), "errors must map names to int or float"),
    "model_type unknown": (lambda p: _config(p, lambda c: _set(c, "model_type", "no_such_arch")),
                           "model_type 'no_such_arch'"),
    "config.json not JSON": (lambda p: (p / "config.json").write_text('{"model_type": "llama",'), "is not valid JSON"),
    "quantized part missing": (_tensors(lambda sd: sd.pop(f"{L0}.scale")), "missing ['scale']"),
    "quantized part extra": (_tensors(lambda sd: _set(sd, f"{L0}.extra", torch.zeros(2))), "unexpected ['extra']"),
    "quantized part wrong shape": (_tensors(lambda sd: _set(sd, f"{L0}.scale", sd[f"{L0}.scale"].reshape(-1))),
                                   f"{L0}.scale is F16 [128]"),
    "quantized part wrong dtype": (_tensors(lambda sd: _set(sd, f"{L0}.scale", sd[f"{L0}.scale"].float())),
                                   f"{L0}.scale is F32 [64, 2] in model.safetensors; scheme int4-g32 stores F16 [64, 2]"),
    "packed weight wrong dtype": (_tensors(lambda sd: _set(sd, f"{L0}.qweight", sd[f"{L0}.qweight"].to(torch.int32))),
                                  f"{L0}.qweight is I32"),
    "head part wrong shape": (_tensors(lambda sd: _set(sd, "lm_head.weight", sd["lm_head.weight"][:-1])),
                              "lm_head.weight is BF16"),
    "norm missing": (_tensors(lambda sd: sd.pop("model.norm.weight")), "missing from model.safetensors (model.norm.weight)"),
    "norm wrong shape": (_tensors(lambda sd: _set(sd, "model.norm.weight", torch.ones(32))),
                         "model.norm.weight has shape [32]"),
    "norm not float": (_tensors(lambda sd: _set(sd, "model.norm.weight", torch.ones(64, dtype=torch.int8))),
                       "model.norm.weight is stored as I8"),
    "tensor the model has no place for": (_tensors(lambda sd: _set(sd, "model.layers.0.extra", torch.zeros(2))),
                                          "no place for (model.layers.0.extra)"),
    "unquantized weight of a quantized layer": (_tensors(lambda sd: _set(sd, f"{L0}.weight", torch.zeros(64, 64))),
                                                "unexpected ['weight']"),
    "NaN in a norm": (_tensors(_poison("model.layers.1.input_layernorm.weight")),
                      "tensor model.layers.1.input_layernorm.weight holds NaN"),
    "NaN in a scale": (_tensors(_poison(f"{L0}.scale")), f"tensor {L0}.scale holds NaN"),
    "weights missing": (lambda p: (p / WEIGHTS_FILE).unlink(), "missing model.safetensors"),
    "tokenizer.json not JSON": (lambda p: (p / "tokenizer.json").write_text('{"model": {'),
                                "tokenizer.json is not valid JSON"),
    "tokenizer_config.json not JSON": (lambda p: (p / "tokenizer_config.json").write_text("nope"),
                                       "tokenizer_config.json is not valid JSON"),
}


def test_the_untampered_checkpoint_loads(saved):
    model, tok = qk.load(saved)
    assert tok is not None and len(model.quantkit.layers) == 14


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_checkpoint_is_refused(ckpt, case):
    how, fragment = TAMPER[case]
    how(ckpt)
    with pytest.raises(SourceError) as e:
        qk.load(ckpt)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg, msg


@pytest.mark.parametrize("case", list(TAMPER))
def test_cli_prints_one_error_line(ckpt, case, capsys):
    how, fragment = TAMPER[case]
    how(ckpt)
    capsys.readouterr()
    rc = main(["inspect", str(ckpt)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err


QUANTKIT = Path(sys.executable).with_name("quantkit")


@pytest.mark.skipif(not QUANTKIT.exists(), reason="the quantkit console script is not installed")
@pytest.mark.parametrize("command,case", [("inspect", "layers a list"), ("eval", "quantized part wrong dtype")])
def test_console_script_exits_2_without_traceback(ckpt, tmp_path, command, case):
    how, fragment = TAMPER[case]
    how(ckpt)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    argv = [str(QUANTKIT), command, str(ckpt)] + (["--max-tokens", "16", "--text", str(text)] if command == "eval" else [])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in r.stderr, r.stderr
