"""The docs name only what exists: every path, module, class, function and command option that
README.md, CONTRIBUTING.md and docs/*.md cite is in the repository, every result file they quote
is in benchmarks/results/, and benchmarks/results/ holds nothing they do not quote."""

import ast
import builtins
import importlib
import re
from pathlib import Path

import pytest

from kvbudget.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = ROOT / "benchmarks" / "results"

# Names the docs cite from other projects (transformers, torch, the OpenAI client).
OUTSIDE = {"Cache", "DynamicLayer", "QuantizedLayer", "RMSNorm", "OpenAI", "AutoModelForCausalLM", "AutoTokenizer",
           "from_pretrained", "apply_chat_template", "generate", "forward", "act_fn", "gate_proj", "up_proj",
           "exp2", "token_urlsafe", "max_memory_allocated", "sdpa", "eager"}
FILE_TYPES = {"py", "sh", "md", "json", "jsonl", "txt", "png", "toml", "sqlite", "html", "kvb"}
OUTSIDE_MODULES = ("torch", "triton", "tl", "transformers", "secrets", "model", "tok", "openai", "np", "math", "F")
# A path as the docs write it: under one of the repository's top folders.
PATH = re.compile(r"(?<![\w/.-])((?:src|benchmarks|tests|docs)/[\w./*-]*\w)")
# A source file named by its last parts only (`serve/auth.py`, `fused.py`).
SHORT_FILE = re.compile(r"(?<![\w/.-])([\w-]+(?:/[\w-]+)*\.(?:py|sh))\b")
MODULE = re.compile(r"\bkvbudget((?:\.\w+)+)")
CODE = re.compile(r"`([^`\n]+)`")
# A code span that is one Python reference: a dotted name, maybe called.
REFERENCE = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(\(.*\))?$")


def _lines():
    for doc in DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            yield f"{doc.relative_to(ROOT)}:{n}", line


def _tracked() -> list[str]:
    return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts
            and "__pycache__" not in p.parts and not str(p.relative_to(ROOT)).startswith(".")]


def _defined() -> set[str]:
    """Every class, function, method, module and assigned name in src/, tests/ and benchmarks/."""
    names = set(dir(builtins))
    for path in [*ROOT.joinpath("src").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py"),
                 *ROOT.joinpath("benchmarks").glob("*.py")]:
        names.add(path.stem)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            for t in targets:
                if isinstance(t, ast.Name):
                    names.add(t.id)
                elif isinstance(t, ast.Attribute):
                    names.add(t.attr)
            if isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def test_paths_the_docs_name_exist():
    files = _tracked()
    missing = []
    for where, line in _lines():
        for m in PATH.finditer(line):
            if not list(ROOT.glob(m.group(1))):
                missing.append(f"{where}: {m.group(1)}")
        for m in SHORT_FILE.finditer(line):
            name = m.group(1)
            if not name.startswith(("src/", "benchmarks/", "tests/", "docs/")) and \
                    not any(f == name or f.endswith("/" + name) for f in files):
                missing.append(f"{where}: {name}")
    assert not missing, "docs name files that do not exist:\n" + "\n".join(missing)


def test_modules_the_docs_name_import():
    missing = []
    for where, line in _lines():
        for m in MODULE.finditer(line):
            module, obj = "kvbudget", importlib.import_module("kvbudget")
            for part in m.group(1).strip(".").split("."):
                try:
                    obj = importlib.import_module(f"{module}.{part}")
                except ModuleNotFoundError:
                    if not hasattr(obj, part):
                        missing.append(f"{where}: kvbudget{m.group(1)}")
                        break
                    obj = getattr(obj, part)
                module += f".{part}"
        for name in re.findall(r"\bkb\.(\w+)", line):  # `import kvbudget as kb`
            if not hasattr(importlib.import_module("kvbudget"), name):
                missing.append(f"{where}: kb.{name}")
    assert not missing, "docs name modules or attributes that do not exist:\n" + "\n".join(missing)


