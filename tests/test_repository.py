"""The repository speaks of the project: no trace of how the work was organised, a README of a readable size whose
paths exist."""
import os
import re

from conftest import ROOT

# Words that belong in notes and commit messages rather than in the project's files.
PROCESS_WORDS = re.compile(r"\b(stops?|sessions?|tasks?|issues?) ?#?\d+|(?<![\w/&])#\d+\b|\(now\)|\bof then\b|"
                           r"\blent\b|\basked\b|can_start_another|\bthis (task|stop)\b", re.IGNORECASE)
TEXT = (".py", ".md", ".yaml", ".txt", ".cfg", ".toml")


def project_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("fixtures", "__pycache__", "data", "ckpt")]
        for name in files:
            if name.endswith(TEXT) or folder.endswith(".ci"):
                yield os.path.join(folder, name)
    yield os.path.join(ROOT, ".ci", "run")


def test_nothing_in_the_repository_speaks_of_how_the_work_was_organised():
    this = os.path.abspath(__file__)
    found = [f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}" for path in set(project_files()) if path != this
             for n, line in enumerate(open(path, encoding="utf-8"), 1) if PROCESS_WORDS.search(line)]
    assert not found, "\n".join(found)


def test_the_readme_is_a_guide_of_a_readable_size_whose_paths_exist():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(readme.encode()) <= 25_000
    paths = set(re.findall(r"\b((?:configs|docs|tests)/[\w./-]+\.(?:yaml|md|png|py)|\w+\.py)\b", readme))
    missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
    assert {"train.py", "cam.py", "configs/t4x2.yaml", "docs/experiments.md"} <= paths and not missing, missing
    for section in ("## Install", "## The three commands", "## Recipes", "## Preparing the info files", "## Methods",
                    "### Prompt-CAM in this project", "## Evaluation", "## Explanations", "## Results",
                    "## Hardware and image size", "## Citations"):
        assert section in readme, section


def test_functions_read_whole_and_docstrings_say_what_and_why_briefly():
    import ast
    long = []
    for path in (p for p in set(project_files()) if p.endswith(".py")):
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)):
                lines = len((ast.get_docstring(node, clean=False) or "").strip().splitlines())
                name = getattr(node, "name", "module")
                if lines > 6:
                    long.append(f"{os.path.relpath(path, ROOT)}: {name}'s docstring has {lines} lines")
                if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno >= 80:
                    long.append(f"{os.path.relpath(path, ROOT)}: {name} has {node.end_lineno - node.lineno + 1} lines")
    assert not long, "\n".join(long)
