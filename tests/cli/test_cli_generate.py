"""`quantkit generate`: greedy text from a model, streamed, with its speed; eager and compiled."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from quantkit.cli import main


def _greedy_reference(folder, prompt, n):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[0, -1].argmax()
            out.append(int(nxt))
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return tok.decode(out, skip_special_tokens=True)


def test_generate_streams_the_greedy_continuation(tiny, capsys):
    main(["generate", str(tiny), "--prompt", "the cat", "--max-new-tokens", "6", "--no-compile", "--ignore-eos"])
    cap = capsys.readouterr()
    expected = _greedy_reference(tiny, "the cat", 6)
    # streamed: the prompt, then the continuation in whole characters as they are decoded (a
    # byte-level piece waits for the next token; the end flushes what is left)
    assert cap.out.startswith("the cat") and cap.out[len("the cat"):] == expected
    assert "6 new tokens" in cap.err and "eager" in cap.err
    main(["generate", str(tiny), "--prompt", "the cat", "--max-new-tokens", "6", "--no-compile", "--ignore-eos", "--json"])
    assert json.loads(capsys.readouterr().out)["text"] == expected


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_generate_gives_the_eager_text_on_a_quantized_model(tiny, capsys):
    """int8 on the native kernels (where built), decode steps compiled: the same greedy text."""
    args = ["generate", str(tiny), "--prompt", "the cat", "--max-new-tokens", "5", "--scheme", "int8", "--ignore-eos",
            "--json"]
    main(args + ["--no-compile"])
    eager = json.loads(capsys.readouterr().out)
    main(args)
    compiled = json.loads(capsys.readouterr().out)
    assert compiled["compiled"] and not eager["compiled"]
    assert compiled["text"] == eager["text"] and compiled["new_tokens"] == 5
    assert compiled["decode_tokens_per_s"] > 0 and compiled["compile_seconds"] > 0


def _native_or_skip():
    from quantkit.kernels import native

    if not native.wonly():
        pytest.skip(f"quantkit's native kernels are not built here: {native.why_not_native() or 'the build failed'}")


def test_generate_with_int8_activations(tiny, capsys):
    """--int8-activations: the quantized layers decode on int8 activations (said on stderr); the
    text is the greedy continuation of the same model switched in Python."""
    _native_or_skip()
    import quantkit as qk
    from quantkit.evaluate.speed import greedy_tokens

    main(["generate", str(tiny), "--prompt", "the cat", "--max-new-tokens", "6", "--scheme", "int4-g32",
          "--no-compile", "--ignore-eos", "--int8-activations", "--json"])
    cap = capsys.readouterr()
    assert "int8 activations:" in cap.err and " of " in cap.err
    res = json.loads(cap.out)
    model, tok = qk.load(str(tiny))
    model = qk.quantize(model, "int4-g32", progress=False)
    qk.set_activations(model, "int8")
    ids = tok("the cat", return_tensors="pt").input_ids
    want = greedy_tokens(model, ids, new_tokens=6)
    assert res["text"] == tok.decode(want, skip_special_tokens=True)


def test_int8_activations_on_a_float_model_is_a_clear_error(tiny, capsys):
    from cli_support import run_error

    _native_or_skip()
    run_error(capsys, ["generate", tiny, "--prompt", "the cat", "--int8-activations"], "no quantized layers",
              "--scheme")


def test_eval_with_int8_activations_measures_the_approximation(capsys, quantized, text_file):
    _native_or_skip()
    base = ["eval", str(quantized), "--text", str(text_file), "--ctx", "16", "--max-tokens", "96", "--json"]
    main(base)
    exact = json.loads(capsys.readouterr().out)
    main(base + ["--int8-activations"])
    a8 = json.loads(capsys.readouterr().out)
    assert a8["tokens"] == exact["tokens"]
    assert a8["perplexity"] != exact["perplexity"]  # every row went through int8 activations
    assert a8["perplexity"] == pytest.approx(exact["perplexity"], rel=0.05)
