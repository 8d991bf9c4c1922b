"""An ordinary program for ferry's tests: it maps anonymous memory, lays
zero pages out in it as asked, counts, and checks its memory on SIGUSR1.

    python3 zero_layout.py MIB LAYOUT REPORT

LAYOUT: every-N (every N-th page zero), none, all, one-run (the middle half
zero), random (a quarter of the pages, drawn from a fixed seed). The other
pages hold data unique to each page. It does not call setsid(), does not
align anything beyond what mmap gives, and rewrites REPORT in place (a
fixed-size record: "counter verified ok|bad\\n") every 10 ms.
"""

import mmap
import os
import random
import signal
import sys
import time

PAGE = 4096
RECORD = 64


def zero_pages(n, layout):
    if layout.startswith("every-"):
        step = int(layout[len("every-"):])
        return lambda i: i % step == 0
    if layout == "none":
        return lambda i: False
    if layout == "all":
        return lambda i: True
    if layout == "one-run":
        return lambda i: n // 4 <= i < n // 4 + n // 2
    if layout == "random":
        rng = random.Random(7)
        chosen = bytearray(n)
        for i in range(n):
            chosen[i] = rng.random() < 0.25
        return lambda i: chosen[i] == 1
    raise SystemExit(f"unknown layout {layout}")


def data(i):
    return (i * 0x9E3779B97F4A7C15 % (1 << 64) | 1).to_bytes(8, "little") * (PAGE // 8)


def main():
    mib, layout, report = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    n = mib * (1 << 20) // PAGE
    is_zero = zero_pages(n, layout)
    mem = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    zero = bytes(PAGE)
    for i in range(n):
        # Zero pages are written too: present, as an application that
        # cleared a buffer leaves them.
        mem[i * PAGE:(i + 1) * PAGE] = zero if is_zero(i) else data(i)

    asked = [False]
    signal.signal(signal.SIGUSR1, lambda *_: asked.__setitem__(0, True))
    fd = os.open(report, os.O_WRONLY | os.O_CREAT, 0o600)
    counter, verified = 0, "-"
    while True:
        if asked[0]:
            asked[0] = False
            good = all(
                mem[i * PAGE:(i + 1) * PAGE] == (zero if is_zero(i) else data(i))
                for i in range(n)
            )
            verified = "ok" if good else "bad"
        counter += 1
        os.pwrite(fd, f"{counter} {verified}".ljust(RECORD - 1).encode() + b"\n", 0)
        time.sleep(0.01)


main()
