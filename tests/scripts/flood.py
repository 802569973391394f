"""Hostile clients for the agent's bounds tests.

flood.py slow HOST PORT COUNT SECONDS   COUNT connections that send a request
    head one header line every half second and never finish it
flood.py idle HOST PORT COUNT SECONDS   COUNT connections that send nothing
flood.py dns HOST PORT COUNT            COUNT queries for names nobody knows

The connection modes print JSON: how many connected, and how many of those
the server had closed when SECONDS were up (waiting up to 4 s more for the
rest; with the latest close, seconds after the start).
"""
import json
import resource
import select
import socket
import struct
import sys
import time

mode, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 256), hard))

if mode == "dns":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(count):
        name = "n%d.flood.invalid" % i
        q = struct.pack(">HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0)
        q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
        s.sendto(q, (host, port))
    print(json.dumps({"sent": count}))
    sys.exit(0)

seconds = float(sys.argv[5])
start = time.time()
poll = select.poll()
socks = {}
# At most this many connects in flight: a burst of thousands of SYNs
# overflows the listener's SYN queue, the kernel answers with SYN cookies,
# and a cookie connection whose ACK meets a full accept queue is dropped
# without a trace on the server: the client holds a connection no server
# ever saw (and none can close). Pacing keeps every connection one the
# server accepts.
IN_FLIGHT = 256
opened, pending = 0, set()


def open_more():
    global opened
    while opened < count and len(pending) < IN_FLIGHT:
        opened += 1
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            continue
        socks[s.fileno()] = s
        pending.add(s.fileno())
        poll.register(s, select.POLLOUT)


connected, closed, last_close = set(), set(), 0.0
next_line = start
def done():
    # Past SECONDS, wait up to 4 s more for connections still open.
    elapsed = time.time() - start
    return elapsed >= seconds and (connected <= closed or elapsed >= seconds + 4)


while not done():
    open_more()
    for fd, ev in poll.poll(100):
        s = socks[fd]
        if fd not in connected and ev & select.POLLOUT and not ev & (select.POLLERR | select.POLLHUP):
            connected.add(fd)
            pending.discard(fd)
            poll.modify(s, select.POLLIN)
            if mode == "slow":
                try:
                    s.send(b"GET / HTTP/1.1\r\nHost: slow.example\r\n")
                except OSError:
                    pass
            continue
        if fd in connected and fd not in closed:
            try:
                gone = ev & (select.POLLERR | select.POLLHUP) or s.recv(4096) == b""
            except OSError:
                gone = True
            if gone:
                closed.add(fd)
                last_close = time.time() - start
                poll.unregister(s)
        elif fd not in connected:
            pending.discard(fd)
            poll.unregister(s)
    if mode == "slow" and time.time() >= next_line:
        next_line += 0.5
        for fd in connected - closed:
            try:
                socks[fd].send(b"X-Slow: 1\r\n")
            except OSError:
                pass
print(json.dumps({"connected": len(connected), "closed": len(closed), "last_close": round(last_close, 2)}))
