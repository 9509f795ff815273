"""Generate docs/api.md, the API reference, from the docstrings (stdlib `inspect` only).

    python scripts/gen_api_docs.py           # write docs/api.md
    python scripts/gen_api_docs.py --check   # exit 1 if docs/api.md is out of date

What it covers: the names in `quantkit.__all__` (in that order), then the main public modules
(MODULES below), each with its `__all__` or, without one, the public functions and classes
defined in it, in source order. An object documented once is linked, not repeated. The output
is deterministic: no memory addresses, no absolute paths, annotations as written in the source.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import inspect
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "api.md"

# (module, one-line role) in the order they appear in the reference
MODULES = (
    ("quantkit", "the Python API (`import quantkit as qk`)"),
    ("quantkit.scheme", "the scheme grammar: `Scheme`, `parse_scheme`"),
    ("quantkit.config", "what to quantize how: `QuantConfig`, mixed-precision `Rule`s, `make_config`"),
    ("quantkit.formats", "codecs: float weight -> `QuantizedWeight` and back; the `FORMATS` registry"),
    ("quantkit.algorithms", "weight methods and block transforms, one file each: the `METHODS` and `TRANSFORMS` registries"),
    ("quantkit.modules", "model surgery: the one walk over quantizable layers (`iter_targets`), head, tied tensors"),
    ("quantkit.data", "text sources, the evaluation / calibration split, calibration samples"),
    ("quantkit.io.load", "any model source -> model and tokenizer"),
    ("quantkit.io.checkpoint", "quantkit's safetensors checkpoint layout"),
    ("quantkit.io.gguf", "GGUF export for llama.cpp"),
    ("quantkit.io.export_hf", "GPTQ and compressed-tensors checkpoint export"),
    ("quantkit.io.hf", "transformers integration: quantize on load, save_pretrained / from_pretrained"),
    ("quantkit.io.hf_config", "`QuantkitConfig`, and the seed users' bitsandbytes / GPTQ configs translated key for key"),
    ("quantkit.evaluate", "quality, speed and size measurements"),
    ("quantkit.evaluate.run", "`evaluate_model`, behind `quantkit.evaluate`"),
    ("quantkit.observers", "activation range observers for static w8a8"),
    ("quantkit.plan", "per-layer sensitivity and mixed-precision plans"),
    ("quantkit.train", "QAT, QLoRA, 8-bit AdamW and the training loop"),
)
# module-level registries: shown as their keys (their values hold objects whose repr has addresses)
REGISTRIES = {"quantkit.formats": ("FORMATS",), "quantkit.algorithms": ("METHODS", "TRANSFORMS")}
# names a module exports lazily through __getattr__ (documented where they are defined)
LAZY = {"quantkit": ("QuantkitConfig", "QuantkitHfQuantizer")}
LAZY_HOME = {"QuantkitConfig": "quantkit.io.hf_config", "QuantkitHfQuantizer": "quantkit.io.hf"}  # where each is defined

_ADDR = re.compile(r" at 0x[0-9a-fA-F]+")
_CONST_TYPES = (str, int, float, bool, tuple, frozenset)


def anchor(*parts: str) -> str:
    """A stable HTML anchor for an object: its dotted name with every other character a dash,
    case kept (`quantkit.Scheme` and the module `quantkit.scheme` differ only in case, so
    modules get their own prefix, see `module_anchor`)."""
    return "-".join(re.sub(r"[^A-Za-z0-9]+", "-", p).strip("-") for p in parts)


def module_anchor(name: str) -> str:
    return "module-" + anchor(name)


class _Raw:
    """An annotation or default shown exactly as the source wrote it."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def stable_repr(v) -> str:
    """repr with sets in sorted order (their iteration order depends on PYTHONHASHSEED)."""
    if isinstance(v, (set, frozenset)) and v:
        items = ", ".join(sorted(map(stable_repr, v)))
        return f"frozenset({{{items}}})" if isinstance(v, frozenset) else f"{{{items}}}"
    return clean(repr(v))


