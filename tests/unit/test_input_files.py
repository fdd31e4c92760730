"""The files shapekit reads: the config (as root: one only root can change) and the state files.

Whatever is at the path, shapekit reads no more than it means to, never
blocks on it, and a file it cannot use is one line naming it and the fix.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from paths import INCIDENT_CONFIG

from shapekit import state
from shapekit.commands.limit_ip import limit_ip_app
from shapekit.config.addresses import ValueProblem, parse_host
from shapekit.config.load import load_config
from shapekit.config.model import batch_safe_name_problem
from shapekit.config.rules import Cap
from shapekit.errors import UsageError

GOOD = '[device.eth0]\nrate = "100mbit"\n'
CAP = {"host": "198.51.100.7", "rate": "128kbit", "dev": "eth0", "expires": None, "comment": "", "slot": 3}


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail, rather than hang, when the block blocks."""

    def too_slow(signum, frame):
        raise TimeoutError(f"blocked for {seconds}s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def refusal(call, *args, **kwargs) -> str:
    """The one line `call` fails with, as bad input (exit status 2)."""
    with within(5), pytest.raises(UsageError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert caught.value.exit_code == 2
    assert "\n" not in message, message
    return message


@pytest.fixture
def owners(mocker) -> dict[Path, tuple[int, int]]:
    """Every file root's and group root's (the tests may run as a user), but those set here: path → (uid, gid)."""
    table: dict[Path, tuple[int, int]] = {}
    real = {name: getattr(os, name) for name in ("stat", "lstat", "fstat")}

    def fake(name: str):
        def call(target, *args, **kwargs):
            info = real[name](target, *args, **kwargs)
            where = os.readlink(f"/proc/self/fd/{target}") if isinstance(target, int) else os.path.abspath(target)
            fields = list(info)
            fields[stat.ST_UID], fields[stat.ST_GID] = table.get(Path(where), (0, 0))
            return os.stat_result(fields)

        return call

    for name in real:
        mocker.patch(f"os.{name}", side_effect=fake(name))
    return table


@pytest.fixture
def nested(tmp_path) -> Path:
    """A config two directories down, in tmp_path/gp/parent."""
    path = tmp_path / "gp" / "parent" / "shapekit.toml"
    path.parent.mkdir(parents=True)
    path.write_text(GOOD)
    return path


# --- what is at the config's path -------------------------------------------------------------


@pytest.mark.parametrize("check_owner", [False, True])
def test_a_fifo_as_config_is_refused_without_blocking(tmp_path, owners, check_owner):
    path = tmp_path / "shapekit.toml"
    os.mkfifo(path)

    assert refusal(load_config, path, check_owner=check_owner) == (
        f"{path}: not a regular file (a FIFO): point --config at the TOML file"
    )


def test_a_fifo_put_in_after_the_first_look_is_opened_without_blocking(tmp_path, mocker):
    regular = tmp_path / "regular.toml"
    regular.write_text(GOOD)
    path = tmp_path / "shapekit.toml"
    os.mkfifo(path)
    mocker.patch("os.stat", return_value=os.stat(regular))  # it was a file when shapekit looked

    assert refusal(load_config, path, check_owner=False) == (
        f"{path}: not a regular file (a FIFO): point --config at the TOML file"
    )


def test_a_config_symlinked_to_dev_zero_is_refused(tmp_path):
    path = tmp_path / "shapekit.toml"
    path.symlink_to("/dev/zero")

    assert refusal(load_config, path, check_owner=False) == (
        f"{path}: not a regular file (a character device): point --config at the TOML file"
    )


def test_a_directory_as_config_is_refused(tmp_path):
    assert refusal(load_config, tmp_path, check_owner=False) == (
        f"{tmp_path}: not a regular file (a directory): point --config at the TOML file"
    )


def test_a_config_above_16_mib_is_refused(tmp_path):
    path = tmp_path / "shapekit.toml"
    with path.open("wb") as out:
        out.truncate(17 << 20)

    assert refusal(load_config, path, check_owner=False) == (
        f"{path}: larger than the 16 MiB shapekit reads: point --config at the TOML file"
    )


def test_a_config_whose_size_says_0_is_read_no_further_than_16_mib(tmp_path, mocker):
    path = tmp_path / "shapekit.toml"
    path.write_bytes(b"#" * ((16 << 20) + 10))
    fstat = os.fstat

    def says_0(fd):  # as /proc files do
        fields = list(fstat(fd))
        fields[stat.ST_SIZE] = 0
        return os.stat_result(fields)

    mocker.patch("os.fstat", side_effect=says_0)
    read = mocker.patch("os.read", side_effect=os.read)

    assert "larger than the 16 MiB shapekit reads" in refusal(load_config, path, check_owner=False)
    assert sum(c.args[1] for c in read.call_args_list) == (16 << 20) + 1


def test_a_config_nested_too_deep_is_one_line(write_config):
    path = write_config("a = " + "[" * 100_000)

    assert refusal(load_config, path, check_owner=False) == f"{path}: TOML nested too deep: a config nests a few levels"


def test_a_missing_config_says_how_to_name_one(tmp_path):
    assert "no such file (pass --config PATH or set SHAPEKIT_CONFIG)" in refusal(
        load_config, tmp_path / "none.toml", check_owner=True
    )


# --- as root: a config only root can change ---------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "gid", "who", "fix"), [(0o777, 0, "any user", "chmod o-w"), (0o775, 50, "group 50", "chmod g-w")]
)
def test_a_writable_grandparent_directory_is_refused(nested, owners, mode, gid, who, fix):
    grandparent = nested.parent.parent
    grandparent.chmod(mode)
    owners[grandparent] = (0, gid)

    assert refusal(load_config, nested, check_owner=True) == (
        f"{nested}: {grandparent} is writable by {who}; it drives root commands: {fix} {grandparent}"
    )


def test_a_group_writable_directory_of_group_root_is_accepted(nested, owners):
    nested.parent.parent.chmod(0o775)

    assert load_config(nested, check_owner=True).devices["eth0"].rate == 100_000_000


def test_a_sticky_world_writable_grandparent_is_accepted(nested, owners):
    nested.parent.parent.chmod(0o1777)  # as /tmp

    assert load_config(nested, check_owner=True).devices["eth0"].rate == 100_000_000


def test_a_config_owned_by_a_user_is_refused(nested, owners):
    owners[nested] = (1000, 1000)

    assert refusal(load_config, nested, check_owner=True) == (
        f"{nested}: {nested} is owned by uid 1000, not root; it drives root commands: chown root {nested}"
    )


def test_a_directory_owned_by_a_user_is_refused_even_sticky(nested, owners):
    nested.parent.chmod(0o1777)
    owners[nested.parent] = (1000, 1000)

    assert f"{nested.parent} is owned by uid 1000, not root" in refusal(load_config, nested, check_owner=True)


def test_a_world_writable_config_is_refused_before_it_is_read(nested, owners):
    nested.write_text("this is not TOML")
    nested.chmod(0o666)

    assert refusal(load_config, nested, check_owner=True).endswith(
        f"writable by any user; it drives root commands: chmod o-w {nested}"
    )


def test_the_directories_of_a_symlinks_target_are_checked(tmp_path, nested, owners):
    link = tmp_path / "etc" / "shapekit.toml"
    link.parent.mkdir()
    link.symlink_to(nested)
    nested.parent.parent.chmod(0o777)

    assert f"{nested.parent.parent} is writable by any user" in refusal(load_config, link, check_owner=True)


def test_the_directory_holding_a_symlink_is_checked(tmp_path, nested, owners):
    link = tmp_path / "etc" / "shapekit.toml"
    link.parent.mkdir()
    link.symlink_to(nested)
    link.parent.chmod(0o777)

    assert f"{link.parent} is writable by any user" in refusal(load_config, link, check_owner=True)


def test_a_directory_between_two_symlinks_is_checked(tmp_path, nested, owners):
    # etc/shapekit → opt/current → gp/parent: opt is on neither the path as given nor its realpath.
    (tmp_path / "opt").mkdir()
    (tmp_path / "opt" / "current").symlink_to(nested.parent)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "shapekit").symlink_to(tmp_path / "opt" / "current")
    (tmp_path / "opt").chmod(0o777)

    message = refusal(load_config, tmp_path / "etc" / "shapekit" / "shapekit.toml", check_owner=True)

    assert f"{tmp_path / 'opt'} is writable by any user" in message


