"""popfetchd import mpoprc|fetchmailrc: real-world-shaped files become
configurations that pass popfetchd check; secrets go to 0600 files, and every
setting without a counterpart is reported with its file and line."""
import os
import stat
import textwrap

MPOPRC = textwrap.dedent("""\
    # mpop configuration
    defaults
    tls on
    tls_starttls on
    keep off

    account work
    host pop.work.example
    user "john doe"
    password "se\\"cret # kept"
    auth scram-sha-1
    delivery mda "/usr/bin/procmail -f '%F'"

    account gmail : work
    host pop.gmail.com
    port 995
    tls_starttls off
    user john@gmail.com
    password gm
    keep on
    tls_certcheck off

    account eval : work
    passwordeval "pass show mail"

    account default : work
    """)

FETCHMAILRC = textwrap.dedent("""\
    # fetchmail
    set daemon 300
    set postmaster "root"
    defaults proto pop3 keep

    poll pop.example.org with proto POP3 port 995
      user 'alice' there with password 'p#ss w\\'d' is alice here
      options ssl sslcertck fetchall
      mda "/usr/bin/procmail -d %T"

    poll mail.example.net proto pop3 auth cram-md5:
      user "bob" password "b0b" is bob here, nokeep;

    poll imap.example.com protocol imap user dave password x ssl
    """)


def import_to(run_popfetchd, tmp_path, kind, text):
    rc = tmp_path / kind
    rc.write_text(text)
    confdir = tmp_path / "cfg"
    (confdir / "conf.d").mkdir(parents=True, exist_ok=True)
    (confdir / "popfetchd.yaml").write_text(f"state_directory: {tmp_path / 'state'}\n")
    r = run_popfetchd(["import", kind, str(rc), "-o", str(confdir / "conf.d")])
    return rc, confdir, r


def test_mpoprc_to_checked_configurations(run_popfetchd, tmp_path):
    rc, confdir, r = import_to(run_popfetchd, tmp_path, "mpoprc", MPOPRC)
    assert r.returncode == 0, r.stderr
    d = confdir / "conf.d"
    assert sorted(p.name for p in d.iterdir()) == [
        "eval.yaml", "gmail.password", "gmail.yaml", "work.password", "work.yaml"]
    assert (d / "work.password").read_text() == 'se"cret # kept'
    assert stat.S_IMODE(os.stat(d / "work.password").st_mode) == 0o600
    assert f"{rc}:12: delivery has no popfetchd counterpart" in r.stderr
    assert f"{rc}:24: passwordeval cannot be carried over" in r.stderr
    assert f"{rc}:26: account default only names another account" in r.stderr
    work = (d / "work.yaml").read_text()
    assert "tls: explicit" in work and "sasl_mechanisms: [SCRAM-SHA-1]" in work
    assert "remove_after_read: true" in work and "se\"cret" not in work
    gmail = (d / "gmail.yaml").read_text()
    assert "tls: implicit" in gmail and "tls_verify: false" in gmail
    assert "remove_after_read: false" in gmail
    # eval has no password yet: check says so; with it, everything passes
    r = run_popfetchd(["-c", str(confdir), "check"])
    assert r.returncode != 0 and "eval.password" in r.stderr
    (d / "eval.password").write_text("x")
    os.chmod(d / "eval.password", 0o600)
    r = run_popfetchd(["-c", str(confdir), "check"])
    assert r.returncode == 0, r.stderr
    assert "pop.gmail.com:995" in r.stdout and "pop.work.example:110" in r.stdout


def test_fetchmailrc_to_checked_configurations(run_popfetchd, tmp_path):
    rc, confdir, r = import_to(run_popfetchd, tmp_path, "fetchmailrc", FETCHMAILRC)
    assert r.returncode == 0, r.stderr
    d = confdir / "conf.d"
    assert (d / "alice-pop.example.org.password").read_text() == "p#ss w'd"
    alice = (d / "alice-pop.example.org.yaml").read_text()
    assert "tls: implicit" in alice and "remove_after_read: false" in alice
    assert "poll_interval: 300s" in alice
    bob = (d / "bob-mail.example.net.yaml").read_text()
    assert "tls: explicit" in bob and "sasl_mechanisms: [CRAM-MD5]" in bob
    assert "remove_after_read: true" in bob
    assert not list(d.glob("dave*"))
    for line, what in [(3, "set postmaster"), (7, "is: delivery"), (8, "fetchall"),
                       (9, "mda has no popfetchd counterpart"), (14, "protocol imap")]:
        assert f"{rc}:{line}: {what}" in r.stderr
    r = run_popfetchd(["-c", str(confdir), "check"])
    assert r.returncode == 0, r.stderr


