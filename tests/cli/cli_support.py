"""What the CLI tests share: a tiny tokenizer and text, the tiny model's fixtures (conftest.py)
and the checks of a user error (exit 2, one `error:` line, nothing left behind)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantkit.cli import main

TEXT = """The harbour town sits at the mouth of a wide river, where fishing boats come in with the tide.
In the morning the market opens early, and the smell of bread and salt fills the narrow streets.
Most of the houses were built of grey stone more than two hundred years ago, after a great fire.

The old lighthouse stands on a rock to the north of the harbour. It was built in the last years
of the eighteenth century and rebuilt after a storm damaged the tower. The light can be seen from
far out at sea, and it still guides the boats home on dark winter nights.

Farmers from the valley bring their cattle to the town twice a year. The fair lasts for three
days, with music in the square, games for the children and long tables of food. Visitors come
from the cities to walk along the cliffs, to watch the birds and to swim in the cold clear water.

The river flows north through the valley before it reaches the sea. Along its banks there are
mills, small farms and a railway line that was opened in the year the school was founded. The
school has grown since then, and today it teaches children from every village in the valley.

In the evening the streets are quiet again. The boats rest in the harbour, the lamps are lit one
by one, and the sound of the sea fills the town until the morning market opens once more.
"""
VOCAB = 320  # the tokenizer below has at most 300 entries


def make_tokenizer():
    from tiny_tokenizer import make_tiny_tokenizer

    return make_tiny_tokenizer(TEXT.splitlines())


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run_error(capsys, argv, *fragments):
    """Run the CLI expecting a user error: exit 2 and exactly one stderr line starting with error:."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]
