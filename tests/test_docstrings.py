"""The repository describes itself as it is: every test module and test states its property in a docstring, and no
code, test or README speaks of issues or of how the code used to be."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_module_and_test_has_a_docstring():
    """Each tests/*.py module and each test function in it opens with a docstring (its first line the property)."""
    missing = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(path.read_text())
        if not ast.get_docstring(tree):
            missing.append(path.name)
        missing += [f"{path.name}::{node.name}" for node in ast.walk(tree)
                    if isinstance(node, ast.FunctionDef) and node.name.startswith("test")
                    and not ast.get_docstring(node)]
    assert not missing, missing


def test_no_words_about_the_projects_history():
    """No "issue 12", "before the change" or "sync-free change" in code, tests, configs or the README."""
    pattern = re.compile(r"\bissue \d+|before the change|after the change|sync-free change", re.IGNORECASE)
    tests = [path for path in ROOT.glob("tests/*.py") if path.name != "test_docstrings.py"]  # its own pattern aside
    files = [*ROOT.glob("*.py"), *ROOT.glob("distill/*.py"), *ROOT.glob("scripts/*.py"), *tests,
             *ROOT.glob("configs/**/*.yaml"), ROOT / "config.yaml",
             ROOT / "README.md", *ROOT.glob("docs/*.md")]
    found = [f"{path.name}:{n}" for path in files for n, line in enumerate(path.read_text().splitlines(), 1)
             if pattern.search(line)]
    assert not found, found
