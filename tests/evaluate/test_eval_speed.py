import time

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from quantkit.errors import DataError
from quantkit.evaluate import decode_speed, greedy_generate, greedy_tokens, prefill_speed

from measure_support import MIN_FORWARD_S  # a floor under one eager forward's time

PROMPT = torch.tensor([[5, 17, 99, 3, 42]])


def _timed(fn, *args, **kwargs):
    """(fn's result, the wall time around the call): no time measured inside can exceed it."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _naive_greedy(model, ids, n):
    """Greedy decoding without a KV cache: recompute the whole sequence each step."""
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=seq, use_cache=False).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq[0, ids.shape[1]:]


def _word_tokenizer(eos: str | None = None) -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_cached_greedy_matches_recompute(name, request):
    model = request.getfixturevalue(name)
    got = greedy_tokens(model, PROMPT, new_tokens=10)
    assert got.shape == (10,) and got.dtype == torch.long
    assert torch.equal(got, _naive_greedy(model, PROMPT, 10))


def test_decode_speed(tiny_llama):
    result, wall = _timed(decode_speed, tiny_llama, PROMPT, new_tokens=6, warmup=2, repeats=2)
    assert set(result) == {"decode_tokens_per_s", "new_tokens", "seconds"}
    assert result["new_tokens"] == 6
    assert 6 * MIN_FORWARD_S <= result["seconds"] <= wall  # six timed decode steps, inside the call
    assert result["decode_tokens_per_s"] == pytest.approx(6 / result["seconds"])


def test_decode_speed_without_warmup(tiny_gpt2):
    result, wall = _timed(decode_speed, tiny_gpt2, PROMPT, new_tokens=3, warmup=0)
    tps = result["decode_tokens_per_s"]
    assert 3 / wall <= tps <= 1 / MIN_FORWARD_S  # 3 steps within the call's wall time; one token per forward
    assert tps == pytest.approx(3 / result["seconds"])


def test_prefill_speed(tiny_llama):
    ids = torch.randint(0, 256, (2, 12))
    tps, wall = _timed(prefill_speed, tiny_llama, ids, warmup=0, repeats=1)
    assert ids.numel() / wall <= tps <= ids.numel() / MIN_FORWARD_S  # one timed forward of 24 tokens


def test_prefill_speed_last_logits_projects_one_position(tiny_llama):
    ids = torch.randint(0, 256, (2, 12))
    seen = []
    h = tiny_llama.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    try:
        tps, wall = _timed(prefill_speed, tiny_llama, ids, warmup=0, repeats=1, last_logits=True)
        assert ids.numel() / wall <= tps <= ids.numel() / MIN_FORWARD_S
        prefill_speed(tiny_llama, ids, warmup=0, repeats=1)
    finally:
        h.remove()
    assert seen[0][:2] == (2, 1) and seen[1][:2] == (2, 12)


def test_prefill_speed_last_logits_needs_logits_to_keep(tiny_gpt2, monkeypatch):
    import inspect

    if "logits_to_keep" in inspect.signature(tiny_gpt2.forward).parameters:
        monkeypatch.setattr(tiny_gpt2, "forward", lambda input_ids=None, past_key_values=None, use_cache=None: None)
    with pytest.raises(ValueError, match="logits_to_keep"):
        prefill_speed(tiny_gpt2, torch.randint(0, 256, (1, 4)), warmup=0, repeats=1, last_logits=True)


def test_bad_prompt_shapes(tiny_llama):
    with pytest.raises(DataError):
        decode_speed(tiny_llama, torch.tensor([1, 2, 3]))
    with pytest.raises(DataError):
        decode_speed(tiny_llama, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(DataError):
        greedy_tokens(tiny_llama, torch.ones(1, 0, dtype=torch.long))


def test_greedy_generate_text(tiny_llama):
    prompt = " ".join(f"w{int(t)}" for t in PROMPT[0])
    expected = greedy_tokens(tiny_llama, PROMPT, 8).tolist()
    text = greedy_generate(tiny_llama, _word_tokenizer(), prompt, new_tokens=8)
    assert text == " ".join(f"w{t}" for t in expected)
    # Cut at the first EOS token.
    cut = expected[3]
    first = expected.index(cut)
    text = greedy_generate(tiny_llama, _word_tokenizer(eos=f"w{cut}"), prompt, new_tokens=8)
    assert text == " ".join(f"w{t}" for t in expected[:first])


@pytest.mark.skipif(not (__import__("shutil").which("g++") or __import__("shutil").which("c++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decode_gives_the_cached_greedy_tokens(tiny_llama):
    """decode_speed(compile=True): a StaticCache and compiled decode steps continue the prompt
    exactly as the eager loop does (an fp32 model; the graph is built once and reused)."""
    from quantkit.evaluate.speed import _greedy_compiled

    with torch.inference_mode():
        got, _ = _greedy_compiled(tiny_llama, PROMPT, 9, cache_len=PROMPT.shape[1] + 10)
        again, _ = _greedy_compiled(tiny_llama, PROMPT, 9, cache_len=PROMPT.shape[1] + 10)
    assert torch.equal(got, _naive_greedy(tiny_llama, PROMPT, 10)) and torch.equal(got, again)
    result, wall = _timed(decode_speed, tiny_llama, PROMPT, new_tokens=4, warmup=0, compile=True)
    assert result["new_tokens"] == 4 and 0 < result["seconds"] <= wall  # compiling is untimed, but inside the call
    assert 4 / wall <= result["decode_tokens_per_s"] == pytest.approx(4 / result["seconds"])


def test_compiled_decode_without_a_compiler_says_what_to_install(tiny_llama, monkeypatch):
    import shutil

    from quantkit.errors import QuantkitError

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(QuantkitError, match="C\\+\\+ compiler"):
        decode_speed(tiny_llama, PROMPT, new_tokens=2, compile=True)


@pytest.mark.skipif(not (__import__("shutil").which("g++") or __import__("shutil").which("c++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decode_of_several_quantized_models_gives_each_its_own_tokens(tiny_llama):
    """Quantized layers reach torch.compile's graph as tensors (the native kernels' handles are
    inputs, not constants), so models of one architecture can share a compiled step: each must
    still decode its own weights, as its eager loop does."""
    import quantkit as qk
    from quantkit.evaluate.speed import _greedy_compiled

    models = [qk.quantize(tiny_llama, s, progress=False) for s in ("int4-g32", "int8", "nf4-dq")]
    with torch.inference_mode():
        outs = []
        for m in models:
            got, _ = _greedy_compiled(m, PROMPT, 7, cache_len=PROMPT.shape[1] + 10)
            assert torch.equal(got, _naive_greedy(m, PROMPT, 8))
            outs.append(got)
        # and back to the first: its own tokens again
        assert torch.equal(_greedy_compiled(models[0], PROMPT, 7, cache_len=PROMPT.shape[1] + 10)[0], outs[0])


@pytest.mark.skipif(not (__import__("shutil").which("g++") or __import__("shutil").which("c++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_a_step_that_does_not_compile_as_one_graph_decodes_eagerly_and_spoils_nothing(tiny_llama, caplog):
    """LLM.int8()'s outlier count is data-dependent: its decode step cannot be one graph, so it
    runs eagerly (said once), and a model compiled after it still gets its own full graph."""
    import logging

    import quantkit as qk

    outl = qk.quantize(tiny_llama, "llm-int8", progress=False)
    with caplog.at_level(logging.WARNING, logger="quantkit.evaluate.speed"):
        r = decode_speed(outl, PROMPT, new_tokens=3, warmup=1, compile=True)
    assert not r["compiled"] and "does not compile as one graph" in caplog.text
    m = qk.quantize(tiny_llama, "int8", progress=False)
    r = decode_speed(m, PROMPT, new_tokens=3, warmup=1, compile=True)
    assert r["compiled"]
    from quantkit.evaluate.speed import _greedy_compiled

    with torch.inference_mode():
        got, _ = _greedy_compiled(m, PROMPT, 7, cache_len=PROMPT.shape[1] + 10)
    assert torch.equal(got, _naive_greedy(m, PROMPT, 8))


@pytest.mark.skipif(not (__import__("shutil").which("g++") or __import__("shutil").which("c++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_a_quantized_copy_of_a_compiled_model_decodes_its_own_weights(tiny_llama):
    """qk.quantize deep-copies the model, the cached compiled step with it: the copy must build its
    own step, not run the original model's (whose logits differ at 2 bits)."""
    from transformers import StaticCache

    import quantkit as qk
    from quantkit.evaluate.speed import _greedy_compiled, compiled_step

    def step_logits(m, step):
        cache = StaticCache(config=m.config, max_cache_len=PROMPT.shape[1] + 4)
        p = PROMPT.shape[1]
        m(input_ids=PROMPT, past_key_values=cache, use_cache=True, cache_position=torch.arange(p))
        return step(PROMPT[:, -1:], cache, torch.tensor([p]))[0, -1]

    with torch.inference_mode():
        _greedy_compiled(tiny_llama, PROMPT, 3, cache_len=PROMPT.shape[1] + 10)
        q = qk.quantize(tiny_llama, "int2-g32", head="int8", progress=False)  # (a bf16 head would round logits)
        got = step_logits(q, compiled_step(q))
        want = step_logits(q, lambda t, c, pos: q(input_ids=t, past_key_values=c, use_cache=True, cache_position=pos,
                                                   position_ids=pos[None]).logits)
        fp32 = step_logits(tiny_llama, compiled_step(tiny_llama))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert float((fp32 - want).abs().max()) > 1e-2
