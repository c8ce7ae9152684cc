"""The house rules that a reader relies on: every `module.name` that a docstring, a comment or a README names in one
of our modules exists there (a pointer to code that moved is worse than none); the modules keep their budgets."""
import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("common", "data", "rollout", "reward", "advantage", "train", "evaluate", "report", "sft", "toy")
# `rollout.py`, `toy/data/train.jsonl`, `--rollout.n`, `args.data.train`: file names, paths, flags and attributes
REFERENCE = re.compile(r"(?<![\w./\-$])(" + "|".join(MODULES) + r")\.([A-Za-z_]\w*)")
FILE_SUFFIXES = {"py", "jsonl", "json", "parquet", "md", "png", "txt", "sh"}
STAGES = ("rollout", "reward", "advantage", "train", "evaluate", "sft")


def defined(module: str) -> set[str]:
    """Top-level names of module.py, and the fields of its dataclasses (a docstring may name a flag's field as
    `rollout.n`, for --rollout.n)."""
    names = set()
    for node in ast.parse((ROOT / f"{module}.py").read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {x.target.id for x in node.body if isinstance(x, ast.AnnAssign)}
        if isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file (the whole text of any other file)."""
    text = path.read_text()
    if path.suffix != ".py":
        return list(enumerate(text.splitlines(), 1))
    out = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(text).readline)
           if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            out += [(node.lineno + k, line) for k, line in enumerate(node.value.value.splitlines())]
    return out


def stale(path: Path, names: dict[str, set[str]]) -> list[str]:
    out = []
    for line, text in sorted(prose(path)):
        for module, name in REFERENCE.findall(text):
            if name not in names[module] and name not in FILE_SUFFIXES:
                out.append(f"{path.name}:{line}: {module}.{name}")
    return out


def test_every_module_name_in_docstrings_comments_and_readmes_exists():
    names = {m: defined(m) for m in MODULES}
    files = [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py"), ROOT / "README.md",
             ROOT / "bench" / "README.md", ROOT / "run.sh"]
    found = [ref for path in files for ref in stale(path, names)]
    assert not found, "names that do not exist (moved or renamed?):\n" + "\n".join(found)


def test_the_reference_check_finds_a_stale_name(tmp_path):
    """The check itself: a moved function named in a docstring is found; a flag, a path and a file name are not."""
    path = tmp_path / "x.py"
    path.write_text('"""Uses rollout.collate and data.collate."""\n# --rollout.n, toy/data/train.jsonl, train.py\n')
    assert stale(path, {m: defined(m) for m in MODULES}) == ["x.py:1: rollout.collate"]


def over_budget(path: Path, max_lines: int, functions: bool = True) -> list[str]:
    """What breaks the house budgets in a file: more than max_lines lines, a line over 120 characters, a function
    over 60 lines (if `functions`)."""
    text = path.read_text()
    lines = text.splitlines()
    out = [f"{path.name}: {len(lines)} lines > {max_lines}"] if len(lines) > max_lines else []
    out += [f"{path.name}:{i}: {len(line)} characters > 120" for i, line in enumerate(lines, 1) if len(line) > 120]
    for node in ast.walk(ast.parse(text)) if functions else []:
        length = node.end_lineno - node.lineno + 1 if isinstance(node, ast.FunctionDef) else 0
        if length > 60:
            out.append(f"{path.name}:{node.lineno}: {node.name} is {length} lines > 60")
    return out


def test_modules_keep_their_budgets():
    """Each stage script, data.py and report.py (evaluate.py's report) <= 400 lines; in every module no function over
    60 lines, and in every module,
    test and bench no line over 120 characters (a budget is met by plainer code, never by moving or squeezing it)."""
    modules = {ROOT / f"{m}.py": 400 if m in (*STAGES, "data", "report") else 10**6 for m in MODULES}
    broken = [b for path, max_lines in modules.items() for b in over_budget(path, max_lines)]
    broken += [b for path in [*ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]
               for b in over_budget(path, 10**6, functions=False)]
    assert not broken, "\n".join(broken)


@pytest.mark.xfail(strict=True, reason="issue 27: common.py is over 500 lines; its layout waits for the owners")
def test_common_and_the_whole_keep_their_budgets():
    """common.py <= 500 lines, and the six stages with data.py, common.py and report.py (split from evaluate.py)
    <= 3,383 lines (issue 27). Strict: when it passes, this mark must go."""
    sizes = {m: len((ROOT / f"{m}.py").read_text().splitlines()) for m in (*STAGES, "data", "common", "report")}
    assert sizes["common"] <= 500 and sum(sizes.values()) <= 3383, sizes


def test_the_budget_check_finds_what_breaks_it(tmp_path):
    """The check itself: a long file, a long line and a long function are each found, and nothing else."""
    path = tmp_path / "x.py"
    path.write_text("def f():\n" + "    x = 1\n" * 60 + "y = '" + "a" * 120 + "'\n")
    found = ["x.py: 62 lines > 61", "x.py:62: 126 characters > 120", "x.py:1: f is 61 lines > 60"]
    assert over_budget(path, 61) == found
    assert over_budget(path, 62, functions=False) == found[1:2]
