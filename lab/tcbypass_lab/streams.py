"""Measured streams between namespaces of a sandbox: a sequence-numbered UDP
stream and a fast ping, each run by a small process inside a namespace.

Every sender sends at a fixed rate until the test says stop (`finish()`),
and stops by itself after at most `limit` seconds; every receiver stops
after a quiet spell or a hard deadline. All timestamps are CLOCK_MONOTONIC
(shared by every process on the machine), so a lost packet can be matched
to the operation that was under way when it was sent.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from tcbypass_lab.sandbox import NETNS_DIR

# Sends datagrams of 4-byte sequence number + padding at `rate` per second,
# a few per wake-up (time.sleep has ~1 ms granularity), until the file
# `stop` exists or `count` are sent, and prints the send time of each in µs.
# A failed send is recorded, not retried.
_SENDER = r"""
import json, os, socket, struct, sys, time
dst, port, rate, count, stop = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
pad = b"r" * 60
sent, failed = [], []
t0 = time.monotonic()
while len(sent) < count and not os.path.exists(stop):
    due = int((time.monotonic() - t0) * rate) + 1
    while len(sent) < min(count, due):
        i = len(sent)
        sent.append(int(time.monotonic() * 1e6))
        try:
            s.sendto(struct.pack("!I", i) + pad, (dst, port))
        except OSError as exc:
            failed.append([i, exc.errno])
    time.sleep(0.0005)
print(json.dumps({"sent_us": sent, "failed": failed}))
"""

# Receives until `idle` seconds pass without a datagram (after the first one)
# or `limit` seconds in all; prints the sequence numbers in arrival order and
# how many datagrams the namespace's UDP stack dropped for a full buffer.
_RECEIVER = r"""
import json, socket, struct, sys, time
port, idle, limit = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
def snmp():
    rows = [line.split() for line in open("/proc/net/snmp") if line.startswith("Udp:")]
    return dict(zip(rows[0][1:], map(int, rows[1][1:])))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: never the reason for a loss
s.bind(("0.0.0.0", port))
s.settimeout(0.1)
before = snmp()
print("ready", flush=True)
seqs, arrived_us, last = [], [], None
deadline = time.monotonic() + limit
while time.monotonic() < deadline:
    try:
        data = s.recv(2048)
    except socket.timeout:
        if last is not None and time.monotonic() - last > idle:
            break
        continue
    last = time.monotonic()
    seqs.append(struct.unpack("!I", data[:4])[0])
    arrived_us.append(int(last * 1e6))
after = snmp()
print(json.dumps({"seqs": seqs, "arrived_us": arrived_us,
                  "rcvbuf_errors": after["RcvbufErrors"] - before["RcvbufErrors"]}))
