"""Secrets and permissions (DESIGN.md §1): a file holding an inline secret
that group or others can read is refused, as is a secret file others can
read — exit 78 from every command, naming the file, the key and the fix,
and the server is never contacted."""

import os

import pytest

EX_CONFIG = 78


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
@pytest.mark.parametrize("key,extra", [
    ("password", {}),
    ("oauth2.client_secret", {"auth": "oauth2"}),
    ("smime.key_password", {}),
])
def test_inline_secret_in_a_readable_file_is_refused(fake_pop3, fake_config, confdir,
                                                     run_popfetchd, key, extra, mode):
    server = fake_pop3([b"Subject: x\n\nbody\n"])
    config = fake_config(server, **extra)
    if key == "oauth2.client_secret":
        config["oauth2"] = {"token_endpoint": "https://127.0.0.1:1/token",
                            "client_id": "id", "client_secret": "inline-secret-42",
                            "scope": "s"}
        config.pop("password", None)
    elif key == "smime.key_password":
        config["smime"] = {"key_name": "k", "key_password": "inline-secret-42"}
    cd = confdir(config)
    path = cd.files["fake"]
    os.chmod(path, mode)
    for args in (["check"], ["receive-all", "fake"], ["test", "fake"]):
        res = run_popfetchd(args, confdir=cd)
        assert res.returncode == EX_CONFIG, res.describe()
        assert f"{path}:" in res.stderr or f"{path}:" in res.stdout, res.describe()
        assert "readable by group or others (chmod 600)" in res.stderr + res.stdout
    assert server.sessions == []


def test_main_file_with_inline_default_password(fake_pop3, fake_config, confdir,
                                                run_popfetchd):
    server = fake_pop3([])
    config = fake_config(server)
    config.pop("password")
    cd = confdir(config, daemon={"defaults": {"password": "inline-secret-43"}})
    os.chmod(cd.main, 0o644)
    res = run_popfetchd(["check"], confdir=cd)
    assert res.returncode == EX_CONFIG
    assert f"{cd.main}:" in res.stderr and "defaults.password" in res.stderr
    assert "chmod 600" in res.stderr


def test_secret_file_readable_by_others_is_refused(fake_pop3, fake_config, confdir,
                                                   run_popfetchd, tmp_path):
    server = fake_pop3([])
    secret = tmp_path / "pw"
    secret.write_text("file-secret-44\n")
    secret.chmod(0o604)
    config = fake_config(server, password=None, password_file=str(secret))
    cd = confdir(config)
    res = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_CONFIG
    assert f"{secret} is readable by others (chmod 600)" in res.stderr
    assert "file-secret-44" not in res.stderr
    # group-readable is fine for a secret file (a group of admins may share it)
    secret.chmod(0o640)
    assert run_popfetchd(["check"], confdir=cd).returncode == 0
    assert server.sessions == []


def test_private_file_is_accepted(fake_pop3, fake_config, confdir, run_popfetchd):
    server = fake_pop3([])
    cd = confdir(fake_config(server))
    os.chmod(cd.files["fake"], 0o600)
    assert run_popfetchd(["check"], confdir=cd).returncode == 0
