"""The [[mark]] matches of issue 16 on a real kernel: dscp, length and tcp_flags lists, sent and arriving.

Each test sends packets that differ only in the matched field and reads
which class counted them (`tc -s class show`), out of the veth and into the
IFB; iptables-save and `shape-init --check` read the rules back.
"""

from __future__ import annotations

import pytest
from netns import Namespace, NetPair, sh

CLASSES = """
[device.DEV.classes.shaped]
rate = "100mbit"
classid = 0x10

[device.DEV.classes.voice]
parent = "shaped"
rate = "10mbit"
classid = 0x1010

[device.DEV.classes.small]
parent = "shaped"
rate = "10mbit"
classid = 0x1020

[device.DEV.classes.normal]
parent = "shaped"
rate = "10mbit"
ceil = "100mbit"
classid = 0x1030

[device.DEV.classes.acks]
parent = "shaped"
rate = "10mbit"
classid = 0x1040

[device.DEV.classes.bulk]
parent = "shaped"
rate = "10mbit"
ceil = "100mbit"
classid = 0x1090
"""
DEVICE = """
[device.DEV]
rate = "10gbit"
default = "normal"
leaf = "pfifo"
classifier = "classify"
"""
# Arriving traffic: the same classes on the IFB.
INGRESS = """
[device.DEV.ingress]
rate = "1gbit"
default = "normal"
leaf = "pfifo"
""" + CLASSES.replace("[device.DEV.classes", "[device.DEV.ingress.classes")
VOICE, SMALL, NORMAL, ACKS, BULK = "5c:1010", "5c:1020", "5c:1030", "5c:1040", "5c:1090"
EF_TOS = "0xb8"  # DSCP 46 in the TOS byte / traffic class
SMALL_ACKS = '[[mark]]\nclass = "acks"\nproto = "tcp"\ntcp_flags = ["ack"]\nlength = "0:100"\n'  # wondershaper's
IPERF_PORT = 5300


def boot(netpair, rules: str, ingress: bool = False) -> str:
    config = str(netpair.write_config(DEVICE + CLASSES + (INGRESS if ingress else "") + rules))
    for command in ("shape-init", "shape-bypass", "shape-mark"):
        netpair.shapekit(command, "--config", config)
    return config


def packets(netpair, classid: str, dev: str | None = None) -> int:
    shown = netpair.left.run("tc", "-s", "class", "show", "dev", dev or netpair.dev, "classid", classid).stdout
    return int(shown.split("Sent ")[1].split()[2])


def ping(ns, to: str, *options: str, count: int = 5) -> None:
    ns.run("ping", "-c", str(count), "-i", "0.2", "-W", "2", "-q", *options, to)


FAMILIES = pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])


@FAMILIES
def test_dscp_ef_pings_go_to_the_voice_class_and_others_do_not(netpair, ipv6):
    boot(netpair, '[[mark]]\nclass = "voice"\ndscp = "EF"\n')
    to = netpair.right.addr6 if ipv6 else netpair.right.addr4

    ping(netpair.left, to, "-Q", EF_TOS)
    ping(netpair.left, to)

    assert packets(netpair, VOICE) == 5  # the EF echo requests, and nothing else
    assert packets(netpair, NORMAL) >= 5
    tool = "ip6tables-save" if ipv6 else "iptables-save"
    assert f'-m dscp --dscp 0x2e -m comment --comment "mark[1] voice" -g SHAPEKIT-PKT-{0x5C1010}' in netpair.save(tool)


@FAMILIES
def test_length_puts_small_packets_in_their_class_and_big_ones_not(netpair, ipv6):
    to = netpair.right.addr6 if ipv6 else netpair.right.addr4
    # To the peer only: IPv6's own small packets (router solicitations, MLD reports) go elsewhere.
    boot(netpair, f'[[mark]]\nclass = "small"\ndst = "{to}"\nlength = "0:100"\n')

    ping(netpair.left, to, "-s", "20")  # 48 bytes (IPv4), 68 (IPv6)
    after_small = packets(netpair, SMALL)
    ping(netpair.left, to, "-s", "400")

    assert 5 <= after_small <= 6  # the pings, and for IPv6 the peer's neighbour solicitation
    assert packets(netpair, SMALL) == after_small
    assert packets(netpair, NORMAL) >= 5
    assert "-m length --length 0:100" in netpair.save("ip6tables-save" if ipv6 else "iptables-save")


