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
