"""Limits on what a stranger controls (DESIGN.md §3, issue 5): MIME nesting
depth, number of parts, bytes decoded per message. Beyond them the message
is still saved whole (message.eml, meta.json) with a note saying which limit
stopped the extraction; nothing crashes, nothing is lost, the server is
emptied as usual."""

import hashlib
import json
import os
import resource
from pathlib import Path

from test_receive import EX_OK

EX_CONFIG = 78


def head(subject):
    return (f"From: a@example.org\nTo: b@example.org\nSubject: {subject}\n"
            f"MIME-Version: 1.0\n").encode()


def receive(fake_pop3, fake_config, confdir, run_popfetchd, data, **overrides):
    server = fake_pop3([data])
    config = fake_config(server, **overrides)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_OK, res.describe()
    assert server.remaining() == []
    [line] = res.lines
    folder = Path(line)
    assert (folder / "message.eml").read_bytes() == data.replace(b"\n", b"\r\n")
    return res, folder, json.loads((folder / "meta.json").read_text())


def attachments_message(sizes):
    parts = [b"--B\nContent-Type: text/plain\n\nsee the files\n"]
    blobs = []
    for i, size in enumerate(sizes):
        blob = hashlib.sha256(str(i).encode()).digest() * (size // 32)
        blobs.append(blob)
        parts.append(f"--B\nContent-Type: application/octet-stream\n"
                     f"Content-Disposition: attachment; filename=\"part{i}.bin\"\n"
                     f"Content-Transfer-Encoding: base64\n\n".encode()
                     + _b64(blob))
    return head("sizes") + b"Content-Type: multipart/mixed; boundary=B\n\n" + \
        b"".join(parts) + b"--B--\n", blobs


def _b64(data):
    import base64
    return base64.encodebytes(data)


def test_max_decoded_size_stops_extraction(fake_pop3, fake_config, confdir, run_popfetchd):
    data, blobs = attachments_message([40_000, 40_000, 40_000])
    res, folder, meta = receive(fake_pop3, fake_config, confdir, run_popfetchd, data,
                                max_decoded_size="100k")
    # 100k is 102400 bytes: the text and two attachments fit, the third does not
    names = [a["name"] for a in meta["attachments"]]
    assert names == ["part0.bin", "part1.bin"]
    for a, blob in zip(meta["attachments"], blobs):
        assert (folder / "attachments" / a["name"]).read_bytes() == blob
    # the partly written third file is gone
    assert sorted(p.name for p in (folder / "attachments").iterdir()) == names
    assert "more than 102400 decoded bytes" in meta["note"]
    assert "more than 102400 decoded bytes" in res.stderr


def test_default_decoded_ceiling_is_not_in_the_way(fake_pop3, fake_config, confdir,
                                                   run_popfetchd):
    data, blobs = attachments_message([40_000, 40_000, 40_000])
    _, folder, meta = receive(fake_pop3, fake_config, confdir, run_popfetchd, data)
    assert len(meta["attachments"]) == 3 and "note" not in meta


def test_deep_nesting_is_cut(fake_pop3, fake_config, confdir, run_popfetchd):
    depth = 60
    body = b"Content-Type: text/plain\n\ndeepest\n"
    for i in range(depth):
        body = (f"Content-Type: multipart/mixed; boundary=b{i}\n\n--b{i}\n".encode() + body
                + f"--b{i}--\n".encode())
    data = head("deep") + body
    _, folder, meta = receive(fake_pop3, fake_config, confdir, run_popfetchd, data)
    assert "MIME nesting deeper than 20" in meta["note"]
    assert meta["text"] == [] and not (folder / "text.txt").exists()


def test_too_many_parts_are_cut(fake_pop3, fake_config, confdir, run_popfetchd):
    n = 1500
    parts = b"".join(
        f"--B\nContent-Type: text/csv\nContent-Disposition: attachment; "
        f"filename=\"row{i}.csv\"\n\n{i}\n".encode() for i in range(n))
    data = head("many") + b"Content-Type: multipart/mixed; boundary=B\n\n" + parts + b"--B--\n"
    _, folder, meta = receive(fake_pop3, fake_config, confdir, run_popfetchd, data)
    assert "more than 1000 MIME parts" in meta["note"]
    # the multipart itself is part 1: 999 leaves fit
    assert len(meta["attachments"]) == 999
    assert len(os.listdir(folder / "attachments")) == 999


def cpu_of_children():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def test_megabyte_header_fields_take_no_time(fake_pop3, fake_config, confdir, run_popfetchd):
    """Header fields of a megabyte full of encoded words that never end: every
    decoder is linear, so the message is saved byte for byte and described in
    a moment. Quadratic decoding took minutes of CPU on the event loop (past
    the watchdog: killed, restarted, the same message fetched again)."""
    words = b"=?a?q?x" * (1024 * 1024 // 7)
    name = b"=?utf-8?q?abc" * (256 * 1024 // 13)
    data = (head(words.decode()) + b"Content-Type: multipart/mixed; boundary=B\n\n"
            b"--B\nContent-Type: text/plain\n\nhello\n"
            b"--B\nContent-Type: application/octet-stream; name=\"" + name + b"\"\n"
            b"Content-Disposition: attachment; filename=\"" + name + b"\"\n\nx\n--B--\n")
    before = cpu_of_children()
    _, folder, meta = receive(fake_pop3, fake_config, confdir, run_popfetchd, data)
    cpu = cpu_of_children() - before
    # generous for a sanitizer build; the quadratic decoders took minutes
    assert cpu < 10, f"{cpu:.1f} s of CPU for one message"
    assert meta["subject"] == words.decode()
    assert (folder / "text.txt").read_text() == "hello"
    [att] = meta["attachments"]
    assert att["original_name"] == name.decode()
    assert len(att["name"].encode()) <= 255 and att["name"].startswith("=_utf-8_q_abc")
    assert (folder / "attachments" / att["name"]).read_bytes() == b"x"


def test_max_decoded_size_must_be_a_size(fake_pop3, fake_config, confdir, run_popfetchd):
    server = fake_pop3([])
    cd = confdir(fake_config(server, max_decoded_size="lots"))
    res = run_popfetchd(["check"], confdir=cd)
    assert res.returncode == EX_CONFIG
    assert f"{cd.files['fake']}:" in res.stderr and "max_decoded_size" in res.stderr