def clean(text: str) -> str:
    """Strip memory addresses and the repository's absolute path from a repr."""
    text = _ADDR.sub("", text)
    return text.replace(str(REPO) + "/", "").replace(str(Path.home()), "~")


def _annotation(a):
    if a is inspect.Parameter.empty:
        return a
    if isinstance(a, str):
        return _Raw(a[1:-1] if len(a) > 1 and a[0] == a[-1] and a[0] in "'\"" else a)
    return _Raw(clean(inspect.formatannotation(a)))


def signature(obj, name: str) -> str | None:
    """`name(params) -> ret` with source-form annotations and cleaned default reprs (None
    when there is nothing to show, e.g. a Protocol's `(*args, **kwargs)`)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    if [p.kind for p in sig.parameters.values()] == [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]:
        return None
    if inspect.isclass(obj):
        owner = next((k for k in obj.__mro__ if "__init__" in vars(k) or "__new__" in vars(k)), object)
        if not owner.__module__.startswith("quantkit"):
            return None  # a constructor inherited from another package: its signature is that package's
        sig = sig.replace(return_annotation=inspect.Signature.empty)
    params = []
    for p in sig.parameters.values():
        default = p.default if p.default is inspect.Parameter.empty else _Raw(stable_repr(p.default))
        params.append(p.replace(annotation=_annotation(p.annotation), default=default))
    sig = sig.replace(parameters=params, return_annotation=_annotation(sig.return_annotation))
    return f"{name}{sig}"


def docstring(obj) -> str | None:
    """The object's own docstring (never one inherited from a base class) as Markdown."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if isinstance(obj, type) and dataclasses.is_dataclass(obj) and doc and re.match(rf"{obj.__name__}\(", doc):
        return None  # the generated "Name(field: type, ...)" text is not documentation
    if not isinstance(doc, str) or not doc.strip():
        return None
    return to_markdown(doc, module=inspect.ismodule(obj))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def to_markdown(doc: str, module: bool = False) -> str:
    """Docstring -> Markdown: prose as is; a paragraph indented deeper than the prose around it
    (an example, a grammar, a table) becomes a fenced block, since Markdown would reflow it.

    The prose indentation is 0 for a module docstring (written at column 0) and otherwise the
    smallest indentation of the lines after the first, as `inspect.cleandoc` takes it."""
    lines = doc.expandtabs().split("\n")
    first, body = lines[0].strip(), lines[1:]
    if module:
        base = 0
    else:
        ind = [_indent(ln) for ln in body if ln.strip()]
        base = min(ind) if ind else 0
    paras: list[list[str]] = []
    cur: list[str] = [first] if first else []
    for ln in body:
        if ln.strip():
            cur.append(ln[base:] if _indent(ln) >= base else ln.lstrip())
        elif cur:
            paras.append(cur)
            cur = []
    if cur:
        paras.append(cur)
    out = []
    for p in paras:
        if all(_indent(ln) >= 4 for ln in p):
            strip = min(_indent(ln) for ln in p)
            out.append("```text\n" + "\n".join(ln[strip:].rstrip() for ln in p) + "\n```")
        else:
            text = "\n".join(ln.rstrip() for ln in p)
            out.append(text[:-1] if text.endswith("::") else text)
    return "\n\n".join(out)


def _line(obj) -> int:
    try:
        return inspect.getsourcelines(inspect.unwrap(obj))[1]
    except (OSError, TypeError):
        return 10**9


def public_names(mod) -> list[str]:
    """`__all__`, or the public functions and classes defined in the module, in source order."""
    if hasattr(mod, "__all__"):
        return list(mod.__all__)
    names = [n for n, v in vars(mod).items()
             if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
             and getattr(v, "__module__", None) == mod.__name__]
    return sorted(names, key=lambda n: (_line(getattr(mod, n)), n))


