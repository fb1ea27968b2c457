"""Reading xl configs, translating phasereboot for xl, fingerprint inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenpbr import domconfig
from xenpbr.domconfig import ConfigError

SAMPLE = r'''
# a PV guest
name = "web1"
type = "pv"
kernel = "KERNEL"
memory = 256
vcpus = 2
extra = "console=hvc0 quiet"
on_crash = "phasereboot"   # handled by xenpbr
on_watchdog = 'phasereboot'
disk = [ 'format=raw, vdev=xvda, access=rw, target=/srv/root.img',
         "file:/srv/data.img,xvdb,w",
         "/srv/ro.iso,raw,xvdc,r", ]
xenpbr_disks = ["xvdb=persistent"]
uuid = "5a4c5e6b-1111-2222-3333-444455556666"
'''


def cfg(text: str = SAMPLE, tmp_path: Path | None = None) -> domconfig.DomainConfig:
    return domconfig.parse(text, Path("vm.cfg"))


def test_parse_values_comments_and_lists() -> None:
    c = cfg()
    assert c.name == "web1" and c.settings["memory"] == 256 and c.settings["vcpus"] == 2
    assert c.settings["disk"][1] == "file:/srv/data.img,xvdb,w"
    assert c.wants_phasereboot("on_crash") and c.wants_phasereboot("on_watchdog")


def test_for_xl_translates_actions_and_drops_xenpbr_keys() -> None:
    xl = cfg().for_xl()
    assert xl["on_crash"] == "preserve" and xl["on_watchdog"] == "preserve"
    assert "xenpbr_disks" not in xl
    rendered = domconfig.render(xl)
    assert domconfig.parse(rendered).settings == xl  # render/parse round trip


def test_disk_policies_default_explicit_and_readonly() -> None:
    assert domconfig.disk_policies(cfg()) == {"xvda": "snapshot", "xvdb": "persistent",
                                              "xvdc": "readonly"}


@pytest.mark.parametrize("text,match", [
    ('name = "a"\non_crash = "reboot-please"\n', "not an action"),
    ('name = "a"\non_poweroff = "phasereboot"\n', "not an action"),
    ('name = "a"\ntype = "hvm"\non_crash = "phasereboot"\n', "PV guests only"),
    ('name = "a"\nmemory = \n', "expected a value"),
    ('name = "a" extra\n', "expected newline"),
    ('name = "a"\ndisk = ["x" "y"]\n', "expected ',' or ']'"),
    ('name = "a"\n$x = 1\n', "unexpected character"),
    ('name = "a"\ndisk = ["/img,xvda,w"]\nxenpbr_disks = ["xvda=weird"]\n', "POLICY"),
    ('name = "a"\ndisk = ["/img,xvda,w"]\nxenpbr_disks = ["xvdz=persistent"]\n', "VDEV"),
])
def test_bad_configs_name_the_problem(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        c = domconfig.parse(text, Path("vm.cfg"))
        domconfig.disk_policies(c)


def test_missing_name_is_reported() -> None:
    with pytest.raises(ConfigError, match="no name"):
        domconfig.parse("memory = 1\n").name


def test_fingerprint_follows_kernel_bytes_not_path(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel-1")
    c = cfg(SAMPLE.replace("KERNEL", str(kernel)))
    before = domconfig.fingerprint(c, ("kernel", "app"), "v1")
    kernel.write_bytes(b"kernel-2")  # upgraded in place, same path
    after = domconfig.fingerprint(c, ("kernel", "app"), "v1")
    assert before.differences(after) == ["kernel"]
    assert before.disks == (("xvda", "/srv/root.img", "snapshot"),
                            ("xvdb", "file:/srv/data.img", "persistent"),
                            ("xvdc", "/srv/ro.iso", "readonly"))
    assert before.memory_mib == 256 and before.cmdline == "console=hvc0 quiet"


def test_unreadable_kernel_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="fingerprint"):
        domconfig.fingerprint(cfg(SAMPLE.replace("KERNEL", "/nonexistent/vmlinuz")), (), "")


@pytest.mark.parametrize("line, problem", [
    ("xenpbr_crash_loop_window = 0", "xenpbr_crash_loop_window = 0"),
    ("xenpbr_crash_loop_window = \"60\"", "expected a number of seconds"),
    ("xenpbr_crash_loop_limit = 0", "xenpbr_crash_loop_limit = 0"),
    ("xenpbr_crash_loop_limit = 2.5", "whole number of crashes"),
])
def test_bad_crash_loop_settings_are_refused_at_parse_time(line: str, problem: str) -> None:
    with pytest.raises(domconfig.ConfigError, match=problem):
        domconfig.parse(f'name = "g"\n{line}\n')


def test_crash_loop_policy_defaults_and_overrides() -> None:
    assert domconfig.crash_loop_policy(domconfig.parse('name = "g"\n')) == (60.0, 3)
    cfg = domconfig.parse('name = "g"\nxenpbr_crash_loop_window = 20\n'
                          'xenpbr_crash_loop_limit = 5\n')
    assert domconfig.crash_loop_policy(cfg) == (20.0, 5)


def test_hot_stream_setting_defaults_on_and_refuses_other_values() -> None:
    assert domconfig.hot_stream(domconfig.parse('name = "a"\n'))
    assert not domconfig.hot_stream(domconfig.parse('name = "a"\nxenpbr_hot_stream = 0\n'))
    with pytest.raises(domconfig.ConfigError, match="xenpbr_hot_stream = 2: expected 1"):
        domconfig.hot_stream(domconfig.parse('name = "a"\nxenpbr_hot_stream = 2\n'))



def test_live_capture_is_opt_in_and_a_bad_value_is_refused_when_parsed() -> None:
    assert not domconfig.live_capture(domconfig.parse('name = "a"\n'))
    assert domconfig.live_capture(domconfig.parse('name = "a"\nxenpbr_live_capture = 1\n'))
    for bad in ('2', '"yes"', '1.0'):
        with pytest.raises(ConfigError, match="xenpbr_live_capture = .*: expected 1"):
            cfg(f'name = "g"\nxenpbr_live_capture = {bad}\n')

# -- issue 12 points 2 and 3: explicit disk policies, unknown xenpbr_* keys -------------

PBR_DISKS = ('name = "g"\non_crash = "phasereboot"\n'
             'disk = ["format=raw, vdev=xvda, access=rw, target=/srv/root.img", '
             '"/srv/data.img,raw,xvdb,w", "/srv/cd.iso,raw,xvdc,r"]\n')


def test_misspelled_xenpbr_key_is_an_error_naming_the_close_match() -> None:
    with pytest.raises(ConfigError, match=r"xenpbr_disk: did you mean xenpbr_disks\?"):
        cfg('name = "g"\nxenpbr_disk = ["xvda=persistent"]\n')
    with pytest.raises(ConfigError, match="xenpbr_hot_streams: did you mean xenpbr_hot_stream"):
        cfg('name = "g"\nxenpbr_hot_streams = 0\n')
    with pytest.raises(ConfigError, match="unknown setting xenpbr_zzz: xenpbr knows"):
        cfg('name = "g"\nxenpbr_zzz = 1\n')


def test_phasereboot_refuses_a_read_write_disk_without_a_policy() -> None:
    with pytest.raises(ConfigError) as refused:
        domconfig.require_disk_policies(cfg(PBR_DISKS + 'xenpbr_disks = ["xvdb=persistent"]\n'))
    message = str(refused.value)
    assert "xvda (target /srv/root.img)" in message and "xvdb" not in message.split(".")[0]
    for policy in ("snapshot: reverted with the image", "persistent: never reverted",
                   "readonly: attached read-only"):
        assert policy in message
    assert 'xenpbr_disks = ["xvdb=persistent", "xvda=snapshot"]' in message
    with pytest.raises(ConfigError, match="xvda .*xvdb"):
        domconfig.require_disk_policies(cfg(PBR_DISKS))


def test_explicit_policies_pass_and_readonly_disks_need_none() -> None:
    ok = cfg(PBR_DISKS + 'xenpbr_disks = ["xvda=snapshot", "xvdb=persistent"]\n')
    assert domconfig.require_disk_policies(ok) == {"xvda": "snapshot", "xvdb": "persistent",
                                                   "xvdc": "readonly"}
    plain = cfg(PBR_DISKS.replace('"phasereboot"', '"restart"'))  # not ours to revert
    assert domconfig.require_disk_policies(plain)["xvda"] == "snapshot"


def test_stored_disk_policies_for_status_never_raise() -> None:
    settings = cfg(PBR_DISKS + 'xenpbr_disks = ["xvdb=persistent"]\n').settings
    assert domconfig.stored_disk_policies(settings) == {
        "xvda": "unset", "xvdb": "persistent", "xvdc": "readonly"}
    broken = {**settings, "xenpbr_disks": ["xvdq=sometimes"]}
    assert domconfig.stored_disk_policies(broken) == {"xvda": "unset", "xvdb": "unset",
                                                      "xvdc": "readonly"}
    bogus = {**settings, "xenpbr_disks": ["xvdb=sometimes"]}  # shown as stored
    assert domconfig.stored_disk_policies(bogus)["xvdb"] == "sometimes"


def test_config_uuid_is_canonical_or_an_error() -> None:
    assert domconfig.config_uuid(cfg()) == "5a4c5e6b-1111-2222-3333-444455556666"
    assert domconfig.config_uuid(cfg('name = "g"\n')) is None
    with pytest.raises(ConfigError, match="not a UUID"):
        domconfig.config_uuid(cfg('name = "g"\nuuid = "nope"\n'))


def test_health_policy_defaults_overrides_and_refusals() -> None:
    assert domconfig.health_policy(domconfig.parse('name = "g"\n')) == (120.0, 2)
    cfg = domconfig.parse('name = "g"\nxenpbr_healthy_after = 30\nxenpbr_image_failures = 1\n')
    assert domconfig.health_policy(cfg) == (30.0, 1)
    for line, problem in (("xenpbr_healthy_after = -1", "xenpbr_healthy_after = -1"),
                          ('xenpbr_healthy_after = "2m"', "number of seconds"),
                          ("xenpbr_image_failures = 0", "xenpbr_image_failures = 0"),
                          ("xenpbr_image_failures = 1.5", "whole number of unhealthy")):
        with pytest.raises(ConfigError, match=problem):
            domconfig.parse(f'name = "g"\n{line}\n')


def test_misspelled_health_keys_name_the_close_match() -> None:
    with pytest.raises(ConfigError, match="did you mean xenpbr_healthy_after"):
        domconfig.parse('name = "g"\nxenpbr_healty_after = 30\n')
    with pytest.raises(ConfigError, match="did you mean xenpbr_image_failures"):
        domconfig.parse('name = "g"\nxenpbr_image_failure = 2\n')


def test_resurrect_is_off_unless_set_and_one_means_the_default_caps() -> None:
    from xenpbr.resurrection.model import Caps
    assert domconfig.resurrect_caps(domconfig.parse('name = "g"\n')) is None
    assert domconfig.resurrect_caps(domconfig.parse('name = "g"\nxenpbr_resurrect = 0\n')) is None
    assert domconfig.resurrect_caps(domconfig.parse('name = "g"\nxenpbr_resurrect = 1\n')) == Caps()


def test_resurrect_caps_set_any_subset_with_size_units() -> None:
    from xenpbr.resurrection.model import MIB, Caps
    caps = domconfig.resurrect_caps(domconfig.parse(
        'name = "g"\nxenpbr_resurrect = "regions=3, bytes=512K"\n'))
    assert caps == Caps(regions=3, bytes=512 * 1024, seconds=Caps.seconds)
    caps = domconfig.resurrect_caps(domconfig.parse(
        'name = "g"\nxenpbr_resurrect = "seconds=0.5,bytes=1G"\n'))
    assert caps == Caps(regions=Caps.regions, bytes=1024 * MIB, seconds=0.5)


@pytest.mark.parametrize("value, problem", [
    ("2", "expected 0 (off), 1"),
    ('""', "expected 0 (off), 1"),
    ('"regions=0"', "regions='0' is out of range"),
    ('"regions=1000"', "regions='1000' is out of range"),
    ('"bytes=2G"', "bytes='2G' is out of range"),
    ('"bytes=1.5M"', "bytes='1.5M' is out of range or not a number"),
    ('"seconds=60"', "seconds='60' is out of range"),
    ('"seconds=2M"', "seconds='2M'"),
    ('"pages=3"', "'pages=3' is not a cap"),
    ('"regions=2,regions=3"', "repeats one"),
    ('"regions"', "'regions' is not a cap"),
])
def test_resurrect_refuses_bad_values_naming_the_key_and_what_is_allowed(
        value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        domconfig.parse(f'name = "g"\nxenpbr_resurrect = {value}\n')
    assert problem in str(info.value)
    assert "xenpbr_resurrect" in str(info.value) and "regions 1..256" in str(info.value)


def test_resurrect_typo_names_the_key() -> None:
    with pytest.raises(ConfigError, match="did you mean xenpbr_resurrect"):
        domconfig.parse('name = "g"\nxenpbr_resurect = 1\n')