def test_a_first_per_packet_rule_takes_the_small_acks_of_a_connection_a_later_rule_marked(netpair):
    bulk_rule = f'[[mark]]\nclass = "bulk"\nproto = "tcp"\ndport = {IPERF_PORT}\n'
    boot(netpair, SMALL_ACKS + bulk_rule)

    netpair.goodput(download=True, port=IPERF_PORT, seconds=3)  # left sends only ACKs on the data connection

    acks, bulk = packets(netpair, ACKS), packets(netpair, BULK)
    print(f"small ACKs first: acks class {acks} packets, bulk class {bulk}")
    assert acks > 1000
    assert bulk < acks / 20  # the SYNs, and iperf3's own messages on its control connection


def test_the_same_rules_the_other_way_round_leave_the_acks_with_the_connection(netpair):
    bulk_rule = f'[[mark]]\nclass = "bulk"\nproto = "tcp"\ndport = {IPERF_PORT}\n'
    boot(netpair, bulk_rule + SMALL_ACKS)

    netpair.goodput(download=True, port=IPERF_PORT, seconds=3)

    acks, bulk = packets(netpair, ACKS), packets(netpair, BULK)
    print(f"bulk rule first: acks class {acks} packets, bulk class {bulk}")
    assert acks == 0
    assert bulk > 1000


def test_tcp_flags_syn_as_a_list_counts_each_connections_first_packet(netpair):
    boot(netpair, '[[mark]]\nclass = "voice"\nproto = "tcp"\ntcp_flags = ["syn"]\n' + SMALL_ACKS)

    netpair.goodput(port=IPERF_PORT, seconds=1)

    syns, acks = packets(netpair, VOICE), packets(netpair, ACKS)
    assert 2 <= syns <= 10, syns  # control and data connection (a retried connect before the server listens adds one)
    assert acks >= 2  # the handshakes' last packets at least
    saved = netpair.save()
    assert '-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m comment --comment "mark[1] voice"' in saved
    assert "-m tcp --tcp-flags FIN,SYN,RST,ACK ACK -m length --length 0:100" in saved


def test_the_kernel_holds_what_the_config_says(netpair):
    rules = SMALL_ACKS + '[[mark]]\nclass = "voice"\ndscp = "EF"\n[[mark]]\nclass = "small"\nlength = 64\n'
    rules += '[[mark]]\nclass = "bulk"\nproto = "udp"\nsport = 9\n'
    rules += '[[mark]]\nclass = "small"\ndirection = "in"\nlength = "0:100"\n'
    config = boot(netpair, rules, ingress=True)

    result = netpair.shapekit("shape-init", "--config", config, "--check", check=False)

    assert result.returncode == 0, result.stdout + result.stderr


@FAMILIES
def test_arriving_pings_are_classed_by_dscp_and_length_on_the_ifb(netpair, ipv6):
    peer, to = (netpair.right.addr6, netpair.left.addr6) if ipv6 else (netpair.right.addr4, netpair.left.addr4)
    rules = '[[mark]]\nclass = "voice"\ndirection = "in"\ndscp = "EF"\n'
    rules += f'[[mark]]\nclass = "small"\ndirection = "in"\nsrc = "{peer}"\nlength = "0:100"\n'
    boot(netpair, rules, ingress=True)
    ifb = f"ifb-{netpair.dev}"

    ping(netpair.right, to, "-Q", EF_TOS, "-s", "400")
    ping(netpair.right, to, "-s", "20")
    after_small = packets(netpair, SMALL, ifb)
    ping(netpair.right, to, "-s", "400")

    assert packets(netpair, VOICE, ifb) == 5
    assert 5 <= after_small <= 6  # the pings, and for IPv6 the peer's neighbour advertisement
    assert packets(netpair, SMALL, ifb) == after_small
    assert packets(netpair, NORMAL, ifb) >= 5


def test_arriving_pure_acks_are_classed_by_their_flags_on_the_ifb(netpair):
    boot(netpair, SMALL_ACKS.replace("[[mark]]\n", '[[mark]]\ndirection = "in"\n'), ingress=True)
    ifb = f"ifb-{netpair.dev}"

    netpair.goodput(port=IPERF_PORT, seconds=2)  # right sends only ACKs on the data connection

    acks, normal = packets(netpair, ACKS, ifb), packets(netpair, NORMAL, ifb)
    print(f"arriving small ACKs: acks class {acks} packets, default class {normal}")
    assert acks > 200
    assert normal < acks / 20  # SYN-ACKs, iperf3's messages, neighbour discovery


# --- src_mac: a client behind a router ------------------------------------------------------------------

