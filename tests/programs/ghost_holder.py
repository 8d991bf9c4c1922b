"""Holds a deleted 3 MiB file open and keeps checking its contents.

An ordinary program CRIU can dump only with a ghost limit above 3 MiB
(CRIU's default is 1 MiB): argv[1] is the file to create and delete,
argv[2] the status file, rewritten every 50 ms as "COUNT ok" while the
deleted file still reads back as written ("COUNT BAD" otherwise).
"""
import hashlib
import os
import sys
import time

SIZE = 3 << 20
path, status = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
data = os.urandom(SIZE)
os.write(fd, data)
os.unlink(path)
want = hashlib.sha256(data).digest()
count = 0
while True:
    count += 1
    got = hashlib.sha256(os.pread(fd, SIZE, 0)).digest()
    tmp = status + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{count} {'ok' if got == want else 'BAD'}\n")
    os.rename(tmp, status)
    time.sleep(0.05)
