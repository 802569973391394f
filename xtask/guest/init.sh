#!/bin/busybox sh
# The guest's /init for `cargo xtask kernel-test`: mount what the agent
# needs (cgroup v2 alone at /sys/fs/cgroup, as on most distributions), run
# the capture checks, print one `CHECK <name> PASS|FAIL` line each, and
# report the verdict through qemu's isa-debug-exit device.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
ip -6 addr add ::1/128 dev lo 2>/dev/null

failed=0
check() { # name, then a command whose success is the verdict
  name=$1; shift
  if "$@" >/tmp/check.out 2>&1; then echo "CHECK $name PASS"; else echo "CHECK $name FAIL"; sed 's/^/  | /' /tmp/check.out | tail -5; failed=1; fi
}
R="/redirector --state-dir /run/r"

echo "KERNEL $(uname -r)"
/redirector verify --json > /tmp/verify.json 2>/tmp/verify.err
echo "VERIFY_JSON $(tr -d '\n' < /tmp/verify.json)"
check verifier /redirector verify

mkdir -p /sys/fs/cgroup/rt /www
echo hello-from-guest > /www/index.html
$R run --cgroup /sys/fs/cgroup/rt --config /cfg.yaml > /tmp/agent.log 2>&1 &
httpd -p 127.0.0.1:8080 -h /www
httpd -p '[::1]:8081' -h /www 2>/dev/null
i=0; while [ $i -lt 100 ] && ! grep -q "agent ready" /tmp/agent.log; do sleep 0.1; i=$((i+1)); done
check agent-start grep -q "agent ready" /tmp/agent.log

counter() { $R status --json | tr -d ' \n' | grep -o "\"$1\":[0-9]*" | cut -d: -f2 | awk '{s+=$1} END {print s+0}'; }
check connect4-redirect sh -c "[ \"\$($R exec --workload w4 -- wget -q -O- http://127.0.0.1:8080/)\" = hello-from-guest ]"
check connect6-redirect sh -c "[ \"\$($R exec --workload w6 -- wget -q -O- 'http://[::1]:8081/')\" = hello-from-guest ]"
$R status --json > /tmp/status.json
echo "STATUS $(tr -d ' \n' < /tmp/status.json | head -c 1500)"
redirected=$(counter redirected)
answered=$(counter original_dst_answered)
check counters [ "$redirected" -ge 2 ]
check getsockopt-original-dst [ "$answered" -ge 2 ]
check sockops-no-stale-state sh -c "$R status --json | tr -d ' \n' | grep -q '\"handshakes_in_flight\":0'"
mkdir -p /sys/fs/cgroup/rt/manual
check enroll $R enroll /sys/fs/cgroup/rt/manual
check unenroll $R unenroll /sys/fs/cgroup/rt/manual
check sk_msg-loads sh -c "tr -d ' \n' < /tmp/verify.json | grep -q '\"name\":\"programredirector_sk_msg\",\"ok\":true'"
# Pods' inbound steering (sk_lookup, 5.9+): the verifier takes it.
check sk_lookup-loads sh -c "tr -d ' \n' < /tmp/verify.json | grep -q '\"name\":\"programredirector_sk_lookup\",\"ok\":true'"
# The shortcut, switched on at run time: the proxy's writes reach the
# client through sk_msg, not the loopback TCP stack.
total() { $R status --json | tr -d ' \n' | grep -o "\"$1\":[0-9]*" | head -1 | cut -d: -f2; }
$R accelerate on > /tmp/accel.out 2>&1
check sk_msg-carries-a-request sh -c "[ \"\$($R exec --workload ws -- wget -q -O- http://127.0.0.1:8080/)\" = hello-from-guest ]"
check sk_msg-redirects [ "$(total msgs_redirected)" -ge 1 ]
$R accelerate off > /tmp/accel.out 2>&1
$R uninstall > /tmp/uninstall.out 2>&1
check uninstall-leaves-nothing sh -c "[ ! -e /sys/fs/bpf/redirector ]"

# The keyed-map tier (no per-socket storage): the same capture.
$R run --cgroup /sys/fs/cgroup/rt --config /cfg.yaml --storage map > /tmp/agent2.log 2>&1 &
i=0; while [ $i -lt 100 ] && ! grep -q "agent ready" /tmp/agent2.log; do sleep 0.1; i=$((i+1)); done
check keyed-agent-start grep -q "agent ready" /tmp/agent2.log
check keyed-connect4-redirect sh -c "[ \"\$($R exec --workload k4 -- wget -q -O- http://127.0.0.1:8080/)\" = hello-from-guest ]"
check keyed-connect6-redirect sh -c "[ \"\$($R exec --workload k6 -- wget -q -O- 'http://[::1]:8081/')\" = hello-from-guest ]"
check keyed-getsockopt-original-dst [ "$(counter original_dst_answered)" -ge 2 ]
settled() { i=0; while [ $i -lt 50 ]; do $R status --json | tr -d ' \n' | grep -q '"handshakes_in_flight":0' && return 0; sleep 0.1; i=$((i+1)); done; return 1; }
check keyed-no-stale-state settled
$R uninstall > /tmp/uninstall.out 2>&1
check keyed-uninstall-leaves-nothing sh -c "[ ! -e /sys/fs/bpf/redirector ]"

if [ $failed = 0 ]; then echo "RESULT PASS"; v='\001'; else echo "RESULT FAIL"; v='\002'; fi
printf "$v" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
poweroff -f