def constants(mod) -> list[tuple[str, str]]:
    """Public UPPER_CASE constants defined in the module with a short, address-free repr."""
    out = []
    src = inspect.getsource(mod)
    for n, v in vars(mod).items():
        if not n.isupper() or n.startswith("_") or not isinstance(v, _CONST_TYPES):
            continue
        if not re.search(rf"^{n}\s*(:[^=]*)?=", src, re.MULTILINE):
            continue  # imported from elsewhere
        r = stable_repr(v)
        if len(r) <= 240:
            out.append((n, r))
    return out


def members(cls) -> list[tuple[str, object]]:
    """Public methods and properties the class itself defines, in source order."""
    out = []
    for n, v in vars(cls).items():
        if n.startswith("_"):
            continue
        if isinstance(v, (staticmethod, classmethod)):
            v = v.__func__
        if inspect.isfunction(v) or isinstance(v, property):
            out.append((n, v))
    return sorted(out, key=lambda nv: (_line(nv[1].fget if isinstance(nv[1], property) else nv[1]), nv[0]))


class Writer:
    def __init__(self):
        self.lines: list[str] = []
        self.seen: dict[int, tuple[str, str]] = {}  # id(obj) -> (qualified name, anchor)
        self.gaps: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def doc(self, obj, qual: str) -> None:
        d = docstring(obj)
        if d is None:
            self.gaps.append(qual)
            self.add("*No docstring.*", "")
        else:
            self.add(d, "")

    def entry(self, modname: str, name: str, obj) -> None:
        qual = f"{modname}.{name}"
        a = anchor(qual)
        key = id(obj)
        if key in self.seen and (inspect.isfunction(obj) or inspect.isclass(obj)):
            other, other_a = self.seen[key]
            self.add(f"### {qual}", f'<a id="{a}"></a>', "", f"The same object as [`{other}`](#{other_a}).", "")
            return
        if inspect.isfunction(obj) or inspect.isclass(obj):
            self.seen[key] = (qual, a)
        kind = "class" if inspect.isclass(obj) else ("function" if callable(obj) else "constant")
        self.add(f"### {qual}", f'<a id="{a}"></a>', "")
        if kind == "constant":
            self.add("```python", f"{name} = {stable_repr(obj)}", "```", "")
            return
        sig = signature(obj, name)
        if sig:
            self.add("```python", ("class " if kind == "class" else "") + sig, "```", "")
        defined = getattr(obj, "__module__", modname)
        if defined != modname:
            self.add(f"Defined in `{defined}`.", "")
        self.doc(obj, qual)
        if kind == "class":
            for mname, m in members(obj):
                self.add(f"#### {qual}.{mname}", f'<a id="{anchor(qual, mname)}"></a>', "")
                if isinstance(m, property):
                    self.add("*property*", "")
                    self.doc(m.fget or m, f"{qual}.{mname}")
                else:
                    s = signature(m, mname)
                    if s:
                        self.add("```python", s, "```", "")
                    self.doc(m, f"{qual}.{mname}")


def top_level() -> dict[str, object]:
    """quantkit.__all__'s objects. Importing the subpackage `quantkit.evaluate` rebinds the
    package attribute `quantkit.evaluate` (the function) to that module; when that has
    happened, the function is taken from a private execution of quantkit/__init__.py (its
    imports resolve to the modules already loaded, so every other object is the same)."""
    import quantkit

    top = {n: getattr(quantkit, n) for n in quantkit.__all__}
    shadowed = [n for n, v in top.items() if inspect.ismodule(v)]
    if shadowed:
        ns = {"__name__": "quantkit", "__package__": "quantkit", "__file__": quantkit.__file__,
              "__path__": list(quantkit.__path__)}
        src = Path(quantkit.__file__).read_text()
        src = src.replace("logging.getLogger(__name__).addHandler(logging.NullHandler())", "")
        exec(compile(src, quantkit.__file__, "exec"), ns)
        top.update({n: ns[n] for n in shadowed})
    return top


