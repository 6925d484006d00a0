"""S/MIME (DESIGN.md §3): encrypted mail decrypted with the configuration's
PKCS#12 key, signed mail unwrapped, and mail that cannot be decrypted saved
as it came — never lost, meta.json saying why.

The fixtures are made here with the openssl CLI: a test CA, two recipients
(alice, whose key popfetchd holds, and bob), and messages encrypted and
signed with `openssl cms`. The content inside is a Python `email` entity
whose text and attachment are checked byte for byte after extraction.
"""

import hashlib
import json
import os
import subprocess
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest

from test_receive import EX_OK

EX_CONFIG = 78
P12_PASSWORD = "p12-Secret-of-alice-4711"
TEXT = "Invoice 2026-117 attached.\nTotal: 1\u202f234,50 \u20ac\n"
PDF = b"%PDF-1.7\n" + bytes(range(256)) * 300 + b"\n%%EOF\n"


def openssl(*args, cwd, input=None):
    proc = subprocess.run(["openssl", *args], cwd=cwd, input=input, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


class PKI:
    """A test CA and two S/MIME recipients, alice and bob, in one folder."""

    def __init__(self, where):
        self.dir = where
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", "/CN=popfetchd test CA", "-keyout", "ca.key", "-out", "ca.crt",
                cwd=where)
        (where / "ext.cnf").write_text(
            "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=emailProtection\n")
        for who in ("alice", "bob"):
            openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj",
                    f"/CN={who}/emailAddress={who}@example.org",
                    "-keyout", f"{who}.key", "-out", f"{who}.csr", cwd=where)
            openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                    "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf",
                    "-out", f"{who}.crt", cwd=where)
        openssl("pkcs12", "-export", "-inkey", "alice.key", "-in", "alice.crt",
                "-certfile", "ca.crt", "-name", "alice", "-passout", f"pass:{P12_PASSWORD}",
                "-out", "alice.p12", cwd=where)

    def encrypt(self, entity, to="alice"):
        """The S/MIME (application/pkcs7-mime enveloped-data) form of entity."""
        return openssl("cms", "-encrypt", "-aes256", "-recip", f"{to}.crt",
                       cwd=self.dir, input=entity)

    def sign(self, entity, opaque):
        """Signed by alice: opaque pkcs7-mime signed-data, or multipart/signed."""
        args = ["-nodetach"] if opaque else []
        return openssl("cms", "-sign", *args, "-signer", "alice.crt", "-inkey", "alice.key",
                       cwd=self.dir, input=entity)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


def content_entity():
    """The MIME entity inside the wrapping: a text and a PDF."""
    inner = MIMEMultipart("mixed")
    inner.attach(MIMEText(TEXT, "plain", "utf-8"))
    pdf = MIMEApplication(PDF, "pdf")
    pdf.add_header("Content-Disposition", "attachment", filename="invoice-117.pdf")
    inner.attach(pdf)
    return inner.as_bytes().replace(b"\n", b"\r\n")


def message(wrapped, subject="secret invoice"):
    """A whole message: envelope headers on top of the S/MIME entity."""
    head = (f"From: supplier@example.org\r\nTo: alice@example.org\r\n"
            f"Subject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}@example.org>\r\n"
            f"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n").encode()
    return head + wrapped.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def keystore_conf(confdir, config, pki, mode=0o600):
    """A configuration directory whose keystore holds alice.p12."""
    cd = confdir(config)
    keys = cd.path / "keys"
    keys.mkdir()
    (keys / "alice.p12").write_bytes((pki.dir / "alice.p12").read_bytes())
    (keys / "alice.p12").chmod(mode)
    return cd


def receive_one(fake_pop3, fake_config, confdir, run_popfetchd, pki, data, secret_registry,
                **smime):
    secret_registry.add(P12_PASSWORD)
    server = fake_pop3([data])
    overrides = {"smime": smime} if smime else {}
    config = fake_config(server, **overrides)
    res = run_popfetchd(["receive-all", "fake"], confdir=keystore_conf(confdir, config, pki))
    assert res.returncode == EX_OK, res.describe()
    assert len(res.lines) == 1
    folder = Path(res.lines[0])
    meta = json.loads((folder / "meta.json").read_text())
    # saved and counted: the server is emptied whatever became of S/MIME
    assert server.remaining() == []
    assert (folder / "message.eml").read_bytes() == data
    return res, folder, meta


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_content_extracted(folder, meta):
    assert tree(folder) == ["attachments", "attachments/invoice-117.pdf", "message.eml",
                            "meta.json", "text.txt"]
    assert (folder / "text.txt").read_text().replace("\r\n", "\n") == TEXT
    assert meta["text"] == ["text.txt"]
    [att] = meta["attachments"]
    assert att == {"name": "invoice-117.pdf", "original_name": "invoice-117.pdf",
                   "content_type": "application/pdf", "size": len(PDF),
                   "sha256": hashlib.sha256(PDF).hexdigest()}
    assert (folder / "attachments" / "invoice-117.pdf").read_bytes() == PDF


