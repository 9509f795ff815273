"""Slow reference readers of the checkpoint layouts quantkit exports (io/export_hf.py), written
from the formats' public descriptions, not from quantkit's code (nothing here imports quantkit):
a file is read with `safetensors` and its integers unpacked bit by bit.

GPTQ, checkpoint format "gptq" (v1; AutoGPTQ / gptqmodel / transformers' GPTQ integration):
  qweight int32 [in*b/32, out]: the codes of one output column packed along the input dim,
  element i at bit i*b of the column's stream (LSB first); qzeros int32 [groups, out*b/32]: the
  zero points packed along the output dim, stored as zero - 1 (mod 2^b, v1's convention);
  scales fp16 [groups, out]; g_idx int32 [in]: the group of input i.
  W[o, i] = scales[g_idx[i], o] * (qweight[i, o] - zero[g_idx[i], o]).
compressed-tensors, format "pack-quantized" (what vLLM serves, transformers loads):
  weight_packed int32 [out, ceil(in*b/32)]: signed codes q offset by 2^(b-1), packed densely
  along the input dim (element i at bit i*b of the row's stream, LSB first); weight_scale
  [out, groups]; weight_zero_point int32 [ceil(out*b/32), groups] (asymmetric only): signed zero
  points offset by 2^(b-1), packed along the output dim; weight_shape int64 [2] = [out, in].
  W[o, i] = weight_scale[o, i // g] * (q[o, i] - zero_point[o, i // g]) (symmetric: zero point 0).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


def unpack_lsb_first(words, bits: int, count: int) -> np.ndarray:
    """The first `count` unsigned `bits`-bit values of each row's stream of 32-bit words
    [rows, n_words] (two's-complement int32 read as unsigned): value i occupies bits
    [i*bits, (i+1)*bits) of the row, word j holding bits [32j, 32j+32), least significant first;
    a value may straddle two words. Returns int64 [rows, count]."""
    w = np.asarray(words).astype(np.int64) & 0xFFFFFFFF
    if w.ndim != 2 or w.shape[1] * 32 < count * bits:
        raise ValueError(f"{w.shape} words cannot hold {count} values of {bits} bits per row")
    out = np.empty((w.shape[0], count), dtype=np.int64)
    for i in range(count):
        word, off = divmod(i * bits, 32)
        v = w[:, word] >> off
        if off + bits > 32:
            v = v | (w[:, word + 1] << (32 - off))
        out[:, i] = v & ((1 << bits) - 1)
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def dequant_gptq(tensors: dict, name: str, bits: int) -> torch.Tensor:
    """Layer `name`'s float32 weight [out, in] from its GPTQ (v1) tensors."""
    qweight, qzeros = _np(tensors[f"{name}.qweight"]), _np(tensors[f"{name}.qzeros"])
    scales, g_idx = _np(tensors[f"{name}.scales"]).astype(np.float32), _np(tensors[f"{name}.g_idx"]).astype(np.int64)
    inn, out = len(g_idx), qweight.shape[1]
    assert qweight.dtype == np.int32 and qweight.shape == (inn * bits // 32, out), (name, qweight.shape)
    assert qzeros.dtype == np.int32 and qzeros.shape == (scales.shape[0], out * bits // 32), (name, qzeros.shape)
    assert tensors[f"{name}.scales"].dtype == torch.float16 and scales.shape[1] == out, name
    u = unpack_lsb_first(qweight.T, bits, inn)  # [out, in]: each output column's stream along the input dim
    zero = (unpack_lsb_first(qzeros, bits, out) + 1) % (1 << bits)  # [groups, out]; v1 stores zero - 1
    w = scales[g_idx].T * (u - zero[g_idx].T).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))


def dequant_ct(tensors: dict, name: str, bits: int, sym: bool, g: int) -> torch.Tensor:
    """Layer `name`'s float32 weight [out, in] from its compressed-tensors pack-quantized tensors
    (`g`: the group length; the input width for per-channel scales)."""
    out, inn = _np(tensors[f"{name}.weight_shape"]).tolist()
    packed = _np(tensors[f"{name}.weight_packed"])
    assert packed.dtype == np.int32 and packed.shape == (out, -(-inn * bits // 32)), (name, packed.shape)
    offset = 1 << (bits - 1)
    q = unpack_lsb_first(packed, bits, inn) - offset  # [out, in], signed
    scale = _np(tensors[f"{name}.weight_scale"]).astype(np.float32)
    assert scale.shape == (out, inn // g), (name, scale.shape)
    if sym:
        assert f"{name}.weight_zero_point" not in tensors, name
        zp = np.zeros_like(scale, dtype=np.int64)
    else:
        zpp = _np(tensors[f"{name}.weight_zero_point"])
        assert zpp.dtype == np.int32 and zpp.shape == (-(-out * bits // 32), inn // g), (name, zpp.shape)
        zp = unpack_lsb_first(zpp.T, bits, out).T - offset  # [out, groups], packed along the output dim
    col_group = np.arange(inn) // g
    w = scale[:, col_group] * (q - zp[:, col_group]).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))


def _quantization_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())["quantization_config"]


def read_gptq(folder) -> dict[str, torch.Tensor]:
    """{layer name: float32 weight} of every GPTQ-quantized layer (those with a qweight) in an
    exported folder, with the bit width and group size read from its config.json."""
    cfg = _quantization_config(folder)
    assert (cfg["quant_method"], cfg["checkpoint_format"], cfg["desc_act"]) == ("gptq", "gptq", False), cfg
    bits, group = cfg["bits"], cfg["group_size"]
    tensors = load_file(str(Path(folder) / "model.safetensors"))
    out = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        inn = tensors[f"{name}.g_idx"].numel()
        # desc_act false: inputs in order, group i // group_size (group_size -1: one group per column)
        want_idx = np.arange(inn) // (inn if group == -1 else group)
        assert np.array_equal(_np(tensors[f"{name}.g_idx"]), want_idx), name
        assert f"{name}.weight" not in tensors, name
        out[name] = dequant_gptq(tensors, name, bits)
    return out


def read_compressed_tensors(folder) -> dict[str, torch.Tensor]:
    """{layer name: float32 weight} of every pack-quantized layer (those with a weight_packed) in
    an exported folder, with the scheme read from its config.json's one config group."""
    cfg = _quantization_config(folder)
    assert (cfg["quant_method"], cfg["format"]) == ("compressed-tensors", "pack-quantized"), cfg
    (group,) = cfg["config_groups"].values()
    w = group["weights"]
    assert group["targets"] == ["Linear"] and w["type"] == "int" and group["input_activations"] is None, group
    bits, sym = w["num_bits"], w["symmetric"]
    tensors = load_file(str(Path(folder) / "model.safetensors"))
    out = {}
    for key in tensors:
        if not key.endswith(".weight_packed"):
            continue
        name = key[: -len(".weight_packed")]
        assert name not in cfg["ignore"] and f"{name}.weight" not in tensors, name
        inn = int(tensors[f"{name}.weight_shape"][1])
        g = inn if w["strategy"] == "channel" else w["group_size"]
        assert w["strategy"] in ("channel", "group") and inn % g == 0, (name, w)
        out[name] = dequant_ct(tensors, name, bits, sym, g)
    return out


READERS = {"gptq": read_gptq, "compressed-tensors": read_compressed_tensors}
