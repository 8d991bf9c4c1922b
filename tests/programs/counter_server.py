"""An ordinary program for ferry's HA tests: a TCP counter service that
never calls setsid() and knows nothing of ferry. Each connection gets one
line, `served=N`, where N counts the connections served so far and lives
in memory only (so a restore shows what its checkpoint held).

    python3 counter_server.py PORT
"""

import socket
import sys


def main():
    port = int(sys.argv[1])
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen(64)
    served = 0
    while True:
        conn, _ = server.accept()
        served += 1
        try:
            conn.sendall(f"served={served}\n".encode())
        except OSError:
            pass
        conn.close()


main()
