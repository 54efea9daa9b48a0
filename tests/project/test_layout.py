"""Required layout and the one-way dependency rule: schemas <- topology <- workers;
training uses schemas; only opal (the CLI) wires everything."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from opal.cli import COMMANDS
from tests.support import REPO

LAYERS = ("schemas", "inference", "topology", "workers", "training", "opal")
ALLOWED = {
    "schemas": set(),
    "inference": {"schemas"},
    "topology": {"schemas"},
    "workers": {"schemas", "inference", "topology"},
    "training": {"schemas", "inference"},
    "opal": {"schemas", "inference", "topology", "workers", "training"},
}
# Shared code must import only what both environments have.
SHARED_THIRD_PARTY = {"pydantic", "pydantic_settings", "fastavro"}
# The inference client is shared too: both environments have httpx and Pillow.
INFERENCE_THIRD_PARTY = SHARED_THIRD_PARTY | {"httpx", "PIL"}


def test_required_top_level() -> None:
    for name in ("workers", "schemas", "training", "topology", "deploy", "tests"):
        assert (REPO / name).is_dir(), name
    for name in ("pyproject.toml", "README.md", "Makefile", ".ci/run"):
        assert (REPO / name).is_file(), name


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("layer", LAYERS)
def test_dependency_direction(layer: str) -> None:
    for f in (REPO / layer).rglob("*.py"):
        bad = (_imports(f) & set(LAYERS)) - ALLOWED[layer] - {layer}
        assert not bad, f"{f.relative_to(REPO)} imports {sorted(bad)}"


# The stream side's packages that shared code may import *inside a function* reached only on the stream side:
# schemas/registry.py builds confluent-kafka's schema-registry clients when a registry URL is configured.
SCHEMAS_STREAM_ONLY = {"confluent_kafka"}


def _executed_imports(path: Path) -> set[str]:
    """The top-level packages a module imports when it is imported: module level, outside ``if TYPE_CHECKING:``."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            node = ast.Module(body=node.orelse, type_ignores=[])
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


def test_schemas_import_only_shared_dependencies() -> None:
    """schemas/ loads in both environments: what importing a module runs needs only shared packages; a stream-only
    package (SCHEMAS_STREAM_ONLY) may be imported inside the function that needs it, nothing else."""
    import sys

    stdlib = set(sys.stdlib_module_names)
    for f in (REPO / "schemas").rglob("*.py"):
        third = _imports(f) - stdlib - {"schemas", "__future__"}
        assert third <= SHARED_THIRD_PARTY | SCHEMAS_STREAM_ONLY, f"{f.relative_to(REPO)} imports {sorted(third - SHARED_THIRD_PARTY)}"
        loaded = _executed_imports(f) - stdlib - {"schemas", "__future__"}
        assert loaded <= SHARED_THIRD_PARTY, f"{f.relative_to(REPO)} imports {sorted(loaded - SHARED_THIRD_PARTY)} at module level"


def test_readme_documents_every_setting() -> None:
    from schemas.settings import OpalSettings

    readme = (REPO / "README.md").read_text()
    missing = [name for name, _, _ in OpalSettings().describe() if f"`{name}`" not in readme]
    assert not missing, f"README lacks {missing}"


def test_inference_imports_only_shared_dependencies() -> None:
    import sys

    stdlib = set(sys.stdlib_module_names)
    for f in (REPO / "inference").rglob("*.py"):
        third = _imports(f) - stdlib - {"schemas", "inference", "__future__"}
        assert third <= INFERENCE_THIRD_PARTY, f"{f.relative_to(REPO)} imports {sorted(third - INFERENCE_THIRD_PARTY)}"


