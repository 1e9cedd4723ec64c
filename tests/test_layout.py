"""The codebase's shape: one error hierarchy, no test hooks or sys.path edits in the product, no
library module too long to read, imports that only run down the layers (no back-edge, no cycle),
each name imported from the module that defines it (re-exports only in package faces), and docs
that name only files that exist."""
from __future__ import annotations

import ast
import re

from helpers import ROOT

LIBRARY = ROOT / "propulsion_ds"
PRODUCT_DIRS = ("propulsion_ds", "launch", "bench", "scripts")
MAX_MODULE_LINES = 500          # one job per module; past this it is two
# The layers of propulsion_ds, lowest first: a module imports only from its own layer or below.
# A package (``config``) or a top-level module (``model``) is placed as a whole; the package
# faces (``__init__.py``) sit in the layer of their package.
LAYERS = (
    ("errors", "fsutil", "collective", "distributed"),      # no project imports but errors
    ("method", "data", "model"),                            # the method, the data, the base model
    ("config",),                                            # the run config checks model, data, method
    ("eval",),                                              # task evals on a model and its data
    ("train",),                                             # the recipe and its components
    ("tools",),                                             # offline tools: merge, export, memory
)
# Paths the docs may name: repository files under these folders.
PATH_RE = re.compile(r"\b((?:propulsion_ds|launch|bench|scripts|configs|tests|docs|assets)/[\w./-]*\w)(?![\w{])")


def _py_files(*dirs):
    for d in dirs:
        yield from sorted((ROOT / d).rglob("*.py"))


def test_every_error_class_lives_in_errors_and_carries_an_exit_code():
    from propulsion_ds import errors

    defined_elsewhere = []
    for path in _py_files("propulsion_ds"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    re.search(r"(Error|Exception)$", ast.unparse(b)) for b in node.bases):
                defined_elsewhere.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not defined_elsewhere, defined_elsewhere
    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) >= 12
    for cls in classes:
        assert issubclass(cls, errors.PropulsionError), cls
        assert cls.exit_code in (1, 2, 3, 75), cls
    assert errors.Preempted.exit_code == 75 and errors.TrainingError.exit_code == 3


def test_the_train_cli_catches_the_base_error_once():
    src = (ROOT / "launch" / "train.py").read_text()
    assert src.count("except PropulsionError as e:") == 2      # config loading, then the run
    assert not re.search(r"except \((ConfigError|DataError)", src)


def test_no_test_hooks_or_sys_path_edits_in_the_product():
    offenders = []
    for path in _py_files(*PRODUCT_DIRS):
        text = path.read_text()
        if re.search(r"PROPULSION_TEST|\bFAULT_[A-Z]", text):
            offenders.append(f"{path.relative_to(ROOT)}: test-only environment variable")
        if re.search(r"sys\.path\.(insert|append)", text):
            offenders.append(f"{path.relative_to(ROOT)}: sys.path edit")
    for doc in ("README.md", "docs/ARCHITECTURE.md"):
        if "PROPULSION_TEST" in (ROOT / doc).read_text():
            offenders.append(f"{doc}: documents a test-only environment variable")
    assert not offenders, offenders


