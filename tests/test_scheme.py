"""parse_scheme grammar, canonical names, and shape validation / group fallback."""
import re

import pytest

from quantkit.errors import SchemeError
from quantkit.scheme import EXAMPLES, PER_CHANNEL, PER_TENSOR, Scheme, parse_scheme, parse_schemes


@pytest.mark.parametrize("text", EXAMPLES + ("int4", "int2-tensor", "int8-asym", "int5-g32-sym", "fp4-b128-dq", "fp8-e5m2", "fp32", "fp16"))
def test_examples_round_trip(text):
    s = parse_scheme(text)
    assert isinstance(s, Scheme)
    assert parse_scheme(s.name) == s
    assert parse_scheme(s) is s


def test_parsed_fields():
    assert parse_scheme("int4-g128") == Scheme(kind="int", bits=4, symmetric=False, group_size=128)
    assert parse_scheme("int8").symmetric and parse_scheme("int8").group_size == PER_CHANNEL
    assert parse_scheme("int3-tensor-sym").group_size == PER_TENSOR
    assert parse_scheme("int4-g-1").name == "int4"
    nf = parse_scheme("nf4-dq")
    assert (nf.kind, nf.group_size, nf.double_quant, nf.name) == ("nf4", 64, True, "nf4-b64-dq")
    assert parse_scheme("fp8-e4m3").fp_format == "e4m3"


@pytest.mark.parametrize(
    "text,options",
    [("int9", "2 to 8"), ("int4-g100", "32, 64, 128"), ("int4-g48", "32, 64, 128"), ("nf5", "nf4"), ("", "int{2..8}"),
     ("fp8-e3m4", "fp8-e4m3"), ("nf4-b48", "power of two")],
)
def test_bad_strings(text, options):
    with pytest.raises(SchemeError) as e:
        parse_scheme(text)
    msg = str(e.value)
    assert options in msg  # the message lists what is accepted


def test_validate_for():
    parse_scheme("int4-g128").validate_for((8, 256))
    with pytest.raises(SchemeError) as e:
        parse_scheme("int4-g128").validate_for((8, 576), name="mlp.down")
    assert "mlp.down" in str(e.value) and "32, 64" in str(e.value)
    with pytest.raises(SchemeError):
        parse_scheme("int8").validate_for((8, 4, 2))


def test_fallback_for():
    s = parse_scheme("int4-g128")
    assert s.fallback_for(576).group_size == 64
    assert s.fallback_for(576).name == "int4-g64"
    assert s.fallback_for(100) is None
    assert s.fallback_for(256) is s
    assert parse_scheme("int8").fallback_for(100) == parse_scheme("int8")


def test_parse_schemes():
    assert [s.name for s in parse_schemes("int8, nf4-dq")] == ["int8", "nf4-b64-dq"]
    with pytest.raises(SchemeError):
        parse_schemes("int8,int8")
    with pytest.raises(SchemeError):
        parse_schemes("int8,,nf4")


# ----------------------------------------------------------------------------- fallbacks the grammar accepts
from quantkit.config import Rule
from quantkit.scheme import GRAMMAR  # noqa: E402

INT_GROUPS = (32, 64, 128, 256, 1024)  # the -gN the grammar lists (GRAMMAR text), written out independently
BLOCKS = tuple(2 ** k for k in range(5, 13))  # nf4/fp4 -bN: powers of two from 32 to 4096
GROUPED = ([f"int{b}-g{g}{sym}" for b in range(2, 9) for g in INT_GROUPS for sym in ("-sym", "-asym")]
           + [f"{k}-b{n}{dq}" for k in ("nf4", "fp4") for n in BLOCKS for dq in ("", "-dq")])
WIDTHS = sorted(set(range(32, 16385, 32)) | {576, 1536, 4864, 13824, 100, 48, 96, 3 * 1024 + 512})


def test_grammar_text_lists_the_int_groups():
    assert "int{2..8}[-g{" + "|".join(map(str, INT_GROUPS)) + "}" in GRAMMAR


@pytest.mark.parametrize("text", GROUPED)
def test_every_fallback_is_a_scheme_the_grammar_accepts(text):
    s = parse_scheme(text)
    accepted = INT_GROUPS if s.kind == "int" else BLOCKS
    for w in WIDTHS:
        fb = s.fallback_for(w)
        want = max((g for g in accepted if g <= s.group_size and w % g == 0), default=None)
        if want is None:
            assert fb is None, (text, w)
            continue
        assert fb.group_size == want, (text, w)
        assert parse_scheme(fb.name) == fb  # a checkpoint that records it loads again
        fb.validate_for((4, w))


def test_fallbacks_on_awkward_widths():
    assert parse_scheme("int4-g1024").fallback_for(1536).name == "int4-g256"  # not 512: the grammar refuses int4-g512
    assert parse_scheme("int4-g1024").fallback_for(13824).name == "int4-g256"
    assert parse_scheme("int3-g1024-sym").fallback_for(4864).name == "int3-g256-sym"
    assert parse_scheme("int4-g256").fallback_for(576).name == "int4-g64"
    assert parse_scheme("nf4-b4096").fallback_for(1536).name == "nf4-b512"  # nf4 does accept 512
    assert parse_scheme("fp4-b2048-dq").fallback_for(13824).name == "fp4-b512-dq"
    with pytest.raises(SchemeError, match="invalid group size 512"):
        parse_scheme("int4-g512")


