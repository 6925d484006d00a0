#!/usr/bin/env python3
"""Deterministic, realistic RFC 5322 messages for popfetchd's tests and benchmarks.

Messages use LF line endings, as an MTA stores them in a Maildir (Dovecot
sends them with CRLF over POP3; `to_crlf` gives the bytes a POP3 client
receives). The mix, chosen per block of five messages so that any five
consecutive messages cover every kind:

  plain-ascii   text/plain; us-ascii, 7bit
  plain-8bit    text/plain; utf-8, 8bit
  plain-qp      text/plain; utf-8, quoted-printable
  alternative   multipart/alternative: text/plain + text/html
  mixed         multipart/mixed: text + 1-3 base64 attachments (plain,
                RFC 2231 and RFC 2047 encoded file names)

About half of the Subjects and the non-ASCII From/Cc display names are
RFC 2047 encoded (B and Q, UTF-8 and ISO-8859-1, adjacent encoded words
split across a folded line, encoded words between plain words). Some text
lines start with "." or ".." (dot-stuffing). Sizes are lognormal around
the requested mean.

API:
    generate(count, mean_size, seed)          -> [bytes]
    generate_messages(count, mean_size, seed) -> [Message]  (bytes + ground truth)
    expected_subject(data) -> str             the decoded Subject of a message
    expected_headers(data) -> dict            message_id, date, from, to, cc, subject
    dot_message(seed)      -> bytes           a message full of dot-stuffing edge cases
    to_crlf(data)          -> bytes

CLI (fills a Maildir, e.g. for the demo and the benchmark):
    python3 tests/tools/mailgen.py --count N --size 16k --seed 1 \\
        --maildir DIR/mail/user1 [--owner nobody] [--fresh]
"""

import argparse
import base64
import dataclasses
import datetime
import email.parser
import email.policy
import email.utils
import math
import os
import pwd
import quopri
import random
import shutil
import sys
import urllib.parse

KINDS = ("plain-ascii", "plain-8bit", "plain-qp", "alternative", "mixed")
MIN_SIZE = 600

WORDS = ("the of and to in is that for it as was with be by on not he this are or "
         "his from at which but have an they you were her she there been one all "
         "would their we him when who will more no if out so said what up its about "
         "into than them can only other new some could time these two may then do "
         "first any my now such like our over even most made after also did many "
         "before must through back years where much your way well down should "
         "because each just those people how too little state good very make world "
         "invoice meeting quarterly report budget deadline project review schedule "
         "attached please regards thanks customer delivery server backup release").split()
UNI_WORDS = ["Grüße", "Übersicht", "café", "naïve", "Straße", "résumé", "Łódź", "Ærø",
             "smörgåsbord", "jalapeño", "façade", "€100", "coöperate", "日本語", "Ελλάδα"]
LATIN1_WORDS = ["café", "naïve", "Grüße", "Übersicht", "résumé", "façade", "jalapeño"]
PEOPLE = [("Alice Example", "alice@example.org"), ("Bob Müller", "bob@example.net"),
          ("Ng, Carol", "carol@mail.example.com"), ("Dariusz Łukasz", "dl@example.pl"),
          ("Eve Newsletter", "news@lists.example.org"), ("François Hébert", "fh@example.fr"),
          ("", "noreply@service.example.com"), ("山田 太郎", "yamada@example.jp")]
FILENAMES = ["report-Q3.pdf", "scan_0042.pdf", "photo.png", "diagram.png", "invoice 2024-117.pdf"]
UNI_FILENAMES = ["Übersicht März.pdf", "résumé final.pdf", "Straßenplan.png", "写真.png",
                 "Ελληνικά έγγραφα με πολύ μακρύ όνομα αρχείου για συνέχεια.pdf"]
DOT_LINES = [".", "..", ". leading dot", "...and so on", ".hidden", "..two"]
TIMEZONES = [0, 60, 120, -300, -420, 330, 540]


@dataclasses.dataclass
class Attachment:
    name: str            # the decoded original file name
    content_type: str
    data: bytes


@dataclasses.dataclass
class Message:
    """A generated message and what a correct decoder should find in it."""
    data: bytes                      # the message, LF line endings
    kind: str
    subject: str                     # decoded
    from_name: str                   # decoded display name ("" if none)
    from_addr: str
    to: list                         # [(name, addr)]
    cc: list                         # [(name, addr)]
    message_id: str                  # with the angle brackets
    date: str                        # the Date header as written
    text_plain: str = None           # decoded text/plain body, if any
    text_html: str = None            # decoded text/html body, if any
    attachments: list = dataclasses.field(default_factory=list)
    dot_lines: bool = False          # has lines starting with "."


