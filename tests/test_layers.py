"""
The code is layered and never circular: trb.py <- distill/ <- train_small.py <- train_fsdp.py <- scripts/. A module
imports only modules of its own layer or below, the import graph has no circle (counting imports placed inside
functions), and trb.py imports nothing of the project. Checked on the AST of every module; the check itself is shown
to fail on a circle and on an upward import written for the purpose.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("trb", "distill", "train_small", "train_fsdp", "scripts")  # bottom to top
# Project imports placed inside a function, where they stay on purpose: gpu_check's --prepare runs on a machine that
# has the network but not the project's packages, so nothing it does not need is imported at start-up.
LAZY = {"scripts.gpu_check"}


def project_modules(root):
    """{dotted name: path} of the modules of the layers under root."""
    paths = [root / "trb.py", root / "train_small.py", root / "train_fsdp.py",
             *sorted((root / "distill").glob("*.py")), *sorted((root / "scripts").glob("*.py"))]
    return {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
            for p in paths if p.exists()}


def layer(name):
    return LAYERS.index(name.split(".")[0])


def imports(path, modules):
    """[(imported project module, whether the import is inside a function)] of one file."""
    found = []

    def visit(node, in_function):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        found.extend((name, in_function) for name in names if name in modules)
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return found


def circles(graph):
    """Each circle of the graph, as the path that closes it (found by depth-first search)."""
    found, state = [], {}

    def walk(node, path):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                walk(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    return found


def violations(root):
    """Every breach of the layers under root, one line each: an upward import, a circle, a project import inside a
    function outside LAZY."""
    modules = project_modules(root)
    graph, problems = {}, []
    for name, path in modules.items():
        found = imports(path, modules)
        graph[name] = {target for target, _ in found if target != name}
        problems += [f"{name} imports {target}, a layer above it" for target in sorted(graph[name])
                     if layer(target) > layer(name)]
        problems += [f"{name} imports {target} inside a function" for target, lazy in found
                     if lazy and name not in LAZY]
    problems += ["circle: " + " -> ".join(circle) for circle in circles(graph)]
    return problems


def test_the_modules_are_layered_without_circles():
    """No module imports one of a higher layer, none imports a project module inside a function (gpu_check aside),
    and the import graph of trb.py, distill/, the training scripts and scripts/ has no circle."""
    assert violations(ROOT) == []


def test_trb_imports_nothing_of_the_project():
    """trb.py, the method in one file, imports no module of the project."""
    modules = project_modules(ROOT)
    assert imports(ROOT / "trb.py", modules) == []


def test_the_check_fails_on_a_circle_and_on_an_upward_import(tmp_path):
    """On a throwaway tree where distill.a and distill.b import each other (b inside a function) and distill.c imports
    train_small, the check names the circle, the upward import and the import inside a function."""
    files = {"trb.py": "", "train_small.py": "import trb\n", "train_fsdp.py": "import train_small\n",
             "distill/__init__.py": "", "distill/a.py": "from distill import b\n",
             "distill/b.py": "def f():\n    from distill import a\n", "distill/c.py": "import train_small\n",
             "scripts/__init__.py": ""}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    problems = violations(tmp_path)
    assert "circle: distill.a -> distill.b -> distill.a" in problems
    assert "distill.c imports train_small, a layer above it" in problems
    assert "distill.b imports distill.a inside a function" in problems
    assert len(problems) == 3, problems


def test_the_top_level_is_the_card():
    """The only Python modules at the top are trb.py, train_small.py and train_fsdp.py; trb.py reads in one sitting
    (at most 450 lines) and the README in five minutes (at most 250 lines)."""
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["train_fsdp.py", "train_small.py", "trb.py"]
    assert len((ROOT / "trb.py").read_text().splitlines()) <= 450
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
