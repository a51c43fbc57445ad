"""The project's shape: no import cycles, a small harness/ top level, and cheap imports where promised."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("formulas", "harness")
MAX_HARNESS_TOP_LEVEL_FILES = 8


def _modules():
    """{dotted module name: path} of every Python file in the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for fn in files:
                if fn.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, fn), ROOT)[:-3].replace(os.sep, ".")
                    out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, fn)
    return out


def _imports(name, path, modules):
    """Project modules `name` imports anywhere in its file (deferred imports inside functions included)."""
    is_pkg = path.endswith("__init__.py")
    here = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = here
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return {m for m in found if m in modules and m != name}


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(n, stack):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m, stack)
                if c:
                    return c
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            c = visit(n, [])
            if c:
                return c
    return None


def test_no_import_cycles():
    modules = _modules()
    graph = {n: _imports(n, p, modules) for n, p in modules.items()}
    assert "harness.cli.plan" in graph["harness.cli"]  # the checker sees package-relative imports
    assert _cycle(graph) is None, " → ".join(_cycle(graph))


def test_cycle_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_harness_top_level_is_small():
    top = [f for f in os.listdir(os.path.join(ROOT, "harness")) if f.endswith(".py")]
    assert len(top) <= MAX_HARNESS_TOP_LEVEL_FILES, sorted(top)


def test_formulas_import_neither_torch_nor_harness():
    for name, path in _modules().items():
        if name.startswith("formulas"):
            tree = ast.parse(open(path, encoding="utf-8").read())
            names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
            assert not {m for m in names if m.split(".")[0] in ("torch", "transformers", "harness")}, name


@pytest.mark.parametrize("argv", [
    ["--version"],
    ["predict", "--model", "gpt2", "--json"],
    ["predict", "--model", "Llama-3.1-70B", "--mode", "train", "--method", "qlora", "--json"],
    ["plan", "--model", "Llama-3.1-70B", "--mode", "train", "--method", "qlora", "--gpu", "4090", "--tokens", "1B",
     "--deadline", "1d", "--json"],
], ids=["version", "predict", "predict-qlora", "plan"])
def test_cheap_commands_import_nothing_heavy(argv):
    """predict, plan and --version answer without torch, transformers, huggingface_hub, pandas, numpy or yaml."""
    code = ("import sys; from harness.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'huggingface_hub', 'pandas', 'numpy', 'yaml')\n"
            "         if m in sys.modules]\n"
            "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_version(capsys):
    from harness import __version__
    from harness.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"vramlab {__version__}"
