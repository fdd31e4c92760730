"""Bad input: one line naming the problem and the fix, exit 2, and nothing run."""

from __future__ import annotations

from pathlib import Path

import pytest
from paths import SEED_CONFIG

from shapekit.commands.bypass import bypass_main
from shapekit.commands.flush import flush_app
from shapekit.commands.init import init_app, init_main
from shapekit.commands.limit_ip import limit_ip_main
from shapekit.commands.status import status_main
from shapekit.config.load import load_config
from shapekit.errors import CommandFailed, UsageError
from shapekit.plan import tree as plan

GOOD = """
[device.eth0]
rate = "100mbit"
default = "bulk"
[device.eth0.classes.shaped]
rate = "50mbit"
[device.eth0.classes.bulk]
parent = "shaped"
rate = "1mbit"
"""

RULE = '[[mark]]\nclass = "bulk"\nproto = "tcp"\n'

# case: (config text, what the one line must say)
BAD_CONFIGS = {
    "toml syntax error": ('[device.eth0]\nrate = "100mbit\n', "TOML syntax error: "),
    "toml error has line and column": ("[device.eth0]\nrate = 100mbit\n", "(at line 2, column"),
    "no device": ("", "device: no devices"),
    "unknown section": (GOOD + "[shaping]\nx = 1\n", "shaping: unknown section"),
    "device not a table": ('device = "eth0"\n', "device: no devices"),
    "bad interface name": ('[device."eth 0"]\nrate = "1mbit"\n', "not a network interface name"),
    "an iptables wildcard as a name": (
        '[device."eth+"]\nrate = "1mbit"\n',
        "device name 'eth+' ends in '+', which iptables reads as every device whose name starts 'eth'",
    ),
    "interface name too long": ('[device.abcdefghijklmnop]\nrate = "1mbit"\n', "1-15 characters"),
    "missing line rate": ("[device.eth0]\n", "device.eth0.rate: missing"),
    "ambiguous kb": (
        '[device.eth0]\nrate = "100kb"\n',
        "'100kb' is ambiguous: write '100kbit' (kbits/s) or '100kbps' (kbytes/s)",
    ),
    "ambiguous k": ('[device.eth0]\nrate = "100k"\n', "'100k' is ambiguous"),
    "ambiguous mb": ('[device.eth0]\nrate = "5mb"\n', "write '5mbit' (mbits/s) or '5mbps' (mbytes/s)"),
    "bare number": ("[device.eth0]\nrate = 100000\n", "100000 is ambiguous"),
    "unknown unit": ('[device.eth0]\nrate = "10mbits"\n', "unknown rate unit 'mbits'"),
    "zero rate": ('[device.eth0]\nrate = "0kbit"\n', "a rate must be above 0"),
    "not a number": ('[device.eth0]\nrate = "fast"\n', "'fast' is not a rate"),
    "fraction of a bit": ('[device.eth0]\nrate = "0.5bit"\n', "not a whole number of bits/s"),
    "unknown device key": (
        GOOD.replace('default = "bulk"', 'default = "bulk"\nburst = "5k"'),
        "device.eth0.burst: unknown key",
    ),
    "unknown leaf": (
        GOOD.replace('default = "bulk"', 'default = "bulk"\nleaf = "red"'),
        "'red' is not one of 'sfq', 'fq_codel', 'cake', 'pfifo', 'none'",
    ),
    "leaf on a class with children": (
        GOOD.replace('rate = "50mbit"', 'rate = "50mbit"\nleaf = "fq_codel"'),
        "device.eth0.classes.shaped.leaf: only a leaf class has a leaf qdisc; this class has child classes",
    ),
    "unknown class leaf": (
        GOOD + 'leaf = "red"\n',
        "device.eth0.classes.bulk.leaf: 'red' is not one of 'sfq', 'fq_codel', 'cake', 'pfifo', 'none'",
    ),
    "unknown classifier": (
        GOOD.replace('default = "bulk"', 'default = "bulk"\nclassifier = "u32"'),
        "device.eth0.classifier: 'u32' is not one of 'fw', 'classify'",
    ),
    "classes without default": (GOOD.replace('default = "bulk"\n', ""), "device.eth0.default: missing"),
    "default not a class": (
        GOOD.replace('default = "bulk"', 'default = "nope"'),
        "device.eth0.default: 'nope' is not a class",
    ),
    "default is an inner class": (
        GOOD.replace('default = "bulk"', 'default = "shaped"'),
        "'shaped' has child classes; name a leaf class",
    ),
    "unknown class key": (GOOD + "priority = 1\n", "device.eth0.classes.bulk.priority: unknown key"),
    "class without rate": (GOOD + "[device.eth0.classes.x]\nprio = 1\n", "device.eth0.classes.x.rate: missing"),
    "unknown parent": (
        GOOD.replace('parent = "shaped"', 'parent = "nope"'),
        "classes.bulk.parent: 'nope' is not a class",
    ),
    "own parent": (GOOD.replace('parent = "shaped"', 'parent = "bulk"'), "a class cannot be its own parent"),
    "parent loop": (
        GOOD
        + '[device.eth0.classes.a]\nrate = "1mbit"\nparent = "b"\n[device.eth0.classes.b]\nrate = "1mbit"\nparent = "a"\n',
        "the parents form a loop",
    ),
    "rate above ceil": (
        GOOD.replace('rate = "1mbit"', 'rate = "2mbit"\nceil = "1mbit"'),
        "classes.bulk.rate: 2mbit is above the ceil 1mbit",
    ),
    "ceil above parent ceil": (
        GOOD.replace('rate = "1mbit"', 'rate = "1mbit"\nceil = "200mbit"'),
        "classes.bulk.ceil: 200mbit is above the ceil of 'shaped' (100mbit)",
    ),
    "ceil above line rate": (
        GOOD.replace('rate = "50mbit"', 'rate = "50mbit"\nceil = "1gbit"'),
        "1gbit is above the device rate (100mbit)",
    ),
    "prio above 7": (
        GOOD + "prio = 10\n",
        "classes.bulk.prio: 10 is out of range: use 0..7 (the kernel clamps higher values to 7)",
    ),
    "prio not an integer": (GOOD + 'prio = "high"\n', "classes.bulk.prio: must be an integer"),
    "bad burst unit": (GOOD + 'burst = "5kbps"\n', "classes.bulk.burst: '5kbps' has an unknown size unit"),
    "classid taken by shapekit": (GOOD + "classid = 0x5c\n", "0x5c is already used by shapekit"),
    "classid out of range": (GOOD + "classid = 0x8000\n", "use 16..32767 (the class minor, in hex: 0x1010)"),
    "classid twice": (
        GOOD + "classid = 0x20\n" + '[device.eth0.classes.c]\nrate = "1mbit"\nclassid = 0x20\n',
        "0x20 is already used by bulk",
    ),
    "mark on inner class": (
        GOOD.replace('rate = "50mbit"', 'rate = "50mbit"\nmark = 5'),
        "only a leaf class takes marked traffic",
    ),
    "mark collision": (
        GOOD + 'mark = 7\n[device.eth0.classes.c]\nrate = "1mbit"\nmark = 7\n',
        "classes.c.mark: mark 7 is already the mark of class 'bulk'",
    ),
    "mark out of range": (GOOD + "mark = 0\n", "classes.bulk.mark: 0 is out of range"),
    "mark in the caps' group byte": (
        GOOD + "mark = 16777216\n",
        "classes.bulk.mark: 16777216 is above 16777215 (the top byte of the mark is per-IP caps' group): "
        "pick a smaller mark",
    ),
    "bad class name": (GOOD + '[device.eth0.classes."a b"]\nrate = "1mbit"\n', "a class name uses letters"),
    # [[mark]] and [bypass]
    "rule for unknown class": (
        GOOD + '[[mark]]\nclass = "nope"\n',
        "mark[1].class: 'nope' is not a class of [device.eth0]",
    ),
    "rule without class": (GOOD + '[[mark]]\nproto = "tcp"\n', "mark[1].class: missing"),
    "rule for inner class": (GOOD + '[[mark]]\nclass = "shaped"\n', "'shaped' has child classes on eth0"),
    "port 70000": (GOOD + RULE + "dport = 70000\n", "mark[1].dport: port 70000 is out of range: use 1..65535"),
    "port 0": (GOOD + RULE + "sport = 0\n", "mark[1].sport: port 0 is out of range"),
    "reversed range": (GOOD + RULE + 'sport = "63000:61000"\n', "the first port must be below the second"),
    "not a port": (GOOD + RULE + 'dport = "http"\n', "'http' is not a port"),
    "too many ports": (GOOD + RULE + f"dport = {list(range(1, 17))}\n", "multiport takes 15 (a range counts 2)"),
    "ports without proto": (GOOD + '[[mark]]\nclass = "bulk"\ndport = 53\n', 'ports need proto = "tcp" or "udp"'),
    "unknown proto": (GOOD + '[[mark]]\nclass = "bulk"\nproto = "gre"\n', "mark[1].proto: 'gre' is not one of"),
    "v6 host with icmp": (
        GOOD + '[[mark]]\nclass = "bulk"\nproto = "icmp"\ndst = "2001:db8::1"\n',
        'use proto = "icmpv6"',
    ),
    "v4 host with icmpv6": (
        GOOD + '[[mark]]\nclass = "bulk"\nproto = "icmpv6"\nsrc = "198.51.100.1"\n',
        'use proto = "icmp"',
    ),
    "mixed families": (
        GOOD + '[[mark]]\nclass = "bulk"\nsrc = "198.51.100.1"\ndst = "2001:db8::1"\n',
        "different IP versions",
    ),
    "bad host": (
        GOOD + '[[mark]]\nclass = "bulk"\ndst = "example.com"\n',
        "mark[1].dst: 'example.com' is not an IPv4/IPv6",
    ),
    "host bits set": (GOOD + '[[mark]]\nclass = "bulk"\nsrc = "198.51.100.7/24"\n', "write 198.51.100.0/24"),
    "tcp_flags a string other than syn": (
        GOOD + RULE + 'tcp_flags = "fin"\n',
        """mark[1].tcp_flags: 'fin' is not "syn" or a non-empty list of flag names ("fin", "syn", "rst", "ack"), e.g. ["ack"]""",
    ),
    "tcp_flags an empty list": (GOOD + RULE + "tcp_flags = []\n", 'mark[1].tcp_flags: [] is not "syn" or a non-empty'),
    "tcp_flags an unknown flag": (
        GOOD + RULE + 'tcp_flags = ["ack", "psh"]\n',
        'mark[1].tcp_flags: \'psh\' is not a flag this match knows: use "fin", "syn", "rst", "ack"',
    ),
    "tcp_flags a flag twice": (GOOD + RULE + 'tcp_flags = ["ack", "ACK"]\n', "names a flag twice"),
    "tcp_flags list without proto": (
        GOOD + '[[mark]]\nclass = "bulk"\ntcp_flags = ["ack"]\n',
        "mark[1].tcp_flags: needs proto = \"tcp\", not 'all'",
    ),
    "src_mac not a mac": (
        GOOD + '[[mark]]\nclass = "bulk"\nsrc_mac = "02:00:00:00:01"\n',
        "mark[1].src_mac: '02:00:00:00:01' is not a MAC address: write six hex pairs, e.g. 02:00:00:00:00:01",
    ),
    "src_mac multicast": (
        GOOD + '[[mark]]\nclass = "bulk"\nsrc_mac = "01:00:5e:00:00:01"\n',
        "mark[1].src_mac: '01:00:5e:00:00:01' is a multicast address",
    ),
    "src_mac not a string": (GOOD + '[[mark]]\nclass = "bulk"\nsrc_mac = 2\n', "mark[1].src_mac: must be a string"),
    "dscp 64": (GOOD + RULE + "dscp = 64\n", "mark[1].dscp: 64 is not a DSCP: use 0..63 or a name"),
    "dscp EF2": (GOOD + RULE + 'dscp = "EF2"\n', "mark[1].dscp: 'EF2' is not a DSCP"),
    "dscp true": (GOOD + RULE + "dscp = true\n", "mark[1].dscp: True is not a DSCP"),
    "length backwards": (
        GOOD + RULE + 'length = "200:100"\n',
        "mark[1].length: '200:100' runs backwards: write the lower bound first (100:200)",
    ),
    "length out of range": (GOOD + RULE + "length = 70000\n", "mark[1].length: 70000 is out of range"),
    "length not a range": (GOOD + RULE + 'length = "small"\n', "mark[1].length: 'small' is not a length"),
    "length below any IPv6 packet": (
        GOOD + RULE + 'dst = "fd00::1"\nlength = "0:39"\n',
        "mark[1].length: an IPv6 packet is at least 40 bytes, so this never matches",
    ),
    "tcp_flags with udp": (
        GOOD + '[[mark]]\nclass = "bulk"\nproto = "udp"\ntcp_flags = "syn"\n',
        'needs proto = "tcp"',
    ),
    "bad l7proto": (GOOD + '[[mark]]\nclass = "bulk"\nl7proto = "Bit Torrent"\n', "not a layer7 protocol name"),
    "rule for unknown device": (
        GOOD + '[[mark]]\nclass = "bulk"\ndevice = "eth9"\n',
        "mark[1].device: 'eth9' is not a configured device",
    ),
    "unknown rule key": (GOOD + '[[mark]]\nclass = "bulk"\nport = 22\n', "mark[1].port: unknown key"),
    "mark as a table": (
        GOOD.replace("[device.eth0]", '[mark]\nclass = "bulk"\n[device.eth0]'),
        "mark: must be an array of tables",
    ),
    "class mark is the bypass mark": (GOOD + "mark = 1001\n", "classes.bulk.mark: mark 1001 is the bypass mark"),
    "class mark is the set bypass mark": (GOOD + "mark = 7\n[bypass]\nmark = 7\n", "mark 7 is the bypass mark"),
    "bypass port with unknown protocol": (
        GOOD + '[bypass]\nports = ["22/xyz"]\n',
        "bypass.ports: '22/xyz' has an unknown protocol 'xyz'",
    ),
    "bypass port without protocol": (
        GOOD + '[bypass]\nports = ["22"]\n',
        "bypass.ports: '22' is not a port: write PORT/PROTO",
    ),
    "bypass ports not a list": (GOOD + '[bypass]\nports = "22/tcp"\n', "bypass.ports: must be a list"),
    "bypass bad host": (GOOD + '[bypass]\nhosts = ["10.0.0.300"]\n', "bypass.hosts: '10.0.0.300' is not"),
    "bypass bad mark": (GOOD + "[bypass]\nmark = -1\n", "bypass.mark: -1 is not a mark"),
    "bypass mark in the caps' group byte": (
        GOOD + "[bypass]\nmark = 16777216\n",
        "bypass.mark: 16777216 is not a mark: use an integer 1..16777215 "
        "(the top byte of the mark is per-IP caps' group)",
    ),
    "bypass unknown key": (GOOD + "[bypass]\nport = 22\n", "bypass.port: unknown key"),
    "one class, two marks": (
        GOOD + '[device.eth1]\nrate = "1mbit"\ndefault = "bulk"\n[device.eth1.classes.bulk]\nrate = "1mbit"\n'
        '[[mark]]\nclass = "bulk"\n',
        "'bulk' has a different mark on each device: give it the same mark = N everywhere, or add device = to the rule",
    ),
    # values of the wrong type, and values tc would refuse
    "parent not a string": (
        GOOD.replace('parent = "shaped"', 'parent = ["shaped"]'),
        "classes.bulk.parent: must be a class name",
    ),
    "rule device not a string": (
        GOOD + '[[mark]]\nclass = "bulk"\ndevice = ["eth0"]\n',
        "mark[1].device: must be a string",
    ),
    "rule proto not a string": (
        GOOD + '[[mark]]\nclass = "bulk"\nproto = ["tcp"]\n',
        "mark[1].proto: must be a string",
    ),
    "rate below a byte": ('[device.eth0]\nrate = "1bit"\n', "below 8bit (one byte/s), the least HTB takes"),
    "rate above 1tbit": ('[device.eth0]\nrate = "2tbit"\n', "above 1tbit"),
    "quantum too big": (GOOD + 'quantum = "1g"\n', "classes.bulk.quantum: '1g' is more than tc takes here"),
    "burst too big": (GOOD + 'burst = "4g"\n', "classes.bulk.burst: '4g' is more than tc takes here"),
    "ranges count twice in multiport": (
        GOOD + RULE + 'sport = ["1:2", "3:4", "5:6", "7:8", "9:10", "11:12", "13:14", "15:16"]\n',
        "a range counts 2",
    ),
    # percentages: of a parent's ceil, so only a class's rate and ceil
    "line rate as a percentage": (
        '[device.eth0]\nrate = "40%"\n',
        "device.eth0.rate: '40%' is a percentage, which only a class's rate and ceil take: the line rate is what"
        " they are shares of, so write the line's own, e.g. '100mbit'",
    ),
    "ingress line rate as a percentage": (
        GOOD + '[device.eth0.ingress]\nrate = "100%"\n',
        "device.eth0.ingress.rate: '100%' is a percentage, which only a class's rate and ceil take: the line rate",
    ),
    "cap as a percentage": (
        GOOD + '[device.eth0.limits]\n"198.51.100.7" = "50%"\n',
        "device.eth0.limits.\"198.51.100.7\": '50%' is a percentage, which only a class's rate and ceil take:"
        " a cap holds a host to a rate of its own, not a share of a class, so write one, e.g. '2mbit'",
    ),
    "cap table as a percentage": (
        GOOD + '[device.eth0.limits]\n"198.51.100.7" = { rate = "50%", direction = "out" }\n',
        "'50%' is a percentage, which only a class's rate and ceil take: a cap holds a host",
    ),
    "zero percent": (
        GOOD.replace('rate = "1mbit"', 'rate = "0%"'),
        "classes.bulk.rate: '0%' is out of range: a share of the parent's ceil is above 0% and up to 100%",
    ),
    "above 100 percent": (GOOD.replace('rate = "1mbit"', 'ceil = "150%"\nrate = "1mbit"'), "'150%' is out of range"),
    "a percent sign alone": (
        GOOD.replace('rate = "1mbit"', 'rate = "%"'),
        "classes.bulk.rate: '%' is not a percentage (expected a number above 0 and up to 100, e.g. '40%')",
    ),
    "negative percent": (GOOD.replace('rate = "1mbit"', 'rate = "-5%"'), "'-5%' is not a percentage"),
    "percent of a tiny ceil below a byte": (
        '[device.eth0]\nrate = "1kbit"\ndefault = "a"\n[device.eth0.classes.a]\nrate = "0.1%"\n',
        "classes.a.rate: '0.1%' of 1kbit is below 8bit (one byte/s), the least HTB takes",
    ),
    "percent rate above the ceil (60% of the parent's ceil, not its rate)": (
        GOOD.replace('rate = "1mbit"', 'rate = "60%"\nceil = "2mbit"'),
        "classes.bulk.rate: 60mbit is above the ceil 2mbit",
    ),
    "burst as a percentage": (GOOD + 'burst = "10%"\n', "classes.bulk.burst: '10%' is not a size"),
    "quantum as a percentage": (GOOD + 'quantum = "10%"\n', "classes.bulk.quantum: '10%' is not a size"),
    # link-layer overhead
    "overhead below -64": (
        GOOD.replace('default = "bulk"', 'default = "bulk"\noverhead = -65'),
        "device.eth0.overhead: -65 is out of range: use -64..256 bytes each packet costs on the line beyond its length",
    ),
    "overhead too big": (
        GOOD.replace('default = "bulk"', 'default = "bulk"\noverhead = 1000'),
        "device.eth0.overhead: 1000 is out of range: use -64..256 bytes each packet costs on the line beyond its length",
    ),
    "overhead not an integer": (
        GOOD.replace('default = "bulk"', 'default = "bulk"\noverhead = "40b"'),
        "device.eth0.overhead: must be an integer, not '40b'",
    ),
    "unknown link layer": (
        GOOD + '[device.eth0.ingress]\nrate = "1mbit"\nlinklayer = "adsl"\n',
        "device.eth0.ingress.linklayer: 'adsl' is not one of 'ethernet', 'atm', 'ptm'",
    ),
    "overhead on a class": (GOOD + "overhead = 10\n", "device.eth0.classes.bulk.overhead: unknown key"),
    "bypass every host": (
        GOOD + '[bypass]\nhosts = ["0.0.0.0/0"]\n',
        "bypass.hosts: 0.0.0.0/0 would bypass every host",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_config_error(system, cli, write_config, case):
    text, expected = BAD_CONFIGS[case]
    path = write_config(text)

    result = cli(init_app, "--config", str(path))

    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"shape-init: {path}: "), result.stderr
    assert expected in result.stderr, result.stderr
    assert system.calls == []


def test_missing_config_file(system, cli, tmp_path):
    result = cli(init_app, "--config", str(tmp_path / "nope.toml"))

    assert result.exit_code == 2
    assert (
        result.stderr == f"shape-init: {tmp_path}/nope.toml: no such file (pass --config PATH or set SHAPEKIT_CONFIG)\n"
    )
    assert system.calls == []


def test_unknown_dev(system, cli):
    result = cli(init_app, "--config", str(SEED_CONFIG), "--dev", "eth7")

    assert result.exit_code == 2
    assert result.stderr == f"shape-init: --dev eth7: not a device in {SEED_CONFIG} (configured: eth0)\n"
    assert system.calls == []


def test_device_that_does_not_exist(system, cli, write_config):
    result = cli(init_app, "--config", str(write_config('[device.wlan9]\nrate = "1mbit"\n')))

    assert result.exit_code == 2
    assert "device 'wlan9' does not exist" in result.stderr
    assert system.calls == []


@pytest.mark.parametrize("app", [init_app, flush_app], ids=["init", "flush"])
def test_not_root(system, cli, mocker, app):
    mocker.patch("os.geteuid", return_value=1000)

    result = cli(app, "--config", str(SEED_CONFIG))

    assert result.exit_code == 2
    assert "must run as root (or review it with --dry-run)" in result.stderr
    assert system.calls == []


def test_missing_binary(system, cli, mocker):
    mocker.patch("shutil.which", return_value=None)

    result = cli(init_app, "--config", str(SEED_CONFIG))

    assert result.exit_code == 2
    assert result.stderr == "shape-init: `tc` is not installed or not in PATH: install it (apt-get install iproute2)\n"
    assert system.calls == []


def test_missing_kernel_features_are_named_with_the_key_that_avoids_them(system, cli):
    def kernel_without_sfq_and_fw(argv, stdin):
        if argv[0] == "unshare" and ("sfq" in stdin or " fw " in stdin):
            raise CommandFailed("unshare", "Error: Specified qdisc kind is unknown.\nCommand failed -:3\n")

    system.hooks.append(kernel_without_sfq_and_fw)

    result = cli(init_app, "--config", str(SEED_CONFIG))

    assert result.exit_code == 2
    assert result.stderr == (
        'shape-init: the kernel lacks the sfq qdisc (sch_sfq): set leaf = "pfifo" (or "none") in [device.eth0]; '
        'the kernel lacks the fw classifier (cls_fw): set classifier = "classify" in [device.eth0]\n'
    )
    assert system.batches() == []


CAKE_AND_CLASS_FQ_CODEL = (
    SEED_CONFIG.read_text()
    .replace('leaf = "sfq"', 'leaf = "cake"')
    .replace("mark = 11010\n", 'mark = 11010\nleaf = "fq_codel"\n')
)


def test_kernel_features_name_each_leaf_qdisc_with_the_tables_that_ask_for_it(write_config):
    config = load_config(write_config(CAKE_AND_CLASS_FQ_CODEL), check_owner=False)

    features = plan.kernel_features([tree for d in config.devices.values() for tree in d.trees])

    assert [(f.name, f.lines[2:], f.fix) for f in features] == [
        ("HTB (sch_htb)", (), "shapekit needs HTB; no config change avoids it"),
        (  # the root filter that finds a capped host's group: every egress tree has it
            "the bpf classifier (cls_bpf)",
            ('filter add dev lo parent 1: protocol all prio 1 bpf bytecode "1,6 0 0 0"',),
            "shapekit's per-IP caps need it; no config change avoids it",
        ),
        (
            "the cake qdisc (sch_cake)",
            ("qdisc add dev lo parent 1:1 handle 2: cake unlimited besteffort triple-isolate split-gso",),
            'set leaf = "pfifo" (or "none") in [device.eth0]',
        ),
        (
            "the fq_codel qdisc (sch_fq_codel)",
            ("qdisc add dev lo parent 1:1 handle 2: fq_codel",),
            'set leaf = "pfifo" (or "none") in [device.eth0.classes.high]',
        ),
        (
            "the fw classifier (cls_fw)",
            ("filter add dev lo parent 1: protocol all prio 1 handle 1 fw flowid 1:1",),
            'set classifier = "classify" in [device.eth0]',
        ),
    ]
    assert {f.lines[:2] for f in features} == {
        ("qdisc add dev lo root handle 1: htb", "class add dev lo parent 1: classid 1:1 htb rate 1mbit")
    }


def test_kernel_features_name_ingress_tables_and_their_classes(write_config):
    text = (
        '[device.eth0]\nrate = "100mbit"\nleaf = "fq_codel"\nclassifier = "classify"\n'
        '[device.eth0.ingress]\nrate = "50mbit"\ndefault = "bulk"\nleaf = "cake"\n'
        '[device.eth0.ingress.classes.bulk]\nrate = "40mbit"\n'
        '[device.eth0.ingress.classes.ssh]\nrate = "10mbit"\nleaf = "fq_codel"\n'
    )
    config = load_config(write_config(text), check_owner=False)

    features = plan.kernel_features([tree for d in config.devices.values() for tree in d.trees])

    assert [(f.name, f.fix) for f in features] == [
        ("HTB (sch_htb)", "shapekit needs HTB; no config change avoids it"),
        ("the bpf classifier (cls_bpf)", "shapekit's per-IP caps need it; no config change avoids it"),
        ("the cake qdisc (sch_cake)", 'set leaf = "pfifo" (or "none") in [device.eth0.ingress]'),
        (
            "the fq_codel qdisc (sch_fq_codel)",
            'set leaf = "pfifo" (or "none") in [device.eth0], [device.eth0.ingress.classes.ssh]',
        ),
    ]


def test_a_kernel_without_cake_or_fq_codel_is_refused_naming_the_tables(system, cli, write_config):
    def kernel_without_cake_and_fq_codel(argv, stdin):
        if argv[0] == "unshare" and (" cake " in stdin or "fq_codel" in stdin):
            raise CommandFailed("unshare", "Error: Specified qdisc kind is unknown.\nCommand failed -:3\n")

    system.hooks.append(kernel_without_cake_and_fq_codel)

    result = cli(init_app, "--config", str(write_config(CAKE_AND_CLASS_FQ_CODEL)))

    assert result.exit_code == 2
    assert result.stderr == (
        'shape-init: the kernel lacks the cake qdisc (sch_cake): set leaf = "pfifo" (or "none") in [device.eth0]; '
        'the kernel lacks the fq_codel qdisc (sch_fq_codel): set leaf = "pfifo" (or "none") in '
        "[device.eth0.classes.high]\n"
    )
    assert system.batches() == []


def test_probe_is_skipped_where_namespaces_cannot_be_made(system, cli):
    def no_namespaces(argv, stdin):
        if argv[0] == "unshare":
            raise CommandFailed("unshare", "unshare: unshare failed: Operation not permitted\n")

    system.hooks.append(no_namespaces)

    assert cli(init_app, "--config", str(SEED_CONFIG)).exit_code == 0
    assert len(system.batches()) == 1


@pytest.mark.parametrize("mode", [0o666, 0o620])
def test_config_writable_by_others_is_refused_as_root(tmp_path, mode, mocker):
    path = tmp_path / "shapekit.toml"
    path.write_text(GOOD)
    path.chmod(mode)
    mocker.patch("os.stat", side_effect=lambda p, *a, **k: _stat_as(Path(p), mode, path))

    with pytest.raises(UsageError, match="it drives root commands: chmod [og]-w"):
        load_config(path, check_owner=True)


def _stat_as(target: Path, mode: int, path: Path):
    """The file owned by root:staff (gid 50) with `mode`; its directory root's and 0755."""
    import os
    import stat

    real = os.lstat(target)
    fields = list(real)
    fields[stat.ST_UID], fields[stat.ST_GID] = 0, 50
    fields[stat.ST_MODE] = (stat.S_IFREG | mode) if target == path else (stat.S_IFDIR | 0o755)
    return os.stat_result(fields)


def test_config_owned_by_another_user_is_refused_as_root(tmp_path, mocker):
    path = tmp_path / "shapekit.toml"
    path.write_text(GOOD)
    mocker.patch("os.stat", side_effect=lambda p, *a, **k: _owned_by(Path(p), 1000))

    with pytest.raises(UsageError, match="owned by uid 1000, not root; it drives root commands: chown root"):
        load_config(path, check_owner=True)


def _owned_by(target: Path, uid: int):
    import os
    import stat

    fields = list(os.lstat(target))
    fields[stat.ST_UID] = uid
    return os.stat_result(fields)


# --- usage errors: one line through one place (cli._main), exit 2 ------------------------

USAGE_ERRORS = {
    "unknown option": (init_main, ["--bogus"], "shape-init: no such option: --bogus"),
    "extra argument": (init_main, ["extra"], "shape-init: got unexpected extra argument(s) (extra)"),
    "missing rate": (limit_ip_main, ["add", "198.18.9.9"], "shape-limit-ip: missing argument 'rate'"),
    "negative rate read as an option": (
        limit_ip_main,
        ["add", "198.18.9.9", "-1mbit"],
        "shape-limit-ip: no such option: -1",
    ),
    "bypass add without an entry": (bypass_main, ["add"], "shape-bypass: missing argument 'PORT/PROTO|HOST...'"),
    "unknown verb": (bypass_main, ["frobnicate"], "shape-bypass: no such command 'frobnicate'"),
    "interval 0": (status_main, ["--interval", "0"], "0.0 is not a number of seconds from 0.1 to 86400"),
    "interval nan": (status_main, ["--interval", "nan"], "nan is not a number of seconds from 0.1 to 86400"),
    "interval inf": (status_main, ["-i", "inf"], "inf is not a number of seconds from 0.1 to 86400"),
    "interval negative": (status_main, ["--interval=-1"], "-1.0 is not a number of seconds from 0.1 to 86400"),
    "interval not a number": (status_main, ["--interval", "soon"], "'soon' is not a valid float"),
    "interval past a day": (status_main, ["--interval", "1e10"], "10000000000.0 is not a number of seconds from 0.1"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_a_usage_error_is_one_line_and_exit_2(system, capsys, monkeypatch, case):
    main, args, expected = USAGE_ERRORS[case]
    monkeypatch.setattr("sys.argv", ["prog", *args])

    with pytest.raises(SystemExit) as exited:
        main()

    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.count("\n") == 1 and expected in err, err
    assert "--help)" in err  # and where to look
    assert system.calls == []


def test_help_and_version_still_exit_0(capsys, monkeypatch):
    for args in (["--help"], ["--version"]):
        monkeypatch.setattr("sys.argv", ["shape-init", *args])
        with pytest.raises(SystemExit) as exited:
            init_main()
        assert exited.value.code == 0
    assert "shapekit " in capsys.readouterr().out


@pytest.mark.parametrize("duration", ["", " ", "-1h", "nan", "inf", "0s"])
def test_a_duration_that_is_empty_or_no_time_is_refused(system, cli_runner_limit, duration):
    result = cli_runner_limit("add", "198.51.100.7", "1mbit", "--for", duration)

    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("shape-limit-ip: --for: ") and result.stderr.count("\n") == 1
    assert system.batches() == []


def test_a_run_time_cap_as_a_percentage_is_refused(system, cli_runner_limit):
    result = cli_runner_limit("add", "198.51.100.7", "50%")

    assert result.exit_code == 2, result.stderr
    assert result.stderr == (
        "shape-limit-ip: '50%' is a percentage, which only a class's rate and ceil take: a cap holds a host to a"
        " rate of its own, not a share of a class, so write one, e.g. '2mbit'\n"
    )
    assert system.calls == []


@pytest.fixture
def cli_runner_limit(cli, write_config):
    from shapekit.commands.limit_ip import limit_ip_app

    config = str(write_config(GOOD))
    return lambda *args: cli(limit_ip_app, *args, "--config", config)


@pytest.mark.parametrize("name", ["adv#1", "a'b", 'a"b', "a\\b", "a b", "a/b", "sixteen-chars-xx", "eth+"])
def test_flush_dev_refuses_a_name_tc_batch_cannot_carry(system, cli, name):
    result = cli(flush_app, "--dev", name)

    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert system.calls == []
