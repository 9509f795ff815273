"""The documentation stays true to the code: docs/api.md is what scripts/gen_api_docs.py makes
from the docstrings, every `quantkit ...` command in docs/guide.md parses with the real CLI,
the `qk.` names it uses exist, and its relative links and anchors resolve."""
from __future__ import annotations

import difflib
import functools
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDE = DOCS / "guide.md"


# ----------------------------------------------------------------------------- helpers
def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every ``` fenced block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL)]


def prose(text: str) -> str:
    """The text with fenced blocks removed."""
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def shell_commands(body: str) -> list[str]:
    """Logical lines of a shell block (backslash continuations joined, comments dropped)."""
    out, cur = [], ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        out.append(cur.strip())
        cur = ""
    return [c for c in out if c]


def quantkit_argv(command: str) -> list[str] | None:
    """The arguments after `quantkit` (or `.venv/bin/quantkit`), comments stripped; None if the
    line is not a quantkit command."""
    words = shlex.split(command, comments=True)
    if not words or not re.fullmatch(r"(\S*/)?quantkit", words[0]):
        return None
    return words[1:]


def guide_commands() -> list[list[str]]:
    text = GUIDE.read_text()
    cmds = []
    for lang, body in fenced_blocks(text):
        if lang in ("", "bash", "sh", "shell", "console"):
            cmds += [a for a in map(quantkit_argv, shell_commands(body)) if a is not None]
    return cmds


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    h = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return h.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    text = prose(path.read_text())
    found, seen = set(), {}
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        found.add(s if n == 0 else f"{s}-{n}")
    found.update(re.findall(r'<a\s+(?:id|name)="([^"]+)"', text))
    return frozenset(found)


@pytest.fixture(scope="module")
def parser():
    from quantkit.cli import build_parser

    return build_parser()


def subparsers(parser):
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


# ----------------------------------------------------------------------------- api.md
def test_api_reference_is_up_to_date():
    """What `python scripts/gen_api_docs.py --check` checks, in process."""
    spec = importlib.util.spec_from_file_location("gen_api_docs", ROOT / "scripts" / "gen_api_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text, _ = gen.render()
    old = (DOCS / "api.md").read_text()
    if text != old:
        diff = "\n".join(list(difflib.unified_diff(old.splitlines(), text.splitlines(), "docs/api.md", "generated",
                                                    lineterm="", n=1))[:30])
        pytest.fail(f"docs/api.md is out of date: run python scripts/gen_api_docs.py\n{diff}")


# ----------------------------------------------------------------------------- guide.md
def test_guide_has_commands():
    assert len(guide_commands()) >= 20


def test_guide_commands_parse(parser):
    """Each command names a real subcommand, uses only its flags, and parses as a whole
    (choices such as --gguf TYPE and --head included)."""
    subs = subparsers(parser)
    for argv in guide_commands():
        assert argv and argv[0] in subs, f"unknown subcommand in docs/guide.md: quantkit {' '.join(argv)}"
        known = set(subs[argv[0]]._option_string_actions)
        for w in argv[1:]:
            if w.startswith("--"):
                assert w.split("=")[0] in known, f"quantkit {argv[0]} has no option {w} (docs/guide.md)"
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"quantkit {' '.join(argv)} (docs/guide.md) does not parse")


def test_guide_inline_commands_exist(parser):
    """`quantkit SUB --flag ...` in the prose names a real subcommand and real flags."""
    subs = subparsers(parser)
    spans = re.findall(r"`(quantkit [^`]+)`", prose(GUIDE.read_text()))
    assert spans
    for span in spans:
        words = span.split()
        assert words[1] in subs, f"unknown subcommand in `{span}` (docs/guide.md)"
        known = set(subs[words[1]]._option_string_actions)
        for w in words[2:]:
            if w.startswith("--"):
                assert w.split("=")[0] in known, f"quantkit {words[1]} has no option {w} (`{span}` in docs/guide.md)"


def test_guide_flags_in_prose_exist(parser):
    """Every `--flag` in the guide's prose belongs to some subcommand."""
    flags = set()
    for sp in subparsers(parser).values():
        flags |= set(sp._option_string_actions)
    for span in re.findall(r"`([^`\n]+)`", prose(GUIDE.read_text())):
        for f in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", span):
            assert f in flags, f"{f} (in `{span}`, docs/guide.md) is no quantkit option"


def test_guide_python_names_exist():
    import quantkit

    text = GUIDE.read_text()
    for name in sorted(set(re.findall(r"\bqk\.([A-Za-z_]\w*)", text))):
        assert name in quantkit.__all__ or name in ("QuantkitConfig", "QuantkitHfQuantizer", "train"), \
            f"qk.{name} (docs/guide.md) is not part of quantkit's API"
    for lang, body in fenced_blocks(text):
        if lang == "python":
            for name in re.findall(r"from quantkit import (\w+)", body):
                assert name in quantkit.__all__ or name in ("QuantkitConfig", "QuantkitHfQuantizer")


@pytest.mark.parametrize("doc", ["guide.md", "api.md"])
def test_relative_links_resolve(doc):
    path = DOCS / doc
    text = prose(path.read_text())
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        target, _, frag = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{doc}: link {link} points to a missing file"
        if frag and file.suffix == ".md":
            assert frag in anchors(file), f"{doc}: link {link}: no heading or anchor #{frag} in {file.name}"