def test_printed_without_output_dir_and_no_secret(run_popfetchd, tmp_path):
    rc = tmp_path / "mpoprc"
    rc.write_text(MPOPRC)
    r = run_popfetchd(["import", "mpoprc", str(rc)])
    assert r.returncode == 0
    assert "# ---- conf.d/work.yaml ----" in r.stdout
    assert 'password_file: "/etc/popfetchd/secrets/work.password"' in r.stdout
    assert "se\\\"cret" not in r.stdout and "se\"cret" not in r.stdout + r.stderr
    assert "the password of work is not printed" in r.stderr


def test_refuses_to_overwrite(run_popfetchd, tmp_path):
    rc, confdir, r = import_to(run_popfetchd, tmp_path, "mpoprc", MPOPRC)
    assert r.returncode == 0
    before = (confdir / "conf.d" / "work.yaml").read_text()
    r = run_popfetchd(["import", "mpoprc", str(rc), "-o", str(confdir / "conf.d")])
    assert r.returncode == 73 and "exists: not overwritten" in r.stderr
    assert (confdir / "conf.d" / "work.yaml").read_text() == before


def test_usage_and_no_pop3(run_popfetchd, tmp_path):
    rc = tmp_path / "rc"
    rc.write_text("poll imap.example.com protocol imap user u\n")
    assert run_popfetchd(["import", "fetchmailrc", str(rc)]).returncode == 65
    assert run_popfetchd(["import", "getmailrc", str(rc)]).returncode == 64
    assert run_popfetchd(["import", "mpoprc"]).returncode == 64
    assert run_popfetchd(["import", "mpoprc", str(tmp_path / "none")]).returncode == 66
    # an unreadable file leaves no output directory behind
    out = tmp_path / "out"
    r = run_popfetchd(["import", "mpoprc", str(tmp_path / "none"), "-o", str(out)])
    assert r.returncode == 66 and not out.exists()


FINGERPRINT = ":".join(["AB"] * 32)

# More of what real files hold: every line either maps to a key (MAPPED) or is
# reported with its line number.
MPOPRC_MORE = textwrap.dedent(f"""\
    # ~/.mpoprc of a laptop
    defaults
    timeout 20
    skipsize 25m
    uidls_file ~/.mpop_uidls/%U_at_%H
    only_new on
    tls_trust_file CA_FILE

    account personal
    host "pop.personal.example"
    user me\\ too
    password 'single quotes are kept'
    auth on
    tls_fingerprint {FINGERPRINT}
    killsize 50m
    delivery maildir ~/Mail/inbox
    eval echo host other.example

    account pinned : personal
    tls_trust_file system
    tls_certcheck off
    include ~/.mpoprc.d/more
    auth gssapi

    account plain
    host 192.0.2.1
    tls off
    user u
    passwordeval "gpg -d ~/.pw.gpg"
    auth user
    """)
MPOP_MAPPED = {"defaults", "timeout", "skipsize", "only_new", "tls_trust_file", "account",
               "host", "user", "password", "auth", "tls_fingerprint", "tls_certcheck", "tls"}

FETCHMAILRC_MORE = textwrap.dedent("""\
    set daemon 600
    set logfile ~/.fetchmail.log
    set no bouncemail
    defaults protocol pop3 ssl sslcertck timeout 30
      limit 1000000

    # two users on one server, one of them kept
    poll "pop.shared.example" service 995
      user "ann" password "a'nn" keep
      user 'ben' pass 'b\\"en' nokeep fetchall flush
      sslcertfile CA_FILE
      smtphost localhost

    skip old.example proto apop user carl password c
      no sslcertck sslproto TLS1.2+

    poll plain.example proto pop3 port 110 user dora password d sslproto ''
      fetchlimit 10
    """)
FETCHMAIL_MAPPED = {"set daemon", "defaults", "poll", "skip", "user", "keep", "nokeep",
                    "service", "password", "pass", "sslcertfile", "proto", "protocol", "port",
                    "ssl", "sslcertck", "timeout", "limit"}


