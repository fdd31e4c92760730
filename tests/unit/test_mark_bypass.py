"""shape-mark and shape-bypass: the exact restore text, with every process mocked."""

from __future__ import annotations

import json

import pytest
from paths import SEED_CONFIG

from shapekit.commands.bypass import bypass_app
from shapekit.commands.flush import flush_app
from shapekit.commands.mark import mark_app
from shapekit.errors import CommandFailed

SKELETON = """\
-A SHAPEKIT -j SHAPEKIT-DECIDE
-A SHAPEKIT -j SHAPEKIT-LIMIT
-A SHAPEKIT-DECIDE -j SHAPEKIT-BYPASS
-A SHAPEKIT-DECIDE -m mark --mark 1001 -j RETURN
-A SHAPEKIT-DECIDE -m connmark ! --mark 0 -j CONNMARK --restore-mark
-A SHAPEKIT-DECIDE -m connmark ! --mark 0 -j RETURN
-A SHAPEKIT-DECIDE -j SHAPEKIT-MARK
-A SHAPEKIT-BYPASS -p tcp -m multiport --ports 22,80 -j MARK --set-mark 1001
"""
SETTERS = """\
-A SHAPEKIT-CONN-11090 -j MARK --set-mark 11090
-A SHAPEKIT-CONN-11090 -m conntrack ! --ctstate RELATED -j CONNMARK --save-mark
-A SHAPEKIT-CONN-11010 -j MARK --set-mark 11010
-A SHAPEKIT-CONN-11010 -m conntrack ! --ctstate RELATED -j CONNMARK --save-mark
-A SHAPEKIT-PKT-11010 -j MARK --set-mark 11010
"""
# Seed 000's POSTROUTING rules, in reverse (the seed's last match won, shapekit's first wins),
# IPv4: torrent ports → 11090; icmp, SYN, ssh, dns → 11010.
SEED_000_MARK_V4 = (
    """\
*mangle
:SHAPEKIT - [0:0]
:SHAPEKIT-DECIDE - [0:0]
:SHAPEKIT-BYPASS - [0:0]
:SHAPEKIT-MARK - [0:0]
:SHAPEKIT-CONN-11090 - [0:0]
:SHAPEKIT-CONN-11010 - [0:0]
:SHAPEKIT-PKT-11010 - [0:0]
:SHAPEKIT-LIMIT - [0:0]
"""
    + SKELETON
    + """\
-A SHAPEKIT-MARK -p tcp -m tcp --sport 61000:63000 -m comment --comment "mark[1] torrent" -g SHAPEKIT-CONN-11090
-A SHAPEKIT-MARK -p icmp -m comment --comment "mark[2] high" -g SHAPEKIT-CONN-11010
-A SHAPEKIT-MARK -p tcp -m tcp --tcp-flags SYN,RST,ACK SYN -m comment --comment "mark[4] high" -g SHAPEKIT-PKT-11010
-A SHAPEKIT-MARK -p tcp -m tcp --dport 22 -m comment --comment "mark[5] high" -g SHAPEKIT-CONN-11010
-A SHAPEKIT-MARK -p udp -m udp --dport 53 -m comment --comment "mark[6] high" -g SHAPEKIT-CONN-11010
-A SHAPEKIT-MARK -p tcp -m tcp --dport 53 -m comment --comment "mark[7] high" -g SHAPEKIT-CONN-11010
"""
    + SETTERS
    + "-A POSTROUTING -j SHAPEKIT\nCOMMIT\n"
)
# The same for IPv6: icmpv6 instead of icmp.
SEED_000_MARK_V6 = SEED_000_MARK_V4.replace(
    '-p icmp -m comment --comment "mark[2] high"', '-p ipv6-icmp -m comment --comment "mark[3] high"'
)
SEED_000_BYPASS = (
    """\
*mangle
:SHAPEKIT - [0:0]
:SHAPEKIT-DECIDE - [0:0]
:SHAPEKIT-BYPASS - [0:0]
:SHAPEKIT-MARK - [0:0]
:SHAPEKIT-LIMIT - [0:0]
"""
    + SKELETON
    + "-A POSTROUTING -j SHAPEKIT\nCOMMIT\n"
)
V4, V6 = ("iptables-restore", "--noflush"), ("ip6tables-restore", "--noflush")
SAVE4, SAVE6 = ("iptables-save", "-t", "mangle"), ("ip6tables-save", "-t", "mangle")


