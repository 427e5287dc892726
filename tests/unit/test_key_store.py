"""The shared API key file and the stores that read it: changes seen within the poll period,
concurrent writers never losing a change, the older ``tenant:sha256hex`` lines still read."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.common import keyfile as keyfile_module
from services.common.env import ConfigError, Env
from services.common.key_store import KeyStore, KeyStoreError, UnknownKey
from services.common.keyfile import KeyFile, KeyFileError, Parsed, hash_key, new_api_key
from services.router.key_settings import KeyStoreSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _legacy(path: Path, **keys: str) -> None:
    path.write_text("".join(f"{tenant}:{hash_key(key)}\n" for tenant, key in keys.items()))


def _inline(job: Callable[[], None]) -> None:
    """A re-read run as soon as it is started: these tests are about what the file says (the
    worker thread a store runs it in has tests of its own, below)."""
    job()


def _store(path: Path, clock: Clock, poll_s: float = 0.25) -> KeyStore:
    return KeyStore.open(path, clock, lambda: 1_700_000_000.0, poll_s, start=_inline)


def test_the_older_tenant_colon_hash_lines_still_work(tmp_path: Path) -> None:
    key = new_api_key()
    _legacy(tmp_path / "keys", acme=key)
    store = _store(tmp_path / "keys", Clock())
    assert store.tenant_for(key) == "acme"
    assert store.tenant_for(key + "x") is None
    (record,) = store.records()
    assert record.id == f"file-{hash_key(key)[:12]}" and record.active


def test_a_key_created_by_one_store_is_accepted_by_another_within_the_poll(
    tmp_path: Path,
) -> None:
    _legacy(tmp_path / "keys", acme=new_api_key())
    clock = Clock()
    writer, reader = _store(tmp_path / "keys", clock), _store(tmp_path / "keys", clock)
    record, key = writer.create("globex", "ci")
    assert key.startswith("cm_") and record.tenant == "globex" and record.name == "ci"
    assert writer.tenant_for(key) == "globex"  # the writer at once
    assert reader.tenant_for(key) is None  # the reader looked less than poll_s ago
    clock.now += 0.25
    assert reader.tenant_for(key) == "globex"
    assert key not in (tmp_path / "keys").read_text()  # only its hash is stored


def test_revoked_and_rotated_keys_are_refused_everywhere(tmp_path: Path) -> None:
    _legacy(tmp_path / "keys", acme=new_api_key())
    clock = Clock()
    writer, reader = _store(tmp_path / "keys", clock), _store(tmp_path / "keys", clock)
    record, old = writer.create("globex", "")
    clock.now += 1
    assert reader.tenant_for(old) == "globex"
    rotated, new = writer.rotate(record.id)
    assert rotated.id == record.id and rotated.rotated_at is not None and new != old
    clock.now += 1
    assert reader.tenant_for(old) is None and reader.tenant_for(new) == "globex"
    revoked = writer.revoke(record.id)
    assert revoked.revoked_at is not None and writer.tenant_for(new) is None
    clock.now += 1
    assert reader.tenant_for(new) is None
    assert [r.id for r in reader.records() if not r.active] == [record.id]  # kept, listed
    with pytest.raises(KeyStoreError, match="revoked"):
        writer.rotate(record.id)
    with pytest.raises(UnknownKey):
        writer.revoke("key_nosuchkey")


class _Watched(KeyFile):
    """A key file that says whether a change is being applied under its lock."""

    locked = False

    def update(
        self,
        change: Callable[[list[Any]], list[Any]],
        *,
        create: bool = False,
        last: Parsed | None = None,
    ) -> Parsed:
        def watched(records: list[Any]) -> list[Any]:
            self.locked = True
            try:
                return change(records)
            finally:
                self.locked = False

        return super().update(watched, create=create, last=last)


def test_of_two_rotations_at_once_the_key_in_force_has_the_latest_rotated_at(
    tmp_path: Path,
) -> None:
    """Two routers rotate one key at once: both succeed, the last written wins (the other's
    key is refused, as after any later rotation), and the key in force carries the later
    stamp, so a caller whose rotated_at is not ListKeys' knows its key was replaced. The
    stamp was taken before the file's lock: the first router stamped, the second rotated
    whole, and the first then wrote its key over it with the earlier stamp (7 of 20 races
    with threads). Here the second rotation runs at the first's stamp unless the first holds
    the lock then, which it now does: the race, made deterministic."""
    _legacy(tmp_path / "keys", acme=new_api_key())
    stamps = iter(float(t) for t in range(1_700_000_000, 1_700_000_010))
    first_file, second_file = _Watched(tmp_path / "keys"), _Watched(tmp_path / "keys")
    second = KeyStore(second_file, Clock(), lambda: next(stamps), 0.25, start=_inline)
    key_id = second.records()[0].id
    answers: list[tuple[Any, str]] = []

    def first_wall() -> float:
        stamp = next(stamps)
        if not first_file.locked:  # the other router's whole rotation between stamp and write
            answers.append(second.rotate(key_id))
        return stamp

    first = KeyStore(first_file, Clock(), first_wall, 0.25, start=_inline)
    answers.insert(0, first.rotate(key_id))
    if len(answers) == 1:  # the first held the lock as it stamped: the second comes after
        answers.append(second.rotate(key_id))
    reader = _store(tmp_path / "keys", Clock())
    (in_force,) = [(r, key) for r, key in answers if reader.tenant_for(key) == "acme"]
    (dead,) = [(r, key) for r, key in answers if reader.tenant_for(key) is None]
    listed = reader.records()[0]
    assert listed.rotated_at == in_force[0].rotated_at
    assert dead[0].rotated_at is not None and in_force[0].rotated_at is not None
    assert dead[0].rotated_at < in_force[0].rotated_at, (dead[0], in_force[0])


def test_the_key_in_force_has_the_latest_rotated_at_whatever_the_routers_clocks(
    tmp_path: Path,
) -> None:
    """Router A's clock is 2 s ahead of B's: A rotates, then B. B's key is in force (the last
    written), and was stamped 2 s before A's dead one, so "the key in force has the latest
    rotated_at" was false. Now a change is stamped after the key's latest stamp: B's rotation
    just after A's, and a revocation by B after both."""
    _legacy(tmp_path / "keys", acme=new_api_key())
    a = KeyStore(KeyFile(tmp_path / "keys"), Clock(), lambda: 1_700_000_002.0, 0.25, start=_inline)
    b = KeyStore(KeyFile(tmp_path / "keys"), Clock(), lambda: 1_700_000_000.1, 0.25, start=_inline)
    key_id = a.records()[0].id
    (ra, ka), (rb, kb) = a.rotate(key_id), b.rotate(key_id)
    reader = _store(tmp_path / "keys", Clock())
    assert reader.tenant_for(ka) is None and reader.tenant_for(kb) == "acme"
    assert ra.rotated_at == 1_700_000_002.0  # its own clock: ahead of the record's stamps
    assert rb.rotated_at is not None and ra.rotated_at < rb.rotated_at < ra.rotated_at + 0.001
    assert reader.records()[0].rotated_at == rb.rotated_at
    revoked = b.revoke(key_id)
    assert revoked.revoked_at is not None and revoked.revoked_at > rb.rotated_at


