#!/usr/bin/env bash
# The vswitch part of the demo, sourced by scripts/demo.sh (which provides step, die, check,
# start_daemon, stop_daemon, guest_initrd, run_guest, ...). Run it alone with
#   DEMO_PARTS=vswitch scripts/demo.sh        (or scripts/demo-vswitch.sh)
#
# The switch is `vswitch serve --config configs/vswitch-two-vlans.toml` (VSWITCH_CONFIG=file
# for another): its first two access ports on one VLAN (A: vm1, vm2) and the first access
# port on another VLAN (B: vm3), both VLANs with a service_ip (the switch's own address, the
# guests' gateway). Three QEMU guests boot at once, each NIC a vhost-user virtio-net with its
# port's MAC (anti_spoof drops frames from any other source MAC) and `vectors=0` (QEMU 7.2
# under TCG crashes with MSI-X on vhost-user NICs). Addresses come from the service_ip
# subnets: vm1 .1 and vm2 .2 on A, vm3 .3 on B. The host steers the guests through their
# serial consoles:
#   1. vm1 and vm2 wait for each other, ping each other and their gateway, then broadcast on
#      A (gratuitous ARP, one a second) and wait;
#   2. then the host tells vm3 to start: it adds a second address, .3 in A's subnet (A is
#      then on-link for it, no router in the way), pings vm1 and A's gateway many times,
#      reads its NIC's receive counter (VLAN B is otherwise silent, so anything counted is
#      a leak from A), and only then pings its own gateway on B;
#   3. with all three guests still up, the host asks the switch for its ports and FDB
#      (`vswitch ctl`), then lets the guests power off, reads the counters
#      (`vswitch ctl stats`), stops the switch with SIGTERM and checks the whole story.