def test_a_symlink_owned_by_a_user_is_refused(tmp_path, nested, owners):
    link = tmp_path / "shapekit.toml"
    link.symlink_to(nested)
    owners[link] = (1000, 1000)

    assert refusal(load_config, link, check_owner=True) == (
        f"{link}: {link} is a symlink owned by uid 1000, not root; it drives root commands: chown -h root {link}"
    )


def test_a_config_swapped_while_it_was_opened_is_refused(tmp_path, nested, owners, mocker):
    other = tmp_path / "other.toml"
    other.write_text(GOOD)
    real_open = os.open
    mocker.patch("os.open", side_effect=lambda path, flags, *args: real_open(other, flags, *args))

    assert refusal(load_config, nested, check_owner=True) == (
        f"{nested}: it changed while it was being opened: run the command again"
    )


# --- device names tc -batch cannot carry ------------------------------------------------------


@pytest.mark.parametrize(
    ("toml_name", "name", "char"),
    [('"adv#1"', "adv#1", "'#'"), ('"it\'s"', "it's", '"\'"'), ("'a\"b'", 'a"b', "'\"'"), ("'a\\b'", "a\\b", "'\\\\'")],
)
def test_a_device_name_tc_batch_cannot_carry_is_refused(write_config, toml_name, name, char):
    path = write_config(f'[device.{toml_name}]\nrate = "1mbit"\n')

    message = refusal(load_config, path, check_owner=False)

    assert message.startswith(f"{path}: device.{name}: device name {name!r} has {char}, which tc -batch reads as")
    assert "rename the device (ip link set " in message and " name NEWNAME)" in message


