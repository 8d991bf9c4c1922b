"""An ordinary program for ferry's tests: it never calls setsid(), knows
nothing of ferry, holds `MIB` MiB of random bytes with zero pages here and
there (not aligned to anything it asked for), rewrites a scratch buffer
all the time, and counts in a file (written whole and renamed).

When `COUNT_FILE.check` appears it removes it and writes
`COUNT_FILE.verdict`: "ok" if the held bytes still hash as they did at
start, "CHANGED" otherwise.

    python3 checked_memory.py COUNT_FILE MIB
"""

import hashlib
import os
import sys
import time

path = sys.argv[1]
size = int(sys.argv[2]) << 20
held = bytearray(os.urandom(size))
# Zero runs of 1 to 5 pages, every 40 KiB or so, at odd offsets.
at = 1000
while at + 5 * 4096 < size:
    run = (at // 7) % 5 * 4096 + 4096
    held[at : at + run] = bytes(run)
    at += 40 * 1024 + 123
digest = hashlib.sha256(held).hexdigest()
scratch = bytearray(4 << 20)


def write(name, text):
    with open(name + ".tmp", "w") as f:
        f.write(text)
    os.rename(name + ".tmp", name)


n = 0
while True:
    n += 1
    off = (n * 12289) % (len(scratch) - 8192)
    scratch[off : off + 8192] = os.urandom(8192)
    if os.path.exists(path + ".check"):
        os.unlink(path + ".check")
        ok = hashlib.sha256(held).hexdigest() == digest
        write(path + ".verdict", "ok" if ok else "CHANGED")
    write(path, str(n))
    time.sleep(0.02)
