"""An ordinary program for ferry's tests: it never calls setsid(), knows
nothing of ferry, holds `MIB` MiB of random bytes, and counts in a file
(written whole and renamed, no descriptor kept) while it runs.

    python3 file_counter.py COUNT_FILE [MIB]
"""

import os
import sys
import time

path = sys.argv[1]
held = bytearray(os.urandom(int(sys.argv[2]) << 20 if len(sys.argv) > 2 else 0))
n = 0
while True:
    n += 1
    with open(path + ".tmp", "w") as f:
        f.write(str(n))
    os.rename(path + ".tmp", path)
    time.sleep(0.02)