def test_batch_safe_name_problem():
    assert batch_safe_name_problem("eth0.100") is None
    assert batch_safe_name_problem("adv#1") == (
        "device name 'adv#1' has '#', which tc -batch reads as the start of a comment:"
        " rename the device (ip link set 'adv#1' name NEWNAME)"
    )


# --- state files ------------------------------------------------------------------------------


def write_limits(directory: Path, data: object) -> Path:
    path = directory / state.LIMITS_FILE
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def limits_refusal(directory: Path) -> str:
    message = refusal(state.load_caps, directory)
    assert message.startswith(f"state file {directory / state.LIMITS_FILE}: "), message
    assert message.endswith(": fix it or remove it to start afresh (the run-time caps in it are lost)"), message
    return message


@pytest.mark.parametrize(
    ("entry", "where", "reason"),
    [
        ({"slot": [1]}, "caps[0].slot", "[1] is not a cap's place (0-130559) or null"),
        ({"slot": "abc"}, "caps[0].slot", "'abc' is not a cap's place"),
        ({"slot": True}, "caps[0].slot", "True is not a cap's place"),
        ({"slot": -1}, "caps[0].slot", "-1 is not a cap's place"),
        ({"slot": 130560}, "caps[0].slot", "130560 is not a cap's place (0-130559) or null"),
        ({"direction": "in", "slot": 0x10}, "caps[0].slot", "16 is not a cap's place (32768-65534) or null"),
        ({"host": 7}, "caps[0].host", "7 is not a string"),
        ({"host": "mail.example.com"}, "caps[0].host", "'mail.example.com' is not an IPv4/IPv6 address"),
        ({"rate": 128000}, "caps[0].rate", "128000 is not a string"),
        ({"rate": "128kb"}, "caps[0].rate", "'128kb' is ambiguous"),
        ({"dev": ["eth0"]}, "caps[0].dev", "['eth0'] is not a string"),
        ({"dev": "adv#1"}, "caps[0].dev", "device name 'adv#1' has '#'"),
        ({"dev": "eth0 root"}, "caps[0].dev", "'eth0 root' is not a network interface name"),
        ({"expires": True}, "caps[0].expires", "True is not a time"),
        ({"expires": "soon"}, "caps[0].expires", "'soon' is not a time"),
        ({"comment": 5}, "caps[0].comment", "5 is not one line of printable text"),
        ({"comment": "two\nlines"}, "caps[0].comment", "'two\\nlines' is not one line of printable text"),
        ({"direction": "up"}, "caps[0].direction", "'up' is not 'out' or 'in'"),
        ({"quantum": 1514}, "caps[0]", "unknown key 'quantum' (known: host, rate, dev"),
        ({"host": None}, "caps[0].host", "None is not a string"),
    ],
)
def test_every_field_of_a_saved_cap_is_checked(tmp_path, entry, where, reason):
    write_limits(tmp_path, {"caps": [{**CAP, **entry}]})

    assert f": {where}: {reason}" in limits_refusal(tmp_path)