def assert_nothing_extracted(folder, meta):
    # the raw message is all there is: no half-decrypted leftovers
    assert tree(folder) == ["message.eml", "meta.json"]
    assert meta["text"] == [] and meta["attachments"] == []


def test_encrypted_message_is_decrypted(fake_pop3, fake_config, confdir, run_popfetchd, pki,
                                        secret_registry):
    data = message(pki.encrypt(content_entity()))
    assert b"invoice-117" not in data and b"application/pkcs7-mime" in data
    res, folder, meta = receive_one(fake_pop3, fake_config, confdir, run_popfetchd, pki, data,
                                    secret_registry, key_name="alice",
                                    key_password=P12_PASSWORD)
    assert meta["smime"] == "decrypted"
    assert meta["subject"] == "secret invoice"
    assert_content_extracted(folder, meta)
    assert "saved as it came" not in res.stderr


def test_password_from_a_file(fake_pop3, fake_config, confdir, run_popfetchd, pki,
                              secret_registry, tmp_path):
    pw = tmp_path / "p12-password"
    pw.write_text(P12_PASSWORD + "\n")
    pw.chmod(0o600)
    data = message(pki.encrypt(content_entity()))
    _, folder, meta = receive_one(fake_pop3, fake_config, confdir, run_popfetchd, pki, data,
                                  secret_registry, key_name="alice", key_password_file=str(pw))
    assert meta["smime"] == "decrypted"
    assert_content_extracted(folder, meta)


@pytest.mark.parametrize("case", ["no-key", "wrong-password", "other-recipient", "missing-file"])
def test_undecryptable_message_is_saved_raw(fake_pop3, fake_config, confdir, run_popfetchd, pki,
                                            secret_registry, case):
    to = "bob" if case == "other-recipient" else "alice"
    data = message(pki.encrypt(content_entity(), to=to))
    smime = {"no-key": {},
             "wrong-password": {"key_name": "alice", "key_password": "not-the-p12-password"},
             "other-recipient": {"key_name": "alice", "key_password": P12_PASSWORD},
             "missing-file": {"key_name": "carol", "key_password": P12_PASSWORD}}[case]
    if case == "wrong-password":
        secret_registry.add("not-the-p12-password")
    res, folder, meta = receive_one(fake_pop3, fake_config, confdir, run_popfetchd, pki, data,
                                    secret_registry, **smime)
    reason = {"no-key": "no key configured",
              "wrong-password": "the key could not be loaded",
              "other-recipient": "not for this key",
              "missing-file": "the key could not be loaded"}[case]
    assert meta["smime"].startswith("not-decrypted: " + reason), meta["smime"]
    if case == "missing-file":
        assert "carol.p12" in meta["smime"] and "no such file" in meta["smime"]
    if case == "wrong-password":
        assert "password" in meta["smime"]
    if case == "other-recipient":
        # the reason names who the message is for
        assert "bob" in meta["smime"] or "popfetchd test CA" in meta["smime"]
    assert_nothing_extracted(folder, meta)
    # one warning per message, naming it
    assert "(fake-0000-" in res.stderr and "saved as it came, not-decrypted" in res.stderr


@pytest.mark.parametrize("opaque", [True, False], ids=["signed-data", "multipart-signed"])
def test_signed_message_is_unwrapped(fake_pop3, fake_config, confdir, run_popfetchd, pki,
                                     secret_registry, opaque):
    data = message(pki.sign(content_entity(), opaque=opaque), subject="signed order")
    if opaque:
        assert b"smime-type=signed-data" in data and b"invoice-117" not in data
    else:
        assert b"multipart/signed" in data
    # no key is needed to unwrap
    _, folder, meta = receive_one(fake_pop3, fake_config, confdir, run_popfetchd, pki, data,
                                  secret_registry)
    assert meta["smime"] == "signed"
    # the signature (smime.p7s) is not content: it stays in message.eml
    assert_content_extracted(folder, meta)


def test_signed_then_encrypted_is_decrypted(fake_pop3, fake_config, confdir, run_popfetchd,
                                            pki, secret_registry):
    data = message(pki.encrypt(pki.sign(content_entity(), opaque=False)))
    _, folder, meta = receive_one(fake_pop3, fake_config, confdir, run_popfetchd, pki, data,
                                  secret_registry, key_name="alice", key_password=P12_PASSWORD)
    assert meta["smime"] == "decrypted"
    assert_content_extracted(folder, meta)


