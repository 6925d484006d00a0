"""Message content written beside message.eml (DESIGN.md §3): text.txt,
text.html and attachments/, listed in meta.json, checked against what the
mail generator put in."""

import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path

import pytest

import contentgen as cg
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


# ==========================================================================
# The fixture matrix: structures, transfer encodings, charsets, names,
# nested messages, hostile names and the save flags. Every message is built
# with contentgen (the email package); each test compares what popfetchd
# wrote with what was put in, byte for byte.


def sha256(data):
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass
class Att:
    """An attachment a correct reader writes: its safe name, the decoded
    name the message gives (None: no name), its type and its bytes."""
    name: str
    original_name: object
    content_type: str
    data: bytes

    def meta(self):
        return {"name": self.name, "original_name": self.original_name,
                "content_type": self.content_type, "size": len(self.data),
                "sha256": sha256(self.data)}


@dataclasses.dataclass
class Saved:
    """One saved message folder, with its meta.json and the bytes sent."""
    folder: Path
    meta: dict
    sent: bytes

    def read(self, name):
        return (self.folder / name).read_bytes()

    def files(self):
        """Every entry under the folder, as relative paths ("attachments/" for the dir)."""
        out = set()
        for p in self.folder.rglob("*"):
            rel = p.relative_to(self.folder).as_posix()
            out.add(rel + "/" if p.is_dir() and not p.is_symlink() else rel)
        return out