def test_seed_000_rules_are_probed_then_one_restore_per_family(system, cli):
    result = cli(mark_app, "--config", str(SEED_CONFIG))

    assert result.exit_code == 0, result.stderr
    assert system.calls == [
        (("unshare", "--net", "--", *V4), SEED_000_MARK_V4),
        (("unshare", "--net", "--", *V6), SEED_000_MARK_V6),
        (SAVE4, None),
        (SAVE6, None),
        (V4, SEED_000_MARK_V4),
        (V6, SEED_000_MARK_V6),
    ]


def test_seed_000_bypass(system, cli):
    result = cli(bypass_app, "--config", str(SEED_CONFIG))

    assert result.exit_code == 0, result.stderr
    assert [(argv, text) for argv, text in system.calls if argv in (V4, V6)] == [
        (V4, SEED_000_BYPASS),
        (V6, SEED_000_BYPASS),
    ]


def test_hosts_go_to_their_own_family_in_both_directions(system, cli, write_config):
    text = SEED_CONFIG.read_text().replace("hosts = []", 'hosts = ["198.51.100.0/24", "2001:db8::/64"]')

    cli(bypass_app, "--config", str(write_config(text)))

    v4, v6 = (text for argv, text in system.calls if argv in (V4, V6))
    assert "-A SHAPEKIT-BYPASS -d 198.51.100.0/24 -j MARK --set-mark 1001\n" in v4
    assert "-A SHAPEKIT-BYPASS -s 198.51.100.0/24 -j MARK --set-mark 1001\n" in v4
    assert "2001:db8" not in v4
    assert "-A SHAPEKIT-BYPASS -d 2001:db8::/64 -j MARK --set-mark 1001\n" in v6
    assert "198.51" not in v6


def test_many_ports_are_split_into_multiport_matches_of_15(system, cli, write_config):
    ports = ", ".join(f'"{p}/udp"' for p in range(1000, 1014)) + ', "2000:2010/udp"'
    text = SEED_CONFIG.read_text().replace('ports = ["22/tcp", "80/tcp"]', f"ports = [{ports}]")

    cli(bypass_app, "--config", str(write_config(text)))

    v4 = next(text for argv, text in system.calls if argv == V4)
    rules = [line for line in v4.splitlines() if line.startswith("-A SHAPEKIT-BYPASS")]
    assert rules == [
        "-A SHAPEKIT-BYPASS -p udp -m multiport --ports "
        + ",".join(map(str, range(1000, 1014)))
        + " -j MARK --set-mark 1001",
        "-A SHAPEKIT-BYPASS -p udp -m multiport --ports 2000:2010 -j MARK --set-mark 1001",
    ]


def test_classify_devices_get_a_classify_chain(system, cli, write_config):
    text = SEED_CONFIG.read_text().replace('classifier = "fw"', 'classifier = "classify"')

    cli(mark_app, "--config", str(write_config(text)))

    v4 = next(text for argv, text in system.calls if argv == V4)
    assert "-A SHAPEKIT -j SHAPEKIT-CLASSIFY\n" in v4
    assert [line for line in v4.splitlines() if line.startswith("-A SHAPEKIT-CLASSIFY")] == [
        "-A SHAPEKIT-CLASSIFY -o eth0 -m mark --mark 1001 -j CLASSIFY --set-class 5c:2",
        "-A SHAPEKIT-CLASSIFY -o eth0 -m mark --mark 11010 -j CLASSIFY --set-class 5c:1010",
        "-A SHAPEKIT-CLASSIFY -o eth0 -m mark --mark 11030 -j CLASSIFY --set-class 5c:1030",
        "-A SHAPEKIT-CLASSIFY -o eth0 -m mark --mark 11090 -j CLASSIFY --set-class 5c:1090",
    ]