CLIENT_A, CLIENT_B = "02:00:00:00:5c:0a", "02:00:00:00:5c:0b"
ROUTER_LAN, CLIENT = "198.18.1.1", "198.18.1.2"
ROUTER_CONFIG = """
[device.DEV]
rate = "10gbit"
default = "normal"
leaf = "pfifo"
classifier = "classify"

[device.DEV.classes.shaped]
rate = "20mbit"
ceil = "20mbit"
classid = 0x10

[device.DEV.classes.a]
parent = "shaped"
rate = "1mbit"
ceil = "2mbit"
classid = 0x1010

[device.DEV.classes.b]
parent = "shaped"
rate = "1mbit"
ceil = "8mbit"
classid = 0x1020

[device.DEV.classes.normal]
parent = "shaped"
rate = "1mbit"
ceil = "4mbit"
classid = 0x1030

[[mark]]
class = "a"
src_mac = "CLIENT_A"

[[mark]]
class = "b"
src_mac = "CLIENT_B"
""".replace("CLIENT_A", CLIENT_A.upper()).replace("CLIENT_B", CLIENT_B)


@pytest.fixture
def routed(netpair):
    """A client namespace behind the left one, which forwards its packets out of the shaped device to the right.

    Yields the client as the left end of a NetPair whose right end is the server, for goodput.
    """
    token = netpair.left.name.split("-")[1]
    client = Namespace(f"sk-{token}-c", f"sk{token}c", CLIENT, "fd00:5d::2")
    lan = f"sk{token}a"
    try:
        sh("ip", "netns", "add", client.name)
        sh("ip", "link", "add", lan, "netns", netpair.left.name, "type", "veth", "peer", "name", client.dev,
           "netns", client.name)  # fmt: skip
        client.run("ip", "link", "set", client.dev, "address", CLIENT_A)
        for ns, dev, addr in ((netpair.left, lan, ROUTER_LAN), (client, client.dev, CLIENT)):
            ns.run("ip", "addr", "add", f"{addr}/24", "dev", dev)
            ns.run("ip", "link", "set", dev, "up")
        client.run("ip", "route", "add", "default", "via", ROUTER_LAN)
        netpair.right.run("ip", "route", "add", "198.18.1.0/24", "via", netpair.left.addr4)
        netpair.left.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        yield NetPair(left=client, right=netpair.right, workdir=netpair.workdir, env=netpair.env), lan
    finally:
        for pid in sh("ip", "netns", "pids", client.name, check=False).stdout.split():
            sh("kill", "-9", pid, check=False)
        sh("ip", "netns", "del", client.name, check=False)


def test_src_mac_classes_forwarded_traffic_by_the_clients_mac_and_never_the_routers_own(netpair, routed):
    behind, lan = routed
    config = str(netpair.write_config(ROUTER_CONFIG))
    for command in ("shape-init", "shape-bypass", "shape-mark"):
        netpair.shapekit(command, "--config", config)

    as_a = behind.goodput(to=netpair.right.addr4, seconds=5) / 2_000_000
    a_bytes = netpair.class_bytes("5c:1010")
    behind.left.run("ip", "link", "set", behind.left.dev, "address", CLIENT_B)
    netpair.left.run("ip", "neigh", "flush", "dev", lan)  # the router's replies go to the new MAC
    as_b = behind.goodput(to=netpair.right.addr4, seconds=5) / 8_000_000
    ping(netpair.left, netpair.right.addr4)  # the router's own packets: no source MAC to match

    print(f"src_mac goodput/ceil: client as {CLIENT_A} {as_a:.3f}, as {CLIENT_B} {as_b:.3f}")
    assert 0.85 <= as_a <= 1.0, as_a
    assert 0.85 <= as_b <= 1.0, as_b
    assert a_bytes > 1_000_000
    assert netpair.class_bytes("5c:1010") - a_bytes < 1_000  # the last packets of A's connections, not B's
    assert netpair.class_bytes("5c:1020") > 4_000_000
    assert packets(netpair, NORMAL) >= 5
    # 02:00:00:00 and 5c:0a after EtherType 0x0800, read back as written.
    program = "8,40 0 0 4292870156,21 0 5 2048,32 0 0 4292870150,21 0 3 33554432,40 0 0 4292870154,21 0 1 23562"
    assert f'-m bpf --bytecode "{program},6 0 0 1,6 0 0 0" -m comment --comment "mark[1] a"' in netpair.save()
    check = netpair.shapekit("shape-init", "--config", config, "--check", check=False)
    assert check.returncode == 0, check.stdout + check.stderr
