"""Message content written beside message.eml (DESIGN.md §3): text.txt,
text.html and attachments/, listed in meta.json, checked against what the
mail generator put in."""

import hashlib
import json
from pathlib import Path

import mailgen
from test_receive import EX_OK


def by_subject(folders):
    out = {}
    for f in folders:
        meta = json.loads((f / "meta.json").read_text())
        out[meta["subject"]] = (f, meta)
    return out


def test_text_and_attachments_are_decoded(fake_pop3, fake_config, confdir, run_popfetchd):
    messages = mailgen.generate_messages(12, 6000, seed=71)
    server = fake_pop3([m.data for m in messages])
    config = fake_config(server)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_OK
    saved = by_subject(Path(line) for line in res.lines)
    assert len(saved) == len(messages)
    n_att = 0
    for m in messages:
        folder, meta = saved[m.subject]
        names = meta["text"]
        if m.text_plain is not None:
            assert "text.txt" in names
            got = (folder / "text.txt").read_bytes().decode().replace("\r\n", "\n")
            assert got.strip() == m.text_plain.replace("\r\n", "\n").strip()
        if m.text_html is not None:
            assert "text.html" in names
        assert sorted(a["original_name"] for a in meta["attachments"]) == \
            sorted(a.name for a in m.attachments)
        for a, want in zip(sorted(meta["attachments"], key=lambda a: a["original_name"]),
                           sorted(m.attachments, key=lambda a: a.name)):
            data = (folder / "attachments" / a["name"]).read_bytes()
            assert data == want.data
            assert a["size"] == len(data)
            assert a["sha256"] == hashlib.sha256(data).hexdigest()
            assert a["content_type"] == want.content_type
            assert "/" not in a["name"] and not a["name"].startswith(".")
            n_att += 1
    assert n_att > 0, "the generator made no attachment: the test proves nothing"


def test_hostile_attachment_name_stays_in_the_folder(fake_pop3, fake_config, confdir,
                                                    run_popfetchd, tmp_path):
    msg = (b"From: a@example.org\nTo: b@example.org\nSubject: hostile\n"
           b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=B\n\n"
           b"--B\nContent-Type: text/plain\n\nsee attached\n"
           b"--B\nContent-Type: application/octet-stream; name=\"../../../escape.sh\"\n"
           b"Content-Disposition: attachment; filename=\"../../../escape.sh\"\n"
           b"Content-Transfer-Encoding: base64\n\nZWNobyBwd25lZAo=\n"
           b"--B\nContent-Type: application/pdf\n"
           b"Content-Disposition: attachment; filename=\".hidden.pdf\"\n\n%PDF\n--B--\n")
    server = fake_pop3([msg])
    config = fake_config(server)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_OK
    folder = Path(res.lines[0])
    names = sorted(p.name for p in (folder / "attachments").iterdir())
    assert names == ["escape.sh", "hidden.pdf"], names
    assert not list(Path(config["save_directory"]).parent.rglob("escape.sh"))[1:]
    assert (folder / "attachments" / "escape.sh").read_bytes() == b"echo pwned\n"


def test_save_attachments_false_writes_none(fake_pop3, fake_config, confdir, run_popfetchd):
    messages = mailgen.generate_messages(6, 6000, seed=72)
    server = fake_pop3([m.data for m in messages])
    config = fake_config(server, save_attachments=False)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_OK
    for line in res.lines:
        folder = Path(line)
        assert not (folder / "attachments").exists()
        assert (folder / "message.eml").exists()
        assert json.loads((folder / "meta.json").read_text())["attachments"] == []