def test_every_match_key_in_one_rule(system, cli, write_config):
    text = SEED_CONFIG.read_text().split("[[mark]]")[0] + (
        '[[mark]]\nclass = "torrent"\nproto = "tcp"\nsrc = "2001:db8::/32"\ndst = "2001:db8:1::7"\n'
        'sport = [6881, "6900:6910"]\ndport = 443\ndevice = "eth0"\n'
        '[[mark]]\nclass = "high"\nproto = "udp"\nsport = [1, 2]\ndport = [3, 4]\n'
    )

    cli(mark_app, "--config", str(write_config(text)))

    v4, v6 = (text for argv, text in system.calls if argv in (V4, V6))
    assert (
        "-A SHAPEKIT-MARK -o eth0 -s 2001:db8::/32 -d 2001:db8:1::7/128 -p tcp -m tcp --dport 443 "
        '-m multiport --sports 6881,6900:6910 -m comment --comment "mark[1] torrent" -g SHAPEKIT-CONN-11090\n'
    ) in v6
    assert "mark[1]" not in v4  # an IPv6 rule goes to ip6tables only
    assert (
        "-A SHAPEKIT-MARK -p udp -m multiport --sports 1,2 -m multiport --dports 3,4 "
        '-m comment --comment "mark[2] high" -g SHAPEKIT-CONN-11010\n'
    ) in v4


# What an earlier install left: its chains as iptables-save prints them, one stale setter, a limit chain.
SAVED_V4 = """\
# Generated by iptables-save v1.8.9 (nf_tables)
*mangle
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:SHAPEKIT - [0:0]
:SHAPEKIT-BYPASS - [0:0]
:SHAPEKIT-CONN-4242 - [0:0]
:SHAPEKIT-DECIDE - [0:0]
:SHAPEKIT-LIMIT - [0:0]
:SHAPEKIT-MARK - [0:0]
:USER - [0:0]
-A POSTROUTING -p udp -m udp --dport 9 -j MARK --set-xmark 0x7/0xffffffff
-A POSTROUTING -j SHAPEKIT
-A SHAPEKIT -j SHAPEKIT-DECIDE
-A SHAPEKIT -j SHAPEKIT-LIMIT
-A SHAPEKIT-BYPASS -p tcp -m multiport --ports 8080 -j MARK --set-xmark 0x3e9/0xffffffff
-A SHAPEKIT-CONN-4242 -j MARK --set-xmark 0x1092/0xffffffff
-A SHAPEKIT-DECIDE -j SHAPEKIT-BYPASS
-A SHAPEKIT-DECIDE -j SHAPEKIT-MARK
-A SHAPEKIT-LIMIT -o eth0 -j SET --map-set SHAPEKIT-eth0-4 dst --map-prio --map-mark
-A SHAPEKIT-MARK -p udp -m udp --dport 9 -g SHAPEKIT-CONN-4242
COMMIT
"""


def test_mark_rewrites_its_chains_and_the_skeleton_deletes_stale_setters_keeps_limits(system, cli):
    system.answers[SAVE4] = SAVED_V4

    cli(mark_app, "--config", str(SEED_CONFIG))

    v4 = next(text for argv, text in system.calls if argv == V4)
    declared = [line for line in v4.splitlines() if line.startswith(":")]
    assert ":SHAPEKIT-LIMIT - [0:0]" not in declared  # shape-limit-ip's: its rules stay
    assert ":SHAPEKIT-BYPASS - [0:0]" in declared  # the skeleton: rewritten from config and state
    assert ":SHAPEKIT-CONN-4242 - [0:0]" in declared  # flushed, then deleted
    assert v4.endswith("-X SHAPEKIT-CONN-4242\nCOMMIT\n")
    assert "-A POSTROUTING" not in v4  # the jump is there already