# --------------------------------------------------------------------------
# encodings


def to_crlf(data):
    """LF (or mixed) line endings -> CRLF, as POP3 delivers a Maildir message."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def parse_size(text):
    """'16k' -> 16384, '1m' -> 1048576, '500' -> 500."""
    text = str(text).strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(text[-1:], 1)
    return int(float(text.rstrip("km")) * mult)


def enc_b(text, charset="UTF-8"):
    """RFC 2047 B encoded word."""
    return f"=?{charset}?B?{base64.b64encode(text.encode(charset)).decode()}?="


def enc_q(text, charset="UTF-8"):
    """RFC 2047 Q encoded word (for a header, '_' is a space)."""
    out = []
    for byte in text.encode(charset):
        c = chr(byte)
        if c == " ":
            out.append("_")
        elif c.isascii() and (c.isalnum() or c in "!*+-/"):
            out.append(c)
        else:
            out.append(f"={byte:02X}")
    return f"=?{charset}?Q?{''.join(out)}?="


def enc_2231(text):
    """RFC 2231 extended parameter value (charset''percent-encoded)."""
    return "UTF-8''" + urllib.parse.quote(text.encode(), safe="")


def split_2231(value, width):
    """Split an RFC 2231 value into continuation chunks, never inside a %XX."""
    tokens, k = [], 0
    while k < len(value):
        step = 3 if value[k] == "%" else 1
        tokens.append(value[k:k + step])
        k += step
    chunks = [""]
    for t in tokens:
        if len(chunks[-1]) + len(t) > width:
            chunks.append("")
        chunks[-1] += t
    return chunks


def format_address(name, addr, rng):
    """An address with its display name quoted or RFC 2047 encoded as needed."""
    if not name:
        return addr if rng.random() < 0.5 else f"<{addr}>"
    if name.isascii():
        if any(c in name for c in ',.;:"()<>@[]'):
            return f'"{name}" <{addr}>'
        return f"{name} <{addr}>"
    try:
        name.encode("iso-8859-1")
        latin1 = True
    except UnicodeEncodeError:
        latin1 = False
    if latin1 and rng.random() < 0.5:
        return f"{enc_q(name, 'ISO-8859-1')} <{addr}>"
    return f"{enc_b(name)} <{addr}>"


def fold(value, width=72):
    """Fold a header value at spaces (the space stays, after the LF)."""
    lines, line = [], ""
    for word in value.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\n ".join(lines)


# --------------------------------------------------------------------------
# the generator


class _Gen:
    """Builds one message from a seeded random generator."""

    def __init__(self, seed, index):
        self.seed, self.index = seed, index
        self.r = random.Random(f"mailgen/{seed}/{index}")

    # -- text ----------------------------------------------------------------

    def sentence(self, unicode_ok):
        r = self.r
        words = [r.choice(WORDS) for _ in range(r.randint(5, 16))]
        if unicode_ok and r.random() < 0.3:
            words[r.randrange(len(words))] = r.choice(UNI_WORDS)
        return " ".join(words).capitalize() + r.choice(".....?!")

    def text(self, nbytes, unicode_ok, dot_lines):
        """Paragraphs wrapped at 72 columns, about nbytes long (UTF-8)."""
        r, paras, size = self.r, [], 0
        while size < nbytes or not paras:
            lines, line = [], ""
            for _ in range(r.randint(2, 6)):
                for w in self.sentence(unicode_ok).split():
                    if line and len(line) + 1 + len(w) > 72:
                        lines.append(line)
                        line = w
                    else:
                        line = f"{line} {w}" if line else w
            lines.append(line)
            if dot_lines and r.random() < 0.3:
                lines.insert(r.randrange(len(lines) + 1), r.choice(DOT_LINES))
            para = "\n".join(lines)
            paras.append(para)
            size += len(para.encode()) + 2
        if dot_lines:  # at least one, at the start of a paragraph
            paras.insert(r.randrange(len(paras) + 1), r.choice(DOT_LINES[:2]))
        if unicode_ok and all(p.isascii() for p in paras):
            paras.append(f"{r.choice(UNI_WORDS)} {r.choice(WORDS)}.")
        return "\n\n".join(paras) + "\n"

    # -- headers -------------------------------------------------------------

    def subject(self):
        """(header value as written, decoded subject)."""
        r = self.r
        words = [r.choice(WORDS) for _ in range(r.randint(3, 14))]
        plain = " ".join(words).capitalize()
        style = r.choice(["plain", "plain", "plain-long", "b", "q", "re-mixed",
                          "split", "latin1"])
        if style == "plain":
            return plain, plain
        if style == "plain-long":
            text = plain + " " + " ".join(r.choice(WORDS) for _ in range(14))
            return fold("Subject: " + text)[len("Subject: "):], text
        uni = f"{plain} {r.choice(UNI_WORDS)}"
        if style == "b":
            return enc_b(uni), uni
        if style == "q":
            return enc_q(uni), uni
        if style == "re-mixed":
            word = r.choice(UNI_WORDS)
            return f"Re: {enc_q(word)} {plain}", f"Re: {word} {plain}"
        if style == "split":  # adjacent encoded words: the space between vanishes
            head, tail = uni[: len(uni) // 2], uni[len(uni) // 2:]
            return f"{enc_b(head)}\n {enc_b(tail)}", uni
        word = r.choice(LATIN1_WORDS)
        text = f"{word} {plain}"
        return enc_q(text, "ISO-8859-1"), text

    def headers(self, kind, ctype, cte=None):
        """The header block; returns (text, ground truth dict)."""
        r, i = self.r, self.index
        from_name, from_addr = r.choice(PEOPLE)
        to = [("", f"user{r.randint(1, 4)}@example.test")]
        if r.random() < 0.3:
            to.append(r.choice(PEOPLE[:4]))
        cc = r.sample(PEOPLE, r.randint(1, 2)) if r.random() < 0.4 else []
        subj_raw, subject = self.subject()
        tz = datetime.timezone(datetime.timedelta(minutes=r.choice(TIMEZONES)))
        when = datetime.datetime.fromtimestamp(1700000000 + i * 37 + r.randint(0, 30), tz)
        date = email.utils.format_datetime(when)
        mid = f"<mailgen.{self.seed}.{i}.{r.getrandbits(48):012x}@example.net>"
        relay = f"mx{r.randint(1, 9)}.example.net"
        h = [f"Return-Path: <{from_addr}>",
             f"Received: from {relay} ({relay} [192.0.2.{r.randint(1, 254)}])\n"
             f"\tby mail.example.test (Postfix) with ESMTPS id {r.getrandbits(40):010X}\n"
             f"\tfor <{to[0][1]}>; {date}",
             f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.net; s=s1;\n"
             f"\th=from:to:subject:date:message-id;\n"
             f"\tbh={base64.b64encode(r.randbytes(32)).decode()};\n"
             f"\tb={base64.b64encode(r.randbytes(96)).decode()}",
             f"Date: {date}",
             f"From: {format_address(from_name, from_addr, r)}",
             "To: " + ", ".join(format_address(n, a, r) for n, a in to)]
        if cc:
            h.append(fold("Cc: " + ", ".join(format_address(n, a, r) for n, a in cc)))
        h += [f"Subject: {subj_raw}",
              f"Message-ID: {mid}",
              "MIME-Version: 1.0",
              f"X-Mailgen: seed={self.seed} index={i} kind={kind}",
              f"Content-Type: {ctype}"]
        if cte:
            h.append(f"Content-Transfer-Encoding: {cte}")
        truth = dict(subject=subject, from_name=from_name, from_addr=from_addr,
                     to=to, cc=cc, message_id=mid, date=date)
        return "\n".join(h) + "\n", truth

    # -- bodies --------------------------------------------------------------

    def boundary(self):
        return f"=_mailgen_{self.r.getrandbits(64):016x}"

    def text_part(self, nbytes, dot_lines):
        """A text/plain MIME part (7bit if ASCII, else quoted-printable)."""
        unicode_ok = self.r.random() < 0.5
        body = self.text(nbytes, unicode_ok, dot_lines)
        if body.isascii():
            head = "Content-Type: text/plain; charset=us-ascii\nContent-Transfer-Encoding: 7bit\n"
            return head + "\n" + body, body
        qp = quopri.encodestring(body.encode()).decode()
        head = "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n"
        return head + "\n" + qp, body

    def html_part(self, nbytes):
        paras = self.text(nbytes * 3 // 4, True, False).strip().split("\n\n")
        html = ("<html><head><meta charset=\"utf-8\"></head><body>\n"
                + "\n".join(f"<p>{p}</p>" for p in paras) + "\n</body></html>\n")
        qp = quopri.encodestring(html.encode()).decode()
        head = "Content-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n"
        return head + "\n" + qp, html

    def attachment(self, nraw):
        """A base64 attachment part; returns (part text, Attachment)."""
        r = self.r
        style = r.choice(["ascii", "ascii", "2231", "2231-cont", "2047"])
        name = r.choice(FILENAMES if style == "ascii" else UNI_FILENAMES)
        png = name.endswith(".png")
        magic = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" if png else b"%PDF-1.5\n%\xe2\xe3\xcf\xd3\n"
        data = magic + r.randbytes(max(0, nraw - len(magic)))
        ctype = "image/png" if png else "application/pdf"
        if style == "ascii":
            ct, cd = f'{ctype}; name="{name}"', f'attachment; filename="{name}"'
        elif style == "2231":
            ct, cd = f"{ctype}; name*={enc_2231(name)}", f"attachment;\n\tfilename*={enc_2231(name)}"
        elif style == "2231-cont":  # RFC 2231 continuations
            chunks = split_2231(enc_2231(name), 40)
            params = ";\n".join(f"\tfilename*{n}*={c}" for n, c in enumerate(chunks))
            ct, cd = ctype, f"attachment;\n{params}"
        else:  # RFC 2047 inside a quoted parameter: non-standard, very common
            ct, cd = f'{ctype}; name="{enc_b(name)}"', f'attachment; filename="{enc_b(name)}"'
        b64 = base64.encodebytes(data).decode()
        part = (f"Content-Type: {ct}\nContent-Transfer-Encoding: base64\n"
                f"Content-Disposition: {cd}\n\n{b64}")
        return part, Attachment(name, ctype, data)

    def multipart(self, subtype, parts):
        b = self.boundary()
        body = "This is a multi-part message in MIME format.\n\n"
        body += "".join(f"--{b}\n{p}\n" for p in parts) + f"--{b}--\n"
        return f'multipart/{subtype};\n\tboundary="{b}"', body

    def message(self, kind, target, dot_lines):
        """Build the message of the given kind, about `target` bytes."""
        r = self.r
        extra = {}
        if kind.startswith("plain"):
            unicode_ok = kind != "plain-ascii"
            charset = "us-ascii" if kind == "plain-ascii" else "utf-8"
            cte = {"plain-ascii": "7bit", "plain-8bit": "8bit", "plain-qp": "quoted-printable"}[kind]
            ctype = f"text/plain; charset={charset}" + ("; format=flowed" if r.random() < 0.3 else "")
            head, truth = self.headers(kind, ctype, cte)
            text = self.text(max(64, target - len(head)), unicode_ok, dot_lines)
            body = quopri.encodestring(text.encode()).decode() if kind == "plain-qp" else text
            extra["text_plain"] = text
        elif kind == "alternative":
            n = max(64, target - 1500)
            (tp, text), (hp, html) = self.text_part(n * 2 // 5, dot_lines), self.html_part(n * 3 // 5)
            ctype, body = self.multipart("alternative", [tp, hp])
            head, truth = self.headers(kind, ctype)
            extra.update(text_plain=text, text_html=html)
        else:
            n = max(256, target - 1500)
            natt = r.randint(1, 3)
            tlen = min(n // 5, r.randint(200, 3000))
            raw = max(16, (n - tlen - 250 * natt) * 3 // 4 * 76 // 77)
            cuts = sorted(r.random() for _ in range(natt - 1))
            shares = [b - a for a, b in zip([0] + cuts, cuts + [1])]
            tp, text = self.text_part(tlen, dot_lines)
            atts = [self.attachment(max(16, int(raw * s))) for s in shares]
            ctype, body = self.multipart("mixed", [tp] + [p for p, _ in atts])
            head, truth = self.headers(kind, ctype)
            extra.update(text_plain=text, attachments=[a for _, a in atts])
        data = (head + "\n" + body).encode()
        return Message(data=data, kind=kind, dot_lines=dot_lines, **truth, **extra)


def _sizes(count, mean_size, seed):
    """Lognormal sizes (sigma 0.6) rescaled so that their mean is mean_size."""
    r = random.Random(f"mailgen-sizes/{seed}")
    raw = [math.exp(r.gauss(0, 0.6)) for _ in range(count)]
    k = mean_size * count / sum(raw) if raw else 0
    return [max(MIN_SIZE, int(x * k)) for x in raw]


def _kinds(count, seed):
    """Kinds in shuffled blocks of five, so that every five cover all kinds."""
    r = random.Random(f"mailgen-kinds/{seed}")
    out = []
    while len(out) < count:
        block = list(KINDS)
        r.shuffle(block)
        out += block
    return out[:count]


def generate_messages(count, mean_size=8192, seed=1, dot_lines=0.4):
    """`count` Message objects (bytes + ground truth); same arguments, same bytes.

    dot_lines: the share of messages whose text has lines starting with "."
    (messages over 128 KiB are always multipart/mixed).
    """
    sizes, kinds = _sizes(count, mean_size, seed), _kinds(count, seed)
    out = []
    for i in range(count):
        g = _Gen(seed, i)
        kind = "mixed" if sizes[i] > 128 * 1024 else kinds[i]
        out.append(g.message(kind, sizes[i], g.r.random() < dot_lines))
    return out


def generate(count, mean_size=8192, seed=1):
    """`count` deterministic messages (bytes, LF line endings)."""
    return [m.data for m in generate_messages(count, mean_size, seed)]


def dot_message(seed=0):
    """A text/plain message full of dot-stuffing edge cases: lines ".", "..",
    "...", ".x", "..x"; the body starts with a dot line and ends with "."."""
    lines = [".", "..", "...", ".x", "..x", ". space", "a . not at start",
             ".", "", ".", "..", ".end of paragraph"]
    r = random.Random(f"mailgen-dot/{seed}")
    body = [".first line of the body"]
    for _ in range(20):
        body.append(r.choice(lines))
        body.append(" ".join(r.choice(WORDS) for _ in range(r.randint(3, 10))))
    body += ["..", "."]  # the body ends with a line holding a single dot
    head = (f"From: Dot Tester <dots@example.org>\n"
            f"To: user1@example.test\n"
            f"Subject: dot-stuffing {seed}\n"
            f"Date: Tue, 14 Nov 2023 22:13:20 +0000\n"
            f"Message-ID: <dots.{seed}@example.org>\n"
            f"MIME-Version: 1.0\n"
            f"Content-Type: text/plain; charset=us-ascii\n")
    return (head + "\n" + "\n".join(body) + "\n").encode()


# --------------------------------------------------------------------------
# expectations


def _parse_headers(data):
    return email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(data)


def expected_subject(data):
    """The Subject of a message decoded to a str (RFC 2047, unfolded)."""
    value = _parse_headers(data)["subject"]
    return "" if value is None else str(value)


def expected_headers(data):
    """message_id, date, from, to, cc, subject as decoded str (None if absent).
    from/to/cc are also given as lists of (display name, address) under
    from_addresses / to_addresses / cc_addresses."""
    msg = _parse_headers(data)
    out = {}
    for key, header in (("message_id", "message-id"), ("date", "date"),
                        ("from", "from"), ("to", "to"), ("cc", "cc"),
                        ("subject", "subject")):
        value = msg[header]
        out[key] = None if value is None else str(value)
    for key in ("from", "to", "cc"):
        value = msg[key]
        out[f"{key}_addresses"] = ([] if value is None else
                                   [(a.display_name, a.addr_spec) for a in value.addresses])
    return out


# --------------------------------------------------------------------------
# command line


def _owner_ids(owner, maildir):
    """uid, gid for --owner (name or number), or the Maildir's owner, or -1."""
    if owner:
        pw = pwd.getpwuid(int(owner)) if owner.isdigit() else pwd.getpwnam(owner)
        return pw.pw_uid, pw.pw_gid
    if os.geteuid() == 0 and os.path.isdir(maildir):
        st = os.stat(maildir)
        return st.st_uid, st.st_gid
    return -1, -1