"""


def _in_netns(netns: str, *cmd: str, cpu: int | None = None) -> list[str]:
    pinned = ["taskset", "-c", str(cpu)] if cpu is not None else []
    return ["nsenter", f"--net={NETNS_DIR}/{netns}", "--", *pinned, *cmd]


@dataclass
class FlowResult:
    """One UDP stream, as the sender and the receiver saw it."""

    name: str
    sent_us: list  # send time of each sequence number
    failed: list  # [seq, errno] of sends the kernel refused at once
    seqs: list  # sequence numbers in arrival order
    arrived_us: list
    rcvbuf_errors: int
    tolerance: int  # how far back a late packet may land and still count as in order

    @property
    def sent(self) -> int:
        return len(self.sent_us)

    @property
    def lost(self) -> list[int]:
        return sorted(set(range(self.sent)) - set(self.seqs))

    @property
    def duplicates(self) -> int:
        return len(self.seqs) - len(set(self.seqs))

    @property
    def late(self) -> list[tuple[int, int]]:
        """(seq, displacement) of every packet that arrived after a higher one."""
        out, highest = [], -1
        for seq in self.seqs:
            if seq < highest:
                out.append((seq, highest - seq))
            highest = max(highest, seq)
        return out

    @property
    def reordered_beyond_tolerance(self) -> list[tuple[int, int]]:
        return [(s, d) for s, d in self.late if d > self.tolerance]

    def first_arrival_after(self, t_s: float) -> float | None:
        """Monotonic time (s) of the first packet that arrived after `t_s`."""
        i = bisect.bisect_right(self.arrived_us, int(t_s * 1e6))
        return self.arrived_us[i] / 1e6 if i < len(self.arrived_us) else None

    def sent_in(self, start_s: float, end_s: float) -> list[int]:
        lo, hi = int(start_s * 1e6), int(end_s * 1e6)
        return [i for i, t in enumerate(self.sent_us) if lo <= t < hi]


class UdpFlow:
    """A sequence-numbered UDP stream from `src_ns` to `dst_ip` (in `dst_ns`),
    for at most `limit` seconds.

    The sender runs pinned to one CPU so that the stream itself never
    reorders (a sender that migrates between CPUs can, bypass or not)."""

    def __init__(self, name: str, src_ns: str, dst_ns: str, dst_ip: str, port: int, rate: float,
                 limit: float = 40.0, cpu: int = 0, tolerance: int = 0):
        self.name, self.src_ns, self.dst_ns, self.dst_ip = name, src_ns, dst_ns, dst_ip
        self.port, self.rate, self.cpu, self.tolerance = port, rate, cpu, tolerance
        self.count = int(rate * limit)
        self.stop_file = f"/tmp/tcbypass-reliability-stop-{secrets.token_hex(4)}"
        self.sender: subprocess.Popen | None = None
        self.receiver: subprocess.Popen | None = None

    def start_receiver(self, idle: float = 1.5) -> None:
        limit = self.count / self.rate + 60
        self.receiver = subprocess.Popen(
            _in_netns(self.dst_ns, "python3", "-c", _RECEIVER, str(self.port), str(idle), str(limit)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.receiver.stdout.readline()
        assert line.strip() == "ready", f"{self.name}: receiver did not start: {self.receiver.stderr.read()}"

    def start_sender(self) -> None:
        self.sender = subprocess.Popen(
            _in_netns(self.src_ns, "python3", "-c", _SENDER, self.dst_ip, str(self.port), str(self.rate),
                      str(self.count), self.stop_file, cpu=self.cpu),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(self) -> None:
        """Tell the sender to stop (it does within a millisecond or two)."""
        with open(self.stop_file, "w"):
            pass

    def result(self) -> FlowResult:
        """Wait for the sender to stop (finish() first, or it runs to its limit) and the receiver to drain."""
        timeout = self.count / self.rate + 70
        out, err = self.sender.communicate(timeout=timeout)
        assert self.sender.returncode == 0, f"{self.name}: sender failed: {err}"
        sent = json.loads(out)
        out, err = self.receiver.communicate(timeout=timeout)
        assert self.receiver.returncode == 0, f"{self.name}: receiver failed: {err}"
        got = json.loads(out)
        return FlowResult(self.name, sent["sent_us"], sent["failed"], got["seqs"], got["arrived_us"],
                          got["rcvbuf_errors"], self.tolerance)

    def stop(self) -> None:
        """Kill whatever still runs and remove the stop file (teardown, also after a failure)."""
        for proc in (self.sender, self.receiver):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.stop_file)


@dataclass
class PingResult:
    transmitted: int
    received: int
    missing: list = field(default_factory=list)  # icmp_seq of echoes without a reply
    duplicates: int = 0
    replied_at: dict = field(default_factory=dict)  # icmp_seq -> monotonic time of its reply

    @property
    def lost(self) -> int:
        return self.transmitted - self.received

    def sent_about(self, seq: int) -> float | None:
        """When echo `seq` was sent, give or take one interval: the reply
        time of the next echo that was answered."""
        later = [s for s in self.replied_at if s > seq]
        return self.replied_at[min(later)] if later else None


class PingFlow:
    """`ping -i interval` from `src_ns` until finish() (SIGINT), at most `limit` seconds."""

    def __init__(self, src_ns: str, dst_ip: str, interval: float, limit: float = 40.0):
        self.src_ns, self.dst_ip, self.interval = src_ns, dst_ip, interval
        self.count = int(limit / interval)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # A line per reply: into a file, not a pipe, which would fill up and stall ping.
        self.output = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            _in_netns(self.src_ns, "ping", "-n", "-D", "-i", str(self.interval), "-c", str(self.count), "-W", "2",
                      self.dst_ip),
            stdout=self.output, stderr=subprocess.DEVNULL, text=True)

    def finish(self) -> None:
        """Stop sending: ping prints its summary on SIGINT (nsenter exec'd it: same pid)."""
        self.proc.send_signal(signal.SIGINT)

    def result(self) -> PingResult:
        self.proc.wait(timeout=self.count * self.interval * 3 + 30)
        self.output.seek(0)
        out = self.output.read()
        self.output.close()
        summary = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert summary, out[-500:]
        # -D stamps each reply with the wall clock; convert to the monotonic clock.
        offset = time.time() - time.monotonic()
        replied = {int(seq): float(stamp) - offset
                   for stamp, seq in re.findall(r"^\[(\d+\.\d+)\].*icmp_seq=(\d+)", out, re.M)}
        transmitted = int(summary.group(1))
        missing = sorted(set(range(1, transmitted + 1)) - set(replied))
        if missing and missing[-1] == transmitted:  # sent just before SIGINT: its reply had no time
            missing.pop()
            transmitted -= 1
        summary_received = int(summary.group(2))
        return PingResult(transmitted, summary_received, missing, out.count("(DUP!)"), replied)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None:
            self.output.close()


@dataclass
class Timeline:
    """What the test did and when (monotonic seconds)."""

    events: list = field(default_factory=list)  # (label, start, end)

    def run(self, label: str, fn, *args, **kwargs):
        start = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            self.events.append((label, start, time.monotonic()))

    def phases(self, begin: float, end: float,
               first: str = "bridge path, before any attach") -> list[tuple[str, float, float]]:
        """Consecutive phases: before the first event, then from each event's
        start to the next one's start (the operation and the quiet time after it)."""
        starts = [(label, s) for label, s, _ in self.events]
        out = [(first, begin, starts[0][1] if starts else end)]
        for i, (label, s) in enumerate(starts):
            out.append((label, s, starts[i + 1][1] if i + 1 < len(starts) else end))
        return out


@dataclass
class StreamResult:
    """One stream of a MultiStream: what was sent (with its send times) and what arrived."""

    name: str
    sent_us: list = field(default_factory=list)
    got: set = field(default_factory=set)
    send_errors: int = 0

    @property
    def sent(self) -> int:
        return len(self.sent_us)

    @property
    def lost(self) -> list[int]:
        return sorted(set(range(self.sent)) - self.got)


class MultiStream:
    """Many sequence-numbered UDP streams in one process, for soaks: each sender
    socket is made in its source namespace and each receiver in its
    destination's (a socket stays in the namespace it was made in), one thread
    sends every stream at `rate` datagrams a second, one thread receives them
    all. Cheap enough for tens of streams running for an hour on two cores.
    `flows`: (name, src_ns, dst_ns, dst_ip, port)."""

    def __init__(self, flows: list[tuple[str, str, str, str, int]], rate: float):
        import socket as socketlib
        import threading

        from tcbypass import netns

        self.rate, self._stop = rate, threading.Event()
        self.results = [StreamResult(name) for name, *_ in flows]
        self._tx, self._rx, self._dst = [], {}, []
        for i, (_name, src, dst, ip, port) in enumerate(flows):
            family = socketlib.AF_INET6 if ":" in ip else socketlib.AF_INET
            tx = netns.run_in(f"{NETNS_DIR}/{src}", lambda: socketlib.socket(family, socketlib.SOCK_DGRAM))
            rx = netns.run_in(f"{NETNS_DIR}/{dst}", lambda: socketlib.socket(family, socketlib.SOCK_DGRAM))
            rx.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_RCVBUF, 4 << 20)
            rx.bind((ip, port))
            rx.setblocking(False)
            self._tx.append(tx)
            self._rx[rx.fileno()] = (rx, i)
            self._dst.append((ip, port))
        self._threads = [threading.Thread(target=self._send, daemon=True, name="multistream-tx"),
                         threading.Thread(target=self._receive, daemon=True, name="multistream-rx")]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _send(self) -> None:
        import struct

        period, due = 1.0 / self.rate, time.monotonic()
        while not self._stop.is_set():
            for i, sock in enumerate(self._tx):
                result = self.results[i]
                seq = result.sent
                result.sent_us.append(int(time.monotonic() * 1e6))
                try:
                    sock.sendto(struct.pack("!I", seq) + b"s" * 60, self._dst[i])
                except OSError:
                    result.send_errors += 1
            due += period
            self._stop.wait(max(0.0, due - time.monotonic()))

    def _receive(self) -> None:
        import select as selectlib
        import struct

        poller = selectlib.poll()
        for fd in self._rx:
            poller.register(fd, selectlib.POLLIN)
        quiet_until = None
        while True:
            if self._stop.is_set():
                quiet_until = quiet_until or time.monotonic() + 1.0
                if time.monotonic() > quiet_until:
                    return
            for fd, _ in poller.poll(100):
                sock, i = self._rx[fd]
                while True:
                    try:
                        data = sock.recv(2048)
                    except BlockingIOError:
                        break
                    self.results[i].got.add(struct.unpack("!I", data[:4])[0])

    def stop(self) -> list[StreamResult]:
        """Stop sending, give the last datagrams a second to arrive, close everything."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        for sock in self._tx + [rx for rx, _ in self._rx.values()]:
            sock.close()
        return self.results