def test_flush_removes_the_jump_and_every_shapekit_chain(system, cli):
    system.answers[SAVE4] = SAVED_V4

    result = cli(flush_app)

    assert result.exit_code == 0, result.stderr
    assert system.calls[-4:-1] == [
        (SAVE4, None),
        (
            V4,
            "*mangle\n-D POSTROUTING -j SHAPEKIT\n"
            ":SHAPEKIT - [0:0]\n:SHAPEKIT-BYPASS - [0:0]\n:SHAPEKIT-CONN-4242 - [0:0]\n:SHAPEKIT-DECIDE - [0:0]\n"
            ":SHAPEKIT-LIMIT - [0:0]\n:SHAPEKIT-MARK - [0:0]\n"
            "-X SHAPEKIT\n-X SHAPEKIT-BYPASS\n-X SHAPEKIT-CONN-4242\n-X SHAPEKIT-DECIDE\n-X SHAPEKIT-LIMIT\n"
            "-X SHAPEKIT-MARK\nCOMMIT\n",
        ),
        (SAVE6, None),  # nothing of shapekit's in ip6tables: nothing to remove
    ]


def test_flush_dev_leaves_the_chains(system, cli):
    system.answers[SAVE4] = SAVED_V4

    cli(flush_app, "--dev", "eth0")

    assert SAVE4 not in [argv for argv, _ in system.calls]


def _ipv6_fails(argv, stdin):
    if argv == V6:
        raise CommandFailed("ip6tables-restore --noflush", "ip6tables-restore: line 3 failed\n")


def test_a_failing_ipv6_restore_puts_ipv4_back_after_a_first_install(system, cli):
    system.hooks.append(_ipv6_fails)

    result = cli(mark_app, "--config", str(SEED_CONFIG))

    assert result.exit_code == 1
    assert result.stderr == (
        "shape-mark: `ip6tables-restore --noflush` failed: ip6tables-restore: line 3 failed; "
        "put back as before: the IPv4 rules\n"
    )
    assert system.calls[-1] == (
        V4,
        "*mangle\n-D POSTROUTING -j SHAPEKIT\n"  # the jump goes first: then nothing refers to the chains
        ":SHAPEKIT - [0:0]\n:SHAPEKIT-DECIDE - [0:0]\n:SHAPEKIT-BYPASS - [0:0]\n:SHAPEKIT-MARK - [0:0]\n"
        ":SHAPEKIT-CONN-11090 - [0:0]\n:SHAPEKIT-CONN-11010 - [0:0]\n:SHAPEKIT-PKT-11010 - [0:0]\n"
        ":SHAPEKIT-LIMIT - [0:0]\n"
        "-X SHAPEKIT\n-X SHAPEKIT-DECIDE\n-X SHAPEKIT-BYPASS\n-X SHAPEKIT-MARK\n-X SHAPEKIT-CONN-11090\n"
        "-X SHAPEKIT-CONN-11010\n-X SHAPEKIT-PKT-11010\n-X SHAPEKIT-LIMIT\n"
        "COMMIT\n",
    )


def test_a_failing_ipv6_restore_puts_ipv4_back_as_it_was(system, cli):
    system.answers[SAVE4] = SAVED_V4
    system.hooks.append(_ipv6_fails)

    cli(mark_app, "--config", str(SEED_CONFIG))

    argv, undo = system.calls[-1]
    assert argv == V4
    assert "-D POSTROUTING" not in undo  # the jump was there before
    rules = [line for line in undo.splitlines() if line.startswith("-A")]
    assert rules == [line for line in SAVED_V4.splitlines() if line.startswith("-A SHAPEKIT")]
    deleted = [line for line in undo.splitlines() if line.startswith("-X")]
    assert deleted == ["-X SHAPEKIT-CONN-11090", "-X SHAPEKIT-CONN-11010", "-X SHAPEKIT-PKT-11010"]


def test_when_the_undo_fails_too_both_errors_are_told(system, cli):
    system.hooks.append(_ipv6_fails)

    def undo_fails(argv, stdin):
        if argv == V4 and stdin.startswith("*mangle\n-D"):
            raise CommandFailed("iptables-restore --noflush", "iptables-restore: line 2 failed\n")

    system.hooks.append(undo_fails)

    result = cli(mark_app, "--config", str(SEED_CONFIG))

    assert result.exit_code == 1
    assert result.stderr == (
        "shape-mark: `ip6tables-restore --noflush` failed: ip6tables-restore: line 3 failed; putting back the IPv4 "
        "rules failed too: `iptables-restore --noflush` failed: iptables-restore: line 2 failed; "
        "left changed: the IPv4 rules\n"
    )


