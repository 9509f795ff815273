"""The block-by-block calibration walk: GPTQ end to end on tiny models, streaming, errors."""
from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import quantkit as qk
from quantkit.errors import DataError, QuantkitError, SourceError
from quantkit.io.offload import open_streaming
from quantkit.pipeline import quantize_model


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _calib(n=8, length=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, length), generator=g)


def _digest(model, tmp_path, name):
    out = tmp_path / name
    qk.save(model, out)
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("sequential", [False, True])
def test_gptq_beats_rtn_on_calibration_outputs(sequential):
    model = _llama()
    ids = _calib(16, 32)
    g = qk.quantize(model, "int3-g32", method="gptq", calib=ids, sequential=sequential, progress=False)
    r = qk.quantize(model, "int3-g32", progress=False)
    with torch.no_grad():
        ref = model(ids).logits
        err_g = (g(ids).logits - ref).pow(2).mean()
        err_r = (r(ids).logits - ref).pow(2).mean()
    assert err_g < err_r, (err_g, err_r)
    assert set(g.quantkit.methods.values()) == {"gptq"} and len(g.quantkit.layers) == 14


def test_gptq_is_deterministic_byte_for_byte(tmp_path):
    model = _llama()
    a = qk.quantize(model, "int4-g32", method="gptq", calib=_calib(), progress=False)
    b = qk.quantize(model, "int4-g32", method="gptq", calib=_calib(), progress=False)
    assert _digest(a, tmp_path, "a") == _digest(b, tmp_path, "b")


def test_gpt2_blocks_and_conv1d():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256)).eval()
    q = qk.quantize(model, "int4-g32", method="gptq", calib=_calib(), sequential=True, progress=False)
    assert len(q.quantkit.layers) == 8 and set(q.quantkit.methods.values()) == {"gptq"}


def test_streaming_gives_the_same_bytes(tmp_path):
    model = _llama()
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    ids = _calib()
    eager = qk.quantize(model, "int4-g32", method="gptq", calib=ids, progress=False)
    smodel, _, loader = open_streaming(folder, tmp_path / "off")
    assert any(p.is_meta for p in smodel.model.layers.parameters())
    streamed = quantize_model(smodel, qk.make_config("int4-g32", "gptq"), calib=ids, loader=loader, progress=False)
    assert not any(p.is_meta for p in streamed.parameters())
    assert _digest(eager, tmp_path, "e") == _digest(streamed, tmp_path, "s")


@pytest.mark.parametrize("scheme,method", [("int4-g32", "rtn"), ("nf4-dq", "rtn"), ("int8", "rtn-mse")])
def test_data_free_methods_stream_too_and_give_the_same_bytes(tmp_path, scheme, method):
    """RTN (and any data-free method) streams block by block from disk as GPTQ does: each block
    read when reached, the output byte for byte the in-memory one."""
    model = _llama()
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    eager = qk.quantize(model, scheme, method=method, progress=False)
    smodel, _, loader = open_streaming(folder, tmp_path / "off")
    reached = []
    load = loader.load_into
    loader.load_into = lambda block, prefix: (reached.append(prefix), load(block, prefix))
    streamed = quantize_model(smodel, qk.make_config(scheme, method), loader=loader, progress=False)
    assert reached == ["model.layers.0.", "model.layers.1."]
    assert not any(p.is_meta for p in streamed.parameters())
    assert _digest(eager, tmp_path, "e") == _digest(streamed, tmp_path, "s")


def test_streaming_frees_each_float_block_once_it_is_quantized(tmp_path):
    """Peak memory stays at about one float block: nothing may keep a quantized block's float
    weights alive (a list of (name, module) pairs once did, until the whole walk ended)."""
    import gc
    import weakref

    model = _llama()
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    smodel, _, loader = open_streaming(folder, tmp_path / "off")
    seen: list = []
    load = loader.load_into

    def load_into(block, prefix):
        if seen:  # every earlier block has been quantized by now
            gc.collect()
            alive = [w for w in seen if w() is not None]
            assert not alive, f"{len(alive)} float weights of earlier blocks are still referenced"
        load(block, prefix)
        seen.extend(weakref.ref(m.weight) for m in block.modules() if isinstance(m, torch.nn.Linear))

    loader.load_into = load_into
    quantize_model(smodel, qk.make_config("int4-g32", "gptq"), calib=_calib(), loader=loader, progress=False)
    assert len(seen) == 14