def test_tests_mirror_the_packages_and_import_no_test_module() -> None:
    """tests/<package>/test_<module>.py for each product package, bench/ for the bench scripts, project/ for
    repository-wide checks; helpers come from tests/support.py (fixtures from conftest.py), never from another test
    module, also in scripts a test runs in a subprocess."""
    tests = REPO / "tests"
    folders = {*LAYERS, "bench", "project"}
    assert all((tests / d / "__init__.py").is_file() for d in folders)
    for f in sorted(tests.rglob("*.py")):
        rel = f.relative_to(tests)
        if f.name.startswith("test_"):
            assert len(rel.parts) == 2 and rel.parts[0] in folders, f"{rel}: a test module lives in tests/<package>/"
        bad = re.findall(r"(?:from|import)\s+(tests\.(?:conftest|(?:\w+\.)*test_\w*))", f.read_text())
        assert not bad, f"tests/{rel} imports {bad}: shared helpers belong in tests/support.py"


# -- the CLI imports only the command it runs (opal/cli.py: COMMANDS) ------------------------------------
# What only one environment has: command modules may import these at module level, so `opal <command>` in one
# environment must never load a command module of the other side, nor `opal --help` any command module at all.
STREAM_ONLY = {"confluent_kafka", "faust", "aiokafka", "mode", "redis", "boto3", "pyarrow"}
MODEL_ONLY = {"torch", "vllm", "transformers", "trl", "deepspeed", "datasets", "peft", "accelerate"}
MODEL_SIDE_COMMANDS = ("train", "model")  # re-run in .venv-model by opal.commands.common.in_model_env
SHARED_COMMAND_MODULES = {"opal.commands", "opal.commands.common"}
# Runs the CLI as the `opal` script does and writes sys.modules at exit (-X importtime does not see importlib's imports).
LOADED = """
import atexit, json, sys
out, sys.argv = sys.argv[1], ["opal", *sys.argv[2:]]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
from opal.cli import main
main()
"""