def render() -> tuple[str, list[str]]:
    """The whole of docs/api.md, and the names without a docstring."""
    w = Writer()
    top = top_level()
    mods = [(importlib.import_module(m), role) for m, role in MODULES]
    w.add("# quantkit API reference", "",
          "Generated from the docstrings by `python scripts/gen_api_docs.py`; do not edit by hand",
          "(`python scripts/gen_api_docs.py --check` fails when this file is out of date, and",
          "`tests/test_docs.py` runs that check). For how to choose a method and a scheme, see the",
          "[user guide](guide.md); the scheme strings are in [the grammar](#module-quantkit-scheme).", "",
          "## Contents", "")
    for mod, role in mods:
        w.add(f"- [`{mod.__name__}`](#{module_anchor(mod.__name__)}): {role}")
    w.add("")
    for mod, role in mods:
        name = mod.__name__
        w.add(f"## {name}", f'<a id="{module_anchor(name)}"></a>', "")
        d = docstring(mod)
        if d:
            w.add(d, "")
        names = public_names(mod)
        get = (lambda n: top[n]) if name == "quantkit" else (lambda n, mod=mod: getattr(mod, n))
        regs = REGISTRIES.get(name, ())
        for r in regs:
            reg = getattr(mod, r)
            if all(getattr(v, "summary", "") for v in reg.values()):
                w.add(f"`{r}` registers:", "", *(f"- `{k}`: {v.summary}" for k, v in sorted(reg.items())), "")
            else:
                w.add(f"`{r}` registers: " + ", ".join(f"`{k}`" for k in reg) + ".", "")
        names = [n for n in names if n not in regs]
        lazy = LAZY.get(name, ())
        if lazy:
            w.add("Also importable from here (loaded on first use, which registers quantkit with "
                  "transformers): " + ", ".join(f"[`{n}`](#{anchor(LAZY_HOME[n], n)})" for n in lazy) + ".", "")
        if names:
            w.add("| name | summary |", "|---|---|")
            for n in names:
                obj = get(n)
                d = docstring(obj) if callable(obj) else None
                summary = (d or "").split("\n\n")[0]
                summary = "" if summary.startswith("```") else summary.replace("\n", " ").replace("|", "\\|")
                if len(summary) > 140:
                    summary = summary[:137].rsplit(" ", 1)[0] + " ..."
                w.add(f"| [`{n}`](#{anchor(name, n)}) | {summary} |")
            w.add("")
        consts = [(n, r) for n, r in constants(mod) if n not in names and n not in regs]
        if consts:
            w.add("Constants:", "")
            for n, r in consts:
                w.add(f"- `{n} = {r}`")
            w.add("")
        for n in names:
            w.entry(name, n, get(n))
    text = "\n".join(w.lines).rstrip() + "\n"
    ids = re.findall(r'<a id="([^"]+)"></a>', text)
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise RuntimeError(f"duplicate anchors: {dup}")
    missing = sorted(set(re.findall(r"\]\(#([^)]+)\)", text)) - set(ids))
    if missing:
        raise RuntimeError(f"links to missing anchors: {missing}")
    return re.sub(r"\n{3,}", "\n\n", text), w.gaps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is out of date; write nothing")
    ap.add_argument("--gaps", action="store_true", help="also list public names without a docstring")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    text, gaps = render()
    if a.gaps:
        print("no docstring:", *gaps, sep="\n  ")
    if a.check:
        old = OUT.read_text() if OUT.is_file() else ""
        if old != text:
            diff = difflib.unified_diff(old.splitlines(), text.splitlines(), "docs/api.md", "generated", lineterm="", n=1)
            print("\n".join(list(diff)[:40]))
            print(f"{OUT.relative_to(REPO)} is out of date: run python scripts/gen_api_docs.py", file=sys.stderr)
            return 1
        print(f"{OUT.relative_to(REPO)} is up to date")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(REPO)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
