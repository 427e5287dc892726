"""``docker-compose config`` of this repository's compose file and ``.env``, resolved in a
scratch folder (so this install's .run/ is untouched): shared by the compose tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cachemesh.envfile import read_env_file
from services.tools.keys import StackKeys, ensure_keys
from services.tools.stack.environment import port_of
from services.tools.stack.service_table import ServiceDef

ROOT = Path(__file__).resolve().parents[2]


class Resolved:
    def __init__(self, config: dict[str, Any], work: Path, keys: StackKeys) -> None:
        self.config, self.work, self.keys = config, work, keys
        self.dotenv = read_env_file(work / ".env")

    @property
    def run_dir(self) -> Path:
        return self.work / ".run"

    def service(self, name: str) -> dict[str, Any]:
        services: dict[str, dict[str, Any]] = self.config["services"]
        return services[name]

    def port(self, spec: ServiceDef) -> int:
        return port_of(self.dotenv[spec.listen_var])

    def metrics_port(self, spec: ServiceDef) -> int:
        return port_of(self.dotenv[spec.metrics_var])

    def mounts(self, name: str) -> dict[str, Path]:
        """Container path -> the file or folder of this repository mounted there."""
        found: dict[str, Path] = {}
        for volume in self.service(name).get("volumes", []):
            source, _, rest = volume.partition(":")
            if source.startswith(str(self.work)):
                found[rest.split(":")[0]] = ROOT / Path(source).relative_to(self.work)
        return found


def resolve(work: Path, dotenv_extra: str = "") -> Resolved:
    """``docker-compose config`` on a copy of the compose file and ``.env`` (with
    ``dotenv_extra`` appended) in ``work``, so this install's .run/ is untouched."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail(
            "docker-compose is not installed, so docker-compose.yml cannot be validated: "
            "run `make test-deps` (apt-get install docker-compose)"
        )
    shutil.copy(ROOT / "docker-compose.yml", work)
    (work / ".env").write_text((ROOT / ".env").read_text() + dotenv_extra)
    keys = ensure_keys(work / ".run")
    result = subprocess.run(
        [exe, "--project-directory", str(work), "-f", str(work / "docker-compose.yml"), "config"],
        cwd=work,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return Resolved(yaml.safe_load(result.stdout), work, keys)
