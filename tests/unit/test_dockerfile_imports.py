"""Every first-party module a service's process imports (its ``python -m`` module and the
compose health check's ``services.tools.readyz``, with all they import in turn) is copied into
its image, under the ``PYTHONPATH`` the image sets, and not left out by ``.dockerignore``: a
module outside the copied folders (a client helper such as ``cachemesh/_tls.py`` copied file by
file, a new top-level package) would pass every test on a checkout and fail only in the
container, at start-up or at the first health check. Also the package data the services read
(``models.toml``, the verifier's and the router's weights) lies in the copied folders."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted(ROOT.glob("services/*/Dockerfile"))
APP = PurePosixPath("/app")
FIRST_PARTY = ("services", "cachemesh")


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0], ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def _copied(path: Path) -> list[tuple[PurePosixPath, PurePosixPath]]:
    """(source in the repository, destination in the image) of each COPY."""
    found: list[tuple[PurePosixPath, PurePosixPath]] = []
    for op, arg in _instructions(path):
        if op != "COPY":
            continue
        *sources, dest = arg.split()
        for source in sources:
            target = APP / dest if dest not in ("./", ".") else APP
            if dest.endswith("/") or dest in ("./", "."):
                target = target / PurePosixPath(source).name
            found.append((PurePosixPath(source), target))
    return found


def _pythonpath(path: Path) -> list[PurePosixPath]:
    for op, arg in _instructions(path):
        if op == "ENV" and (match := re.search(r"PYTHONPATH=(\S+)", arg)):
            return [PurePosixPath(p) for p in match.group(1).split(":")]
    return [APP]  # WORKDIR /app with python -m: the working directory


def _ignored(relative: PurePosixPath) -> bool:
    patterns = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = relative.parts
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        for i in range(len(parts)):
            prefix = "/".join(parts[: i + 1])
            if fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(parts[i], bare):
                return True
    return False


def _module_file(module: str) -> Path | None:
    """The source file of a first-party module in this checkout (None: not first-party, or a
    name imported from a module rather than a module)."""
    top = module.split(".")[0]
    if top not in FIRST_PARTY:
        return None
    base = ROOT if top == "services" else ROOT / "clients" / "python"
    stem = base.joinpath(*module.split("."))
    for candidate in (stem / "__init__.py", stem.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imported(entry: str) -> dict[str, Path]:
    """Every first-party module ``entry`` imports, transitively (an import anywhere in a
    module's body counts: a lazy one runs too, sooner or later), with its file."""
    seen: dict[str, Path] = {}
    todo = [entry]
    while todo:
        module = todo.pop()
        if module in seen or (path := _module_file(module)) is None:
            continue
        seen[module] = path
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # its packages
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                todo += [source, *(f"{source}.{alias.name}" for alias in node.names)]
    return seen


def _in_image(path: Path, dockerfile: Path) -> PurePosixPath | None:
    """Where ``path`` (a file of this checkout) is in the image, if it is copied."""
    relative = PurePosixPath(path.relative_to(ROOT).as_posix())
    if _ignored(relative):
        return None
    for source, target in _copied(dockerfile):
        if relative == source or source in relative.parents:
            return target / relative.relative_to(source)
    return None


def _importable(module: str, where: PurePosixPath, roots: list[PurePosixPath]) -> bool:
    """``where`` is the file a ``python`` with ``roots`` on its path imports as ``module``."""
    tail = PurePosixPath(*module.split("."))
    return any(
        where in (root / tail / "__init__.py", root / tail.with_suffix(".py")) for root in roots
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_every_module_the_service_imports_is_in_its_image(dockerfile: Path) -> None:
    command = next(arg for op, arg in _instructions(dockerfile) if op == "CMD")
    entry = re.search(r'"-m",\s*"([\w.]+)"', command)
    assert entry is not None, command
    roots = _pythonpath(dockerfile)
    # python -m runs the package's __main__ (after its __init__)
    modules = {**_imported(f"{entry.group(1)}.__main__"), **_imported("services.tools.readyz")}
    assert f"{entry.group(1)}.__main__" in modules
    assert "cachemesh._tls" in modules  # the walk reaches the client helpers the services use
    missing = sorted(
        f"{module} ({path.relative_to(ROOT)})"
        for module, path in modules.items()
        if (where := _in_image(path, dockerfile)) is None or not _importable(module, where, roots)
    )
    assert missing == []


@pytest.mark.parametrize(
    "data",
    ["services/common/models.toml", "services/semantic_cache/verifier_model", "protos"],
)
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_the_package_data_the_services_read_is_copied(dockerfile: Path, data: str) -> None:
    assert (ROOT / data).exists()
    assert _in_image(ROOT / data, dockerfile) is not None


def test_a_file_left_out_is_found() -> None:
    """The check itself: a file outside the copied folders, or one .dockerignore leaves out,
    is not in the image."""
    router = ROOT / "services" / "router" / "Dockerfile"
    assert _in_image(ROOT / "tests" / "conftest.py", router) is None
    assert _in_image(ROOT / "services" / "router" / "__pycache__" / "x.pyc", router) is None
    assert _in_image(ROOT / "clients" / "python" / "cachemesh" / "_tls.py", router) == (
        APP / "clients" / "python" / "cachemesh" / "_tls.py"
    )
    copied = APP / "clients" / "python" / "cachemesh" / "_tls.py"
    assert _importable("cachemesh._tls", copied, [APP, APP / "clients" / "python"])
    assert not _importable("cachemesh._tls", copied, [APP])  # without the image's PYTHONPATH
