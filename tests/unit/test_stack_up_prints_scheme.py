"""``make up`` prints the HTTP front's base URL as ``demo-keys.env`` exports it
(``CACHEMESH_HTTP_URL``): with HTTP_FRONT_TLS_CERT_FILE set the front speaks TLS, and ``up``
printed ``http://...`` though the file said ``https://...`` (a client pointed at the printed
URL got a reset, not an answer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.tools.keys import StackKeys, ensure_keys
from services.tools.stack import cli
from services.tools.stack.lifecycle import Stack


@pytest.fixture(autouse=True)
def _started(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Stack.start`` starts nothing: it writes the keys with the endpoints, as it does."""

    def start(self: Stack, timeout_s: float = 0.0) -> StackKeys:
        return ensure_keys(self.run_dir, self.client_endpoints())

    monkeypatch.setattr(Stack, "start", start)
    monkeypatch.delenv("HTTP_FRONT_TLS_CERT_FILE", raising=False)


def _up(root: Path, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--root", str(root), "--run-dir", str(root / ".run"), "up"])
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize(
    ("dotenv", "scheme"),
    [
        ("HTTP_FRONT_LISTEN=127.0.0.1:18088\n", "http"),
        (
            "HTTP_FRONT_LISTEN=127.0.0.1:18088\nHTTP_FRONT_TLS_CERT_FILE=/etc/front.crt\n"
            "HTTP_FRONT_TLS_KEY_FILE=/etc/front.key\n",
            "https",
        ),
    ],
)
def test_up_prints_the_front_url_with_its_scheme(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dotenv: str, scheme: str
) -> None:
    (tmp_path / ".env").write_text(dotenv)
    out = _up(tmp_path, capsys)
    url = f"{scheme}://127.0.0.1:18088"
    assert f"HTTP front (Anthropic and OpenAI APIs): {url}\n" in out
    assert f"CACHEMESH_HTTP_URL={url}" in (tmp_path / ".run" / "demo-keys.env").read_text()