def test_corrupt_enveloped_data(fake_pop3, fake_config, confdir, run_popfetchd, pki,
                                secret_registry):
    wrapped = pki.encrypt(content_entity())
    head, _, body = wrapped.partition(b"\n\n")
    data = message(head + b"\n\n" + b"Z" * 40 + b"\n" + body[200:])
    _, folder, meta = receive_one(fake_pop3, fake_config, confdir, run_popfetchd, pki, data,
                                  secret_registry, key_name="alice", key_password=P12_PASSWORD)
    assert meta["smime"].startswith("not-decrypted: corrupt"), meta["smime"]
    assert_nothing_extracted(folder, meta)


def test_mixed_mailbox_plain_and_encrypted(fake_pop3, fake_config, confdir, run_popfetchd, pki,
                                           secret_registry):
    """Plain mail beside encrypted mail for another key: all saved, each says what it is."""
    secret_registry.add(P12_PASSWORD)
    plain = message(content_entity(), subject="plain")
    server = fake_pop3([plain, message(pki.encrypt(content_entity(), to="bob"), "for bob"),
                        message(pki.encrypt(content_entity()), "for alice")])
    config = fake_config(server, smime={"key_name": "alice", "key_password": P12_PASSWORD})
    res = run_popfetchd(["receive-all", "fake"], confdir=keystore_conf(confdir, config, pki))
    assert res.returncode == EX_OK
    states = {}
    for line in res.lines:
        meta = json.loads((Path(line) / "meta.json").read_text())
        states[meta["subject"]] = meta["smime"]
    assert states["plain"] == "none"
    assert states["for alice"] == "decrypted"
    assert states["for bob"].startswith("not-decrypted: not for this key")
    assert server.remaining() == []


def test_key_readable_by_others_is_a_configuration_error(fake_pop3, fake_config, confdir,
                                                         run_popfetchd, pki, secret_registry):
    secret_registry.add(P12_PASSWORD)
    server = fake_pop3([message(pki.encrypt(content_entity()))])
    config = fake_config(server, smime={"key_name": "alice", "key_password": P12_PASSWORD})
    cd = keystore_conf(confdir, config, pki, mode=0o644)
    res = run_popfetchd(["check"], confdir=cd)
    assert res.returncode == EX_CONFIG
    assert "smime.key_name" in res.stderr and "alice.p12 is readable by others" in res.stderr
    assert f"{cd.files['fake']}:" in res.stderr
    res = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_CONFIG
    assert len(server.remaining()) == 1


def test_decrypted_plaintext_is_not_left_behind(fake_pop3, fake_config, confdir, run_popfetchd,
                                                pki, secret_registry):
    """The decrypted entity is read from a hidden file in the staged folder;
    nothing of it may remain anywhere under the save directory."""
    data = message(pki.encrypt(content_entity()))
    _, folder, meta = receive_one(fake_pop3, fake_config, confdir, run_popfetchd, pki, data,
                                  secret_registry, key_name="alice", key_password=P12_PASSWORD)
    assert meta["smime"] == "decrypted"
    save = folder.parent
    leftovers = [p for p in save.rglob("*") if p.is_file() and not p.is_relative_to(folder)]
    assert leftovers == [], leftovers
    assert not any(p.name.startswith(".smime") for p in save.rglob("*"))


def test_encrypted_message_over_the_decoded_ceiling(fake_pop3, fake_config, confdir,
                                                    run_popfetchd, pki, secret_registry):
    """The enveloped data is read into memory to be decrypted: max_decoded_size bounds it."""
    data = message(pki.encrypt(content_entity()))
    secret_registry.add(P12_PASSWORD)
    server = fake_pop3([data])
    config = fake_config(server, max_decoded_size="20k",
                         smime={"key_name": "alice", "key_password": P12_PASSWORD})
    res = run_popfetchd(["receive-all", "fake"], confdir=keystore_conf(confdir, config, pki))
    assert res.returncode == EX_OK
    folder = Path(res.lines[0])
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["smime"] == "not-decrypted: too large"
    assert "more than 20480 decoded bytes" in meta["note"]
    assert_nothing_extracted(folder, meta)
    assert server.remaining() == []


def test_decrypted_content_must_be_a_mime_entity(fake_pop3, fake_config, confdir,
                                                 run_popfetchd, pki, secret_registry):
    """What decrypts to something that is no MIME entity (a corrupt key
    transport decrypts with a random key 1 time in 256) is not taken for
    decrypted content: saved raw, with the reason."""
    data = message(pki.encrypt(b"\x8b\x02garbage that is no header\r\n"))
    _, folder, meta = receive_one(fake_pop3, fake_config, confdir, run_popfetchd, pki, data,
                                  secret_registry, key_name="alice", key_password=P12_PASSWORD)
    assert meta["smime"] == "not-decrypted: corrupt (the decrypted content is not a MIME entity)"
    assert_nothing_extracted(folder, meta)