def test_an_old_files_minor_is_checked_on_arriving_traffic(tmp_path):
    old = {k: v for k, v in CAP.items() if k != "slot"}  # saved before cap groups: a class minor
    write_limits(tmp_path, {"caps": [{**old, "direction": "in", "minor": 0x10}]})

    assert ": caps[0].minor: 16 is not a cap's place (32768-65534) or null" in limits_refusal(tmp_path)


def test_an_old_files_minor_is_kept_on_arriving_traffic_and_dropped_on_sent(tmp_path):
    old = {k: v for k, v in CAP.items() if k != "slot"}
    write_limits(
        tmp_path,
        {"caps": [{**old, "minor": 0x8003}, {**old, "host": "198.51.100.8", "direction": "in", "minor": 0x8004}]},
    )

    caps = state.load_caps(tmp_path)

    # sent: its flat class is no place in a group (shape-init places it anew); arriving: the same class 5c:8004
    assert [(str(c.host), c.direction, c.slot) for c in caps] == [
        ("198.51.100.7/32", "out", None),
        ("198.51.100.8/32", "in", 0x8004),
    ]
    state.save_caps(tmp_path, caps)
    saved = json.loads((tmp_path / state.LIMITS_FILE).read_text())["caps"]
    assert [(c["slot"], "minor" in c) for c in saved] == [(None, False), (0x8004, False)]  # saved as places


def test_a_saved_cap_without_its_host_is_refused(tmp_path):
    write_limits(tmp_path, {"caps": [CAP, {k: v for k, v in CAP.items() if k != "host"}]})

    assert ": caps[1].host: missing:" in limits_refusal(tmp_path)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[" * 100_000, "not valid JSON (nested too deep)"),
        ('{"caps": [', "not valid JSON (Expecting value: line 1 column 11 (char 10))"),
        ("\udcff", "not valid JSON ('utf-8' codec can't decode byte 0xff"),
        ("[]", "not a JSON object but []"),
        ('{"caps": {}}', "caps: {} is not a list"),
        ('{"caps": ["x"]}', "caps[0]: 'x' is not a JSON object"),
        ('{"caps": [], "version": 2}', "unknown key 'version' (known: caps)"),
    ],
)
def test_a_limits_file_that_cannot_be_read_is_one_line(tmp_path, text, reason):
    (tmp_path / state.LIMITS_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))

    assert f"limits.json: {reason}" in limits_refusal(tmp_path)


def test_a_fifo_as_state_file_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / state.LIMITS_FILE)

    assert "limits.json: not a regular file (a FIFO)" in limits_refusal(tmp_path)


def test_a_state_file_symlinked_to_dev_zero_is_refused(tmp_path):
    (tmp_path / state.LIMITS_FILE).symlink_to("/dev/zero")

    assert "limits.json: not a regular file (a character device)" in limits_refusal(tmp_path)


def test_a_directory_as_state_file_is_refused(tmp_path):
    (tmp_path / state.LIMITS_FILE).mkdir()

    assert "limits.json: not a regular file (a directory)" in limits_refusal(tmp_path)


def test_a_state_file_above_256_mib_is_refused(tmp_path):
    with (tmp_path / state.LIMITS_FILE).open("wb") as out:
        out.truncate(257 << 20)

    assert "limits.json: larger than the 256 MiB shapekit reads" in limits_refusal(tmp_path)


def test_saved_caps_load_back(tmp_path):
    caps = [
        Cap(parse_host("198.51.100.7"), 128_000, "eth0", "run-time", None, "imap", 0x8003),
        Cap(parse_host("2001:db8::/64"), 1_000_000, "eth0", "run-time", None, "", None, "in"),
        Cap(parse_host("2001:db8::/64"), 1_000_000, "eth0", "run-time", 1.8e9, "", None, "out"),
    ]
    state.save_caps(tmp_path, caps)

    assert state.load_caps(tmp_path) == caps