# TOML subset reader for the switch config: prints tab-separated records
#   control SOCKET | vlan ID SERVICE_IP | port NAME SOCKET VLAN MAC ANTI_SPOOF
# with "-" for a missing value. Keys of sub-tables such as [port.qos] are skipped.
vs_parse_config() {
    awk -v OFS='\t' '
        function val(k) { return (k in f) && f[k] != "" ? f[k] : "-" }
        function flush() {
            if (sec == "port") print "port", val("name"), val("socket"), val("vlan"), val("mac"), val("anti_spoof")
            else if (sec == "vlan") print "vlan", val("id"), val("service_ip")
            else if (sec == "switch") print "control", val("control_socket")
            split("", f)
            sec = ""
        }
        {
            line = $0
            sub(/#.*/, "", line)
            sub(/^[ \t]+/, "", line)
            sub(/[ \t]+$/, "", line)
        }
        line == "" { next }
        line ~ /^\[/ {
            if (line ~ /^\[[a-z_]+\./) { skip = 1; next }
            flush()
            skip = 0
            if (line == "[[port]]") sec = "port"
            else if (line == "[[vlan]]") sec = "vlan"
            else if (line == "[switch]") sec = "switch"
            next
        }
        skip || sec == "" { next }
        {
            eq = index(line, "=")
            if (eq == 0) next
            k = substr(line, 1, eq - 1)
            v = substr(line, eq + 1)
            gsub(/[ \t]/, "", k)
            sub(/^[ \t]+/, "", v)
            if (v ~ /^".*"$/) v = substr(v, 2, length(v) - 2)
            f[k] = v
        }
        END { flush() }
    ' "$1"
}

ip2int() {
    local a b c d
    IFS=. read -r a b c d <<<"$1"
    echo $(((a << 24) + (b << 16) + (c << 8) + d))
}
int2ip() { echo "$((($1 >> 24) & 255)).$((($1 >> 16) & 255)).$((($1 >> 8) & 255)).$(($1 & 255))"; }
# host_ip A.B.C.D/LEN N: the N-th address of that subnet.
host_ip() {
    local len="${1#*/}" net
    net=$(($(ip2int "${1%/*}") & ((0xffffffff << (32 - len)) & 0xffffffff)))
    int2ip $((net + $2))
}

# The guests' shared beginning: NIC up with one address, helpers. Arguments: NAME ADDR/LEN
# VLAN. Guest-side `$` are escaped. The host types "start" and "go" on the console (stdin).
vs_guest_prelude() {
    cat <<EOF
say() { echo "DEMO \$*"; }
rx() { cat /sys/class/net/eth0/statistics/rx_packets; }
# await WORD: wait (4 min at most) for the host to type WORD on the console.
await() {
    while read -t 240 -r line; do [ "\$line" = "\$1" ] && return 0; done
    say "no '\$1' from the host within 4 min"
    return 1
}
stty -echo 2>/dev/null
ip link set eth0 up
ip addr add $2 dev eth0
mac=\$(cat /sys/class/net/eth0/address)
echo "RESULT mac \$mac"
say "$1: eth0 \$mac, $2, on VLAN $3"
# wait_for IP SECS: ping once a second until IP answers (the others boot at their own pace).
wait_for() {
    end=\$((\$(date +%s) + \$2))
    while [ \$(date +%s) -lt \$end ]; do
        t=\$(date +%s)
        ping -c 1 -W 1 \$1 >/dev/null 2>&1 && return 0
        [ \$(date +%s) -gt \$t ] || sleep 1
    done
    return 1
}
# show_ping KEY IP WHAT: three pings, reported as "RESULT KEY <answered>".
show_ping() {
    out=\$(ping -c 3 -W 2 \$2 2>&1)
    got=\$(echo "\$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
    rtt=\$(echo "\$out" | sed -n 's/^round-trip min\/avg\/max = //p')
    echo "RESULT \$1 \${got:-0}"
    say "ping \$3: \${got:-0} of 3 answered\${rtt:+, round-trip min/avg/max \$rtt}"
}
EOF
}

# vm1 and vm2: NAME ADDR/LEN VLAN PEER_NAME PEER_IP GATEWAY_IP
vs_guest_peer() {
    vs_guest_prelude "$1" "$2" "$3"
    cat <<EOF
if wait_for $5 120; then say "$4 ($5) answers"; else say "$4 ($5) did not answer within 120 s"; fi
show_ping ping-peer $5 "$4 ($5)"
show_ping ping-gw $6 "the gateway $6 (the switch's own address on VLAN $3)"
arping -U -c 1000 -I eth0 ${2%/*} >/dev/null 2>&1 &
say "broadcasting on VLAN $3 (gratuitous ARP, one a second) until the host says go"
echo "RESULT ready 1"
await go
kill \$! 2>/dev/null
echo "RESULT rx_packets \$(rx)"
say "eth0 received \$(rx) frames in all; powering off"
EOF
}

# vm3: NAME ADDR/LEN VLAN GATEWAY_IP OTHER_VLAN ADDR_IN_OTHER/LEN TARGET_NAME TARGET_IP
#      OTHER_GATEWAY_IP TRIES
vs_guest_isolated() {
    vs_guest_prelude "$1" "$2" "$3"
    cat <<EOF
say "waiting for the host's start (once $7 and its VLAN $5 peer have reached each other)"
await start
ip addr add $6 dev eth0
say "also gave eth0 $6: VLAN $5's subnet is on-link for $1 now, no router in the way"
# tries N IP: N pings, one at a time (at least a second apart); prints how many answered.
tries() {
    n=0
    for i in \$(seq 1 \$1); do
        t=\$(date +%s)
        if ping -c 1 -W 1 \$2 >/dev/null 2>&1; then n=\$((n + 1)); fi
        [ \$(date +%s) -gt \$t ] || sleep 1
    done
    echo \$n
}
n=\$(tries ${10} $8)
echo "RESULT reach-target \$n"
say "ping $7 ($8), ${10} attempts: \$n answered"
n=\$(tries 3 $9)
echo "RESULT reach-other-gw \$n"
say "ping VLAN $5's gateway $9, 3 attempts: \$n answered"
echo "RESULT rx-isolated \$(rx)"
say "eth0 received \$(rx) frames since boot"
show_ping ping-gw $4 "its own gateway $4 (the switch's own address on VLAN $3)"
echo "RESULT rx_packets \$(rx)"
say "eth0 received \$(rx) frames in all"
echo "RESULT done 1"
await go
say "powering off"
EOF
}

# vs_await TIMEOUT KEY GUEST...: wait until every GUEST's console has a "RESULT KEY" line.
# Fails at once if one of their QEMUs is gone, or after TIMEOUT seconds.
vs_await() {
    local end=$((SECONDS + $1)) key="$2" n all
    shift 2
    while [ "$SECONDS" -lt "$end" ]; do
        all=1
        for n in "$@"; do
            grep -q "^RESULT $key " "$VS_WORK/$n/console.log" 2>/dev/null && continue
            all=0
            [ ! -e "$VS_WORK/$n/secs" ] || return 1
        done
        [ "$all" = 0 ] || return 0
        sleep 0.2
    done
    return 1
}

demo_vswitch() {
    VS_CONFIG="${VSWITCH_CONFIG:-$ROOT/configs/vswitch-two-vlans.toml}"
    [ -f "$VS_CONFIG" ] || die "vswitch config $VS_CONFIG not found"
    VS_CONFIG="$(realpath "$VS_CONFIG")"
    local rec a b c d
    local -a P_NAME=() P_SOCK=() P_VLAN=() P_MAC=()
    local -A SVC=()
    CTL_SOCK=/run/vswitch/ctl.sock
    while IFS=$'\t' read -r rec a b c d _; do
        case "$rec" in
        control) [ "$a" = - ] || CTL_SOCK="$a" ;;
        vlan) [ "$b" = - ] || SVC[$a]="$b" ;;
        port) P_NAME+=("$a") P_SOCK+=("$(abspath "$b")") P_VLAN+=("$c") P_MAC+=("$d") ;;
        esac
    done < <(vs_parse_config "$VS_CONFIG")
    CTL_SOCK="$(abspath "$CTL_SOCK")"

    # Which ports play vm1, vm2 (VLAN A) and vm3 (VLAN B).
    local i VA="" VB="" I1="" I2="" I3=""
    for i in "${!P_NAME[@]}"; do
        is_uint "${P_VLAN[i]}" || continue # trunk ports play no part here
        [ "${P_MAC[i]}" != - ] || continue
        if [ -z "$VA" ]; then
            VA="${P_VLAN[i]}" I1=$i
        elif [ "${P_VLAN[i]}" = "$VA" ] && [ -z "$I2" ]; then
            I2=$i
        elif [ "${P_VLAN[i]}" != "$VA" ] && [ -z "$I3" ]; then
            VB="${P_VLAN[i]}" I3=$i
        fi
    done
    if [ -z "$I2" ] || [ -z "$I3" ]; then
        die "$VS_CONFIG: the demo needs two access ports with a mac on one VLAN and a third on another"
    fi
    if [ -z "${SVC[$VA]:-}" ] || [ -z "${SVC[$VB]:-}" ]; then
        die "$VS_CONFIG: the demo needs a [[vlan]] service_ip for VLANs $VA and $VB"
    fi
    local N1="${P_NAME[I1]}" N2="${P_NAME[I2]}" N3="${P_NAME[I3]}"
    local GW_A="${SVC[$VA]%/*}" GW_B="${SVC[$VB]%/*}" LEN_A="${SVC[$VA]#*/}" LEN_B="${SVC[$VB]#*/}"
    local IP1 IP2 IP3 IP3A
    IP1="$(host_ip "${SVC[$VA]}" 1)" IP2="$(host_ip "${SVC[$VA]}" 2)"
    IP3="$(host_ip "${SVC[$VB]}" 3)" IP3A="$(host_ip "${SVC[$VA]}" 3)"
    for a in "$IP1" "$IP2" "$IP3A"; do
        [ "$a" != "$GW_A" ] || die "$VS_CONFIG: service_ip $GW_A is an address the demo gives a guest"
    done
    [ "$IP3" != "$GW_B" ] || die "$VS_CONFIG: service_ip $GW_B is an address the demo gives a guest"
    for i in "$I1" "$I2" "$I3"; do
        [ "${#P_SOCK[i]}" -lt 100 ] || die "socket path ${P_SOCK[i]} is too long for a unix socket"
    done
    local TRIES=10

    VS_WORK="$ROOT/target/demo/vswitch-run"
    VS_LOG="$VS_WORK/vswitch.log"
    VSWITCH_PID="" VS_RC=""
    VS_GUEST_DIRS=("$VS_WORK/$N1" "$VS_WORK/$N2" "$VS_WORK/$N3")
    # shellcheck disable=SC2317 # invoked by the EXIT trap
    cleanup() { # on any exit: kill the guests and stop a vswitch we started
        local d
        for d in "${VS_GUEST_DIRS[@]}"; do kill_guest "$d"; done
        [ -z "$VSWITCH_PID" ] || stop_daemon VS_RC "$VSWITCH_PID" 10
    }
    trap cleanup EXIT

    if [ -n "${VSWITCH_BIN:-}" ]; then
        VSWITCH="$VSWITCH_BIN"
        step "Using vswitch from VSWITCH_BIN=$VSWITCH"
    else
        step "Building vswitch (release)"
        cargo build --release -p vswitch --bin vswitch
        VSWITCH="$ROOT/target/release/vswitch"
    fi
    [ -x "$VSWITCH" ] || die "$VSWITCH is not an executable"
    ctl() { "$VSWITCH" ctl --config "$VS_CONFIG" "$@" 2>&1; }

    step "Starting vswitch"
    rm -rf "$VS_WORK"
    mkdir -p "${VS_GUEST_DIRS[@]}" "$(dirname "$CTL_SOCK")"
    for i in "${!P_SOCK[@]}"; do mkdir -p "$(dirname "${P_SOCK[i]}")"; done
    start_daemon VSWITCH_PID "$VS_LOG" "${P_SOCK[@]}" "$CTL_SOCK" -- "$VSWITCH" serve --config "$VS_CONFIG"
    echo "    vswitch is running (pid $VSWITCH_PID); vswitch ctl --config $VS_CONFIG ports:"
    ctl ports | indent '      ' || die "vswitch ctl ports failed"

    step "Booting three QEMU guests at once (TCG), one per port, steered through their consoles"
    echo "    $N1: $IP1/$LEN_A on VLAN $VA, MAC ${P_MAC[I1]}; pings $N2 and its gateway $GW_A, then broadcasts"
    echo "    $N2: $IP2/$LEN_A on VLAN $VA, MAC ${P_MAC[I2]}; pings $N1 and its gateway $GW_A, then broadcasts"
    echo "    $N3: $IP3/$LEN_B on VLAN $VB, MAC ${P_MAC[I3]}; once told to start, adds $IP3A/$LEN_A, tries $N1 and $GW_A, then pings its gateway $GW_B"
    guest_initrd "$VS_WORK/$N1" "$(vs_guest_peer "$N1" "$IP1/$LEN_A" "$VA" "$N2" "$IP2" "$GW_A")"
    guest_initrd "$VS_WORK/$N2" "$(vs_guest_peer "$N2" "$IP2/$LEN_A" "$VA" "$N1" "$IP1" "$GW_A")"
    guest_initrd "$VS_WORK/$N3" "$(vs_guest_isolated "$N3" "$IP3/$LEN_B" "$VB" "$GW_B" "$VA" "$IP3A/$LEN_A" "$N1" "$IP1" "$GW_A" "$TRIES")"
    # Each guest's console input is a FIFO this shell holds open read-write, so QEMU never
    # sees its end.
    local -A IN=()
    local -a PIDS=()
    local n fd START=$SECONDS
    for i in "$I1" "$I2" "$I3"; do
        n="${P_NAME[i]}"
        mkfifo "$VS_WORK/$n/console.in"
        exec {fd}<>"$VS_WORK/$n/console.in"
        IN[$n]=$fd
        run_guest "$n" "$VS_WORK/$n" 256 \
            -chardev "socket,id=n0,path=${P_SOCK[i]}" \
            -netdev vhost-user,id=net0,chardev=n0 \
            -device "virtio-net-pci,netdev=net0,mac=${P_MAC[i]},vectors=0,romfile=" &
        PIDS+=($!)
    done
    host() { echo "    host| $*"; }
    local SYNC="" PORTS_UP FDB=""
    if vs_await 180 ready "$N1" "$N2"; then
        host "$N1 and $N2 reached each other; telling $N3 to start"
    else
        host "$N1 and $N2 did not both get ready; telling $N3 to start anyway"
        SYNC="$N1 and $N2 did not both get ready"
    fi
    echo start >&"${IN[$N3]}"
    if vs_await 180 "done" "$N3"; then
        host "$N3 is done; all three guests are up: vswitch ctl ports, vswitch ctl fdb"
    else
        host "$N3 did not finish"
        SYNC="$N3 did not finish"
    fi
    PORTS_UP="$(ctl ports)" || true
    FDB="$(ctl fdb)" || true
    indent '    host|   ' <<<"$PORTS_UP"
    host "telling the guests to power off"
    for n in "$N1" "$N2" "$N3"; do echo go >&"${IN[$n]}"; done
    local -A QRC=() TRC=()
    local k=0
    for n in "$N1" "$N2" "$N3"; do
        wait "${PIDS[k]}" && QRC[$n]=0 || QRC[$n]=$?
        k=$((k + 1))
        fd="${IN[$n]}"
        exec {fd}>&-
        # shellcheck disable=SC2034 # read by check's eval'ed conditions
        TRC[$n]="$(guest_exit "$VS_WORK/$n/console.log")"
        if [ "${QRC[$n]}" != 0 ]; then
            indent "    $n qemu: " <"$VS_WORK/$n/qemu.stderr" >&2
            [ "${QRC[$n]}" = 124 ] && echo "demo: $n's QEMU timed out after 300 s" >&2
        fi
    done
    local GUEST_SECS=$((SECONDS - START))
    # g VAR GUEST KEY: VAR = the guest's last "RESULT KEY value".
    g() { printf -v "$1" '%s' "$(guest_result "$VS_WORK/$2/console.log" "$3")"; }
    # shellcheck disable=SC2034 # read by check's eval'ed conditions
    local MAC1 MAC2 MAC3 P12 P21 G1 G2 G3 REACH REACH_GW RXI3 RX3
    g MAC1 "$N1" mac
    g MAC2 "$N2" mac
    g MAC3 "$N3" mac
    g P12 "$N1" ping-peer
    g P21 "$N2" ping-peer
    g G1 "$N1" ping-gw
    g G2 "$N2" ping-gw
    g G3 "$N3" ping-gw
    g REACH "$N3" reach-target
    g REACH_GW "$N3" reach-other-gw
    g RXI3 "$N3" rx-isolated
    g RX3 "$N3" rx_packets

    step "Asking the switch what it counted (vswitch ctl stats), after the guests powered off"
    local STATS FDB_AFTER
    STATS="$(ctl stats)" || true
    FDB_AFTER="$(ctl fdb)" || true
    printf '%s\n' "$PORTS_UP" >"$VS_WORK/ports.txt"
    printf '%s\n' "$FDB" >"$VS_WORK/fdb.txt"
    printf '%s\n' "$STATS" >"$VS_WORK/stats.txt"
    echo "    saved with the ports and the FDB of when the guests were up in $VS_WORK/{ports,fdb,stats}.txt"
    echo "    the FDB now, with no guest connected: $(($(grep -c . <<<"$FDB_AFTER") - 1)) entries"
    # shellcheck disable=SC2317 # fdb_has and fdb_mac_on are called by check's eval
    # fdb_has VLAN MAC PORT: that entry is in the FDB taken while the guests were up.
    fdb_has() { awk -v v="$1" -v m="$2" -v p="$3" '$1 == v && tolower($2) == tolower(m) && $3 == p { f = 1 } END { exit !f }' <<<"$FDB"; }
    # fdb_mac_on VLAN MAC: MAC was learned on VLAN (on any port).
    # shellcheck disable=SC2317
    fdb_mac_on() { awk -v v="$1" -v m="$2" '$1 == v && tolower($2) == tolower(m) { f = 1 } END { exit !f }' <<<"$FDB"; }
    # counter PORT NAME
    counter() { awk -v p="$1:" -v c="$2" '/^[^ ]/ { cur = $1 } cur == p && $1 == c { print $2 }' <<<"$STATS"; }
    local CONNECTED=0 SPOOF=0 s TX3
    for n in "$N1" "$N2" "$N3"; do
        s="$(counter "$n" drop_spoof)"
        SPOOF=$((SPOOF + ${s:-1}))
        awk -v p="$n" '$1 == p && / connected / { f = 1 } END { exit !f }' <<<"$PORTS_UP" && CONNECTED=$((CONNECTED + 1))
    done
    TX3="$(counter "$N3" tx_packets)"

    step "Stopping vswitch with SIGTERM"
    local LEFT=""
    stop_daemon VS_RC "$VSWITCH_PID"
    VSWITCH_PID=""
    for s in "${P_SOCK[@]}" "$CTL_SOCK"; do [ ! -e "$s" ] || LEFT+=" $s"; done
    echo "    vswitch exit status: $VS_RC; sockets ${LEFT:+left behind:}${LEFT:-removed}"

    step "Summary (vswitch)"
    echo "    vswitch served ${#P_NAME[@]} ports from $VS_CONFIG; three guests ran at once in QEMU (TCG) for $GUEST_SECS s, boots included."
    echo "    Forwarding database while all three guests were up (vswitch ctl fdb):"
    indent '      ' <<<"$FDB"
    echo "    Counters after they powered off (vswitch ctl stats; rx = from the guest into the switch, tx = to the guest):"
    awk '
        /^[^ ].*:$/ { port = substr($1, 1, length($1) - 1); ports[++np] = port; next }
        NF == 2 { if (!($1 in seen)) { seen[$1] = 1; keys[++nk] = $1 } v[port, $1] = $2; if ($2 != 0) nz[$1] = 1 }
        END {
            printf "      %-18s", ""; for (p = 1; p <= np; p++) printf " %8s", ports[p]; print ""
            zero = ""
            for (k = 1; k <= nk; k++) {
                if (!(keys[k] in nz)) { zero = zero (zero == "" ? "" : ", ") keys[k]; continue }
                printf "      %-18s", keys[k]; for (p = 1; p <= np; p++) printf " %8s", v[ports[p], keys[k]]; print ""
            }
            if (zero != "") print "      zero on every port: " zero
        }' <<<"$STATS"
    # The conditions are single-quoted on purpose: check() evaluates them.
    # shellcheck disable=SC2016
    {
        for n in "$N1" "$N2" "$N3"; do
            check "$n: QEMU exited 0 and its script ran to the end" '[ "${QRC[$n]}" = 0 ] && [ "${TRC[$n]}" = 0 ]'
        done
        check "$N3 started once $N1 and $N2 had reached each other; they stayed up, broadcasting, until it was done${SYNC:+: $SYNC}" \
            '[ -z "$SYNC" ]'
        check "each guest's NIC has its port's MAC (${P_MAC[I1]}, ${P_MAC[I2]}, ${P_MAC[I3]})" \
            '[ "$MAC1" = "${P_MAC[I1]}" ] && [ "$MAC2" = "${P_MAC[I2]}" ] && [ "$MAC3" = "${P_MAC[I3]}" ]'
        check "vswitch ctl ports showed all three guests connected" '[ "$CONNECTED" = 3 ]'
        check "VLAN $VA: $N1 pings $N2 ($IP2): ${P12:-0} of 3 answered" '[ "${P12:-0}" -ge 1 ]'
        check "VLAN $VA: $N2 pings $N1 ($IP1): ${P21:-0} of 3 answered" '[ "${P21:-0}" -ge 1 ]'
        check "VLAN $VA: $N1 and $N2 ping their gateway, the switch's $GW_A: ${G1:-0} and ${G2:-0} of 3 answered" \
            '[ "${G1:-0}" -ge 1 ] && [ "${G2:-0}" -ge 1 ]'
        check "VLAN $VB: $N3 pings its gateway, the switch's $GW_B: ${G3:-0} of 3 answered" '[ "${G3:-0}" -ge 1 ]'
        check "VLAN $VB: $N3 cannot reach $N1 ($IP1), even from $IP3A/$LEN_A: ${REACH:-?} of $TRIES answered" '[ "$REACH" = 0 ]'
        check "VLAN $VB: $N3 cannot reach VLAN $VA's gateway $GW_A either: ${REACH_GW:-?} of 3 answered" '[ "$REACH_GW" = 0 ]'
        check "$N3's NIC received not one frame from boot to the end of those attempts (rx_packets ${RXI3:-?})" '[ "$RXI3" = 0 ]'
        check "then only its gateway's replies: ${RX3:-?} frames for ${G3:-0} echo replies (2 more allowed for ARP)" \
            '[ -n "$RX3" ] && [ "$RX3" -le $((${G3:-0} + 2)) ]'
        check "the switch delivered to $N3 just what its NIC counted (tx_packets ${TX3:-?})" '[ "${TX3:-x}" = "${RX3:-y}" ]'
        check "FDB: VLAN $VA has $N1's and $N2's MACs, on their ports" \
            'fdb_has "$VA" "${P_MAC[I1]}" "$N1" && fdb_has "$VA" "${P_MAC[I2]}" "$N2"'
        check "FDB: VLAN $VB has $N3's MAC, on its port; no MAC is learned on the other's VLAN" \
            'fdb_has "$VB" "${P_MAC[I3]}" "$N3" && ! fdb_mac_on "$VA" "${P_MAC[I3]}" && ! fdb_mac_on "$VB" "${P_MAC[I1]}" && ! fdb_mac_on "$VB" "${P_MAC[I2]}"'
        check "no frame dropped as spoofed (drop_spoof 0 on every port)" '[ "$SPOOF" = 0 ]'
        check "vswitch exited 0 on SIGTERM" '[ "$VS_RC" = 0 ]'
        check "vswitch removed its port and control sockets" '[ -z "$LEFT" ]'
    }
    echo "    Logs: $VS_WORK/<guest>/console.log, vswitch $VS_LOG"
    $OK
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    # Run directly: the demo script with this part only.
    DEMO_PARTS=vswitch exec "$(dirname "${BASH_SOURCE[0]}")/demo.sh" "$@"
fi
