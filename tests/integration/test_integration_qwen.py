"""The second real model, another family: Qwen2.5-Coder-0.5B-Instruct (qwen2, untied head,
attention biases, 151,936-token vocabulary), from the six-wheel GGUF alias. Kept short: one
512-token window of WikiText-2."""
import pytest
import torch

import quantkit as qk

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def qwen(qwen_path):
    return qk.load("qwen2.5-0.5b")


def test_the_alias_is_the_stated_file(qwen_path):
    import gguf

    r = gguf.GGUFReader(qwen_path)
    assert qwen_path.stat().st_size == 491_400_064  # fetch checked the SHA-256 prefix too
    assert bytes(r.fields["general.name"].parts[-1]).decode() == "Qwen2.5 Coder 0.5B Instruct AWQ"
    types = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    assert types == {"Q5_0": 133, "Q8_0": 13, "Q6_K": 12, "Q4_K": 12, "F32": 121}


def test_qwen_is_held_right_and_int8_is_close(qwen, wikitext_path):
    from quantkit.evaluate.guard import check_reference
    from quantkit.evaluate.run import evaluate_model

    model, tok = qwen
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.config.tie_word_embeddings
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert check_reference(model, head="bf16", tokenizer=tok).ok
    text = qk.text(str(wikitext_path), "eval")
    res = evaluate_model(qk.quantize(model, "int8", progress=False), tok, text=text, reference=model, ctx=512,
                         max_tokens=512, progress=False, guard=False)  # the guard ran just above
    ref = evaluate_model(model, tok, text=text, ctx=512, max_tokens=512, progress=False)
    assert res["kl_divergence"] < 0.01 and abs(res["perplexity"] / ref["perplexity"] - 1) < 0.02