def unreported(rc, stderr, text, mapped, first_words):
    """Lines of text holding something not in mapped and not reported."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        words = set(first_words(line))
        if line.strip() and not line.lstrip().startswith("#") and not words <= mapped \
                and f"{rc}:{n}:" not in stderr:
            out.append((n, line))
    return out


def test_mpoprc_every_setting_mapped_or_reported(run_popfetchd, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not read by check\n")
    rc, confdir, r = import_to(run_popfetchd, tmp_path, "mpoprc",
                               MPOPRC_MORE.replace("CA_FILE", str(ca)))
    assert r.returncode == 0, r.stderr
    assert unreported(rc, r.stderr, MPOPRC_MORE, MPOP_MAPPED, lambda l: l.split()[:1]) == []
    for line, what in [(5, "uidls_file has no popfetchd counterpart"),
                       (15, "killsize has no popfetchd counterpart"),
                       (16, "delivery has no popfetchd counterpart"),
                       (17, "eval cannot be carried over"),
                       (22, "include has no popfetchd counterpart"),
                       (23, "auth gssapi has no popfetchd counterpart"),
                       (29, "passwordeval cannot be carried over")]:
        assert f"{rc}:{line}: {what}" in r.stderr
    d = confdir / "conf.d"
    personal = (d / "personal.yaml").read_text()
    assert 'server: "pop.personal.example"' in personal and 'user: "me too"' in personal
    assert "tls: explicit" in personal and "sasl_mechanisms" not in personal
    assert f"tls_ca_file: \"{ca}\"" in personal
    assert "tls_fingerprint: sha256:" + "AB" * 32 in personal
    assert "max_message_size: 26214400" in personal
    assert "timeouts:\n  connect: 20s\n  command: 20s\n" in personal
    assert (d / "personal.password").read_text() == "'single quotes are kept'"
    pinned = (d / "pinned.yaml").read_text()
    assert "tls_ca_file" not in pinned and "tls_verify: false" in pinned
    assert "tls_fingerprint: sha256:" in pinned
    plain = (d / "plain.yaml").read_text()
    assert "tls: none" in plain and "sasl_mechanisms: [USER]" in plain
    assert not (d / "plain.password").exists()
    (d / "plain.password").write_text("x")
    os.chmod(d / "plain.password", 0o600)
    r = run_popfetchd(["-c", str(confdir), "check"])
    assert r.returncode == 0, r.stderr
    assert sorted(l.split()[0] for l in r.stdout.splitlines()) == ["personal", "pinned", "plain"]


def test_fetchmailrc_every_setting_mapped_or_reported(run_popfetchd, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not read by check\n")
    rc, confdir, r = import_to(run_popfetchd, tmp_path, "fetchmailrc",
                               FETCHMAILRC_MORE.replace("CA_FILE", str(ca)))
    assert r.returncode == 0, r.stderr

    def keywords(line):
        words = [w.strip("\"',;:") for w in line.split()]
        if words[:2] == ["set", "daemon"]:
            return ["set daemon"]
        # the keywords, not their values
        return [w for w in words if w.isalpha() and w.islower() and len(w) > 3
                and w not in {"localhost", "sslproto"}] + \
               (["sslproto"] if "sslproto" in words else [])
    assert unreported(rc, r.stderr, FETCHMAILRC_MORE, FETCHMAIL_MAPPED, keywords) == []
    for line, what in [(2, "set logfile"), (3, "set no bouncemail"),
                       (10, "fetchall has no popfetchd counterpart"),
                       (10, "flush has no popfetchd counterpart"),
                       (12, "smtphost has no popfetchd counterpart"),
                       (14, "skip: imported with status: inactive"),
                       (15, "no sslcertck: imported as tls_verify: false"),
                       (15, "sslproto \"TLS1.2+\" has no popfetchd counterpart"),
                       (17, "sslproto \"\" beside ssl: ssl is kept"),
                       (18, "fetchlimit has no popfetchd counterpart")]:
        assert f"{rc}:{line}: {what}" in r.stderr
    d = confdir / "conf.d"
    ann = (d / "ann-pop.shared.example.yaml").read_text()
    # options after a user are that user's (fetchmail's user options)
    assert "tls: implicit\nport: 995\n" in ann and "tls_ca_file" not in ann
    assert "remove_after_read: false" in ann and "poll_interval: 600s" in ann
    assert "max_message_size: 1000000" in ann and "connect: 30s" in ann
    assert (d / "ann-pop.shared.example.password").read_text() == "a'nn"
    ben = (d / "ben-pop.shared.example.yaml").read_text()
    assert "remove_after_read: true" in ben and f'tls_ca_file: "{ca}"' in ben
    assert (d / "ben-pop.shared.example.password").read_text() == 'b"en'
    carl = (d / "carl-old.example.yaml").read_text()
    assert "status: inactive" in carl and "tls_verify: false" in carl
    assert "sasl_mechanisms: [APOP]" in carl
    dora = (d / "dora-plain.example.yaml").read_text()
    assert "tls: implicit\nport: 110\n" in dora
    r = run_popfetchd(["-c", str(confdir), "check"])
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 4


def test_output_goes_with_import_only(run_popfetchd, tmp_path):
    out = tmp_path / "out"
    for args in [["check"], ["status"], ["receive", "x"], ["test", "x"],
                 ["receive-all", "--all"], [], ["run"]]:
        r = run_popfetchd(["-c", str(tmp_path), *args, "-o", str(out)])
        assert r.returncode == 64, (args, r.stderr)
        assert "-o/--output goes with import" in r.stderr
        r = run_popfetchd(["--output=" + str(out), "-c", str(tmp_path), *args])
        assert r.returncode == 64, (args, r.stderr)
    assert not out.exists()
    rc = tmp_path / "mpoprc"
    rc.write_text(MPOPRC)
    r = run_popfetchd(["--json", "import", "mpoprc", str(rc)])
    assert r.returncode == 64 and "--json does not go with it" in r.stderr