def test_a_match_the_machine_lacks_is_refused_naming_the_rule(system, cli, write_config):
    text = SEED_CONFIG.read_text() + '[[mark]]\nclass = "torrent"\nl7proto = "bittorrent"\n'

    def no_layer7(argv, stdin):
        if argv[0] == "unshare" and "layer7" in stdin:
            line = stdin.splitlines().index(next(x for x in stdin.splitlines() if "layer7" in x)) + 1
            raise CommandFailed(
                "unshare",
                f"iptables-restore v1.8.9 (nf_tables): Couldn't load match `layer7':No such file or directory\n\n"
                f"Error occurred at line: {line}\nTry `iptables-restore -h' for more information.\n",
            )

    system.hooks.append(no_layer7)

    result = cli(mark_app, "--config", str(write_config(text)))

    assert result.exit_code == 2
    assert result.stderr == (
        "shape-mark: iptables-restore cannot load shapekit's rules here: iptables-restore v1.8.9 (nf_tables): "
        "Couldn't load match `layer7':No such file or directory (l7proto in mark[8] needs the out-of-tree layer7 "
        "match in kernel and iptables: remove l7proto from that rule)\n"
    )
    assert [argv for argv, _ in system.calls if argv in (V4, V6)] == []


def test_bypass_add_saves_applies_and_lists(system, cli, tmp_path):
    result = cli(bypass_app, "add", "8080/tcp", "198.18.7.0/24", "--config", str(SEED_CONFIG))

    assert result.exit_code == 0, result.stderr
    state = json.loads((tmp_path / "state" / "bypass.json").read_text())
    assert state == {"hosts": ["198.18.7.0/24"], "ports": ["8080/tcp"]}
    v4 = [text for argv, text in system.calls if argv == V4][-1]
    assert "-A SHAPEKIT-BYPASS -p tcp -m multiport --ports 22,80,8080 -j MARK --set-mark 1001\n" in v4
    assert "-A SHAPEKIT-BYPASS -d 198.18.7.0/24 -j MARK --set-mark 1001\n" in v4

    listed = cli(bypass_app, "--config", str(SEED_CONFIG), "list")
    assert listed.stdout.splitlines() == [
        "ENTRY          KIND  SOURCE",
        "22/tcp         port  config",
        "80/tcp         port  config",
        "8080/tcp       port  run-time",
        "198.18.7.0/24  host  run-time",
    ]
    as_json = json.loads(cli(bypass_app, "list", "--json", "--config", str(SEED_CONFIG)).stdout)
    assert as_json[2] == {"entry": "8080/tcp", "kind": "port", "source": "run-time"}


def test_bypass_remove_and_the_bare_command_reapplies_saved_entries(system, cli, tmp_path):
    cli(bypass_app, "--config", str(SEED_CONFIG), "add", "8080/tcp", "9090/udp")
    assert cli(bypass_app, "remove", "8080/tcp", "--config", str(SEED_CONFIG)).exit_code == 0
    system.run.reset_mock()

    cli(bypass_app, "--config", str(SEED_CONFIG))

    v4 = next(text for argv, text in system.calls if argv == V4)
    assert "--ports 22,80 -j" in v4 and "-p udp -m multiport --ports 9090 -j" in v4
    assert json.loads((tmp_path / "state" / "bypass.json").read_text())["ports"] == ["9090/udp"]


