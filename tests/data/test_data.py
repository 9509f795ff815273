import re
from pathlib import Path

import pytest
import torch

from quantkit import data
from quantkit.errors import DataError

WIKI = Path("/work/shared/data/wikitext-2-raw/wiki.test.raw")
SENTENCES = [
    "The tower was built in the twelfth century and rebuilt after a fire.",
    "Robert Boulter is an English film, television and theatre actor.",
    "The river flows north through the valley before it reaches the sea.",
    "In 2006 he had a guest role in the series, followed by a play.",
]


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE tokenizer trained in-process on a few sentences (no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<bos>", "<eos>"])
    tk.train_from_iterator(SENTENCES * 3, trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>")
    t._tokenizer.post_processor = None
    return t


@pytest.fixture(scope="module")
def wiki() -> str:
    if not WIKI.is_file():
        pytest.skip(f"{WIKI} is not present")
    return data.read_text(WIKI)


# ---------------------------------------------------------------- text and split


def test_split_rule_on_wikitext(wiki):
    ev, cal, full = data.text(WIKI, "eval"), data.text(WIKI, split="calib"), data.text(WIKI, "all")
    assert full == wiki and ev + cal == wiki  # disjoint, nothing lost
    assert re.match(r" = [^=].* = \n", cal)  # calib starts at a top-level article heading
    assert ev.endswith("\n")
    assert 0.75 <= len(ev) / len(wiki) < 0.80  # calib is about the last quarter
    # no article heading between the 75% mark and the cut
    mark = int(len(wiki) * 0.75)
    assert not re.search(r"^ = [^=].* = $", wiki[mark: len(ev)], re.MULTILINE)


def test_split_without_headings_cuts_at_a_line_start():
    txt = "".join(f"line {i}\n" for i in range(100))
    ev, cal = data.split_text(txt, "eval"), data.split_text(txt, "calib")
    cut, mark = len(ev), int(len(txt) * 0.75)
    assert ev + cal == txt and cal.startswith("line ")
    assert cut > mark and txt[cut - 1] == "\n" and "\n" not in txt[mark: cut - 1]  # first line start after 75%


def test_split_ignores_sub_headings():
    body = "word " * 40 + "\n"
    txt = " = A = \n" + body * 8 + " = = Sub = = \n" + body + " = B = \n" + body
    assert data.split_text(txt, "calib").startswith(" = B = \n")


def test_split_errors():
    with pytest.raises(DataError, match="unknown split"):
        data.split_text("some text\n", "train")
    with pytest.raises(DataError, match="empty"):
        data.split_text("  \n", "eval")


def test_read_text_errors(tmp_path):
    with pytest.raises(DataError, match="no such text file"):
        data.read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        data.read_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        data.read_text(tmp_path / "latin1.txt")
    with pytest.raises(DataError, match="not a file"):
        data.read_text(tmp_path)


def test_read_text_normalises_line_ends(tmp_path):
    (tmp_path / "crlf.txt").write_bytes(b"a\r\nb\rc\n")
    assert data.read_text(tmp_path / "crlf.txt") == "a\nb\nc\n"


def test_hf_spec_errors(monkeypatch):
    with pytest.raises(DataError, match="hf:NAME"):
        data.read_text("hf:")
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match="datasets"):
        data.read_text("hf:wikitext:wikitext-2-raw-v1:test")


# ---------------------------------------------------------------- windows and samples


def test_eval_windows_shapes(tok):
    txt = " ".join(SENTENCES * 20)
    ids = tok(txt, add_special_tokens=False)["input_ids"]
    w = data.eval_windows(tok, txt, ctx=32)
    assert w.dtype == torch.long and w.shape == (len(ids) // 32, 32)
    assert w.flatten().tolist() == ids[: w.numel()]  # non-overlapping, in order, no special tokens
    w = data.eval_windows(tok, txt, ctx=32, max_tokens=100)
    assert w.shape == (3, 32)


def test_eval_windows_too_short_and_empty(tok):
    with pytest.raises(DataError, match=r"text too short to evaluate: \d+ tokens, need at least 512"):
        data.eval_windows(tok, "A short text.", ctx=512)
    with pytest.raises(DataError, match="empty"):
        data.eval_windows(tok, "", ctx=8)
    with pytest.raises(DataError, match="need at least 64"):
        data.eval_windows(tok, " ".join(SENTENCES * 5), ctx=64, max_tokens=10)


def test_windows_from_ids():
    w = data.windows_from_ids(torch.arange(10), ctx=4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(DataError, match="too short"):
        data.windows_from_ids([1, 2, 3], ctx=4)


def test_calib_samples_reproducible(tok):
    txt = " ".join(SENTENCES * 20)
    a = data.calib_samples(tok, txt, n=8, length=16, seed=0)
    b = data.calib_samples(tok, txt, n=8, length=16, seed=0)
    c = data.calib_samples(tok, txt, n=8, length=16, seed=1)
    assert a.shape == (8, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = tok(txt, add_special_tokens=False)["input_ids"]
    row = a[0].tolist()
    assert any(ids[i: i + 16] == row for i in range(len(ids) - 15))  # each sample is a real span
    with pytest.raises(DataError, match="too short"):
        data.calib_samples(tok, "tiny text", n=2, length=64)


def test_generate_reference_text(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok)))
    prompts = ["The tower was", "The river"]
    a = data.generate_reference_text(model, tok, prompts=prompts, max_new_tokens=5)
    b = data.generate_reference_text(model, tok, prompts=prompts, max_new_tokens=5)
    assert a.dim() == 1 and a.dtype == torch.long and torch.equal(a, b)
    first = tok(prompts[0])["input_ids"]
    assert a[: len(first)].tolist() == first
    assert data.windows_from_ids(a, ctx=4).shape[1] == 4
    assert len(data.DEFAULT_PROMPTS) == 8


def test_max_tokens_tokenizes_only_the_prefix_it_needs(tok, monkeypatch):
    """--max-tokens 64 on a long text: the same ids as tokenizing all of it, from a small prefix."""
    big = "\n".join(SENTENCES * 4000)  # ~1 MB
    full = data.tokenize(tok, big)
    seen = []
    real = data.tokenize

    def counting(t, text):
        seen.append(len(text))
        return real(t, text)

    monkeypatch.setattr(data, "tokenize", counting)
    for n in (64, 1000, 20000):
        seen.clear()
        w = data.eval_windows(tok, big, ctx=32, max_tokens=n)
        assert torch.equal(w.reshape(-1), full[: n // 32 * 32])
        assert sum(seen) < max(len(big) // 4, 64 * n)  # a prefix, not the whole text
    seen.clear()
    data.eval_windows(tok, "\n".join(SENTENCES * 3), ctx=8, max_tokens=10**6)  # asks more than there is
    assert torch.equal(data.tokenize_prefix(tok, "\n".join(SENTENCES * 3), 10**6), real(tok, "\n".join(SENTENCES * 3)))
