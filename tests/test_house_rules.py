"""The layout's rules, read from the source: imports point one way, the library touches no
config and writes no files, modules stay small and public functions are typed and documented."""

import ast
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# A package may import itself and what stands left of it (DESIGN.md, README "Code map").
ORDER = ("evaluation", "adv_diffusion", "sampling", "modes")
TOP = ("main", "benchmarks")  # may import everything
LIBRARY = ("evaluation", "adv_diffusion", "sampling")
PROJECT = set(ORDER) | set(TOP) | {"configs", "tests"}
# Command-line converters that write the weight files they convert (README, first command).
WRITERS = {"evaluation/convert_inception.py", "evaluation/convert_lpips.py"}
# Allowed over 400 lines: the UNet layers and DPM-Solver's tableau engine.
LONG = {"adv_diffusion/nets/layers.py", "sampling/dpm_solver.py"}
WRITE_CALLS = {
    "savez",
    "savez_compressed",
    "save",
    "makedirs",
    "mkdir",
    "replace",
    "rename",
    "dump",
    "write",
    "write_text",
    "write_bytes",
    "rmtree",
    "remove",
    "unlink",
}


def _modules(packages) -> list[pathlib.Path]:
  return sorted(p for pkg in packages for p in (REPO / pkg).rglob("*.py"))


def _rel(path: pathlib.Path) -> str:
  return str(path.relative_to(REPO))


def _imported_packages(tree: ast.AST) -> set[str]:
  """Top-level project packages named by any import statement, lazy ones included."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [node.module]
    else:
      continue
    found |= {n.split(".")[0] for n in names if n.split(".")[0] in PROJECT}
  return found


def _upward_imports() -> list[str]:
  bad = []
  for path in _modules(ORDER):
    package = _rel(path).split("/")[0]
    allowed = set(ORDER[: ORDER.index(package) + 1])
    for imported in _imported_packages(ast.parse(path.read_text())) - allowed:
      bad.append(f"{_rel(path)} imports {imported}")
  return bad


def test_imports_point_one_way():
  assert _upward_imports() == []


def test_the_rule_test_sees_an_upward_import(tmp_path, monkeypatch):
  # The check itself can fail: a library module that imports a mode is reported.
  fake = tmp_path / "adv_diffusion"
  fake.mkdir()
  (fake / "x.py").write_text("def f():\n  from modes import train\n")
  for pkg in ORDER:
    if pkg != "adv_diffusion":
      (tmp_path / pkg).mkdir()
  monkeypatch.setattr(__import__(__name__, fromlist=["REPO"]), "REPO", tmp_path)
  assert _upward_imports() == ["adv_diffusion/x.py imports modes"]


@pytest.mark.parametrize("path", _modules(LIBRARY), ids=_rel)
def test_library_reads_no_config_and_writes_no_files(path):
  tree = ast.parse(path.read_text())
  imported = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      imported |= {alias.name.split(".")[0] for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      imported.add(node.module.split(".")[0])
  assert not imported & {"ml_collections", "configs", "clu"}, imported
  if _rel(path) in WRITERS:
    return
  writes = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Call):
      func = node.func
      name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
      if name == "open" and len(node.args) > 1:
        mode = node.args[1]
        if isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wax+"):
          writes.append(f"line {node.lineno}: open(..., {mode.value!r})")
      elif name in WRITE_CALLS and isinstance(func, ast.Attribute):
        base = func.value
        base_name = getattr(base, "id", getattr(base, "attr", ""))
        if base_name in ("np", "os", "json", "shutil", "pathlib", "f", "path"):
          writes.append(f"line {node.lineno}: {base_name}.{name}")
  assert writes == []


@pytest.mark.parametrize("path", _modules(ORDER), ids=_rel)
def test_modules_stay_small(path):
  if _rel(path) in LONG:
    return
  assert len(path.read_text().splitlines()) <= 400


@pytest.mark.parametrize("path", _modules(LIBRARY), ids=_rel)
def test_public_library_functions_are_typed_and_documented(path):
  missing = []
  tree = ast.parse(path.read_text())
  scopes = [tree] + [
      n for n in tree.body if isinstance(n, ast.ClassDef) and not n.name.startswith("_")
  ]
  for scope in scopes:
    for node in scope.body:
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      if node.name.startswith("_"):
        continue
      args = [a for a in node.args.args + node.args.kwonlyargs if a.arg not in ("self", "cls")]
      untyped = [a.arg for a in args if a.annotation is None]
      is_property = any(getattr(d, "id", "") == "property" for d in node.decorator_list)
      if untyped or (node.returns is None and not is_property) or not ast.get_docstring(node):
        missing.append(
            f"{node.name}: untyped {untyped}, returns "
            f"{'ok' if node.returns or is_property else 'missing'}, docstring "
            f"{'ok' if ast.get_docstring(node) else 'missing'}"
        )
  assert missing == []


def test_the_tree_is_formatted():
  # pyink with the settings of pyproject.toml (run `pyink .` to fix).
  result = subprocess.run(
      [sys.executable, "-m", "pyink", "--check", "--quiet", "."],
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  assert result.returncode == 0, result.stderr
