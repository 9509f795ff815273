"""The documentation stays true to the code, on README.md and every page of docs/:

- docs/api.md is what scripts/gen_api_docs.py makes from the docstrings;
- every `quantkit ...` command (in shell blocks and in the prose) parses with the real CLI, with
  real flags and valid scheme strings, and every `--flag` in the prose is a real option;
- every `python benchmarks/X.py --flag` / `bash scripts/Y.sh` names a real script and its flags;
- the `qk.` names used exist, and every `qk.f(...)` call in the Python examples fits the real
  signature (no removed keyword arguments), with valid method, transform and scheme names;
- relative links and their anchors resolve;
- README.md stays a short tour: the two commands for a fresh machine (the test one is what
  `.ci/run` runs), one results table (the same as docs/results.md's, with its command), and a
  link to every page of docs/.

docs/api.md and docs/benchmarks.md are generated; the command and example checks skip them (the
reference is checked against the code as a whole, and the benchmark tables are written by the
scripts), the name and link checks cover them too.
"""
from __future__ import annotations

import ast
import difflib
import functools
import importlib
import importlib.util
import inspect
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDE = DOCS / "guide.md"
README = ROOT / "README.md"
GENERATED = ("api.md", "benchmarks.md")

PAGES = [README] + sorted(DOCS.glob("*.md"))  # every page, generated ones included
WRITTEN = [p for p in PAGES if p.name not in GENERATED]  # the pages people write

# Where the long README sections went when it became a short tour; the README links each.
MOVED = {
    "docs/guide.md": "6. Models, sources and what evaluation measures",
    "docs/gptq.md": "GPTQ and calibration",
    "docs/gguf.md": "Measured against llama.cpp",
    "docs/activation-quantization.md": "Measured on SmolLM2",
    "docs/training.md": "Measured",
    "docs/mixed-precision.md": "Measured on SmolLM2 (`python benchmarks/mixed_precision.py --gptq --sensitivity sens.json`)",
    "docs/ecosystem.md": "Quantize while loading, in transformers",
    "docs/schemes.md": "Scheme grammar",
    "docs/results.md": "Against the peers",
    "docs/layout.md": "Layout of the code",
    "docs/reliability.md": "Reliability: your data, and no garbage",
}
README_MAX_LINES = 200
LAZY_NAMES = ("QuantkitConfig", "QuantkitHfQuantizer")  # quantkit.__getattr__ (transformers integration)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def pages(which):
    return pytest.mark.parametrize("page", which, ids=rel)


# ----------------------------------------------------------------------------- helpers
def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every ``` fenced block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL)]


def prose(text: str) -> str:
    """The text with fenced blocks removed."""
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def code_spans(text: str) -> list[str]:
    """Inline `code` spans of the prose (a span may wrap onto the next line of its paragraph)."""
    return [s for s in re.findall(r"`([^`]+)`", prose(text)) if "\n\n" not in s]


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


def page_shell_commands(path: Path) -> list[str]:
    cmds = []
    for lang, body in fenced_blocks(path.read_text()):
        if lang in ("", "bash", "sh", "shell", "console"):
            cmds += shell_commands(body)
    return cmds


def quantkit_argv(command: str) -> list[str] | None:
    """The arguments after `quantkit` (or `.venv/bin/quantkit`), comments stripped; None if the
    line is not a quantkit command."""
    words = shlex.split(command, comments=True)
    if not words or not re.fullmatch(r"(\S*/)?quantkit", words[0]):
        return None
    return words[1:]


def page_commands(path: Path) -> list[list[str]]:
    """Every `quantkit ...` command of the page's shell blocks, as argv."""
    return [a for a in map(quantkit_argv, page_shell_commands(path)) if a is not None]


def guide_commands() -> list[list[str]]:
    return page_commands(GUIDE)


def script_of(words: list[str]) -> tuple[str, list[str]] | None:
    """For `python benchmarks/x.py ARGS`, `bash scripts/y.sh ARGS` or `benchmarks/x.py ARGS`:
    (the script's path, ARGS); None for anything else."""
    if words and re.fullmatch(r"(\S*/)?(python[\d.]*|bash|sh)", words[0]):
        words = words[1:]
    if words and re.fullmatch(r"(benchmarks|scripts|\.ci)/[\w./-]+", words[0]) and "/" in words[0]:
        return words[0], words[1:]
    return None


def is_other_program(words: list[str]) -> bool:
    """A span or line that runs some other program (python, bash, pytest, pip, git...), whose
    flags are not quantkit's."""
    return bool(words) and bool(re.fullmatch(r"(\S*/)?(python[\d.]*|bash|sh|pytest|pip|git|ninja)", words[0]))


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    h = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return h.replace(" ", "-")


def headings(path: Path) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(path.read_text()), re.MULTILINE)]


