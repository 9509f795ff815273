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