def test_no_library_module_is_too_long_to_read():
    big = {str(p.relative_to(ROOT)): n for p in _py_files("propulsion_ds")
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, big


def _module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_modules() -> dict:
    """{dotted name: path} of every module and package face of propulsion_ds."""
    return {_module_name(p): p for p in _py_files("propulsion_ds")}


def _imports(path, modules: dict) -> dict:
    """{project module imported by ``path``: line}, ``from pkg import sub`` resolved to ``pkg.sub``;
    every import, at any depth (a lazy import inside a function is an edge too)."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:         # import a.b.c where only a.b is ours
                t = t.rpartition(".")[0]
            if t and t != here:
                out.setdefault(t, node.lineno)
    return out


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in any layer of tests/test_layout.py's LAYERS")


def test_imports_run_down_the_layers():
    modules = _library_modules()
    back = []
    for name, path in modules.items():
        if name == "propulsion_ds":                # the package face: the public names, any layer
            continue
        for dep, line in _imports(path, modules).items():
            if dep != "propulsion_ds" and _layer(dep) > _layer(name):
                back.append(f"{path.relative_to(ROOT)}:{line} imports {dep} "
                            f"(layer {_layer(dep)} above its own {_layer(name)})")
    assert not back, "\n".join(back)


def test_no_import_cycle_in_the_library():
    modules = _library_modules()
    graph = {name: set(_imports(path, modules)) for name, path in modules.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [node, dep]) if dep in stack
                              else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, cycles


def _defined_names(path) -> set:
    """Names a module defines itself (functions, classes, assignments), not the ones it imports."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.If, ast.Try)):
            names |= {n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            names |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return names


def test_names_are_imported_from_the_module_that_defines_them():
    """No re-export lines but the package faces: a module that forwards a name it imported
    (``noqa: F401``) makes two homes for it, and a reader follows the wrong one."""
    modules = _library_modules()
    forwards = [f"{p.relative_to(ROOT)}:{i}" for p in _py_files("propulsion_ds") if p.name != "__init__.py"
                for i, line in enumerate(p.read_text().splitlines(), 1)
                if "noqa: F401" in line and not re.match(r"\s*import [\w.]+\s+# noqa", line)]
    assert not forwards, forwards
    listed = []                                 # __all__ naming an imported name forwards it too
    for p in _py_files("propulsion_ds"):
        if p.name == "__init__.py":
            continue
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
                defined = _defined_names(p)
                listed += [f"{p.relative_to(ROOT)}: __all__ lists {e.value}" for e in node.value.elts
                           if isinstance(e, ast.Constant) and e.value not in defined]
    assert not listed, listed
    wrong = []
    for path in _py_files(*PRODUCT_DIRS, "tests"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module in modules):
                continue
            source = modules[node.module]
            if source.name == "__init__.py":        # a package face may forward names
                continue
            defined = _defined_names(source)
            for alias in node.names:
                if alias.name != "*" and alias.name not in defined and f"{node.module}.{alias.name}" not in modules:
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} takes {alias.name} from {node.module}")
    assert not wrong, "\n".join(wrong)


def test_docs_and_docstrings_name_only_files_that_exist():
    texts = {"README.md": (ROOT / "README.md").read_text(),
             "docs/ARCHITECTURE.md": (ROOT / "docs" / "ARCHITECTURE.md").read_text()}
    for path in _py_files("propulsion_ds", "launch"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if doc:
            texts[str(path.relative_to(ROOT))] = doc
    missing = []
    for where, text in texts.items():
        for name in PATH_RE.findall(text):
            name = name.rstrip(".")
            if "*" in name or "<" in name:
                continue
            if not (ROOT / name).exists():
                missing.append(f"{where}: {name}")
    assert not missing, missing


def test_architecture_doc_names_every_train_component():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    recipe = (LIBRARY / "train" / "recipe.py").read_text()
    imported = set(re.findall(r"from propulsion_ds\.train\.(\w+) import", recipe))
    assert imported, "the recipe imports its components from propulsion_ds.train"
    for name in ("Checkpointer", "DSEngine", "NonFiniteGuard", "MetricsSink", "TrainingProgress", "reduce_step"):
        assert name in doc and name in recipe, name


MULTI_RANK_WORDS = {"mpirun", "sbatch", "--num_gpus", "torch.distributed.run", "--nproc_per_node"}


def _launches_ranks(tree) -> bool:
    """The file starts several ranks: run_train/start_train/train_command without nproc=1, or a
    launcher named in a string that is not a docstring."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("run_train", "start_train",
                                                                           "train_command"):
            nproc = [k.value for k in node.keywords if k.arg == "nproc"]
            if not (nproc and isinstance(nproc[0], ast.Constant) and nproc[0].value == 1):
                return True
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "submit":   # SlurmCluster
            return True
        if isinstance(node, ast.Constant) and id(node) not in docstrings and node.value in MULTI_RANK_WORDS:
            return True
    return False


def test_test_files_that_start_ranks_mark_themselves_slow():
    """The fast tier (-m "not slow") has no list of slow files: a file that starts several ranks
    says so itself (pytestmark = pytest.mark.slow, or @pytest.mark.slow on its tests)."""
    unmarked = [p.name for p in sorted((ROOT / "tests").glob("test_*.py")) if p.name != "test_layout.py"
                and _launches_ranks(ast.parse(p.read_text())) and "pytest.mark.slow" not in p.read_text()]
    assert not unmarked, unmarked