@functools.lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    text = prose(path.read_text())
    found, seen = set(), {}
    for h in headings(path):
        s = slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        found.add(s if n == 0 else f"{s}-{n}")
    found.update(re.findall(r'<a\s+(?:id|name)="([^"]+)"', text))
    return frozenset(found)


def section(path: Path, heading: str) -> str:
    """The text under a `## heading` up to the next heading of that level or above."""
    text = path.read_text()
    m = re.search(rf"^(#+)\s+{re.escape(heading)}\s*$", text, re.MULTILINE)
    assert m, f"{rel(path)} has no heading {heading!r}"
    end = re.search(rf"^#{{1,{len(m.group(1))}}}\s", text[m.end():], re.MULTILINE)
    return text[m.end():m.end() + end.start() if end else len(text)]


@pytest.fixture(scope="module")
def parser():
    from quantkit.cli import build_parser

    return build_parser()


def subparsers(parser):
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def all_flags(parser) -> set[str]:
    flags = set(parser._option_string_actions)
    for sp in subparsers(parser).values():
        flags |= set(sp._option_string_actions)
    return flags


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


# ----------------------------------------------------------------------------- commands
def test_guide_has_commands():
    assert len(guide_commands()) >= 20


def test_readme_has_commands():
    assert len(page_commands(README)) >= 8


@pages(WRITTEN)
def test_commands_parse(page, parser):
    """Each command names a real subcommand, uses only its flags, and parses as a whole
    (choices such as --gguf TYPE and --head included); its --scheme / --schemes are valid."""
    from quantkit import parse_scheme

    subs = subparsers(parser)
    for argv in page_commands(page):
        assert argv and argv[0] in subs, f"unknown subcommand in {rel(page)}: quantkit {' '.join(argv)}"
        known = set(subs[argv[0]]._option_string_actions)
        for w in argv[1:]:
            if w.startswith("--"):
                assert w.split("=")[0] in known, f"quantkit {argv[0]} has no option {w} ({rel(page)})"
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"quantkit {' '.join(argv)} ({rel(page)}) does not parse")
        for name in ("scheme", "schemes", "merge_scheme"):
            value = getattr(args, name, None)
            if isinstance(value, str):
                for s in value.split(","):
                    parse_scheme(s)  # SchemeError names what is valid


@pages(WRITTEN)
def test_inline_commands_exist(page, parser):
    """`quantkit SUB --flag ...` in the prose names a real subcommand and real flags."""
    subs = subparsers(parser)
    spans = [s for s in code_spans(page.read_text()) if re.match(r"quantkit\s", s)]
    if page == GUIDE:
        assert spans
    if not spans:
        pytest.skip(f"no `quantkit ...` span in {rel(page)}")
    for span in spans:
        words = span.split()
        assert words[1] in subs, f"unknown subcommand in `{span}` ({rel(page)})"
        known = set(subs[words[1]]._option_string_actions)
        for w in words[2:]:
            if w.startswith("--"):
                assert w.split("=")[0] in known, f"quantkit {words[1]} has no option {w} (`{span}` in {rel(page)})"


@pages(WRITTEN)
def test_flags_in_prose_exist(page, parser):
    """Every `--flag` in the prose belongs to some quantkit subcommand, or, in a span that runs
    a script (`python benchmarks/x.py --rounds 3`), to that script."""
    flags = all_flags(parser)
    for span in code_spans(page.read_text()):
        try:
            words = shlex.split(span)
        except ValueError:
            words = span.split()
        if script_of(words) or is_other_program(words):
            continue  # test_script_commands_are_real checks the scripts' flags
        for f in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", span):
            assert f in flags, f"{f} (in `{span}`, {rel(page)}) is no quantkit option"


