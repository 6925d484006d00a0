"""completion/popfetchd.bash, sourced in bash: what it offers for a few command lines."""
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "completion" / "popfetchd.bash"


def complete(line, cwd=None):
    """COMPREPLY for line (completing its last word; a trailing space: a new word)."""
    words = line.split(" ")
    program = ('source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); '
               '_popfetchd; printf "%s\\n" "${COMPREPLY[@]}"')
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", program, "bash", str(SCRIPT)] + words,
                       capture_output=True, text=True, cwd=cwd, check=True)
    assert r.stderr == ""
    return sorted(w for w in r.stdout.split("\n") if w)


@pytest.fixture
def confdir(tmp_path):
    conf = tmp_path / "conf" / "conf.d"
    conf.mkdir(parents=True)
    (conf / "invoices.yaml").write_text("# the invoices\nid: invoices\nserver: pop.example.org\n")
    (conf / "file-name.yml").write_text("id: 'orders'  # quoted\n")
    (conf / "noid.yaml").write_text("server: pop.example.org\n")
    (conf / "archive.yaml.example").write_text("id: archive\n")
    (conf / "nested.yaml").write_text("oauth2:\n  id: nope\nid: inbox\n")
    return tmp_path / "conf"


def test_commands_and_options():
    assert complete("popfetchd ") == sorted(
        ["run", "check", "test", "receive", "receive-all", "status", "import"])
    assert complete("popfetchd rec") == ["receive", "receive-all"]
    assert complete("popfetchd -v receive-all --a") == ["--all"]
    assert "--json" in complete("popfetchd check --")
    assert complete("popfetchd --ver") == ["--verbose", "--version"]


def test_ids_from_the_configuration_directory_given_with_c(confdir):
    ids = ["inbox", "invoices", "noid", "orders"]
    assert complete(f"popfetchd -c {confdir} receive ") == ids
    assert complete(f"popfetchd --config {confdir} test in") == ["inbox", "invoices"]
    assert complete(f"popfetchd receive-all -c {confdir} invoices ") == ids
    assert complete(f"popfetchd -c {confdir} -q status o") == ["orders"]
    # receive takes one ID
    assert complete(f"popfetchd -c {confdir} receive invoices ") == []
    assert complete(f"popfetchd receive -c {confdir} ") == ids
    # another directory, other ids
    assert complete(f"popfetchd -c {confdir}/none receive ") == []


def test_directory_after_c(confdir):
    assert complete(f"popfetchd -c {confdir}/co") == [f"{confdir}/conf.d"]


def test_import_kind_then_file_then_output_directory(tmp_path):
    (tmp_path / "mpoprc").write_text("account a\n")
    (tmp_path / "fetchmailrc").write_text("poll h user u\n")
    (tmp_path / "out").mkdir()
    assert complete("popfetchd import ") == ["fetchmailrc", "mpoprc"]
    assert complete("popfetchd -q import f") == ["fetchmailrc"]
    # then a file name, in the current directory or a path
    assert complete("popfetchd import mpoprc mp", cwd=tmp_path) == ["mpoprc"]
    assert complete(f"popfetchd import fetchmailrc {tmp_path}/f") == [f"{tmp_path}/fetchmailrc"]
    # one file only
    assert complete("popfetchd import mpoprc mpoprc ", cwd=tmp_path) == []
    # -o: a directory, before or after the words
    assert complete("popfetchd import mpoprc mpoprc -o ", cwd=tmp_path) == ["out"]
    assert complete(f"popfetchd import -o {tmp_path}/o") == [f"{tmp_path}/out"]
    assert complete("popfetchd import --output out ", cwd=tmp_path) == ["fetchmailrc", "mpoprc"]
    assert complete("popfetchd import -o out mpoprc f", cwd=tmp_path) == ["fetchmailrc"]
    assert complete("popfetchd import mpoprc mpoprc --o") == ["--output"]
