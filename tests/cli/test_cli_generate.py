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