@pages(WRITTEN)
def test_script_commands_are_real(page):
    """`python benchmarks/x.py --flag`, `bash scripts/y.sh` (in shell blocks and in the prose):
    the script exists and defines every flag given to it."""
    lines = page_shell_commands(page) + code_spans(page.read_text())
    found = 0
    for line in lines:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        # a shell line may chain commands: `bash scripts/setup.sh --dev && .venv/bin/python -m pytest`
        for part in " ".join(shlex.quote(w) for w in words).split(" '&&' "):
            got = script_of(shlex.split(part))
            if got is None:
                continue
            script, args = got
            path = ROOT / script
            assert path.is_file(), f"{rel(page)}: `{line}` runs {script}, which does not exist"
            found += 1
            source = path.read_text()
            for w in args:
                if w.startswith("--"):
                    flag = w.split("=")[0]
                    quoted = rf"""["']{re.escape(flag)}["'=\s]"""  # ap.add_argument("--rounds", ...)
                    pattern = quoted if path.suffix == ".py" else rf"{re.escape(flag)}(?![\w-])"  # case "$1" in --dev)
                    assert re.search(pattern, source), f"{rel(page)}: {script} has no option {flag} (`{line}`)"
    if not found:
        pytest.skip(f"no script command in {rel(page)}")


# ----------------------------------------------------------------------------- Python
@pages(PAGES)
def test_python_names_exist(page):
    import quantkit

    text = page.read_text()
    for name in sorted(set(re.findall(r"\bqk\.([A-Za-z_]\w*)", text))):
        assert name in quantkit.__all__ or name in LAZY_NAMES + ("train",), \
            f"qk.{name} ({rel(page)}) is not part of quantkit's API"
    for lang, body in fenced_blocks(text):
        if lang == "python":
            for name in re.findall(r"from quantkit import (\w+)", body):
                assert name in quantkit.__all__ or name in LAZY_NAMES, f"{name} ({rel(page)}) is not in quantkit"


def python_snippets(page: Path) -> list[tuple[str, ast.AST]]:
    """(source, tree) of every python block (which must parse) and every inline span that parses
    as a Python expression calling something."""
    out = []
    for lang, body in fenced_blocks(page.read_text()):
        if lang in ("python", "py"):
            try:
                out.append((body, ast.parse(body)))
            except SyntaxError as e:
                pytest.fail(f"{rel(page)}: a python example does not parse ({e}):\n{body}")
    for span in code_spans(page.read_text()):
        if "(" in span and ("qk." in span or "Config(" in span):
            try:
                out.append((span, ast.parse(span.replace("\n", " "), mode="eval")))
            except SyntaxError:
                pass
    return out


