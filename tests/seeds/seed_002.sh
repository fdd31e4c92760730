#!/bin/bash
# Seed 002 ("Traffic shaping using iptables and tc", ../shared/seeds/002_*.txt), as
# published, but for its hosts: the post's 192.168.1.101-103 become $HOST1-3
# (from 198.18.0.0/15 in the tests), so real traffic can reach them.
#
# THIS_KERNEL=1 adapts it to a kernel without cls_fw: each
# `tc filter ... handle $mark fw flowid 1:$mark` becomes
# `tc filter ... u32 match ip dst $ip/32 flowid 1:$mark` (this kernel's u32 has no
# mark match: CONFIG_CLS_U32_MARK is off), and the marks are left set, unused.
: "${NETCARD:?}" "${HOST1:?}" "${HOST2:?}" "${HOST3:?}"
MAXBANDWIDTH=100000 # choose a number that is high enough for non-shaped traffic

# reinit
tc qdisc del dev $NETCARD root handle 1
tc qdisc add dev $NETCARD root handle 1: htb default 9999

# create the default class, this is "all the other traffic"
tc class add dev $NETCARD parent 1:0 classid 1:9999 htb rate $(( $MAXBANDWIDTH ))kbit ceil $(( $MAXBANDWIDTH ))kbit burst 5k prio 9999

# control bandwidth per IP
declare -A ipctrl
# define list of IP and bandwidth (in kilo bits per seconds) below
ipctrl[$HOST1]="128" # limited to 128 kilobits per second
ipctrl[$HOST2]="512" # limited to 512 kilobits per second
ipctrl[$HOST3]="32" # limited to just 32 kilobit per second

mark=0
for ip in "${!ipctrl[@]}"
do
    mark=$(( mark + 1 ))
    bandwidth=${ipctrl[$ip]}

    # traffic shaping rule
    tc class add dev $NETCARD parent 1:0 classid 1:$mark htb rate $(( $bandwidth ))kbit ceil $(( $bandwidth ))kbit burst 5k prio $mark

    # netfilter packet marking rule
    iptables -t mangle -A INPUT -i $NETCARD -s $ip -j CONNMARK --set-mark $mark

    # filter that bind the two
    if [ -n "$THIS_KERNEL" ]; then
        tc filter add dev $NETCARD parent 1:0 protocol ip prio $mark u32 match ip dst $ip/32 flowid 1:$mark
    else
        tc filter add dev $NETCARD parent 1:0 protocol ip prio $mark handle $mark fw flowid 1:$mark
    fi

    echo "IP $ip is attached to mark $mark and limited to $bandwidth kbps"
done

#propagate netfilter marks on connections
iptables -t mangle -A POSTROUTING -j CONNMARK --restore-mark