def test_classes_and_functions_the_docs_name_exist():
    """A code span that is one Python name (``Policy``, ``obs.attention_sum()``, ``make_policy()``)
    names something defined in the repository or in a library the docs say it comes from."""
    defined = _defined() | OUTSIDE
    missing = []
    for where, line in _lines():
        for span in CODE.findall(line):
            m = REFERENCE.match(span.strip())
            if not m or m.group(1).split(".")[0] in OUTSIDE_MODULES:
                continue
            parts = m.group(1).split(".")
            if parts[0] == "kvbudget" or parts[-1] in FILE_TYPES:
                continue  # modules and files have tests of their own
            # Checked: class names, the attribute of a class (`Policy.compress`) and what is
            # called (`make_policy(...)`); plain words (`full`, `snapkv`: names of policies and
            # options; error codes) are not Python references.
            checked = [p for p in parts if p[0].isupper() and not p.isupper()]
            if m.group(2) or parts[0][0].isupper() and len(parts) > 1:
                checked.append(parts[-1])
            missing += [f"{where}: {p} in `{span}`" for p in checked if p not in defined]
    assert not missing, "docs name classes or functions that do not exist:\n" + "\n".join(missing)


def _commands() -> dict[str, set[str]]:
    """The options of each `kvbudget` command (``tasks make`` for the nested one)."""
    out = {}

    def walk(parser, prefix: str) -> None:
        for action in parser._actions:
            if action.choices and isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    out[f"{prefix}{name}"] = {o for a in sub._actions for o in a.option_strings}
                    walk(sub, f"{prefix}{name} ")

    walk(build_parser(), "")
    return out


def test_commands_the_docs_give_take_their_options():
    """Every ``--option`` of a ``kvbudget ...`` or ``python benchmarks/x.py ...`` command in the
    docs is one that command has."""
    commands = _commands()
    flags = re.compile(r"(?<!\S)(--[a-z][a-z0-9-]*)")
    missing = []
    for doc in [*DOCS, ROOT / "Makefile"]:
        text = doc.read_text().replace("\\\n", " ")  # continued shell lines
        for n, line in enumerate(text.splitlines(), 1):
            for m in re.finditer(r"kvbudget (tasks make|[a-z]+)((?: +[^\s`|;#)]+)*)", line):
                if m.group(1) in commands:
                    missing += [f"{doc.name}:{n}: kvbudget {m.group(1)} {f}" for f in flags.findall(m.group(2))
                                if f not in commands[m.group(1)]]
            for m in re.finditer(r"(benchmarks/\w+\.py)((?: +[^\s`|;#]+)*)", line):
                source = _script_source(ROOT / m.group(1))
                missing += [f"{doc.name}:{n}: {m.group(1)} {f}" for f in flags.findall(m.group(2))
                            if f'"{f}"' not in source and f"'{f}'" not in source]
    assert not missing, "docs give options their commands do not take:\n" + "\n".join(missing)


def _script_source(script: Path) -> str:
    """A benchmark script's source with that of the sibling benchmark modules it imports (shared
    argument definitions live there)."""
    if not script.exists():
        return ""
    source = script.read_text()
    for name in re.findall(r"^(?:from|import) (\w+)", source, flags=re.M):
        sibling = script.parent / f"{name}.py"
        if sibling.exists():
            source += sibling.read_text()
    return source


def _quoted_results() -> set[str]:
    """The files under benchmarks/results/ the docs quote (a folder quoted stands for its files)."""
    quoted = set()
    for _, line in _lines():
        for m in PATH.finditer(line):
            path = m.group(1)
            if path.startswith("benchmarks/results/"):
                quoted.add(path.rstrip("/"))
    return quoted


def test_result_files_are_quoted_and_exist():
    quoted = _quoted_results()
    unquoted = []
    for path in sorted(RESULTS.rglob("*")):
        rel = str(path.relative_to(ROOT))
        if path.is_file() and not any(rel == q or rel.startswith(q + "/") for q in quoted):
            unquoted.append(rel)
    assert not unquoted, "benchmarks/results/ holds files no doc quotes:\n" + "\n".join(unquoted)


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_docs_hold_no_history(doc):
    text = doc.read_text()
    found = re.findall(r"(?i)\b(?:session \d+|(?:first|second|third|\w+th) session|used to be)\b|\b[0-9a-f]{7,40}\b"
                       r"(?=[\s,.)])", text)
    found = [f for f in found if not f.isdigit()]
    assert not found, f"{doc.name} tells history: {found}"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_bytes()) <= 12 * 1024