def test_bypass_dry_run_changes_no_state(system, cli, tmp_path):
    result = cli(bypass_app, "add", "8080/tcp", "--dry-run", "--config", str(SEED_CONFIG))

    assert result.exit_code == 0
    assert "iptables-restore --noflush <<'EOF'\n" in result.stdout and "8080" in result.stdout
    assert not (tmp_path / "state" / "bypass.json").exists()
    assert [argv for argv, _ in system.calls if argv in (V4, V6)] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "22/xyz"], "'22/xyz' has an unknown protocol 'xyz': use '/tcp' or '/udp'"),
        (["add", "70000/tcp"], "'70000/tcp': port 70000 is out of range: use 1..65535"),
        (["add", "300.1.1.1"], "'300.1.1.1' is not an IPv4/IPv6 address or CIDR block"),
        (["add", "198.51.100.7/24"], "'198.51.100.7/24' has host bits set: write 198.51.100.0/24"),
        (["add", "::/0"], "::/0 would bypass every host"),
        (["remove", "22/tcp"], "22/tcp is bypassed by"),
        (["remove", "8080/tcp"], "8080/tcp is not a run-time bypass entry"),
    ],
)
def test_bad_bypass_entries_change_nothing(system, cli, tmp_path, args, message):
    result = cli(bypass_app, *args, "--config", str(SEED_CONFIG))

    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert [argv for argv, _ in system.calls if argv in (V4, V6)] == []
    assert not (tmp_path / "state" / "bypass.json").exists()


def test_not_root(system, cli, mocker):
    mocker.patch("os.geteuid", return_value=1000)

    for app in (mark_app, bypass_app):
        result = cli(app, "--config", str(SEED_CONFIG))
        assert result.exit_code == 2 and "must run as root" in result.stderr
    assert system.calls == []


def test_flush_forget_deletes_the_run_time_entries(system, cli, tmp_path):
    cli(bypass_app, "add", "8080/tcp", "--config", str(SEED_CONFIG))
    saved = tmp_path / "state" / "bypass.json"

    cli(flush_app)
    assert saved.exists()  # kept for the next boot
    dry = cli(flush_app, "--forget", "--dry-run")
    assert f"# --forget: delete {saved}\n" in dry.stdout and saved.exists()
    cli(flush_app, "--forget")
    assert not saved.exists()
    assert "--forget" not in cli(flush_app, "--forget", "--dry-run").stdout  # nothing left to delete


@pytest.mark.parametrize("text", ['{"ports": 5}', '{"hosts": null}', '{"ports": ["22/xyz"]}', "[1, 2]", "{not json"])
def test_a_broken_state_file_is_one_line(system, cli, tmp_path, text):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "bypass.json").write_text(text)

    result = cli(bypass_app, "list", "--config", str(SEED_CONFIG))

    assert result.exit_code == 2
    assert result.stderr.startswith(f"shape-bypass: state file {tmp_path}/state/bypass.json")
    assert result.stderr.count("\n") == 1 and "remove it to start afresh" in result.stderr


@pytest.mark.parametrize("app", [mark_app, bypass_app, flush_app], ids=["mark", "bypass", "flush"])
def test_dry_run_needs_no_root(system, cli, mocker, app):
    mocker.patch("os.geteuid", return_value=1000)

    result = cli(app, "--dry-run", "--config", str(SEED_CONFIG))

    assert result.exit_code == 0, result.stderr
    assert "# not root: IPv4 chains unread; planned as a first install\n" in result.stdout
    assert [argv for argv, _ in system.calls if argv[0] not in ("tc", "ip")] == []  # no netfilter or ipset reads


SEED_DEVICES = SEED_CONFIG.read_text().split("[[mark]]")[0]
# The wondershaper small-packet rule first, then a connection rule, then VoIP's EF and a rule after the last
# per-packet one.
PER_PACKET_RULES = (
    '[[mark]]\nclass = "high"\nlength = "0:128"\n'
    '[[mark]]\nclass = "high"\nproto = "tcp"\ntcp_flags = ["ack"]\n'
    '[[mark]]\nclass = "torrent"\nproto = "tcp"\nsport = "61000:63000"\n'
    '[[mark]]\nclass = "high"\nproto = "udp"\ndscp = "ef"\n'
    '[[mark]]\nclass = "torrent"\nproto = "udp"\ndport = 5000\n'
)


def _chains(text: str) -> dict[str, list[str]]:
    chains: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("-A "):
            chains.setdefault(line.split()[1], []).append(line)
    return chains