def _empty_maildir(maildir):
    """Remove messages and Dovecot's index/uidlist files."""
    for sub in ("cur", "new", "tmp"):
        shutil.rmtree(os.path.join(maildir, sub), ignore_errors=True)
    for entry in os.listdir(maildir):
        if entry.startswith("dovecot") or entry == "subscriptions":
            path = os.path.join(maildir, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Fill a Maildir with deterministic realistic messages.")
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--size", type=parse_size, default=parse_size("16k"),
                    help="mean size, suffix k or m (default 16k)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--maildir", required=True, help="e.g. DIR/mail/user1")
    ap.add_argument("--owner", help="user owning the files (default: the Maildir's owner)")
    ap.add_argument("--fresh", action="store_true", help="empty the Maildir first")
    args = ap.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dovecot import maildir_deliver

    uid, gid = _owner_ids(args.owner, args.maildir)
    os.makedirs(args.maildir, exist_ok=True)
    if uid != -1:
        os.chown(args.maildir, uid, gid)
    if args.fresh:
        _empty_maildir(args.maildir)
    total = 0
    for data in generate(args.count, args.size, args.seed):
        maildir_deliver(args.maildir, data, uid, gid)
        total += len(data)
    print(f"mailgen: {args.count} messages, {total} bytes "
          f"(mean {total // max(1, args.count)}) -> {args.maildir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
