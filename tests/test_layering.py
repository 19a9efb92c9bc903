"""The package boundaries in DESIGN.md: the base install never needs torch, patching stands alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported_roots(package: str) -> dict[str, set[str]]:
    """Top-level module names each file of a package imports (absolute imports)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("patching", {"farm", "tasks", "storage"}),
        ("storage", {"torch", "diffusers", "transformers", "insightface", "onnxruntime"}),
    ],
)
def test_package_does_not_import(package: str, forbidden: set[str]) -> None:
    offenders = {f: sorted(names & forbidden) for f, names in _imported_roots(package).items() if names & forbidden}
    assert offenders == {}


def test_client_side_imports_need_no_torch() -> None:
    code = (
        "import sys\n"
        "import farm, farm.cli, farm.settings, farm.errors, tasks, storage\n"
        "import storage.objects, storage.models, storage.transitions, storage.migrate, storage.db\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'insightface')\n"
        "heavy = sorted(m for m in heavy if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_storage_never_imports_farm() -> None:
    """storage/ stands on its own: no file under it imports ``farm`` or ``farm.*`` in any form
    (module level, inside a function, under ``if TYPE_CHECKING:``, or by name through
    ``importlib.import_module`` / ``__import__``). Storage's errors, settings sections and
    ``redact_url`` live in storage; farm imports them from there."""

    def is_farm(name: str | None) -> bool:
        return name is not None and (name == "farm" or name.startswith("farm."))

    offenders: list[str] = []
    files = sorted((ROOT / "storage").rglob("*.py"))
    assert files, "no files under storage/"
    for path in files:
        where = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []  # relative: inside storage
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                names = [node.args[0].value] if called in {"import_module", "__import__"} else []
            else:
                continue
            offenders.extend(
                f"{where}:{node.lineno}: {name}" for name in names if isinstance(name, str) and is_farm(name)
            )
    assert offenders == [], "storage/ must not import farm:\n" + "\n".join(offenders)


def _farm_import_graph() -> dict[str, set[str]]:
    """``module -> farm modules it imports`` over every file of farm/, function-level imports
    included (they are cycles all the same), ``if TYPE_CHECKING:`` blocks left out."""
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for path in (ROOT / "farm").rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skipped = {
            id(child)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body
            for child in ast.walk(stmt)
        }
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            targets.update(name for name in names if name in modules and name != module)
        graph[module] = targets
    return graph


def test_farm_has_no_import_cycles() -> None:
    graph = _farm_import_graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_tasks_call_only_farm_entry_points() -> None:
    """Tasks are thin (issue 21): each receives a message, parses its ids, gets the worker's
    resources and calls one farm function. They import from ``farm`` only these entry-point
    modules (public names), and never SQLAlchemy or ``storage``: queries and policy live in farm."""
    entry_points = {
        "farm.beat",  # start_scheduled_bulk, package_scheduled_bulk
        "farm.feeder",  # schedule, feed_windows
        "farm.finalizer",  # finalize_and_feed
        "farm.shard_delivery",  # deliver_shard
        "farm.scheduler",  # parse_job_id
        "farm.worker.resources",  # WorkerResources (tasks.resources)
        "farm.outages",  # ServiceUnavailable (tasks.resources)
    }
    forbidden_roots = {"sqlalchemy", "storage"}
    offenders: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tasks").rglob("*.py")):
        bad: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [(node.module, alias.name) for alias in node.names]
            else:
                continue
            for module, name in modules:
                root = module.split(".")[0]
                if root in forbidden_roots:
                    bad.append(module)
                elif root == "farm":
                    full = f"{module}.{name}" if module == "farm" and name else module
                    if full not in entry_points or (name or "").startswith("_"):
                        bad.append(f"{module}:{name}" if name else module)
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


# Function-level imports of the project's own modules, each guarding an import the base install
# or a control process must not pay for (torch, PIL, boto3), or a kind's runner (workers only).
LAZY_IMPORTS = {
    ("farm/guidance.py", "patching.sag"),  # torch
    ("farm/manifest.py", "farm.sheets"),  # PIL
    ("farm/manifest.py", "farm.media"),  # PIL, imageio
    ("farm/media.py", "farm.sheets"),  # PIL
    ("farm/tiny_components.py", "patching.ip_adapter"),  # torch
    ("farm/tiny_components.py", "patching.resampler"),  # torch
    ("farm/worker/components.py", "patching"),  # torch, insightface
    ("farm/worker/components.py", "patching.ip_adapter"),
    ("farm/worker/components.py", "patching.face_analysis"),
    ("storage/objects/__init__.py", "storage.objects.s3"),  # boto3
    ("farm/kinds/face_identity.py", "farm.worker.kinds.face_identity"),  # a kind's runner
    ("farm/kinds/temporal_video.py", "farm.worker.kinds.temporal_video"),
    ("farm/kinds/text_to_image.py", "farm.worker.kinds.text_to_image"),
    ("farm/kinds/encode.py", "farm.worker.kinds.encode"),
    ("farm/kinds/upscale.py", "farm.worker.kinds.upscale"),
    ("farm/worker/kinds/upscale.py", "farm.worker.kinds.upscale_img2img"),  # torch: img2img only, not farm.cpu
    ("farm/kinds/contact_sheet.py", "farm.worker.kinds.contact_sheet"),
    ("farm/kinds/package.py", "farm.worker.kinds.package"),
    ("farm/cli/api_cmd.py", "farm.api.app"),  # FastAPI and the routes: only `farm api` needs them
    ("farm/cli/registry_cmd.py", "farm.worker.single_file"),  # diffusers, torch: only `farm models import`
}


def test_project_imports_are_at_module_top_unless_they_guard_heavy_code() -> None:
    found: set[tuple[str, str]] = set()
    for package in ("farm", "storage", "tasks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for function in ast.walk(tree):
                if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(function):
                    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        names = [
                            f"{node.module}.{a.name}" if node.module == "farm" else node.module for a in node.names
                        ]
                    elif isinstance(node, ast.Import):
                        names = [alias.name for alias in node.names]
                    else:
                        continue
                    rel = str(path.relative_to(ROOT))
                    found.update((rel, n) for n in names if n.split(".")[0] in ("farm", "storage", "tasks", "patching"))
    assert found - LAZY_IMPORTS == set()