def test_per_packet_rules_run_before_the_saved_mark_is_restored_and_the_rest_after(system, cli, write_config):
    result = cli(mark_app, "--config", str(write_config(SEED_DEVICES + PER_PACKET_RULES)))

    assert result.exit_code == 0, result.stderr
    v4, v6 = (text for argv, text in system.calls if argv in (V4, V6))
    assert v4 == v6
    chains = _chains(v4)
    assert chains["SHAPEKIT-DECIDE"] == [
        "-A SHAPEKIT-DECIDE -j SHAPEKIT-BYPASS",
        "-A SHAPEKIT-DECIDE -m mark --mark 1001 -j RETURN",
        "-A SHAPEKIT-DECIDE -j SHAPEKIT-MARK",
    ]
    assert chains["SHAPEKIT-MARK"] == [
        '-A SHAPEKIT-MARK -m length --length 0:128 -m comment --comment "mark[1] high" -g SHAPEKIT-PKT-11010',
        "-A SHAPEKIT-MARK -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK ACK "
        '-m comment --comment "mark[2] high" -g SHAPEKIT-PKT-11010',
        '-A SHAPEKIT-MARK -p tcp -m tcp --sport 61000:63000 -m comment --comment "mark[3] torrent" -g SHAPEKIT-CONN-11090',
        '-A SHAPEKIT-MARK -p udp -m dscp --dscp 46 -m comment --comment "mark[4] high" -g SHAPEKIT-PKT-11010',
        "-A SHAPEKIT-MARK -m connmark ! --mark 0 -j CONNMARK --restore-mark",
        "-A SHAPEKIT-MARK -m connmark ! --mark 0 -j RETURN",
        '-A SHAPEKIT-MARK -p udp -m udp --dport 5000 -m comment --comment "mark[5] torrent" -g SHAPEKIT-CONN-11090',
    ]
    assert chains["SHAPEKIT-PKT-11010"] == ["-A SHAPEKIT-PKT-11010 -j MARK --set-mark 11010"]  # not saved
    assert chains["SHAPEKIT-CONN-11090"] == [
        "-A SHAPEKIT-CONN-11090 -j MARK --set-mark 11090",
        "-A SHAPEKIT-CONN-11090 -m conntrack ! --ctstate RELATED -j CONNMARK --save-mark",
    ]


def test_bypass_writes_the_same_decide_chain_as_mark(system, cli, write_config):
    cli(bypass_app, "--config", str(write_config(SEED_DEVICES + PER_PACKET_RULES)))

    v4 = next(text for argv, text in system.calls if argv == V4)
    assert "-A SHAPEKIT-DECIDE -m connmark" not in v4


def test_each_family_restores_the_saved_mark_after_its_own_last_per_packet_rule(system, cli, write_config):
    text = (
        SEED_DEVICES + '[[mark]]\nclass = "high"\nlength = 28\n'  # below any IPv6 packet: IPv4 only
        '[[mark]]\nclass = "torrent"\nproto = "tcp"\nsport = 6881\n'
    )

    cli(mark_app, "--config", str(write_config(text)))

    v4, v6 = (_chains(text) for argv, text in system.calls if argv in (V4, V6))
    assert v4["SHAPEKIT-MARK"][:3] == [
        '-A SHAPEKIT-MARK -m length --length 28 -m comment --comment "mark[1] high" -g SHAPEKIT-PKT-11010',
        "-A SHAPEKIT-MARK -m connmark ! --mark 0 -j CONNMARK --restore-mark",
        "-A SHAPEKIT-MARK -m connmark ! --mark 0 -j RETURN",
    ]
    assert len(v4["SHAPEKIT-DECIDE"]) == 3
    assert v6["SHAPEKIT-MARK"] == [
        '-A SHAPEKIT-MARK -p tcp -m tcp --sport 6881 -m comment --comment "mark[2] torrent" -g SHAPEKIT-CONN-11090'
    ]
    assert "-A SHAPEKIT-DECIDE -m connmark ! --mark 0 -j CONNMARK --restore-mark" in v6["SHAPEKIT-DECIDE"]


