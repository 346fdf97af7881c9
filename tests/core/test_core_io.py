"""Storage helpers: a missing object-store backend names the extra to install; write probes."""

import importlib
import os

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from shpeft_core import io
from shpeft_core.io import StorageError, check_writable

# The module, not the read-only `fsspec.registry` mapping that fsspec's package exports under that name.
_fsspec_registry = importlib.import_module("fsspec.registry")
_registry = _fsspec_registry._registry  # the mutable dict behind fsspec's read-only registry


def _without_backend(monkeypatch, *protocols):
    """Make fsspec fail to import these protocols' backends, installed or not."""
    for proto in protocols:
        if proto in _registry:
            monkeypatch.delitem(_registry, proto)
        bit = _fsspec_registry.known_implementations[proto]
        monkeypatch.setitem(_fsspec_registry.known_implementations, proto,
                            {**bit, "class": "shpeft_test_no_such_module.FileSystem"})


HELPERS = {
    "exists": lambda u: io.exists(u),
    "read_bytes": lambda u: io.read_bytes(u),
    "atomic_write_bytes": lambda u: io.atomic_write_bytes(u, b"x"),
    "remove": lambda u: io.remove(u),
    "sha256_file": lambda u: io.sha256_file(u),
    "local_path": lambda u: io.local_path(u),
    "check_writable": lambda u: check_writable(u),
}


@pytest.mark.parametrize("helper", HELPERS, ids=str)
def test_missing_s3_backend_names_the_extra(monkeypatch, helper):
    _without_backend(monkeypatch, "s3", "s3a")
    with pytest.raises(StorageError) as info:
        HELPERS[helper]("s3://bucket/shpeft/x")
    assert str(info.value) == (
        "s3://bucket/shpeft/x: the s3 filesystem backend is not installed; pip install 'shpeft[s3]'"
    )


@pytest.mark.parametrize("uri", ["gs://bucket/x", "gcs://bucket/x"])
def test_missing_gcs_backend_names_the_extra(monkeypatch, uri):
    _without_backend(monkeypatch, "gs", "gcs")
    with pytest.raises(StorageError, match=r"not installed; pip install 'shpeft\[gcs\]'") as info:
        io.exists(uri)
    assert str(info.value).startswith(uri + ": ")


def test_chained_uri_names_the_failing_protocol(monkeypatch):
    _without_backend(monkeypatch, "s3")
    with pytest.raises(StorageError, match=r"the s3 filesystem backend .* 'shpeft\[s3\]'"):
        io.read_bytes("simplecache::s3://bucket/x")


def test_unknown_protocol():
    with pytest.raises(StorageError, match=r"nosuchproto://x: no fsspec filesystem is known for protocol 'nosuchproto'"):
        io.exists("nosuchproto://x")


def test_storage_error_is_exported_value_error():
    assert {"StorageError", "check_writable"} <= set(io.__all__)
    assert issubclass(StorageError, ValueError)


# ---------------------------------------------------------------- check_writable


def _probes(fs, path):
    return [p for p in fs.find(path, withdirs=True) if ".shpeft-write-probe-" in p]


def test_check_writable_memory():
    fs = fsspec.filesystem("memory")
    check_writable("memory://shpeft-io-test/store")
    assert fs.isdir("/shpeft-io-test/store") and not _probes(fs, "/shpeft-io-test")
    fs.rm("/shpeft-io-test", recursive=True)


def test_check_writable_local_creates_the_store(tmp_path):
    store = tmp_path / "a" / "store"
    check_writable(str(store))
    assert store.is_dir() and os.listdir(store) == []


def test_check_writable_parent_is_a_file(tmp_path):
    (tmp_path / "f").write_text("not a folder")
    store = tmp_path / "f" / "store"
    with pytest.raises(StorageError) as info:
        check_writable(str(store))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"store {store} is not writable")
    assert not store.exists()


def test_check_writable_store_is_a_file(tmp_path):
    (tmp_path / "f").write_text("not a folder")
    with pytest.raises(StorageError, match="is a file"):
        check_writable(str(tmp_path / "f"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_writable_read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StorageError, match="PermissionError"):
            check_writable(str(ro))
    finally:
        ro.chmod(0o700)


class _ReadOnlyFS(MemoryFileSystem):
    """A memory filesystem that lists and makes folders but refuses every write, like a read-only bucket."""

    protocol = "shpeftro"
    store = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        if path.startswith("shpeftro://"):
            path = path[len("shpeftro://"):]
        return super()._strip_protocol(path)

    def pipe_file(self, path, value, *args, **kwargs):
        raise PermissionError(f"Access Denied\nwriting {path}")

    def open(self, path, mode="rb", *args, **kwargs):
        if "r" not in mode:
            raise PermissionError(f"Access Denied: {path}")
        return super().open(path, mode, *args, **kwargs)


def test_check_writable_read_only_store(monkeypatch):
    monkeypatch.setitem(_registry, "shpeftro", _ReadOnlyFS)
    with pytest.raises(StorageError) as info:
        check_writable("shpeftro://bucket/store")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("store shpeftro://bucket/store is not writable: cannot write shpeftro://bucket/store/.shpeft-write-probe-")
    assert "PermissionError: Access Denied" in msg
    # A write the backend refuses is one StorageError naming the URI, with the backend's own error.
    with pytest.raises(StorageError, match="cannot write shpeftro://bucket/store/x: Access Denied") as info:
        io.atomic_write_bytes("shpeftro://bucket/store/x", b"x")
    assert isinstance(info.value.__cause__, PermissionError)


def test_sealed_json_round_trips_and_refuses_any_change(tmp_path):
    uri = str(tmp_path / "state.json")
    doc = {"trials": [{"id": "a", "val": 0.75, "nan": float("nan")}], "n": 3, "text": "é"}
    io.write_sealed_json(uri, doc)
    got = io.read_sealed_json(uri)
    assert got["n"] == 3 and got["text"] == "é" and got["trials"][0]["val"] == 0.75
    assert got["trials"][0]["nan"] != got["trials"][0]["nan"]  # NaN kept
    text = open(uri).read()
    for bad, why in ((text.replace("0.75", "0.76"), "damaged"), (text.replace('"n": 3', '"n": 4'), "damaged"),
                     (text[:-5], "not readable JSON"), ('{"n": 3}', "no checksum"), ("[1, 2]", "no checksum")):
        open(uri, "w").write(bad)
        with pytest.raises(io.DamagedFileError, match=why) as err:
            io.read_sealed_json(uri)
        assert uri in str(err.value)
    with pytest.raises(FileNotFoundError):
        io.read_sealed_json(str(tmp_path / "absent.json"))
