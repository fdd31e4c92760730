#!/bin/bash
# A made-up script for the unit tests: an ingress tree on an IFB picked by u32,
# egress classes picked by u32 and by CLASSIFY, and what shapekit cannot express.
# Recorded in a throwaway namespace (DEV=eth0, the machine 198.18.0.1).
: "${DEV:?}"
tc qdisc add dev $DEV root handle 1: htb default 20
tc class add dev $DEV parent 1: classid 1:1 htb rate 20mbit
tc class add dev $DEV parent 1:1 classid 1:10 htb rate 5mbit ceil 20mbit prio 1
tc class add dev $DEV parent 1:1 classid 1:20 htb rate 5mbit ceil 10mbit prio 3 quantum 3000
tc class add dev $DEV parent 1:1 classid 1:30 htb rate 1mbit ceil 1mbit
tc qdisc add dev $DEV parent 1:20 handle 20: tbf rate 10mbit burst 20k latency 50ms
tc filter add dev $DEV parent 1: protocol ip prio 1 u32 match ip protocol 17 0xff match ip dport 53 0xffff flowid 1:10
tc filter add dev $DEV parent 1: protocol ip prio 2 u32 match ip dst 198.51.100.0/24 flowid 1:30
tc filter add dev $DEV parent 1: protocol ipv6 prio 3 u32 match ip6 dst fd00::7/128 match ip6 protocol 6 0xff match ip6 sport 8080 0xffff flowid 1:10
iptables -t mangle -A POSTROUTING -p tcp -m multiport --ports 5060,5061 -m comment --comment "sip" -j CLASSIFY --set-class 1:10
iptables -t mangle -A POSTROUTING -p tcp -m length --length 0:64 -j CLASSIFY --set-class 1:10
iptables -t mangle -N MYCHAIN
iptables -t mangle -A POSTROUTING -j MYCHAIN
iptables -t mangle -A MYCHAIN -p udp -j MARK --set-mark 7
ip link add ifb0 type ifb
ip link set ifb0 up
tc qdisc add dev ifb0 root handle 2: htb default 30
tc class add dev ifb0 parent 2: classid 2:1 htb rate 50mbit
tc class add dev ifb0 parent 2:1 classid 2:10 htb rate 10mbit ceil 50mbit
tc class add dev ifb0 parent 2:1 classid 2:20 htb rate 2mbit ceil 2mbit
tc class add dev ifb0 parent 2:1 classid 2:30 htb rate 20mbit ceil 50mbit
tc filter add dev ifb0 parent 2: protocol ip prio 2 u32 match ip protocol 6 0xff match ip sport 443 0xffff flowid 2:10
tc filter add dev ifb0 parent 2: protocol ip prio 1 u32 match ip src 203.0.113.9/32 flowid 2:20
tc qdisc add dev $DEV ingress
tc filter add dev $DEV parent ffff: protocol all prio 10 u32 match u32 0 0 action mirred egress redirect dev ifb0
