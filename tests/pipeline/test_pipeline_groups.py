"""Every group / block size of the grammar, on awkward input widths (576, 1536, 4864, 13824):
the fallback the pipeline chooses is saved, and the checkpoint loads again with identical logits.

Two one-block Llamas whose Linear input widths are those (hidden 576, head 64, MLP 1536; hidden 32,
one head of 4864, MLP 13824), every other size tiny."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import quantkit as qk
from quantkit.io.checkpoint import load_checkpoint
from quantkit.scheme import parse_scheme

hf_logging.set_verbosity_error()
VOCAB = 64
INT_GROUPS = (32, 64, 128, 256, 1024)  # the grammar's -gN, written out independently of scheme.GROUP_SIZES
BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # nf4/fp4 -bN
SCHEMES = ([f"int{b}-g{g}" for b in range(2, 9) for g in INT_GROUPS]
           + [f"{k}-b{n}" for k in ("nf4", "fp4") for n in BLOCKS] + ["nf4-b4096-dq", "int4-g1024-sym"])
SHAPES = {"wide": dict(hidden_size=576, head_dim=64, intermediate_size=1536),
          "deep": dict(hidden_size=32, head_dim=4864, intermediate_size=13824)}


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request):
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, vocab_size=VOCAB,
                      tie_word_embeddings=False, **SHAPES[request.param])
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))


def test_the_models_have_the_awkward_widths(model):
    widths = {m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert widths in ({576, 64, 1536}, {32, 4864, 13824})


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_fallback_saves_and_loads(model, ids, scheme, tmp_path):
    asked = parse_scheme(scheme)
    q = qk.quantize(model, scheme, progress=False)
    with torch.no_grad():
        want = q(ids).logits
    qk.save(q, tmp_path / "ck")
    saved = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]["layers"]
    accepted = INT_GROUPS if asked.kind == "int" else BLOCKS
    for name, stored in saved.items():
        sc = parse_scheme(stored)  # every stored name is one the grammar accepts
        width = model.get_submodule(name).in_features
        # the largest accepted size no larger than asked that divides the width
        assert sc.group_size == max(g for g in accepted if g <= asked.group_size and width % g == 0), (name, stored)
        assert sc.with_group(asked.group_size) == asked
    again, _ = load_checkpoint(tmp_path / "ck")
    assert again.quantkit.layers == q.quantkit.layers
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)