def _resolve(node: ast.AST, names: dict):
    """The quantkit object a call's function names (qk.x.y or a name imported from quantkit)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in names:
        return None
    obj = names[node.id]
    for p in reversed(parts):
        if not hasattr(obj, p) and inspect.ismodule(obj):
            importlib.import_module(f"{obj.__name__}.{p}")
        obj = getattr(obj, p)
    return obj


def _imports(tree: ast.AST) -> dict:
    import quantkit

    names = {"qk": quantkit}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "quantkit":
            mod = importlib.import_module(node.module)
            for a in node.names:
                names[a.asname or a.name] = getattr(mod, a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "quantkit":
                    names[a.asname or a.name] = importlib.import_module(a.name)
    return names


@pages(WRITTEN)
def test_python_calls_fit_the_api(page):
    """Every call of a quantkit function or class in the examples binds to its real signature
    (so removed keyword arguments such as `smooth=` or `damp=` on qk.quantize fail here), and
    the method, transform and scheme names it passes are registered / valid."""
    import quantkit as qk

    snippets = python_snippets(page)
    if not snippets:
        pytest.skip(f"no Python example in {rel(page)}")
    calls = 0
    for src, tree in snippets:
        names = _imports(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            fn = _resolve(node.func, names)
            if fn is None or not callable(fn):
                continue
            calls += 1
            where = f"{rel(page)}: {ast.unparse(node)}"
            if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                continue
            try:
                sig = inspect.signature(fn)
            except (TypeError, ValueError):
                continue
            try:
                sig.bind_partial(*[None] * len(node.args), **{k.arg: None for k in node.keywords})
            except TypeError as e:
                pytest.fail(f"{where}: does not fit {getattr(fn, '__name__', fn)}{sig} ({e})")
            kw = {k.arg: k.value for k in node.keywords}
            method = kw.get("method")
            if isinstance(method, ast.Constant) and isinstance(method.value, str):
                assert method.value in qk.METHODS, f"{where}: method {method.value!r} is not in qk.METHODS"
            transforms = kw.get("transforms")
            if isinstance(transforms, (ast.List, ast.Tuple)):
                for t in transforms.elts:
                    if isinstance(t, ast.Constant):
                        assert t.value in qk.TRANSFORMS, f"{where}: transform {t.value!r} is not in qk.TRANSFORMS"
            if fn in (qk.quantize, qk.prepare_qat, qk.prepare_qlora):
                scheme = node.args[1] if len(node.args) > 1 else kw.get("scheme")
                if isinstance(scheme, ast.Constant) and isinstance(scheme.value, str):
                    qk.parse_scheme(scheme.value)
            if isinstance(fn, type) and issubclass(fn, (qk.Method, qk.Transform)):
                try:  # options are validated where the instance is built
                    options = dict(zip(sig.parameters, map(ast.literal_eval, node.args)))
                    options.update({k: ast.literal_eval(v) for k, v in kw.items()})
                except ValueError:
                    continue  # an option that is no literal
                fn(**options)
    assert calls, f"{rel(page)}: its Python examples call nothing of quantkit's"


# ----------------------------------------------------------------------------- links
@pages(PAGES)
def test_relative_links_resolve(page):
    text = prose(page.read_text())
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    if page.name == "benchmarks.md" and not links:
        pytest.skip("docs/benchmarks.md (generated by the benchmark scripts) has no links")
    assert links, f"{rel(page)} links nowhere"
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        target, _, frag = link.partition("#")
        file = (page.parent / target).resolve() if target else page
        assert file.exists(), f"{rel(page)}: link {link} points to a missing file"
        if frag and file.suffix == ".md":
            assert frag in anchors(file), f"{rel(page)}: link {link}: no heading or anchor #{frag} in {file.name}"


# ----------------------------------------------------------------------------- README
def readme_links() -> set[str]:
    return {link.partition("#")[0] for link in re.findall(r"\]\(([^)\s]+)\)", prose(README.read_text()))}


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; keep it a short tour (at most {README_MAX_LINES}) " \
                                  "and move details into docs/"


def test_readme_links_the_pages_it_moved_content_into():
    """Each long section that left the README sits under its heading on a docs page, and the
    README links that page."""
    links = readme_links()
    for page, heading in MOVED.items():
        path = ROOT / page
        assert path.is_file(), f"{page} is missing"
        assert heading in headings(path), f"{page} has no heading {heading!r}"
        assert page in links, f"README.md does not link {page}"


def test_readme_links_every_docs_page():
    links = readme_links()
    for path in sorted(DOCS.glob("*.md")):
        assert rel(path) in links, f"README.md does not link {rel(path)}"


def test_readme_two_commands_are_what_ci_runs():
    """The section "Two commands on a fresh machine": one sets up and runs the main job, the other
    sets up and runs the tests, and the second is exactly what .ci/run runs."""
    blocks = [b for lang, b in fenced_blocks(section(README, "Two commands on a fresh machine")) if lang == "bash"]
    assert len(blocks) == 1
    cmds = [shlex.split(c, comments=True) for c in shell_commands(blocks[0])]
    assert len(cmds) == 2
    main, tests = (" ".join(c) for c in cmds)
    assert main.startswith("bash scripts/setup.sh && ") and "quantkit demo" in main
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    assert ci == [tests], f".ci/run runs {ci}, README's test command is {tests!r}"
    assert "-m pytest" in tests and "--dev" in tests


def results_table(text: str) -> tuple[str, list[str]]:
    """The `quantkit compare` command and the rows of the table after it."""
    m = re.search(r"```bash\n(\.venv/bin/quantkit compare .*?)```\n\n((?:\|[^\n]*\n)+)", text, re.DOTALL)
    assert m, "no `quantkit compare` command followed by its table"
    return m.group(1), m.group(2).splitlines()


def test_readme_results_table_is_the_results_pages():
    """README.md shows one measured table with the command that measured it, the same as in
    docs/results.md."""
    cmd, rows = results_table(section(README, "Measured results"))
    assert len(rows) >= 4
    assert results_table((DOCS / "results.md").read_text()) == (cmd, rows)
    assert quantkit_argv(shell_commands(cmd)[0])[0] == "compare"
