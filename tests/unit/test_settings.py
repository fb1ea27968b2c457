"""dom0 settings (xenpbr/settings.py): env > file > defaults, strict names, typed values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from xenpbr import settings, state
from xenpbr.images import hotcache
from xenpbr.images.store import ImageStore
from xenpbr.settings import Settings, SettingsError, load

HOOKS = Path(__file__).resolve().parents[2] / "hooks"


def conf(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "xenpbr.conf"
    path.write_text(text)
    return path


def test_defaults_without_file_or_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(settings, "DEFAULT_PATH", tmp_path / "absent.conf")
    assert load(environ={}) == Settings()
    assert Settings().state_dir == Path("/var/lib/xenpbr") and Settings().hot_stream


def test_file_overrides_defaults_and_environment_overrides_file(tmp_path: Path) -> None:
    path = conf(tmp_path, "[state]\ndir = /srv/pbr\n[images]\ndefault_quota = 20G\n"
                "[hot-stream]\nenabled = no\ndir = /fast/hot\n[log]\nlevel = warning\n")
    from_file = load(path, environ={})
    assert from_file == Settings(state_dir=Path("/srv/pbr"), image_quota=20 << 30,
                                 hot_stream=False, hot_stream_dir=Path("/fast/hot"),
                                 log_level="warning")
    env = {"XENPBR_STATE_DIR": "/env/state", "XENPBR_HOT_CACHE": "1",
           "XENPBR_IMAGE_QUOTA": "512M"}
    both = load(path, environ=env)
    assert both.state_dir == Path("/env/state") and both.hot_stream
    assert both.image_quota == 512 << 20
    assert both.log_level == "warning"  # not overridden: the file's value stays


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = conf(tmp_path, "[log]\nlevel = debug\n")
    assert load(environ={"XENPBR_CONFIG": str(path)}).log_level == "debug"


def test_a_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read config file .*missing.conf"):
        load(tmp_path / "missing.conf", environ={})


@pytest.mark.parametrize("text, message", [
    ("[images]\ndefault_qouta = 1G\n", r"unknown key 'default_qouta' in \[images\] "
                                       r"\(did you mean 'default_quota'\?\)"),
    ("[hotstream]\nenabled = no\n", r"unknown section \[hotstream\] "
                                    r"\(did you mean 'hot-stream'\?\)"),
    ("[state]\ndir = /a\ndir = /b\n", "option 'dir' in section 'state' already exists"),
    ("dir = /a\n", "no section headers"),
    ("[DEFAULT]\ndir = /a\n", r"unknown section \[DEFAULT\]"),
])
def test_unknown_or_duplicate_names_are_errors_naming_the_close_match(
        tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load(conf(tmp_path, text), environ={})


@pytest.mark.parametrize("text, message", [
    ("[state]\ndir = var/lib/xenpbr\n", r"\[state\] dir: 'var/lib/xenpbr' .*absolute"),
    ("[images]\ndefault_quota = lots\n", r"\[images\] default_quota: 'lots' .*K/M/G/T"),
    ("[images]\ndefault_quota = -1\n", r"default_quota: '-1'"),
    ("[hot-stream]\nenabled = maybe\n", r"\[hot-stream\] enabled: 'maybe' .*yes/no"),
    ("[log]\nlevel = loud\n", r"\[log\] level: 'loud' .*debug, info"),
])
def test_bad_values_name_the_key_and_the_file(tmp_path: Path, text: str,
                                              message: str) -> None:
    with pytest.raises(SettingsError, match=message) as exc:
        load(conf(tmp_path, text), environ={})
    assert "xenpbr.conf" in str(exc.value)


def test_bad_environment_value_names_the_variable(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(settings, "DEFAULT_PATH", tmp_path / "absent.conf")
    with pytest.raises(SettingsError, match="environment variable XENPBR_HOT_CACHE: 'perhaps'"):
        load(environ={"XENPBR_HOT_CACHE": "perhaps"})


@pytest.mark.parametrize("text, size", [("1024", 1024), ("4k", 4096), ("2MiB", 2 << 20),
                                        ("3 G", 3 << 30), ("1TB", 1 << 40),
                                        ("unlimited", None), ("none", None), ("", None)])
def test_sizes(text: str, size: int | None) -> None:
    assert settings.parse_size(text) == size


def test_the_example_file_holds_every_key_and_loads(tmp_path: Path) -> None:
    text = (HOOKS / "xenpbr.conf").read_text()
    for k in settings.KEYS:
        assert f"[{k.section}]" in text and f"#{k.name} =" in text and k.env in text
    assert load(HOOKS / "xenpbr.conf", environ={}) == Settings()
    uncommented = re.sub(r"(?m)^#(\w+ =)", r"\1", text)
    assert load(conf(tmp_path, uncommented), environ={}) == Settings()


def test_docs_describe_every_key() -> None:
    text = (HOOKS.parent / "docs" / "settings.md").read_text()
    for k in settings.KEYS:
        assert f"`{k.name}`" in text and k.env in text and f"[{k.section}]" in text


def test_state_root_and_hot_stream_follow_the_config_file(tmp_path: Path,
                                                          monkeypatch) -> None:
    path = conf(tmp_path, f"[state]\ndir = {tmp_path / 'st'}\n[hot-stream]\nenabled = off\n"
                f"dir = {tmp_path / 'hot'}\n")
    for var in ("XENPBR_STATE_DIR", "XENPBR_HOT_CACHE", "XENPBR_HOT_STREAM_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XENPBR_CONFIG", str(path))
    assert state.state_root() == tmp_path / "st"
    assert not hotcache.enabled()
    store = ImageStore(tmp_path / "store")
    assert hotcache.domain_dir(store, "web") == tmp_path / "hot" / "web"
    monkeypatch.setenv("XENPBR_HOT_CACHE", "1")  # the environment overrides the file
    assert hotcache.enabled()


def test_hot_stream_no_room_names_the_setting(tmp_path: Path, monkeypatch) -> None:
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")(10 << 30, 0, 200 << 20)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage)
    with pytest.raises(hotcache.NoRoom, match=r"\[hot-stream\] dir .*XENPBR_HOT_STREAM_DIR"):
        hotcache._check_room(tmp_path, 512 << 20)


def test_quota_refusal_names_the_setting(tmp_path: Path) -> None:
    from xenpbr.images.errors import QuotaExceeded
    from xenpbr.images.writer import CaptureWriter
    writer = CaptureWriter.__new__(CaptureWriter)
    writer.domain, writer.phase, writer._quota, writer._charged_bytes = "web", "app", 1, 2
    err = writer._over_quota("its pages")
    assert isinstance(err, QuotaExceeded)
    assert "[images] default_quota" in str(err) and "XENPBR_IMAGE_QUOTA" in str(err)