@pytest.mark.parametrize(
    ("keys", "rule"),
    [
        ("dscp = 10\n", "-m dscp --dscp 10"),
        ('dscp = "AF41"\n', "-m dscp --dscp 34"),
        ('dscp = "cs1"\n', "-m dscp --dscp 8"),
        ("length = 64\n", "-m length --length 64"),
        ('length = "1000:65535"\n', "-m length --length 1000:65535"),
        ('proto = "tcp"\ntcp_flags = ["syn"]\n', "-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN"),
        ('proto = "tcp"\ntcp_flags = ["ACK", "syn"]\n', "-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN,ACK"),
        ('proto = "tcp"\ntcp_flags = ["rst"]\n', "-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK RST"),
        ('proto = "tcp"\ntcp_flags = ["fin", "ack"]\n', "-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK FIN,ACK"),
        (
            'proto = "tcp"\ndport = 443\ntcp_flags = ["ack"]\ndscp = "AF11"\nlength = "0:100"\n',
            "-p tcp -m tcp --dport 443 --tcp-flags FIN,SYN,RST,ACK ACK -m dscp --dscp 10 -m length --length 0:100",
        ),
    ],
)
def test_each_new_match_as_its_rule_text(system, cli, write_config, keys, rule):
    cli(mark_app, "--config", str(write_config(SEED_DEVICES + '[[mark]]\nclass = "high"\n' + keys)))

    v4 = next(text for argv, text in system.calls if argv == V4)
    assert _chains(v4)["SHAPEKIT-MARK"][0] == (
        f'-A SHAPEKIT-MARK {rule} -m comment --comment "mark[1] high" -g SHAPEKIT-PKT-11010'
    )


def test_dry_run_shows_the_new_matches(system, cli, write_config):
    result = cli(mark_app, "--dry-run", "--config", str(write_config(SEED_DEVICES + PER_PACKET_RULES)))

    assert result.exit_code == 0, result.stderr
    assert '-A SHAPEKIT-MARK -m length --length 0:128 -m comment --comment "mark[1] high"' in result.stdout
    assert "-A SHAPEKIT-MARK -m connmark ! --mark 0 -j RETURN" in result.stdout


def test_src_mac_is_a_bpf_match_on_the_arriving_frames_ethernet_header(system, cli, write_config):
    rule = '[[mark]]\nclass = "torrent"\nsrc_mac = "02:00:00:0A:bC:01"\n'

    cli(mark_app, "--config", str(write_config(SEED_DEVICES + rule)))

    v4, v6 = (_chains(text)["SHAPEKIT-MARK"] for argv, text in system.calls if argv in (V4, V6))
    # EtherType 0x0800 (IPv4), else out; source 02:00:00:0a (33554442) and bc:01 (48129), else out.
    program = "4292870156,21 0 5 {},32 0 0 4292870150,21 0 3 33554442,40 0 0 4292870154,21 0 1 48129,6 0 0 1,6 0 0 0"
    assert v4 == [
        f'-A SHAPEKIT-MARK -m bpf --bytecode "8,40 0 0 {program.format(2048)}" '
        '-m comment --comment "mark[1] torrent" -g SHAPEKIT-CONN-11090'
    ]
    assert v6 == [v4[0].replace("21 0 5 2048", "21 0 5 34525")]  # EtherType 0x86dd


def test_a_kernel_without_the_bpf_match_refuses_src_mac_before_any_change(system, cli, write_config):
    rules = '[[mark]]\nclass = "high"\nproto = "icmp"\n[[mark]]\nclass = "torrent"\nsrc_mac = "02:00:00:00:00:01"\n'

    def no_bpf(argv, stdin):
        if argv[:3] == ("unshare", "--net", "--") and stdin and "-m bpf" in stdin:
            line = next(n for n, text in enumerate(stdin.splitlines(), 1) if "-m bpf" in text)
            raise CommandFailed(
                " ".join(argv), f"iptables-restore: Couldn't load match `bpf'\n\nError occurred at line: {line}\n"
            )

    system.hooks.append(no_bpf)

    result = cli(mark_app, "--config", str(write_config(SEED_DEVICES + rules)))

    assert result.exit_code == 2
    assert result.stderr.strip().endswith(
        "(src_mac in mark[2] needs the kernel's bpf match, xt_bpf: load it, or remove src_mac)"
    ), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert [argv for argv, _ in system.calls if argv in (V4, V6)] == []