def _loaded_by(python: Path | str, args: list[str], env: dict[str, str], tmp_path: Path) -> tuple[set[str], str]:
    """(the modules `opal ARGS` has loaded when it exits, its stdout) in a fresh ``python``."""
    import json
    import subprocess

    out = tmp_path / f"modules-{len(list(tmp_path.iterdir()))}.json"
    r = subprocess.run([str(python), "-c", LOADED, str(out), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Usage: opal" in r.stdout, (args, r.stdout[-2000:], r.stderr[-2000:])
    return set(json.loads(out.read_text())), r.stdout


def _command_modules(loaded: set[str]) -> set[str]:
    return {m for m in loaded if m.startswith("opal.commands.")} - SHARED_COMMAND_MODULES


def _packages(loaded: set[str]) -> set[str]:
    return {m.split(".")[0] for m in loaded}


def test_opal_help_lists_every_command_and_imports_none(cli_env: dict[str, str], tmp_path: Path) -> None:
    import sys

    loaded, stdout = _loaded_by(sys.executable, ["--help"], cli_env, tmp_path)
    assert _command_modules(loaded) == set(), "opal --help imported command modules"
    assert not _packages(loaded) & (STREAM_ONLY | MODEL_ONLY), sorted(_packages(loaded) & (STREAM_ONLY | MODEL_ONLY))
    for name, entry in COMMANDS.items():
        assert re.search(rf"^\W*{name}\s+{re.escape(entry.help[:40])}", stdout, re.M), name


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_command_imports_only_its_own_module(name: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    """`opal NAME --help` in the stream environment loads NAME's module (seen: the probe can tell) and no other command
    module, nor any package only the model environment has."""
    import sys

    loaded, _ = _loaded_by(sys.executable, [name, "--help"], cli_env, tmp_path)
    assert COMMANDS[name].module in loaded
    assert _command_modules(loaded) == {COMMANDS[name].module}, sorted(_command_modules(loaded))
    assert not _packages(loaded) & MODEL_ONLY, sorted(_packages(loaded) & MODEL_ONLY)


@pytest.mark.model_env
def test_the_model_environment_loads_no_stream_side_package(cli_env: dict[str, str], tmp_path: Path) -> None:
    """The commands in_model_env re-runs in .venv-model (and `opal --help` there) load no Kafka, faust or Redis client
    and no other command module."""
    from tests.support import MODEL_PY

    for args in (["--help"], *([name, "--help"] for name in MODEL_SIDE_COMMANDS)):
        loaded, _ = _loaded_by(MODEL_PY, args, cli_env, tmp_path)
        assert not _packages(loaded) & STREAM_ONLY, (args, sorted(_packages(loaded) & STREAM_ONLY))
        assert _command_modules(loaded) == ({COMMANDS[args[0]].module} if args[0] in COMMANDS else set()), args


def test_a_full_disk_is_named_before_the_model_install_begins(tmp_path: Path) -> None:
    """CI once failed mid-pip with 'No space left on device'; the install now checks first and says so."""
    import subprocess

    venv = tmp_path / "venv"
    out = subprocess.run(
        ["make", "-s", f"{venv}/.opal-installed-model-cpu", f"MODEL={venv}", "NEED_GB=1000000"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "GB free; installing OPAL's model environment needs about 1000000 GB" in out.stderr
    assert not venv.exists()  # refused before anything was made


# -- no import cycles, function-level imports included --------------------------------------------------
CYCLE_PACKAGES = (*LAYERS, "bench")


def modules_under(root: Path, packages: tuple[str, ...] = ()) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root``'s ``packages`` (under ``root`` when none given)."""
    files = sorted(f for d in ([root / p for p in packages] if packages else [root]) for f in d.rglob("*.py"))
    return {".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): f for f in files}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(module: str, is_package: bool, tree: ast.Module) -> list[str]:
    """Every module name ``tree`` imports, at any depth (functions, methods, try blocks): an import inside a function
    still runs, only later. ``if TYPE_CHECKING:`` bodies never run and are left out. ``from a import b`` names
    ``a.b``: the caller resolves it to ``a.b`` when that is a module, else to ``a``."""
    package = module if is_package else module.rpartition(".")[0]
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            out.extend(f"{base}.{a.name}" if base else a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``files`` it imports (an import of ``a.b.c`` goes to the longest prefix that is one)."""
    graph: dict[str, set[str]] = {}
    for name, f in files.items():
        targets: set[str] = set()
        for imported in _imported_names(name, f.name == "__init__.py", ast.parse(f.read_text())):
            parts = imported.split(".")
            hit = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in files), None)
            if hit is not None and hit != name:
                targets.add(hit)
        graph[name] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(found)


def test_no_import_cycles_among_the_projects_modules() -> None:
    """No two modules of the project import each other, directly or through others, counting imports inside
    functions: a function-level import hides a cycle from Python's import machinery, not from the design."""
    cycles = import_cycles(import_graph(modules_under(REPO, CYCLE_PACKAGES)))
    assert not cycles, "import cycles (move the piece that closes each loop to the module it belongs in): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_the_cycle_check_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The checker above finds a cycle closed by an import inside a function, or by a relative import; it ignores
    ``if TYPE_CHECKING:`` imports and imports of other packages."""
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import json\nfrom p.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from p import c\n    return c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p import a\n")
    assert import_cycles(import_graph(modules_under(tmp_path))) == []
    (pkg / "c.py").write_text("def g():\n    from .a import f\n    return f\n")
    assert import_cycles(import_graph(modules_under(tmp_path))) == [["p.a", "p.b", "p.c"]]


# -- size and shape: small modules and classes (issue 22) ---------------------------------------------------
SIZED_PACKAGES = ("opal", "workers", "training", "inference", "schemas", "topology")
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 400


def test_modules_and_classes_stay_small() -> None:
    """No module of the product packages over MAX_MODULE_LINES lines, no class (decorators included, nested ones
    too) over MAX_CLASS_LINES: split a module that grows past it by concern into a sibling module."""
    too_big: list[str] = []
    for f in sorted(f for p in SIZED_PACKAGES for f in (REPO / p).rglob("*.py")):
        text = f.read_text()
        rel = f.relative_to(REPO)
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            too_big.append(f"{rel}: {n} lines (module, most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if (n := (node.end_lineno or node.lineno) - start + 1) > MAX_CLASS_LINES:
                    too_big.append(f"{rel}:{node.lineno}: class {node.name}: {n} lines (class, most {MAX_CLASS_LINES})")
    assert not too_big, "too big, split by concern:\n" + "\n".join(too_big)