@pytest.mark.parametrize("tied,head", [(True, "bf16"), (True, "int8"), (False, "fp16"), (False, "keep")])
def test_streamed_table_and_head_in_row_chunks_give_the_same_bytes(tmp_path, monkeypatch, tied, head):
    """A streamed model's embedding table and head stay views of the float file and are
    quantized a few rows at a time at the end: byte for byte what the whole table gives."""
    import quantkit.pipeline as pipeline
    from quantkit.memory import file_backed

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                         tie_word_embeddings=tied)).eval()
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    cfg = qk.make_config("int4-g32", "gptq", head=head)
    eager = quantize_model(model, cfg, calib=_calib(), progress=False)
    monkeypatch.setattr(pipeline, "TABLE_CHUNK_ROWS", 48)  # 256 rows: six chunks, the last one short
    smodel, _, loader = open_streaming(folder, tmp_path / "off")
    tables = [smodel.get_input_embeddings().weight] + ([] if tied else [smodel.get_output_embeddings().weight])
    assert all(file_backed(tables))  # not private copies: read from disk only where used
    streamed = quantize_model(smodel, cfg, calib=_calib(), loader=loader, progress=False)
    assert _digest(eager, tmp_path, "e") == _digest(streamed, tmp_path, "s")


@pytest.mark.parametrize("scheme", ["bf16", "fp16", "fp32", "int8", "int4-g32", "fp8-e4m3", "int8-tensor"])
def test_quantize_table_in_chunks_is_byte_identical(tmp_path, scheme):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from quantkit.formats import quantize
    from quantkit.pipeline import quantize_table

    save_file({"w": torch.randn(100, 64, generator=torch.Generator().manual_seed(0))}, str(tmp_path / "w.st"))
    with safe_open(str(tmp_path / "w.st"), framework="pt") as h:
        w = h.get_tensor("w")  # a view of the file's mapping
    whole = quantize(w.clone(), scheme)
    chunked = quantize_table(w, qk.parse_scheme(scheme), from_file=True, rows=32)
    assert sorted(chunked.tensors) == sorted(whole.tensors)
    for k, t in whole.tensors.items():
        assert t.dtype == chunked.tensors[k].dtype and torch.equal(t.view(torch.uint8), chunked.tensors[k].view(torch.uint8)), k


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="resident pages: Linux /proc")
def test_streaming_drops_the_table_pages_the_calibration_read(tmp_path):
    model = _llama()
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    smodel, _, loader = open_streaming(folder, tmp_path / "off")
    table = smodel.get_input_embeddings().weight.detach()
    float(table.sum())  # reads every page of the table through the file mapping
    table_bytes = table.numel() * table.element_size()
    file_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))  # every tracked view lies in it
    first = loader.release_mapped()
    assert table_bytes - 2 * 4096 <= first <= file_bytes
    # still tracked: released again (no-op on the OS side), the table's pages among them
    assert table_bytes - 2 * 4096 <= loader.release_mapped() <= first


def test_each_hessian_is_freed_once_its_layer_is_quantized(monkeypatch):
    """A block's Hessians go one by one as their layers are quantized, not all at the block's end
    (one that siblings reading the same input share goes with the last of them)."""
    import gc
    import weakref

    import quantkit.pipeline as pipeline

    seen: list = []
    swap = pipeline.swap_quantized

    def spy(model, name, mod, scheme, method, stats, info):
        gc.collect()
        alive = [n for n, r in seen if r() is not None and r() is not stats["hessian"]]
        assert not alive, f"Hessians of {alive} still alive while quantizing {name}"
        swap(model, name, mod, scheme, method, stats, info)
        seen.append((name, weakref.ref(stats["hessian"])))

    monkeypatch.setattr(pipeline, "swap_quantized", spy)
    qk.quantize(_llama(), "int4-g32", method="gptq", calib=_calib(), progress=False)
    assert len(seen) == 14