@pytest.fixture
def receive(fake_pop3, fake_config, confdir, run_popfetchd, tmp_path, monkeypatch):
    """receive(*messages, before_run=None, **config keys) -> [Saved], in order.

    Serves the messages (email.message.Message or bytes) from a FakePOP3 and
    runs `receive-all fake` in a working directory inside tmp_path; asserts
    exit 0 and exactly one folder per message. before_run() is called when
    everything is set up, just before popfetchd starts. `receive.last` holds
    the Result, the configuration and the ConfDir of the last run."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative path that escaped would land here

    def run(*messages, before_run=None, **config_keys):
        datas = [m if isinstance(m, bytes) else cg.to_bytes(m) for m in messages]
        uidls = [f"msg-{i:03d}" for i in range(len(datas))]
        server = fake_pop3(list(zip(uidls, datas)))
        config = fake_config(server, **config_keys)
        cd = confdir(config)
        if before_run is not None:
            before_run()
        res = run_popfetchd(["receive-all", "fake"], confdir=cd)
        run.last = (res, config, cd)
        assert res.returncode == EX_OK, res.describe()
        folders = {}
        for line in res.lines:
            meta = json.loads((Path(line) / "meta.json").read_text())
            folders[meta["uidl"]] = (Path(line), meta)
        assert sorted(folders) == uidls, res.describe()
        return [Saved(*folders[uidl], data) for uidl, data in zip(uidls, datas)]
    run.last = None
    return run


def check_saved(s, text=None, html=None, atts=()):
    """The folder holds exactly what the message carries: message.eml (the
    bytes sent), text.txt / text.html (bytes, UTF-8), attachments/ (each
    file's bytes), meta.json lists exactly those, and has no note."""
    want_text = ([] if text is None else ["text.txt"]) + ([] if html is None else ["text.html"])
    want_files = {"meta.json", "message.eml"} | set(want_text)
    if atts:
        want_files |= {"attachments/"} | {f"attachments/{a.name}" for a in atts}
    assert s.files() == want_files, s.folder
    assert s.read("message.eml") == s.sent
    assert s.meta["text"] == want_text
    if "text.txt" in want_text:
        assert s.read("text.txt") == text.encode("utf-8")
    if "text.html" in want_text:
        assert s.read("text.html") == html.encode("utf-8")
    assert s.meta["attachments"] == [a.meta() for a in atts]
    for a in atts:
        assert s.read(f"attachments/{a.name}") == a.data, a.name
    assert "note" not in s.meta, s.meta.get("note")


def crlf(text):
    """What a text body decodes to: the lines with CRLF, as on the wire."""
    return text.replace("\n", "\r\n")


def blob(seed, size, head=b""):
    """Deterministic binary content, every byte value included."""
    rnd = random.Random(seed)
    return head + bytes(range(256)) + rnd.randbytes(size)


PDF = blob(1, 3000, b"%PDF-1.7\r\n%\xe2\xe3\xcf\xd3\r\n")
PNG = blob(2, 2000, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
JPEG = blob(3, 1500, b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
ZIP = blob(4, 5000, b"PK\x03\x04\x14\x00\x00\x00\x08\x00")


# --------------------------------------------------------------------------
# 1. structures


PLAIN = "Hello,\n\nthe report is attached.\n.a line starting with a dot\n-- \nSender\n"
HTML = "<html><body><p>Hello,</p><p>the <b>report</b> is attached.</p></body></html>\n"


def structure_plain():
    return cg.message("plain", cg.text(PLAIN)), dict(text=crlf(PLAIN))


def structure_html():
    return cg.message("html", cg.text(HTML, "html")), dict(html=crlf(HTML))


def structure_alternative():
    body = cg.multipart("alternative", cg.text(PLAIN), cg.text(HTML, "html"))
    return cg.message("alternative", body), dict(text=crlf(PLAIN), html=crlf(HTML))


def structure_mixed():
    csv = b"a;b;c\r\n1;2;3\r\n"
    body = cg.multipart(
        "mixed",
        cg.multipart("alternative", cg.text(PLAIN), cg.text(HTML, "html")),
        cg.attachment("application/pdf", "report.pdf", PDF),
        cg.attachment("image/png", "chart.png", PNG),
        cg.attachment("application/zip", "data.zip", ZIP),
        cg.attachment("Application/Octet-Stream", "blob.bin", ZIP[::-1]),
        cg.attachment("text/csv", "table.csv", csv, cte="7bit"),
        # a text/plain with a file name is an attachment, not the body
        cg.attachment("text/plain", "notes.txt", "Grüße\r\n".encode("latin-1")))
    return cg.message("mixed", body), dict(
        text=crlf(PLAIN), html=crlf(HTML),
        atts=[Att("report.pdf", "report.pdf", "application/pdf", PDF),
              Att("chart.png", "chart.png", "image/png", PNG),
              Att("data.zip", "data.zip", "application/zip", ZIP),
              Att("blob.bin", "blob.bin", "application/octet-stream", ZIP[::-1]),
              Att("table.csv", "table.csv", "text/csv", csv),
              Att("notes.txt", "notes.txt", "text/plain", "Grüße\r\n".encode("latin-1"))])


@pytest.mark.parametrize("make", [structure_plain, structure_html, structure_alternative,
                                  structure_mixed], ids=lambda f: f.__name__[10:])
def test_structure(receive, make):
    """Plain only writes text.txt, HTML only text.html (no text.txt), an
    alternative both, and a mixed message every attachment byte for byte
    (attachments are transfer-decoded only, never charset-converted); meta.json
    lists exactly the files written, with type, size and SHA-256."""
    msg, want = make()
    [s] = receive(msg)
    check_saved(s, **want)


# --------------------------------------------------------------------------
# 2. transfer encodings


BINARY = bytes(range(256)) * 4 + b"\r\n\n\r\0" + bytes(range(255, -1, -1))
SEVEN = b"plain,ascii\r\n" * 40 + b"no final line break"
EIGHT = bytes(range(0x20, 0x7f)) + bytes(range(0x80, 0x100)) + b"\r\n" + b"\xff" * 997 + b"\r\n"


@pytest.mark.parametrize("cte,data", [
    pytest.param("base64", BINARY, id="base64"), pytest.param("BASE64", BINARY, id="BASE64"),
    pytest.param("quoted-printable", BINARY, id="qp"),
    pytest.param("Quoted-Printable", BINARY, id="Qp"), pytest.param("7bit", SEVEN, id="7bit"),
    pytest.param("8bit", EIGHT, id="8bit"), pytest.param("8bit", SEVEN, id="8bit-ascii")])
def test_transfer_encoding(receive, cte, data):
    """A body and an attachment in each transfer encoding are decoded to the
    exact bytes put in (binary with CR, LF and NUL through base64 and QP)."""
    body_cte = "quoted-printable-text" if cte.lower() == "quoted-printable" else cte
    body_text = "Tr\u00e4ger f\u00fcr " + cte + "\nzweite Zeile = gleich\n"
    if cte.lower() == "7bit":
        body_text = "carrier for 7bit\nsecond line = equal\n"
    body = cg.multipart("mixed", cg.text(body_text, cte=body_cte),
                        cg.attachment("application/octet-stream", "payload.bin", data, cte=cte))
    [s] = receive(cg.message(f"cte {cte}", body))
    check_saved(s, text=crlf(body_text),
                atts=[Att("payload.bin", "payload.bin", "application/octet-stream", data)])


def test_quoted_printable_soft_breaks_and_long_lines(receive):
    """QP soft line breaks (=CRLF) join lines; a long line comes out whole."""
    line = "x" * 300 + " =equals= " + "\u00e9" * 50
    body_text = line + "\n" + "tab\tend \n"
    [s] = receive(cg.message("qp long", cg.text(body_text, cte="quoted-printable-text")))
    assert b"=\r\n" in s.sent, "the fixture has no soft line break"
    check_saved(s, text=crlf(body_text))


# --------------------------------------------------------------------------
# 3. charsets


SAMPLES = {
    "iso-8859-1": "Grüße aus Köln, ça va? «Très bien» ¡Olé! ½ °C ÿ\nzweite Zeile: Äpfel\n",
    "windows-1252": "Preis: 100 € – „Zitat“ und “curly” ‘quotes’… ™ Œuvre\nŽ š ž Ÿ\n",
    "utf-8": "Grüße, 日本語, emoji 😀, Ελληνικά, Русский\nzweite Zeile\n",
    "shift_jis": "日本語のテキストです。ソフト表示、カタカナとひらがな。\n二行目：半角ｶﾅ\n",
    "iso-2022-jp": "こんにちは、世界。日本語のメールです。\n二行目、表示テスト\n",
    "koi8-r": "Привет, мир! Съешь же ещё этих мягких французских булок.\nВторая строка\n",
}


def charset_cases():
    for charset in SAMPLES:
        ctes = ["7bit", "base64", "quoted-printable-text"] if charset == "iso-2022-jp" \
            else ["base64", "quoted-printable-text", "8bit"]
        for cte in ctes:
            yield pytest.param(charset, cte, id=f"{charset}-{cte.replace('-text', '')}")


def test_samples_exercise_the_hard_bytes():
    """The fixtures carry what they claim: Windows-1252 0x80 0x93 0x94,
    a Shift_JIS trail byte 0x5C, ISO-2022-JP escapes."""
    cp = SAMPLES["windows-1252"].encode("windows-1252")
    assert all(bytes([b]) in cp for b in (0x80, 0x93, 0x94))
    assert b"\x83\x5c" in SAMPLES["shift_jis"].encode("shift_jis")
    assert b"\x1b$B" in SAMPLES["iso-2022-jp"].encode("iso-2022-jp")


@pytest.mark.parametrize("charset,cte", charset_cases())
def test_text_charset_is_converted_to_utf8(receive, charset, cte):
    """text.txt is the body's text in UTF-8, whatever its charset and
    transfer encoding; no note for a body that converts cleanly."""
    sample = SAMPLES[charset]
    [s] = receive(cg.message(f"charset {charset} {cte}", cg.text(sample, charset=charset, cte=cte)))
    check_saved(s, text=crlf(sample))


@pytest.mark.parametrize("charset", ["windows-1252", "shift_jis", "koi8-r"])
def test_html_charset_is_converted_to_utf8(receive, charset):
    """text.html too is converted to UTF-8 (the plain part in another charset)."""
    html = f"<p>{SAMPLES[charset]}</p>\n"
    body = cg.multipart("alternative", cg.text(SAMPLES["iso-8859-1"], charset="iso-8859-1"),
                        cg.text(html, "html", charset=charset, cte="base64"))
    [s] = receive(cg.message(f"html {charset}", body))
    check_saved(s, text=crlf(SAMPLES["iso-8859-1"]), html=crlf(html))


@pytest.mark.parametrize("spelling", ["ISO-8859-1", "latin1", "Windows-1252", "cp1252"])
def test_charset_aliases(receive, spelling):
    """Common spellings of a charset name are understood."""
    sample = "caf\u00e9 na\u00efve \u00fcber\n"
    data = crlf(sample).encode("latin-1")
    part = cg.leaf(f"text/plain; charset={spelling}", data, "8bit")
    [s] = receive(cg.message(f"alias {spelling}", part))
    check_saved(s, text=crlf(sample))


BAD_CHARSET = [
    # (id, declared charset, body bytes: ASCII around bytes the charset cannot read)
    ("unknown", "x-unknown-42", b"plain words, caf\xe9 and \x93quotes\x94\r\nline 2\r\n"),
    ("utf8-with-latin1", "utf-8", b"plain words, caf\xe9 na\xefve\r\nline 2\r\n"),
    ("ascii-with-8bit", "us-ascii", b"plain words, caf\xe9 \x80\r\nline 2\r\n"),
    ("shift-jis-invalid", "shift_jis", b"plain words, \x82\xa0ok \x81\x7f\xfd\xfe\r\nline 2\r\n"),
    ("koi8-as-2022jp", "iso-2022-jp", b"plain words, \x1b$B\xf0\xd2\x1b(B\r\nline 2\r\n"),
]


@pytest.mark.parametrize("charset,data", [pytest.param(c, d, id=i) for i, c, d in BAD_CHARSET])
def test_charset_trouble_is_noted_not_fatal(receive, charset, data):
    """An unknown charset, or bytes invalid in the declared one, do not fail
    the message: exit 0, message.eml saved, text.txt written as valid UTF-8
    (DESIGN §3: "converted to UTF-8") keeping the readable text, and
    meta.json carries a note about the charset."""
    part = cg.leaf(f'text/plain; charset="{charset}"', data, "8bit")
    [s] = receive(cg.message(f"bad charset {charset}", part))
    assert s.read("message.eml") == s.sent
    assert s.meta["text"] == ["text.txt"]
    got = s.read("text.txt")
    try:
        decoded = got.decode("utf-8")
    except UnicodeDecodeError as e:
        pytest.fail(f"text.txt is not UTF-8 ({e}): {got!r}")
    assert decoded.startswith("plain words, ") and decoded.endswith("line 2\r\n"), decoded
    assert "charset" in s.meta.get("note", ""), f"no charset note in meta.json: {s.meta}"


# --------------------------------------------------------------------------
# 4. attachment names as mail clients encode them


def named(data, ctype, disposition=None, name_param=None):
    """An attachment part with raw header parameters: disposition is the
    full Content-Disposition value (None: no such header), name_param is
    appended to the Content-Type."""
    ct = ctype if name_param is None else f"{ctype}; {name_param}"
    return cg.leaf(ct, data, "base64", disposition=disposition)


GERMAN = "Übersicht_März_2024 Größe.xlsx"
JAPANESE = "請求書_2024年度.pdf"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"

NAME_CASES = [
    # (id, part, decoded original name, safe name)
    ("rfc2231-continuations",
     lambda d: named(d, XLSX, "attachment;\r\n\t" + cg.rfc2231_params("filename", GERMAN, size=13)),
     GERMAN, GERMAN),
    ("rfc2231-continuations-japanese",
     lambda d: named(d, "application/pdf",
                     "attachment;\r\n\t" + cg.rfc2231_params("filename", JAPANESE, size=10)),
     JAPANESE, JAPANESE),
    ("rfc2231-mixed-sections",  # encoded and quoted plain sections
     lambda d: named(d, "application/pdf",
                     "attachment; filename*0*=UTF-8''%E6%97%A5%E6%9C%AC;\r\n"
                     "\tfilename*1=\" report\"; filename*2*=%E2%84%A2.pdf"),
     "日本 report™.pdf", "日本 report™.pdf"),
    ("rfc2231-single-latin1",
     lambda d: named(d, "text/plain", "attachment; filename*=iso-8859-1'de'Pr%FCfung%20%E4.txt"),
     "Prüfung ä.txt", "Prüfung ä.txt"),
    ("rfc2231-in-content-type-name",
     lambda d: named(d, "application/pdf", None, "name*=utf-8''%C3%A9t%C3%A9.pdf"),
     "été.pdf", "été.pdf"),
    ("rfc2047-b-utf8",
     lambda d: named(d, "application/pdf", f'attachment; filename="{cg.rfc2047_b(GERMAN)}"'),
     GERMAN, GERMAN),
    ("rfc2047-q-latin1",
     lambda d: named(d, "text/plain",
                     f'attachment; filename="{cg.rfc2047_q("Grüße aus Köln.txt")}"'),
     "Grüße aus Köln.txt", "Grüße aus Köln.txt"),
    ("rfc2047-b-japanese-in-name",
     lambda d: named(d, "application/pdf", None, f'name="{cg.rfc2047_b(JAPANESE)}"'),
     JAPANESE, JAPANESE),
    ("rfc2047-two-words",
     lambda d: named(d, "application/pdf",
                     'attachment;\r\n\tfilename="' + cg.rfc2047_b("Jahres") + " "
                     + cg.rfc2047_b("übersicht.pdf") + '"'),
     "Jahresübersicht.pdf", "Jahresübersicht.pdf"),
    ("content-type-name-only",
     lambda d: named(d, "application/pdf", None, 'name="invoice-2024.pdf"'),
     "invoice-2024.pdf", "invoice-2024.pdf"),
    ("inline-disposition-with-name",
     lambda d: named(d, "application/pdf", 'inline; filename="shown.pdf"'),
     "shown.pdf", "shown.pdf"),
    ("filename-wins-over-name",
     lambda d: named(d, "application/pdf", 'attachment; filename="disposition.pdf"',
                     'name="content-type.pdf"'),
     "disposition.pdf", "disposition.pdf"),
    ("raw-utf8-name",
     lambda d: named(d, "application/pdf",
                     cg.raw(f'attachment; filename="{JAPANESE}"'.encode("utf-8"))),
     JAPANESE, JAPANESE),
    ("raw-utf8-umlauts",
     lambda d: named(d, XLSX, cg.raw(f'attachment; filename="{GERMAN}"'.encode("utf-8"))),
     GERMAN, GERMAN),
    ("unquoted-token",
     lambda d: named(d, "application/pdf", "attachment; filename=plain-token.pdf"),
     "plain-token.pdf", "plain-token.pdf"),
]


def test_continuation_fixture_splits_a_character():
    """The German continuation case cuts inside a UTF-8 character (so a reader
    that converts each section on its own gets it wrong)."""
    first = GERMAN.encode()[:13]
    with pytest.raises(UnicodeDecodeError):
        first.decode("utf-8")


@pytest.mark.parametrize("make,original,safe",
                         [pytest.param(m, o, s, id=i) for i, m, o, s in NAME_CASES])
def test_attachment_name_decoding(receive, make, original, safe):
    """RFC 2231 (continuations, charsets, language), RFC 2047 (B and Q, two
    words), a name only in Content-Type, raw UTF-8: meta.json original_name
    is the decoded name, the file is written under the safe name."""
    data = blob(len(original), 500, head=original.encode())
    part = make(data)
    ctype = part.get_content_type()
    body = cg.multipart("mixed", cg.text("see attached\n"), part)
    [s] = receive(cg.message(cg.rfc2047_b(f"name {original}"), body))
    check_saved(s, text=crlf("see attached\n"), atts=[Att(safe, original, ctype, data)])


def test_many_named_attachments_in_one_message(receive):
    """All the name forms side by side in one message: each keeps its own
    name, each file has its own content."""
    body = [cg.text("see attached\n")]
    atts = []
    for i, (_, make, original, safe) in enumerate(NAME_CASES):
        data = blob(1000 + i, 300 + i)
        part = make(data)
        body.append(part)
        atts.append(Att(safe, original, part.get_content_type(), data))
    # the same name given again in another encoding is numbered
    taken = {}
    for a in atts:
        k = taken[a.name] = taken.get(a.name, 0) + 1
        if k > 1:
            stem, ext = a.name.rsplit(".", 1)
            a.name = f"{stem} ({k}).{ext}"
    assert sum(taken.values()) - len(taken) >= 4, "the fixture repeats no name"
    [s] = receive(cg.message("many names", cg.multipart("mixed", *body)))
    check_saved(s, text=crlf("see attached\n"), atts=atts)


# --------------------------------------------------------------------------
# 5. nested messages, inline images


def test_nested_message_is_saved_as_subject_eml(receive):
    """A message/rfc822 part becomes attachments/SUBJECT.eml holding the
    nested message's bytes exactly; its own attachments stay inside it. A
    subject with characters a name may not hold is made safe ("Re: <x>" ->
    "Re_ _x_"), an encoded subject is decoded, one without subject is
    attachment-N.eml."""
    inner1 = cg.message("Quarterly report", cg.multipart(
        "mixed", cg.text("inner body\n"), cg.attachment("application/pdf", "inner.pdf", PDF)))
    inner2 = cg.message(cg.rfc2047_q("Re: Grüße <Antwort>", "UTF-8"), cg.text("zwei\n"))
    inner3 = cg.text("no subject here\n")
    inner3["From"] = "x@example.org"
    inner3["MIME-Version"] = "1.0"
    raws = [cg.to_bytes(m) for m in (inner1, inner2, inner3)]
    body = cg.multipart("mixed", cg.text("forwarded\n"), cg.rfc822(inner1), cg.rfc822(inner2),
                        cg.rfc822(inner3))
    [s] = receive(cg.message("forward", body))
    for r in raws:
        assert r in s.sent, "the fixture does not carry the nested bytes verbatim"
    check_saved(s, text=crlf("forwarded\n"), atts=[
        Att("Quarterly report.eml", "Quarterly report", "message/rfc822", raws[0]),
        Att("Re_ Grüße _Antwort_.eml", "Re: Grüße <Antwort>", "message/rfc822", raws[1]),
        Att("attachment-3.eml", None, "message/rfc822", raws[2])])


def test_nested_message_with_filename(receive):
    """A message/rfc822 part with a file name: still SUBJECT.eml (DESIGN §3),
    the file name is the original_name."""
    inner = cg.message("Inner subject", cg.text("inner\n"))
    raw = cg.to_bytes(inner)
    part = cg.rfc822(inner)
    part["Content-Disposition"] = 'attachment; filename="forwarded.eml"'
    [s] = receive(cg.message("forward named", cg.multipart("mixed", cg.text("fw\n"), part)))
    check_saved(s, text=crlf("fw\n"),
                atts=[Att("Inner subject.eml", "forwarded.eml", "message/rfc822", raw)])


def test_inline_images_in_related_are_attachments(receive):
    """multipart/related: the HTML's inline images are saved as attachments
    under their names (filename= in an inline disposition, or name= only);
    an unnamed inline image becomes attachment-N.png."""
    html = '<p>Logo: <img src="cid:logo@x"> <img src="cid:photo@x"></p>\n'
    logo = cg.leaf("image/png", PNG, disposition="inline; filename=logo.png",
                   headers=[("Content-ID", "<logo@x>")])
    photo = cg.leaf('image/jpeg; name="photo.jpg"', JPEG, headers=[("Content-ID", "<photo@x>")])
    anon = cg.leaf("image/png", PNG[::-1], disposition="inline",
                   headers=[("Content-ID", "<anon@x>")])
    related = cg.multipart("related", cg.text(html, "html"), logo, photo, anon)
    body = cg.multipart("alternative", cg.text("Logo\n"), related)
    [s] = receive(cg.message("inline images", body))
    check_saved(s, text=crlf("Logo\n"), html=crlf(html), atts=[
        Att("logo.png", "logo.png", "image/png", PNG),
        Att("photo.jpg", "photo.jpg", "image/jpeg", JPEG),
        Att("attachment-3.png", None, "image/png", PNG[::-1])])


# --------------------------------------------------------------------------
# 6. hostile names


FORBIDDEN = set(b'/\\<>:"|?*')


def assert_safe_name(name):
    """DESIGN §3: no '/', no '\\', no control character, none of <>:"|?*,
    no leading '.', never '.' or '..', at most 255 bytes, UTF-8."""
    raw = os.fsencode(name)
    assert raw not in (b"", b".", b".."), name
    assert not raw.startswith(b"."), name
    assert len(raw) <= 255, (len(raw), name)
    assert not any(b < 0x20 or b == 0x7f or b in FORBIDDEN for b in raw), repr(name)
    text = raw.decode("utf-8")  # a name that is not UTF-8 fails here
    assert not any(0x80 <= ord(c) <= 0x9f for c in text), repr(name)


def snapshot(root):
    """{relative path: what it is} for everything under root, links not
    followed: ("dir",), ("file", sha256, mode) or ("link", target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir",)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", sha256(f.read()), st.st_mode)
    return out


OUTSIDE = ["/etc/passwd", "/etc/shadow", "/etc/hosts"]


def outside_state():
    """The places a traversal would aim at outside the test tree."""
    state = {p: sha256(Path(p).read_bytes()) for p in OUTSIDE if os.path.exists(p)}
    state["/"] = sorted(os.listdir("/"))
    state["/etc"] = sorted(os.listdir("/etc"))
    return state


@pytest.fixture
def contained(receive, tmp_path):
    """contained(*messages, **config keys) -> [Saved]: receive(), and prove
    that nothing changed anywhere but in the new message folders, the
    configuration's state directory and (empty) staging directories: the
    whole tmp_path tree (working directory, configuration, save and state
    directories) is compared before and after, and so are /, /etc and a few
    files there. Every name in the folders is a safe name, none a link."""
    def run(*messages, **config_keys):
        taken = {}

        def take():
            taken["tree"], taken["outside"] = snapshot(tmp_path), outside_state()
        saved = receive(*messages, before_run=take, **config_keys)
        _, config, cd = receive.last
        before, outside, after = taken["tree"], taken["outside"], snapshot(tmp_path)
        save_dir = Path(config["save_directory"])
        folders = [os.path.relpath(s.folder, tmp_path) for s in saved]
        state = os.path.relpath(Path(cd.state_directory) / config["id"], tmp_path)
        staging = os.path.relpath(save_dir / ".tmp", tmp_path)

        def allowed(rel, what):
            if any(rel == f or rel.startswith(f + os.sep) for f in folders):
                return what[0] != "link"
            if rel == state or rel.startswith(state + os.sep):
                return True
            return (rel == staging or rel.startswith(staging + os.sep)) and what == ("dir",)
        removed = sorted(set(before) - set(after))
        changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
        added = sorted(p for p in set(after) - set(before) if not allowed(p, after[p]))
        assert removed == [] and changed == [] and added == [], \
            f"outside the message folders: removed {removed}, changed {changed}, added {added}"
        assert outside_state() == outside
        for s in saved:
            for p in s.folder.rglob("*"):
                assert not p.is_symlink(), p
                assert_safe_name(p.name)
        return saved
    return run


PLAIN_TYPES = ["application/pdf", "image/png", "application/octet-stream", "text/plain",
               "application/zip"]

# (id, Content-Disposition value, decoded original name, safe name when alone)
# The original name is None where the message gives none; "?" where the
# rules leave the decoded form open (the safe name is still determined).
HOSTILE = [
    ("dotdot-etc-passwd", 'attachment; filename="../../etc/passwd"', "../../etc/passwd",
     "passwd"),
    ("absolute-etc-passwd", 'attachment; filename="/etc/passwd"', "/etc/passwd", "passwd"),
    ("rfc2231-traversal", "attachment; filename*=utf-8''..%2F..%2Fetc%2Fpasswd",
     "../../etc/passwd", "passwd"),
    ("backslashes-2231", "attachment; filename*=utf-8''..%5C..%5Cx", "..\\..\\x", "x"),
    ("backslashes-raw", 'attachment; filename="..\\..\\x"', "?", "x"),
    ("windows-path", "attachment; filename*=utf-8''C%3A%5CWindows%5Cevil.bat",
     "C:\\Windows\\evil.bat", "evil.bat"),
    ("leading-dot", 'attachment; filename=".bashrc"', ".bashrc", "bashrc"),
    ("three-dots", 'attachment; filename="..."', "...", "attachment-1.EXT"),
    ("two-dots", 'attachment; filename=".."', "..", "attachment-1.EXT"),
    ("one-dot", 'attachment; filename="."', ".", "attachment-1.EXT"),
    ("dots-slash", 'attachment; filename="../"', "../", "attachment-1.EXT"),
    ("empty", 'attachment; filename=""', None, "attachment-1.EXT"),
    ("device-con", 'attachment; filename="CON"', "CON", "CON"),
    ("device-nul-txt", 'attachment; filename="nul.txt"', "nul.txt", "nul.txt"),
    ("reserved-chars", "attachment; filename*=utf-8''a%3Cb%3Ec%3Ad%22e%7Cf%3Fg%2Ah.txt",
     'a<b>c:d"e|f?g*h.txt', "a_b_c_d_e_f_g_h.txt"),
    ("nul-raw", cg.raw(b'attachment; filename="evil\x00name.txt"'), "?", "?"),
    ("nul-rfc2231", "attachment; filename*=utf-8''evil%00name.txt", "?", "evil_name.txt"),
    ("crlf-rfc2231", "attachment; filename*=utf-8''line1%0D%0Aline2.txt",
     "line1\r\nline2.txt", "line1__line2.txt"),
    ("controls-rfc2231", "attachment; filename*=utf-8''a%01b%09c%1Bd%7Fe%C2%85f.txt",
     "a\x01b\tc\x1bd\x7fe\x85f.txt", "a_b_c_d_e_f.txt"),
    ("controls-raw", cg.raw(b'attachment; filename="a\x01b\x1bc\x7fd.txt"'),
     "a\x01b\x1bc\x7fd.txt", "a_b_c_d.txt"),
    ("long-ascii", "attachment;\r\n\t" + cg.rfc2231_params("filename", "A" * 996 + ".pdf",
                                                          size=60),
     "A" * 996 + ".pdf", "A" * 251 + ".pdf"),
    ("long-utf8", "attachment;\r\n\t" + cg.rfc2231_params("filename", "ä" * 498 + ".pdf",
                                                         size=40),
     "ä" * 498 + ".pdf", "ä" * 125 + ".pdf"),
    ("long-no-extension", "attachment;\r\n\t" + cg.rfc2231_params("filename", "B" * 1000,
                                                                 size=60),
     "B" * 1000, "B" * 255),
    ("long-raw-quoted", 'attachment; filename="' + "C" * 995 + '.tar.gz"',
     "C" * 995 + ".tar.gz", "C" * 252 + ".gz"),
]


def hostile_part(i, disposition):
    ctype = PLAIN_TYPES[i % len(PLAIN_TYPES)]
    return ctype, blob(5000 + i, 200 + i), cg.leaf(ctype, blob(5000 + i, 200 + i), "base64",
                                                   disposition=disposition)


EXT = {"application/pdf": "pdf", "image/png": "png", "application/octet-stream": "bin",
       "text/plain": "txt", "application/zip": "zip"}


@pytest.mark.parametrize("i", range(len(HOSTILE)), ids=[h[0] for h in HOSTILE])
def test_hostile_name_alone(contained, i):
    """Each hostile name, alone in its message: the file lands inside the
    message's attachments/ under the name the rules give, with the right
    content, and nothing else anywhere changes."""
    _, disposition, original, safe = HOSTILE[i]
    ctype, data, part = hostile_part(i, disposition)
    body = cg.multipart("mixed", cg.text("hostile\n"), part)
    [s] = contained(cg.message(f"hostile {HOSTILE[i][0]}", body))
    [a] = s.meta["attachments"]
    assert_safe_name(a["name"])
    if safe != "?":
        assert a["name"] == safe.replace("EXT", EXT[ctype])
    if original != "?":
        assert a["original_name"] == original
    assert s.files() == {"message.eml", "meta.json", "text.txt", "attachments/",
                         "attachments/" + a["name"]}
    assert s.read("attachments/" + a["name"]) == data
    assert a["sha256"] == sha256(data) and a["size"] == len(data)
    assert a["content_type"] == ctype


# several hostile names in one message: (Content-Disposition, original, safe name)
HOSTILE_TOGETHER = [
    ('attachment; filename="../../etc/passwd"', "../../etc/passwd", "passwd"),
    ('attachment; filename="/etc/passwd"', "/etc/passwd", "passwd (2)"),
    ("attachment; filename*=utf-8''..%2F..%2Fetc%2Fpasswd", "../../etc/passwd", "passwd (3)"),
    ("attachment; filename*=utf-8''..%5C..%5Cx", "..\\..\\x", "x"),
    ('attachment; filename=".bashrc"', ".bashrc", "bashrc"),
    ('attachment; filename="bashrc"', "bashrc", "bashrc (2)"),
    ('attachment; filename="..."', "...", "attachment-7.EXT"),
    ('attachment; filename=".."', "..", "attachment-8.EXT"),
    ('attachment; filename="."', ".", "attachment-9.EXT"),
    ('attachment; filename="CON"', "CON", "CON"),
    ('attachment; filename="nul.txt"', "nul.txt", "nul.txt"),
    ('attachment; filename="Report.pdf"', "Report.pdf", "Report.pdf"),
    ('attachment; filename="report.pdf"', "report.pdf", "report (2).pdf"),
    ('attachment; filename="REPORT.PDF"', "REPORT.PDF", "REPORT (3).PDF"),
    ('attachment; filename="report.pdf"', "report.pdf", "report (4).pdf"),
    ('attachment; filename="report (2).pdf"', "report (2).pdf", "report (2) (2).pdf"),
    ("attachment; filename*=utf-8''line1%0D%0Aline2.txt", "line1\r\nline2.txt",
     "line1__line2.txt"),
    ("attachment; filename*=utf-8''a%3Cb%3Ec%3Ad%22e%7Cf%3Fg%2Ah.txt", 'a<b>c:d"e|f?g*h.txt',
     "a_b_c_d_e_f_g_h.txt"),
    ("attachment;\r\n\t" + cg.rfc2231_params("filename", "A" * 996 + ".pdf", size=60),
     "A" * 996 + ".pdf", "A" * 251 + ".pdf"),
    ('attachment; filename="' + "A" * 996 + '.pdf"', "A" * 996 + ".pdf",
     "A" * 247 + " (2).pdf"),
    ("attachment;\r\n\t" + cg.rfc2231_params("filename", "ä" * 498 + ".pdf", size=40),
     "ä" * 498 + ".pdf", "ä" * 125 + ".pdf"),
    ("attachment;\r\n\t" + cg.rfc2231_params("filename", "ä" * 498 + ".pdf", size=40),
     "ä" * 498 + ".pdf", "ä" * 123 + " (2).pdf"),
]


def test_hostile_names_together(contained):
    """Many hostile names in one message: each file is inside attachments/,
    repeated names (after making them safe, ignoring case) are numbered
    "NAME (2).EXT" in order, the numbered form of a cut name is cut again to
    255 bytes keeping the extension, and every content is the one sent."""
    parts, atts = [cg.text("hostile\n")], []
    for i, (disposition, original, safe) in enumerate(HOSTILE_TOGETHER):
        ctype, data, part = hostile_part(i, disposition)
        parts.append(part)
        atts.append(Att(safe.replace("EXT", EXT[ctype]), original, ctype, data))
    [s] = contained(cg.message("hostile together", cg.multipart("mixed", *parts)))
    check_saved(s, text=crlf("hostile\n"), atts=atts)


def test_hostile_names_in_several_messages(contained):
    """The same hostile names in three messages received in one run: each
    message's files stay in its own folder, numbering starts afresh per
    message."""
    msgs, wants = [], []
    for m in range(3):
        parts, atts = [cg.text(f"message {m}\n")], []
        for i, (disposition, original, safe) in enumerate(HOSTILE_TOGETHER[:6]):
            ctype, data, part = hostile_part(100 * m + i, disposition)
            parts.append(part)
            atts.append(Att(safe, original, ctype, data))
        msgs.append(cg.message(f"hostile {m}", cg.multipart("mixed", *parts)))
        wants.append(atts)
    saved = contained(*msgs)
    assert len({s.folder for s in saved}) == 3
    for m, (s, atts) in enumerate(zip(saved, wants)):
        check_saved(s, text=crlf(f"message {m}\n"), atts=atts)


# --------------------------------------------------------------------------
# 7. save_text, save_attachments


def full_message():
    """Text, HTML, two attachments and a nested message; what it should give."""
    inner = cg.message("Inner", cg.text("inner\n"))
    body = cg.multipart(
        "mixed", cg.multipart("alternative", cg.text(PLAIN), cg.text(HTML, "html")),
        cg.attachment("application/pdf", "report.pdf", PDF),
        cg.attachment("image/png", "chart.png", PNG, cte="quoted-printable"),
        cg.rfc822(inner))
    atts = [Att("report.pdf", "report.pdf", "application/pdf", PDF),
            Att("chart.png", "chart.png", "image/png", PNG)]
    return cg.message("full", body), atts, cg.to_bytes(inner)


@pytest.mark.parametrize("save_text,save_attachments", [(True, True), (False, True),
                                                        (True, False), (False, False)])
def test_save_flags(contained, save_text, save_attachments):
    """save_text: false -> no message.eml, text.txt, text.html; attachments
    still written. save_attachments: false -> no attachments/ (nor the
    nested message), text still written. Both false -> only meta.json.
    meta.json is always there and lists only what was written; nothing is
    written outside the folder."""
    msg, atts, inner = full_message()
    [s] = contained(msg, save_text=save_text, save_attachments=save_attachments)
    want = atts + [Att("Inner.eml", "Inner", "message/rfc822", inner)]
    files = {"meta.json"}
    if save_text:
        files |= {"message.eml", "text.txt", "text.html"}
    if save_attachments:
        files |= {"attachments/"} | {f"attachments/{a.name}" for a in want}
    assert s.files() == files
    assert s.meta["text"] == (["text.txt", "text.html"] if save_text else [])
    if save_text:
        assert s.read("message.eml") == s.sent
        assert s.read("text.txt") == crlf(PLAIN).encode()
        assert s.read("text.html") == crlf(HTML).encode()
    got = s.meta["attachments"]
    if save_attachments:
        # the two decoded attachments exactly; the nested message by name
        assert got[:2] == [a.meta() for a in atts]
        assert [a["name"] for a in got[2:]] == ["Inner.eml"]
        for a in atts:
            assert s.read(f"attachments/{a.name}") == a.data
    else:
        assert got == []
    assert s.meta["size"] == len(s.sent), "size is the size of message.eml, kept or not"
    assert s.meta["subject"] == "full"


def test_nothing_kept_without_save_directory(fake_pop3, fake_config, confdir, run_popfetchd,
                                             tmp_path, monkeypatch):
    """Both flags false and no save_directory: the message is received (and
    deleted) but no file is written; only the state directory changes."""
    msg, _, _ = full_message()
    server = fake_pop3([("msg-000", cg.to_bytes(msg))])
    config = fake_config(server, save_text=False, save_attachments=False, save_directory=None)
    cd = confdir(config)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    before = snapshot(tmp_path)
    res = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_OK
    assert res.lines == []
    after = snapshot(tmp_path)
    state = os.path.relpath(Path(cd.state_directory) / "fake", tmp_path)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert {p for p in changed if not (p == state or p.startswith(state + os.sep))} == set()
    assert server.remaining() == []


def test_nested_subject_with_slash_keeps_both_sides(receive):
    """A subject is not a path: "Re: Order 12/2026" is saved as
    "Re_ Order 12_2026.eml", not cut to its "last component" "2026.eml"."""
    inner = cg.message("Re: Order 12/2026 \\ Q4", cg.text("inner\n"))
    raw = cg.to_bytes(inner)
    [s] = receive(cg.message("forward slash", cg.multipart("mixed", cg.text("fw\n"),
                                                           cg.rfc822(inner))))
    check_saved(s, text=crlf("fw\n"), atts=[
        Att("Re_ Order 12_2026 _ Q4.eml", "Re: Order 12/2026 \\ Q4", "message/rfc822", raw)])