def test_concurrent_writers_lose_no_change(tmp_path: Path) -> None:
    """Eight stores (each its own open file, as eight routers) create keys at once."""
    _legacy(tmp_path / "keys", acme=new_api_key())
    stores = [_store(tmp_path / "keys", Clock()) for _ in range(8)]
    issued: list[str] = []

    def create(store: KeyStore, n: int) -> None:
        for i in range(10):
            issued.append(store.create(f"t{n}", f"key {i}")[1])

    threads = [threading.Thread(target=create, args=(s, n)) for n, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    fresh = _store(tmp_path / "keys", Clock())
    assert len(fresh.records()) == 81
    assert all(fresh.tenant_for(key) is not None for key in issued)


def test_each_write_is_seen_even_within_one_tick_of_the_clock(tmp_path: Path) -> None:
    _legacy(tmp_path / "keys", acme=new_api_key())
    keyfile = KeyFile(tmp_path / "keys")
    seen = {keyfile.signature()}
    for _ in range(20):
        keyfile.update(lambda records: records)  # same content, same size
        seen.add(keyfile.signature())
    assert len(seen) == 21


def test_a_malformed_file_keeps_the_last_keys_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = new_api_key()
    _legacy(tmp_path / "keys", acme=key)
    clock = Clock()
    store = _store(tmp_path / "keys", clock)
    (tmp_path / "keys").write_text("acme:not-a-hash\n")
    clock.now += 1
    with caplog.at_level(logging.ERROR, "cachemesh.keys"):
        assert store.tenant_for(key) == "acme"
    assert "keys:1" in caplog.text and "keeping the keys read last" in caplog.text


def test_json_records_are_checked_field_by_field(tmp_path: Path) -> None:
    good = {"id": "key_1", "tenant": "acme", "sha256": hash_key("x")}
    (tmp_path / "keys").write_text(json.dumps({**good, "created_at": "yesterday"}) + "\n")
    with pytest.raises(KeyFileError, match="created_at"):
        KeyFile(tmp_path / "keys").read()
    (tmp_path / "keys").write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(KeyFileError, match="twice"):
        KeyFile(tmp_path / "keys").read()


def test_a_missing_key_file_is_created_from_the_seed(tmp_path: Path) -> None:
    key = new_api_key()
    _legacy(tmp_path / "seed", acme=key)
    store = _store_with_seed(tmp_path / "volume" / "keys", tmp_path / "seed")
    assert store.tenant_for(key) == "acme"
    created, _ = store.create("acme", "second")
    # the seed is read only while the key file does not exist
    again = _store_with_seed(tmp_path / "volume" / "keys", tmp_path / "seed")
    assert created.id in {r.id for r in again.records()}


def _store_with_seed(path: Path, seed: Path) -> KeyStore:
    path.parent.mkdir(exist_ok=True)
    return KeyStore.open(path, Clock(), lambda: 0.0, 0.25, seed, _inline)


def test_settings_are_validated_at_start_up(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("# nothing yet\n")
    env = Env({"CACHEMESH_API_KEYS_FILE": str(tmp_path / "keys")})
    with pytest.raises(ConfigError, match=r"holds no keys.*CACHEMESH_API_KEYS_FILE"):
        KeyStoreSettings.from_env(env).open(Clock(), lambda: 0.0)
    missing = Env({"CACHEMESH_API_KEYS_FILE": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match="does not exist"):
        KeyStoreSettings.from_env(missing).open(Clock(), lambda: 0.0)
    slow = Env({"CACHEMESH_API_KEYS_FILE": "k", "CACHEMESH_API_KEYS_POLL_S": "2"})
    with pytest.raises(ConfigError, match="CACHEMESH_API_KEYS_POLL_S"):
        KeyStoreSettings.from_env(slow)
    zero = Env({"CACHEMESH_API_KEYS_FILE": "k", "CACHEMESH_API_KEYS_POLL_S": "0"})
    assert KeyStoreSettings.from_env(zero).poll_s == 0.0


@pytest.mark.parametrize("seed", ["missing", "malformed", "not UTF-8"])
def test_a_bad_seed_file_is_blamed_on_the_seed_files_variable(tmp_path: Path, seed: str) -> None:
    """A missing or malformed CACHEMESH_API_KEYS_SEED_FILE was reported as
    CACHEMESH_API_KEYS_FILE's fault, sending the operator to the wrong file; one not in
    UTF-8 was a traceback (UnicodeDecodeError)."""
    if seed == "malformed":
        (tmp_path / "seed").write_text("not a key line\n")
    if seed == "not UTF-8":
        (tmp_path / "seed").write_bytes("acme caf\u00e9 key\n".encode("latin-1"))
    env = Env(
        {
            "CACHEMESH_API_KEYS_FILE": str(tmp_path / "keys"),
            "CACHEMESH_API_KEYS_SEED_FILE": str(tmp_path / "seed"),
        }
    )
    with pytest.raises(ConfigError) as err:
        KeyStoreSettings.from_env(env).open(Clock(), lambda: 0.0)
    assert str(err.value).endswith("(CACHEMESH_API_KEYS_SEED_FILE)"), str(err.value)
    assert str(tmp_path / "seed") in str(err.value)
    assert not (tmp_path / "keys").exists()


def test_a_key_file_that_cannot_be_created_from_the_seed_is_the_key_files_fault(
    tmp_path: Path,
) -> None:
    _legacy(tmp_path / "seed", acme=new_api_key())
    env = Env(
        {
            "CACHEMESH_API_KEYS_FILE": str(tmp_path / "no-such-dir" / "keys"),
            "CACHEMESH_API_KEYS_SEED_FILE": str(tmp_path / "seed"),
        }
    )
    with pytest.raises(ConfigError, match=r"\(CACHEMESH_API_KEYS_FILE\)$"):
        KeyStoreSettings.from_env(env).open(Clock(), lambda: 0.0)


@pytest.mark.parametrize("tenant", ["", "a b", "-lead", "x" * 65, "semi;colon", "acme\n"])
def test_a_new_key_needs_a_plain_tenant_name(tmp_path: Path, tenant: str) -> None:
    _legacy(tmp_path / "keys", acme=new_api_key())
    with pytest.raises(KeyStoreError, match="tenant must be"):
        _store(tmp_path / "keys", Clock()).create(tenant, "")


def test_a_key_name_is_one_short_line(tmp_path: Path) -> None:
    _legacy(tmp_path / "keys", acme=new_api_key())
    for name in ("two\nlines", "\x1b[2J clears a terminal", "\x9b too"):
        with pytest.raises(KeyStoreError, match="name"):
            _store(tmp_path / "keys", Clock()).create("acme", name)


@pytest.mark.parametrize(
    "name",
    [
        "ci \u202egnp.exe",  # RIGHT-TO-LEFT OVERRIDE: a listing shows "ci exe.png"
        "a\u2066b\u2069",  # bidi isolates
        "\u200fmark",  # RIGHT-TO-LEFT MARK
        "zero\u200bwidth",  # ZERO WIDTH SPACE (Cf): two names that look the same
        "bom\ufeff",
        "line\u2028sep",  # LINE SEPARATOR: a second line
        "para\u2029sep",
    ],
)
def test_a_key_name_holds_no_invisible_format_character(tmp_path: Path, name: str) -> None:
    """Unicode's format characters (Cf) reorder or hide what a listing of keys shows."""
    _legacy(tmp_path / "keys", acme=new_api_key())
    with pytest.raises(KeyStoreError, match="without control characters"):
        _store(tmp_path / "keys", Clock()).create("acme", name)


def test_a_key_name_may_hold_any_script_and_emoji(tmp_path: Path) -> None:
    _legacy(tmp_path / "keys", acme=new_api_key())
    store = _store(tmp_path / "keys", Clock())
    for name in ("alice laptop", "Zoë's Mac", "مفتاح", "दिल्ली", "\U0001f469\u200d\U0001f4bb dev"):
        record, _ = store.create("acme", name)
        assert record.name == name


@pytest.mark.parametrize(
    "line",
    [
        "user@example.com:" + hash_key("x"),
        json.dumps({"id": "key_1", "tenant": "acme\n", "sha256": hash_key("x")}),
        json.dumps({"id": "key_1", "tenant": "a}b", "sha256": hash_key("x")}),
    ],
)
def test_a_tenant_the_admin_api_could_not_name_is_refused_in_the_file(
    tmp_path: Path, line: str
) -> None:
    """The Admin API names tenants by the same rule (purge, stats, policy): a key file tenant
    outside it could be served but never purged; the router refuses to start, naming the line."""
    (tmp_path / "keys").write_text("# keys\n" + line + "\n")
    with pytest.raises(KeyFileError, match="keys:2: tenant must be"):
        KeyFile(tmp_path / "keys").read()


def test_a_number_too_long_for_python_is_a_malformed_line_not_a_crash(tmp_path: Path) -> None:
    """json.loads raises a plain ValueError (int_max_str_digits) for a number of over 4,300
    digits, which the re-read on the key-check path did not catch: one hand edit raised out of
    every request's key check. Now the line is named, as any malformed line is."""
    line = '{"id":"key_1","tenant":"acme","sha256":"' + hash_key("x") + '","created_at":'
    (tmp_path / "keys").write_text("# keys\n" + line + "9" * 5000 + "}\n")
    with pytest.raises(KeyFileError, match="keys:2: not a key record"):
        KeyFile(tmp_path / "keys").read()


def test_a_file_that_could_not_be_read_is_read_again_at_the_next_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that failed for a passing reason (out of file descriptors) must not mark that
    version of the file as read: a revocation in it would be missed until the next change."""
    key = new_api_key()
    _legacy(tmp_path / "keys", acme=key)
    clock = Clock()
    writer, reader = _store(tmp_path / "keys", clock), _store(tmp_path / "keys", clock)
    (record,) = writer.records()
    writer.revoke(record.id)
    real_open = open
    failing = [True]

    def open_once(path: Any, *args: Any, **kwargs: Any) -> Any:
        if failing and failing.pop():
            raise OSError(24, "Too many open files")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", open_once)
    clock.now += 1
    assert reader.tenant_for(key) == "acme"  # the file could not be read: the last keys stand
    clock.now += 1
    assert reader.tenant_for(key) is None  # read again: revoked


def test_a_revocation_by_another_router_right_after_this_ones_write_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Router B revokes a key between router A's write and A's look at the file: A must not
    take B's file for its own (it would never reload it and accept the revoked key)."""
    victim = new_api_key()
    _legacy(tmp_path / "keys", acme=victim)
    clock = Clock()
    a, b = _store(tmp_path / "keys", clock), _store(tmp_path / "keys", clock)
    (record,) = a.records()
    real_update = KeyFile.update

    def then_b_revokes(self: KeyFile, *args: Any, **kwargs: Any) -> Any:
        written = real_update(self, *args, **kwargs)
        if self is a._file:
            monkeypatch.setattr(KeyFile, "update", real_update)
            b.revoke(record.id)  # right after A's lock is released
        return written

    monkeypatch.setattr(KeyFile, "update", then_b_revokes)
    a.create("beta", "new")
    assert b.tenant_for(victim) is None
    clock.now += 1.0  # past poll_s
    assert a.tenant_for(victim) is None


def test_a_file_that_cannot_be_checked_keeps_the_last_keys_and_is_checked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EACCES after a volume's permissions changed, ESTALE on the NFS volume routers share:
    the keys read last stay in force (every tenant was locked out, the path in an UNKNOWN)."""
    key = new_api_key()
    path = tmp_path / "keys"
    _legacy(path, acme=key)
    clock = Clock()
    writer, reader = _store(path, clock), _store(path, clock)
    real_stat = os.stat
    failing = [True]

    def stat(target: Any, *args: Any, **kwargs: Any) -> Any:
        if os.fspath(target) == os.fspath(path) and failing:
            raise OSError(116, "Stale file handle", str(path))
        return real_stat(target, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    (record,) = writer.records()
    failing.pop()
    writer.revoke(record.id)
    failing.append(True)
    clock.now += 1
    assert reader.tenant_for(key) == "acme"  # cannot be checked: the last keys stand
    failing.pop()
    clock.now += 1
    assert reader.tenant_for(key) is None  # checked again: revoked


class _Paused(KeyFile):
    """A key file whose next ``update`` (or ``load``: a re-read) once armed stops right after
    it returns, as a worker thread the scheduler left waiting there, until ``go`` is set."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.armed = ""  # "update" or "load"
        self.here = threading.Event()  # the paused call is in its window
        self.go = threading.Event()
        self.wrote = threading.Event()  # a later update wrote the file

    def _pause(self, what: str) -> None:
        if self.armed == what and not self.here.is_set():
            self.here.set()
            assert self.go.wait(10)

    def update(self, *args: Any, **kwargs: Any) -> Any:
        written = super().update(*args, **kwargs)
        if self.here.is_set():
            self.wrote.set()
        self._pause("update")
        return written

    def load(self, last: Parsed | None = None) -> Parsed:
        parsed = super().load(last)
        self._pause("load")
        return parsed


@pytest.mark.parametrize("slow", ["update", "load"])
def test_a_key_revoked_during_another_change_is_refused_at_once(tmp_path: Path, slow: str) -> None:
    """Two key changes on one router run in worker threads (its Admin API's): one, a
    CreateKey (or a look at a file another router changed), holds the file as it was, paused
    before showing it; a RevokeKey writes and shows its own. The paused one then showed the
    older file over it: the revoked key was accepted on that router until its next poll."""
    path = tmp_path / "keys"
    _legacy(path, acme=new_api_key())
    clock = Clock()
    keyfile = _Paused(path)
    store = KeyStore(keyfile, clock, lambda: 1_700_000_000.0, 0.25, _inline)
    victim, key = store.create("globex", "victim")
    if slow == "update":
        first = threading.Thread(target=store.create, args=("globex", "new"))
    else:
        _store(path, clock).create("initech", "")  # another router's change, for this to read
        clock.now += 1  # past poll_s: the next key check reads the file
        first = threading.Thread(target=store.tenant_for, args=(key,))
    keyfile.armed = slow
    first.start()
    assert keyfile.here.wait(10)
    revoke = threading.Thread(target=store.revoke, args=(victim.id,))
    revoke.start()
    keyfile.wrote.wait(0.5)  # the revocation's write: at once, unless it waits its turn
    keyfile.go.set()
    first.join(10)
    revoke.join(10)
    assert not first.is_alive() and not revoke.is_alive()
    records, _ = KeyFile(path).read()
    assert [r.id for r in records if not r.active] == [victim.id]
    assert store.tenant_for(key) is None  # before this router's next poll


class _Threads:
    """Starts each re-read in a thread, as a store does, and keeps it for the test to join."""

    def __init__(self) -> None:
        self.started: list[threading.Thread] = []

    def __call__(self, job: Callable[[], None]) -> None:
        thread = threading.Thread(target=job, daemon=True)
        self.started.append(thread)
        thread.start()

    def join(self) -> None:
        for thread in self.started:
            thread.join(10)
            assert not thread.is_alive()


def test_a_key_check_never_waits_for_a_reread_and_sees_the_new_keys_once_it_is_swapped_in(
    tmp_path: Path,
) -> None:
    """A key change made every other router and HTTP front re-read and parse the whole file on
    its event loop, in a request's key check (10k keys: 151 ms; 90k: a request held 5.5 s).
    The re-read runs in a worker thread, here held in the middle (the file read and parsed,
    not yet swapped in): the key checks meanwhile are answered, by the keys read last, all of
    them (no half-read file); once it is swapped in, by the new ones."""
    path = tmp_path / "keys"
    victim = new_api_key()
    _legacy(path, acme=victim)
    clock = Clock()
    keyfile = _Paused(path)
    threads = _Threads()
    reader = KeyStore(keyfile, clock, lambda: 1_700_000_000.0, 0.25, threads)
    other = _store(path, clock)  # another router
    created, new = other.create("globex", "")
    (old,) = [r for r in other.records() if r.tenant == "acme"]
    other.revoke(old.id)
    keyfile.armed = "load"
    clock.now += 1  # past poll_s: this key check notices the change and starts a re-read
    assert reader.tenant_for(victim) == "acme"
    assert keyfile.here.wait(10)  # the re-read has read the new file and is held
    for _ in range(3):
        clock.now += 1  # polls while it runs start no other re-read
        assert reader.tenant_for(victim) == "acme" and reader.tenant_for(new) is None
    assert len(threads.started) == 1
    keyfile.go.set()
    threads.join()
    assert reader.tenant_for(victim) is None and reader.tenant_for(new) == "globex"
    assert created.id in {r.id for r in reader.records()}


def test_a_change_made_during_a_reread_is_read_right_after_it(tmp_path: Path) -> None:
    """One re-read at a time; a poll that sees a change while one runs makes one more run
    after it (that change is in force without waiting for a third change or a later poll)."""
    path = tmp_path / "keys"
    victim = new_api_key()
    _legacy(path, acme=victim)
    clock = Clock()
    keyfile = _Paused(path)
    threads = _Threads()
    reader = KeyStore(keyfile, clock, lambda: 1_700_000_000.0, 0.25, threads)
    other = _store(path, clock)
    other.create("globex", "")
    keyfile.armed = "load"
    clock.now += 1
    reader.tenant_for(victim)
    assert keyfile.here.wait(10)  # the first re-read holds the file as it was
    (old,) = [r for r in other.records() if r.tenant == "acme"]
    other.revoke(old.id)  # lands during it
    clock.now += 1
    assert reader.tenant_for(victim) == "acme"  # seen by this poll: one more re-read owed
    keyfile.go.set()
    threads.join()
    assert len(threads.started) == 1  # the same worker read it again
    assert reader.tenant_for(victim) is None  # no further poll needed


def test_a_change_does_not_parse_the_file_again_and_a_reread_parses_only_new_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CreateKey re-read and parsed the whole file under its lock (10k keys: 151 ms of its
    334-409 ms); every other process then parsed all of it again for one new line."""
    path = tmp_path / "keys"
    _legacy(path, acme=new_api_key())
    clock = Clock()
    writer, reader = _store(path, clock), _store(path, clock)
    for i in range(20):
        writer.create("globex", f"key {i}")
    clock.now += 1
    assert len(reader.records()) == 21  # the reader has read them
    third = _store(path, clock)  # a third router, the file read as it is
    parsed: list[str] = []
    real = keyfile_module._json_record

    def counted(line: str, where: str) -> Any:
        parsed.append(where)
        return real(line, where)

    monkeypatch.setattr(keyfile_module, "_json_record", counted)
    _, key = writer.create("globex", "one more")  # this router holds the file as it is
    assert parsed == []
    written = path.read_text().splitlines()[1:]
    assert all(line.startswith("{") for line in written)  # the legacy line was rewritten
    assert [json.loads(line)["name"] for line in written][-2:] == ["key 19", "one more"]
    clock.now += 1
    assert reader.tenant_for(key) == "globex"
    assert parsed == [f"{path}:23"]  # the new line alone (the header, one legacy line, 20)
    third.create("initech", "")  # it reads the one line it had not seen, then writes
    assert parsed[1:] == [f"{path}:23"]
    clock.now += 1
    assert len(reader.records()) == 23 and parsed[2:] == [f"{path}:24"]


def test_a_reread_that_fails_unexpectedly_is_logged_and_the_next_poll_reads_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault out of a re-read (not the file's: a bug, MemoryError) must not leave the store
    thinking one is still running: no poll would ever start another."""
    path = tmp_path / "keys"
    victim = new_api_key()
    _legacy(path, acme=victim)
    clock = Clock()
    keyfile = KeyFile(path)
    threads = _Threads()
    reader = KeyStore(keyfile, clock, lambda: 1_700_000_000.0, 0.25, threads)
    other = _store(path, clock)
    (old,) = other.records()
    other.revoke(old.id)
    real_load = keyfile.load
    faults = [MemoryError()]

    def load(last: Parsed | None = None) -> Parsed:
        if faults:
            raise faults.pop()
        return real_load(last)

    monkeypatch.setattr(keyfile, "load", load)
    clock.now += 1
    with caplog.at_level(logging.ERROR, "cachemesh.keys"):
        assert reader.tenant_for(victim) == "acme"
        threads.join()
    assert "could not be re-read; keeping the keys read last" in caplog.text
    assert reader.tenant_for(victim) == "acme"  # within poll_s: not looked at again
    clock.now += 1
    reader.tenant_for(victim)
    threads.join()
    assert len(threads.started) == 2 and reader.tenant_for(victim) is None


async def test_the_first_key_check_on_an_idle_process_after_a_change_sees_it(
    tmp_path: Path,
) -> None:
    """A router or HTTP front with no request since another process changed the key file
    started the re-read at its next key check and answered that check by the keys read
    before: a key created through one router was refused UNAUTHENTICATED by another idle 5 s
    (on a real stack), and a key revoked was served there. Now the check waits for the
    re-read (in its worker thread, as ever, waited for on the event loop)."""
    _legacy(tmp_path / "keys", acme=new_api_key())
    clock = Clock()
    writer = _store(tmp_path / "keys", clock)
    idle = KeyStore.open(tmp_path / "keys", clock, lambda: 1_700_000_000.0, 0.25)  # threads
    record, key = writer.create("globex", "ci")
    clock.now += 60  # no check meanwhile
    assert await idle.checked_tenant_for(key) == "globex"
    writer.revoke(record.id)
    clock.now += 60
    assert await idle.checked_tenant_for(key) is None