# ----------------------------------------------------------------------------- suggested spellings parse
_SPELLING = re.compile(r"(?<![\w-])(?:int[2-8](?:-[a-z0-9]+)*|(?:nf4|fp4)(?:-[a-z0-9]+)*|fp8-e[45]m[23]|bf16|fp16|fp32"
                       r"|llm-int8|w8a8-(?:dynamic|static)(?:-[a-z0-9]+)*|gguf-[a-z0-9_]+)(?![\w{\[-])")


def _messages():
    """The message of every SchemeError scheme.py raises on bad input."""
    from quantkit.algorithms import GPTQ, SmoothQuant
    from quantkit.config import make_config
    from quantkit.scheme import gguf_scheme

    calls = [lambda t=t: parse_scheme(t) for t in
             ("int9", "int4-g100", "int4-g512", "int3-g-2-sym", "nf4-b48", "fp4-b8192-dq", "nf5", "", "fp8-e3m4",
              "w8a8-foo", "w8a8-static-bogus", "w8a8-dynamic-mse", "w8a8-static-mse-o0", "w8a8-static-ema-asym-o5000",
              "gguf-q9_k")]
    calls += [lambda: parse_scheme("int4-g128").validate_for((8, 576), "L"),
              lambda: parse_scheme("int4-g1024-sym").validate_for((8, 1536), "L"),
              lambda: parse_scheme("int4-g32").validate_for((8, 100), "L"),
              lambda: parse_scheme("nf4-b256-dq").validate_for((8, 576), "L"),
              lambda: parse_scheme("gguf-q4_k").validate_for((8, 576), "L"),
              lambda: parse_scheme("w8a8-static-mse-o64").validate_for((8, 64), "L"),
              lambda: parse_scheme("int8").validate_for((8, 4, 2), "L"),
              lambda: gguf_scheme("Q9_K"), lambda: parse_schemes("int8,,nf4"), lambda: parse_schemes("int8,int8"),
              lambda: GPTQ(damp=2), lambda: GPTQ(block_size=0),
              lambda: SmoothQuant(alpha=3), lambda: make_config("int8", transforms=[{"name": "smoothquant", "options": {"alpha": "x"}}]),
              lambda: make_config("int8", head="int4"), lambda: make_config("int4", method="llm-int8"),
              lambda: Rule("", None)]
    out = []
    for call in calls:
        with pytest.raises(SchemeError) as e:
            call()
        out.append(str(e.value))
    return out


def test_every_suggested_spelling_parses():
    seen = set()
    for msg in _messages():
        assert "\n" not in msg
        suggested = re.sub(r"'[^']*'", "", msg.lower())  # the echoed bad input is not a suggestion
        for word in _SPELLING.findall(suggested):
            if word.endswith("-"):
                continue
            parse_scheme(word)  # raises if a message suggests a spelling the grammar refuses
            seen.add(word)
    # the messages that suggest a fix do name concrete schemes
    assert {"int4-g128", "int4", "int4-g64", "int4-g32", "int4-sym", "nf4-b128", "nf4-b64-dq", "fp4-b128",
            "w8a8-static-mse-o1", "w8a8-static-ema-o32"} <= seen, seen


def test_group_size_error_suggests_no_minus_one():
    with pytest.raises(SchemeError) as e:
        parse_scheme("int4-g100")
    assert "-1" not in str(e.value) and "no -g for per channel (int4)" in str(e.value)


# ----------------------------------------------------------------------------- rule names
NAMES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.11.mlp.down_proj",
         "model.layers.1.mlp.gate_proj", "model.layers.1.self_attn.q_proj", "lm_head", "model.decoder.fc1"]


@pytest.mark.parametrize("pattern", ["down_proj", "mlp.down_proj", "lm_head", "model.layers.1", "model.layers.1.mlp",
                                     "q_proj", "fc1", "self_attn", "mlp", "model.layers.0.mlp.down_proj", "layers.1"])
def test_bare_names_match_as_transformers_matches_them(pattern):
    """transformers' own rule (quantizers_utils.should_convert_module), for whole-component names."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    for name in NAMES:
        assert Rule(pattern, None).matches(name) == (not should_convert_module(name, [pattern])), (pattern, name)


def test_rule_match_boundaries_and_globs():
    r = Rule("model.layers.1", None)
    assert r.matches("model.layers.1.mlp.down_proj") and not r.matches("model.layers.11.mlp.down_proj")
    assert not Rule("mlp.gate", None).matches("model.layers.1.mlp.gate_proj")
    assert not Rule("proj", None).matches("model.layers.1.mlp.down_proj")  # whole components only
    assert Rule("*.mlp.*", None).matches("model.layers.1.mlp.down_proj")
    assert Rule("layers.1*.mlp.down_proj", None).matches("model.layers.11.mlp.down_proj")
    assert not Rule("*.down_proj", None).matches("model.layers.1.mlp.gate_proj")
