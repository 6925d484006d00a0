#!/usr/bin/python3
"""floor-client — the least any POP3 client can do for "fetch all, delete":
log in, send every RETR and DELE at once (pipelined, whether or not the
server offers PIPELINING: Dovecot reads them in order), read the answers,
QUIT and wait for its +OK (the server expunges before it answers). Nothing
is parsed beyond the framing and nothing is made durable: what it takes is
the server's own time plus the network's, the floor under every tool that
tests/bench/peers measures against the same server.

What it received goes into one file (DEST/all.bin: for each message a
10-digit length, a newline and the bytes as they came, dot-stuffed) so that
peers can verify it like the others' deliveries, without an inode per message
and without a copy here.

Usage: floor-client.py HOST PORT plain|stls|tls CA_FILE USER PASSWORD DEST
"""
import os
import socket
import ssl
import sys
import threading


def main():
    host, port, mode, ca, user, password, dest = sys.argv[1:8]
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ctx = ssl.create_default_context(cafile=ca)
    if mode == "tls":
        sock = ctx.wrap_socket(sock, server_hostname=host)
    buf = bytearray()

    def fill():
        data = sock.recv(1 << 18)
        if not data:
            sys.exit("floor-client: the server closed the connection")
        buf.extend(data)

    def line():
        while True:
            i = buf.find(b"\r\n")
            if i >= 0:
                text = bytes(buf[:i])
                del buf[:i + 2]
                return text
            fill()

    def command(text):
        sock.sendall(text.encode() + b"\r\n")
        reply = line()
        if not reply.startswith(b"+OK"):
            sys.exit(f"floor-client: {text.split()[0]}: {reply!r}")
        return reply

    if not line().startswith(b"+OK"):
        sys.exit("floor-client: no greeting")
    if mode == "stls":
        command("STLS")
        sock = ctx.wrap_socket(sock, server_hostname=host)
    command(f"USER {user}")
    command(f"PASS {password}")
    count = int(command("STAT").split()[1])

    def send():
        # RETR and DELE of every message, in pieces the socket takes
        cmds = b"".join(b"RETR %d\r\nDELE %d\r\n" % (i, i) for i in range(1, count + 1))
        sock.sendall(cmds)

    sender = threading.Thread(target=send)
    sender.start()
    out = open(os.path.join(dest, "all.bin"), "wb")
    start = 0
    for _ in range(count):
        reply = line()
        if not reply.startswith(b"+OK"):
            sys.exit(f"floor-client: RETR: {reply!r}")
        while True:
            end = buf.find(b"\r\n.\r\n", start)
            if end >= 0 or (buf.startswith(b".\r\n")):
                break
            start = max(0, len(buf) - 4)
            fill()
        size, cut = (0, 3) if buf.startswith(b".\r\n") else (end + 2, end + 5)
        out.write(b"%010d\n" % size)
        with memoryview(buf) as view:
            out.write(view[:size])      # still dot-stuffed: peers undoes it
        del buf[:cut]
        start = 0
        if not line().startswith(b"+OK"):
            sys.exit("floor-client: DELE refused")
    sender.join()
    out.close()
    command("QUIT")


if __name__ == "__main__":
    main()
