"""parse_scheme grammar, canonical names, and shape validation / group fallback."""
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
