"""The man pages hold the code's keys, commands, options and exit codes, and render cleanly.

The keys come from config.c's key tables, the commands and long options from
main.c, the exit codes from the README's table: a key, command or code added
there and not to doc/*.scd fails here."""
import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("POPFETCHD_BUILD", ROOT / "build"))
PAGES = ["popfetchd.8", "popfetchd.yaml.5"]


def key_tables(source):
    """{table name: [(key, subtable or None)]} of config.c's `struct key NAME[]`."""
    tables = {}
    for m in re.finditer(r"static const struct key (\w+)\[\] = \{(.*?)\n\};", source, re.S):
        rows = re.findall(r'\{"([a-z0-9_]+)", (\w+), [^{}]*?(\w+)?\}', m.group(2))
        tables[m.group(1)] = [(key, sub if fn == "h_map" else None) for key, fn, sub in rows]
    return tables


def sections(scd):
    """{section title: its lines} of an scdoc source."""
    out, title = {}, None
    for line in scd.splitlines():
        if line.startswith("# "):
            title = line[2:].strip()
            out[title] = []
        elif title is not None:
            out[title].append(line)
    return out


def terms(lines, depth=0):
    """{term: the lines of its entry} for the definition-list entries at depth
    (tabs) of lines: an entry is a line starting with *bold* words, each a term."""
    out, current = {}, None
    for line in lines:
        indent = len(line) - len(line.lstrip("\t"))
        if line.strip() and indent <= depth:
            current = None
            if indent == depth and line.lstrip("\t").startswith("*"):
                current = []
                # the terms, not the bold values of "(type, default)" after them
                for word in re.findall(r"\*([^*\s]+)\*", line.split(" (", 1)[0]):
                    out.setdefault(word, current)
                continue
        if current is not None:
            current.append(line)
    return out


def missing_keys(tables, table, entries, depth, prefix=""):
    """The dotted keys of table that are not entries, recursing into mappings."""
    missing = []
    for key, sub in tables[table]:
        if key not in entries:
            missing.append(prefix + key)
        elif sub is not None:
            missing += missing_keys(tables, sub, terms(entries[key], depth + 1) |
                                    {w: [] for w in bold_words(entries[key])},
                                    depth + 1, prefix + key + ".")
    return missing


def bold_words(lines):
    return set(re.findall(r"\*([a-z0-9_]+)\*", "\n".join(lines)))


@pytest.fixture(scope="module")
def tables():
    t = key_tables((ROOT / "daemon/config.c").read_text())
    assert {"mailbox_keys", "daemon_keys", "oauth2_keys", "defaults_keys"} <= t.keys()
    assert ("oauth2", "oauth2_keys") in t["mailbox_keys"]
    return t


def test_every_configuration_key_is_in_popfetchd_yaml_5(tables):
    page = sections((ROOT / "doc/popfetchd.yaml.5.scd").read_text())
    missing = missing_keys(tables, "mailbox_keys",
                           terms(page["CONFIGURATION KEYS (conf.d/ID.yaml)"]), 0)
    missing += missing_keys(tables, "daemon_keys",
                            terms(page["DAEMON SETTINGS (popfetchd.yaml)"]), 0)
    assert missing == [], "keys of config.c not described in doc/popfetchd.yaml.5.scd"
    for title in ["FOLDERS", "META.JSON", "STATUS.JSON"]:
        assert title in page


def test_every_command_option_and_exit_code_is_in_popfetchd_8():
    main = (ROOT / "daemon/main.c").read_text()
    table = re.search(r"\} commands\[\] = \{(.*?)\n\};", main, re.S).group(1)
    commands = re.findall(r'\{"([a-z-]+)",', table)
    longopts = re.search(r"longopts\[\] = \{(.*?)\};", main, re.S).group(1)
    options = ["--" + o for o in re.findall(r'\{"([a-z-]+)",', longopts)]
    readme = (ROOT / "README.md").read_text()
    codes = re.findall(r"^\| (\d+) \|", readme.split("### Exit codes", 1)[1].split("\n#", 1)[0],
                       re.M)
    assert len(commands) >= 6 and "--json" in options and {"0", "64", "78"} <= set(codes)

    page = sections((ROOT / "doc/popfetchd.8.scd").read_text())
    assert [c for c in commands if c not in terms(page["COMMANDS"])] == []
    assert [o for o in options + ["-c", "-v", "-q"] if o not in terms(page["OPTIONS"])] == []
    assert [c for c in codes if c not in terms(page["EXIT STATUS"])] == []
    assert {"SIGHUP", "SIGTERM", "SIGINT"} <= terms(page["SIGNALS"]).keys()
    env = terms(page["ENVIRONMENT"])
    for name in re.findall(r'getenv\("([A-Z_]+)"\)', "".join(
            p.read_text() for p in (ROOT / "daemon").glob("*.c"))):
        assert name == "TMPDIR" or name in env, name


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_without_warnings(page):
    path = BUILD / "doc" / page
    assert path.is_file(), f"{path}: not built (scdoc missing? run scripts/build)"
    man = subprocess.run(["man", "-l", "--warnings", str(path)], capture_output=True,
                         text=True, env=dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="0"))
    assert man.returncode == 0 and man.stderr == "", man.stderr
    text = re.sub(r".\x08", "", man.stdout)  # no overstrike: plain text
    assert "NAME" in text and "SEE ALSO" in text
    groff = subprocess.run(["groff", "-man", "-ww", "-Tutf8", "-z", str(path)],
                           capture_output=True, text=True)
    assert groff.returncode == 0 and groff.stderr == "", groff.stderr