def test_siblings_share_one_hessian_and_give_the_same_bytes(tmp_path, monkeypatch):
    """q/k/v (and gate/up) read the same input, found by one hooked pass (no per-family
    declaration): one Hessian between them, hooked once; the result is byte for byte what one
    Hessian per layer gives."""
    import quantkit.calibrate as calibrate
    import quantkit.pipeline as pipeline

    shared = qk.quantize(_llama(), "int4-g32", method="gptq", calib=_calib(), progress=False)
    seen = {}
    swap = pipeline.swap_quantized

    def spy(model, name, mod, scheme, method, stats, info):
        seen[name] = stats["hessian"]  # kept alive, so no two Hessians can share an address
        swap(model, name, mod, scheme, method, stats, info)

    monkeypatch.setattr(pipeline, "swap_quantized", spy)
    monkeypatch.setattr(calibrate, "shared_inputs", lambda block, inputs, rels: [])
    apart = qk.quantize(_llama(), "int4-g32", method="gptq", calib=_calib(), progress=False)
    assert _digest(shared, tmp_path, "shared") == _digest(apart, tmp_path, "apart")
    assert len({id(h) for h in seen.values()}) == len(seen)  # without the sharing found: one Hessian per layer
    seen.clear()
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "swap_quantized", spy)
    qk.quantize(_llama(), "int4-g32", method="gptq", calib=_calib(), progress=False)
    p = "model.layers.0."
    assert seen[p + "self_attn.q_proj"] is seen[p + "self_attn.k_proj"] is seen[p + "self_attn.v_proj"]
    assert seen[p + "mlp.gate_proj"] is seen[p + "mlp.up_proj"] is not seen[p + "mlp.down_proj"]


def test_blocks_are_found_in_families_without_hints():
    """A family quantkit has no hints for (BERT) calibrates on the stack of blocks found in it;
    an encoder-decoder's two stacks are refused by name (calibration walks one)."""
    from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

    import quantkit.arch as arch

    bert = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=100)).eval()
    assert "bert" not in arch.FAMILIES and arch.family_of(bert).blocks == "bert.encoder.layer"
    q = qk.quantize(bert, "int4-g32", method="gptq", calib=torch.randint(0, 100, (8, 16)), progress=False)
    assert q.quantkit.methods["bert.encoder.layer.1.output.dense"] == "gptq"
    assert all(fam.blocks == "" for fam in arch.FAMILIES.values())  # hints never list blocks: they are found
    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=100))
    with pytest.raises(SourceError, match="encoder.block.*decoder.block|decoder.block.*encoder.block"):
        qk.quantize(t5, "int4-g32", method="gptq", calib=torch.randint(0, 100, (2, 8)), progress=False)
    qk.quantize(t5, "int4-g32", progress=False)  # data-free methods need no blocks


def test_gptq_without_calibration_or_tokenizer_is_refused():
    with pytest.raises(QuantkitError, match="calibration|tokenizer"):
        qk.quantize(_llama(), "int4-g32", method="gptq", progress=False)


def test_calibration_text_shorter_than_one_sample():
    from quantkit.data import calib_samples

    class Tok:  # whitespace tokenizer: enough for the length check
        def __call__(self, text, add_special_tokens=False, **kw):
            return {"input_ids": list(range(len(text.split())))}

    with pytest.raises(DataError, match="too short to calibrate"):
        calib_samples(Tok(), "only a few words here", n=4, length=512)


def test_gptq_refuses_non_integer_schemes():
    with pytest.raises(QuantkitError, match="gptq"):
        qk.quantize(_llama(), "nf4", method="gptq", calib=_calib(), progress=False)


def test_shared_inputs_are_found_in_any_family():
    """The Linears that read one input tensor come from a hooked pass over the block itself:
    llama's q/k/v and gate/up, phi3's none (fused qkv_proj, gate_up_proj), gemma2's as llama's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantkit.arch import blocks_of, family_of
    from quantkit.calibrate import capture_block_inputs, shared_inputs
    from quantkit.modules import linear_weight

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=256, head_dim=16, pad_token_id=0)
    want = {"llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]],
            "phi3": [], "gemma2": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                   ["mlp.gate_proj", "mlp.up_proj"]]}
    for kind, groups in want.items():
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **kw)).eval()
        block = blocks_of(m, family_of(m))[0]
        inputs = capture_block_inputs(m, block, torch.randint(0, 256, (2, 8)), batch_size=2)
        rels = [n for n, mod in block.named_modules() if linear_weight(mod) is not None]
        assert sorted(map(sorted, shared_inputs(block, inputs, rels))) == sorted(map(sorted, groups)), kind