@pytest.mark.parametrize(
    ("caps", "reason"),
    [
        ([("0.0.0.0/0", "1mbit", "out", None)], "caps[0]: 0.0.0.0/0 would cap every host"),
        ([("198.51.100.7", "5gbit", "out", None)], "caps[0]: 5gbit is above the device's line rate 1gbit"),
        ([("198.51.100.7", "1mbit", "in", 1.8e9)], "caps[0]: a cap on arriving traffic has no expiry"),
        (
            [("198.51.100.7", "1mbit", "out", None), ("198.51.100.7/32", "2mbit", "out", None)],
            "caps[1]: 198.51.100.7/32 is capped twice on eth0 (out)",
        ),
    ],
)
def test_a_saved_cap_add_would_refuse_is_refused(tmp_path, caps, reason):
    items = [{"host": h, "rate": r, "dev": "eth0", "direction": d, "expires": e} for h, r, d, e in caps]
    (tmp_path / state.LIMITS_FILE).write_text(json.dumps({"caps": items}))

    message = refusal(state.load_caps, tmp_path, {("eth0", "out"): 1_000_000_000, ("eth0", "in"): 1_000_000_000})

    assert reason in message, message


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"ports": ["22/tcp", 22]}, "ports[1]: 22 is not a string"),
        ({"ports": ["22/sctp"]}, "ports[0]: '22/sctp' has an unknown protocol"),
        ({"hosts": "198.51.100.0/24"}, "hosts: '198.51.100.0/24' is not a list"),
        ({"hosts": ["198.51.100.1/24"]}, "hosts[0]: '198.51.100.1/24' has host bits set"),
        ({"ports": [], "marks": []}, "unknown key 'marks' (known: ports, hosts)"),
    ],
)
def test_a_bypass_file_with_a_bad_entry_is_one_line(tmp_path, data, reason):
    path = tmp_path / state.BYPASS_FILE
    path.write_text(json.dumps(data))

    message = refusal(state.RuntimeBypass.load, tmp_path)

    assert message.startswith(f"state file {path}: {reason}")
    assert message.endswith("(the run-time bypass entries in it are lost)")


@pytest.mark.parametrize("verb", [["list"], ["add", "198.51.100.9", "1mbit"]])
def test_a_corrupt_limits_file_stops_shape_limit_ip_and_stays(system, cli, tmp_path, verb):
    system.roots["eth0"] = {"kind": "htb", "handle": "5c:", "root": True}  # shapekit's tree, with cap groups
    (tmp_path / "state").mkdir()  # $SHAPEKIT_STATE_DIR, as the `system` fixture sets it
    path = write_limits(tmp_path / "state", {"caps": [{**CAP, "slot": [1]}]})
    before = path.read_bytes()

    result = cli(limit_ip_app, *verb, "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"state file {path}: caps[0].slot: [1] is not a cap's place" in result.stderr
    assert path.read_bytes() == before  # never rewritten from what could not be read
    assert system.batches() == []


@pytest.mark.parametrize(
    "text",
    ["0.0.0.0", "255.255.255.255", "198.51.100.7", " 10.0.0.1 ", "9.99.100.249", "1.2.3.4/32", "10.0.0.0/8", "::1"],
)
def test_a_host_read_the_quick_way_is_what_ipaddress_reads(text):
    assert parse_host(text) == ipaddress.ip_network(text.strip())
    assert type(parse_host(text)) is type(ipaddress.ip_network(text.strip()))


@pytest.mark.parametrize(
    "text",
    [
        "256.1.1.1",
        "01.2.3.4",
        "1.2.3",
        "1.2.3.4.5",
        "1.2.3.04",
        "0x1.2.3.4",
        "1.2.3.4 5",
        "١.٢.٣.٤",
        "1.2.3.٤",
        "１.2.3.4",
    ],
)
def test_what_looks_almost_like_an_address_is_still_refused(text):
    with pytest.raises(ValueProblem, match="is not an IPv4/IPv6 address or CIDR block"):
        parse_host(text)
