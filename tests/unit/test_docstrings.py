"""Docstrings a maintainer can trust (issue 16, kind 11).

- Every public function and method in cidm/ whose body raises lists the errors in a "Raises:" section.
- "the reference" always names its source: the official CIDM code (JiahuaDong/CIFC at 9819aa8, with a file) or
  the paper's section.
"""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO / "cidm").rglob("*.py"))


def public_functions(tree):
    """(qualified name, node) of module functions and public classes' methods (__init__ included)."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        not item.name.startswith("_") or item.name == "__init__"):
                    yield f"{node.name}.{item.name}", item


def test_functions_that_raise_list_their_errors():
    missing = []
    for path in SOURCES:
        for name, node in public_functions(ast.parse(path.read_text())):
            raised = {ast.unparse(n.exc.func if isinstance(n.exc, ast.Call) else n.exc)
                      for n in ast.walk(node) if isinstance(n, ast.Raise) and n.exc is not None}
            doc = ast.get_docstring(node) or ""
            section = doc.split("Raises:", 1)[1] if "Raises:" in doc else None
            if raised and (section is None or not all(error in section for error in raised)):
                missing.append(f"{path.relative_to(REPO)}:{node.lineno} {name} raises {sorted(raised)}")
    assert not missing, "public functions whose docstring lacks a Raises: entry for what they raise:\n" + \
        "\n".join(missing)


def test_the_reference_names_its_source():
    vague = []
    for path in SOURCES:
        text = path.read_text()
        for match in re.finditer(r"\bthe reference\b", text, re.IGNORECASE):
            context = text[match.start():match.start() + 160]
            if "JiahuaDong/CIFC" not in context and "§" not in context:
                line = text.count("\n", 0, match.start()) + 1
                vague.append(f"{path.relative_to(REPO)}:{line}: {context.splitlines()[0]}")
    assert not vague, "'the reference' without its source (repository, commit and file, or the paper's section):\n" \
        + "\n".join(vague)
