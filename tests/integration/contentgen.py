"""MIME fixtures for test_content.py, built with Python's `email` package.

Every header is written exactly as given (RawPolicy: no folding, no
re-encoding), so a test can put hostile bytes, RFC 2231 continuations or
RFC 2047 encoded words into a header and know what is on the wire. Bodies
are transfer-encoded here, so the test also knows the decoded bytes a
correct reader must find.

    leaf(ctype, data, cte="base64", disposition=None, headers=())  a part
    text(body, subtype="plain", charset="utf-8", cte=...)          a text body
    attachment(ctype, name, data, cte="base64")                    a named attachment
    multipart(subtype, *parts)                                     a multipart
    rfc822(inner)                                                  message/rfc822
    message(subject, body, headers=())                             top-level headers added
    to_bytes(msg)                                                  CRLF bytes

Header helpers: raw(bytes) for 8-bit or NUL bytes in a header,
rfc2231_params(param, name, charset, size) continuation sections,
rfc2047_b / rfc2047_q encoded words.
"""

import base64
import binascii
import email.generator
import email.message
import email.utils
import io
import urllib.parse
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.policy import Compat32

CRLF = "\r\n"


class RawPolicy(Compat32):
    """compat32 with CRLF, where a header value is written byte for byte
    (a str value may carry raw bytes as surrogate escapes)."""

    def fold(self, name, value):
        return f"{name}: {value}{self.linesep}"

    def fold_binary(self, name, value):
        return self.fold(name, value).encode("ascii", "surrogateescape")


POLICY = RawPolicy(linesep=CRLF, max_line_length=0)


def raw(data):
    """bytes -> a str header value or payload that is written as those bytes."""
    return data.decode("ascii", "surrogateescape")


def encode_body(data, cte):
    """data (bytes) in the transfer encoding cte, as the str payload."""
    kind = cte.lower()
    if kind == "base64":
        return base64.encodebytes(data).decode("ascii")
    if kind == "quoted-printable":
        # istext=False: CR and LF bytes are encoded too, so any bytes round-trip
        return binascii.b2a_qp(data, quotetabs=True, istext=False).decode("ascii")
    if kind == "quoted-printable-text":
        # a text body: line breaks stay hard line breaks (CRLF on the wire)
        return binascii.b2a_qp(data, quotetabs=False, istext=True).decode("ascii")
    if kind in ("7bit", "8bit"):
        assert kind == "8bit" or data.isascii()
        assert b"\0" not in data and b"\r" not in data.replace(b"\r\n", b"")
        return raw(data.replace(b"\r\n", b"\n"))
    raise ValueError(cte)


def leaf(ctype, data, cte="base64", disposition=None, headers=()):
    """A non-multipart part. ctype and disposition are full header values
    (str, written as they are); headers are more (name, value) pairs."""
    part = email.message.Message(policy=POLICY)
    part["Content-Type"] = ctype
    wire_cte = "quoted-printable" if cte == "quoted-printable-text" else cte
    part["Content-Transfer-Encoding"] = wire_cte
    if disposition is not None:
        part["Content-Disposition"] = disposition
    for name, value in headers:
        part[name] = value
    part.set_payload(encode_body(data, cte))
    return part


def text(body, subtype="plain", charset="utf-8", cte="quoted-printable-text"):
    """A text body: body (str, LF line endings) encoded in charset."""
    data = body.replace("\n", CRLF).encode(charset)
    return leaf(f'text/{subtype}; charset="{charset}"', data, cte)


def attachment(ctype, name, data, cte="base64"):
    """An attachment with a plain quoted file name in both headers."""
    return leaf(f'{ctype}; name="{name}"', data, cte,
                disposition=f'attachment; filename="{name}"')


def multipart(subtype, *parts, boundary=None):
    """multipart/SUBTYPE of parts (a random boundary unless given)."""
    outer = MIMEMultipart(subtype, boundary=boundary, policy=POLICY)
    del outer["MIME-Version"]
    for p in parts:
        outer.attach(p)
    return outer


def rfc822(inner):
    """A message/rfc822 part holding inner (an email.message.Message)."""
    part = MIMEMessage(inner, policy=POLICY)
    del part["MIME-Version"]
    return part


def message(subject, body, headers=()):
    """body (a part) with the top-level header fields of a message."""
    top = [("From", "Sender <sender@example.org>"), ("To", "rcpt@example.org"),
           ("Subject", subject), ("Date", "Thu, 26 Nov 2026 10:15:02 +0000"),
           ("Message-ID", email.utils.make_msgid(domain="example.org")),
           ("MIME-Version", "1.0")] + list(headers)
    existing = list(body.items())
    for name in list(body.keys()):
        del body[name]
    for name, value in top + existing:
        body[name] = value
    return body


def to_bytes(msg):
    """The message as it travels: CRLF line endings, headers verbatim."""
    buf = io.BytesIO()
    email.generator.BytesGenerator(buf, mangle_from_=False, policy=POLICY).flatten(msg)
    return buf.getvalue()


# --------------------------------------------------------------------------
# encoded names


def pct(data):
    """Percent-encoding of bytes for an RFC 2231 value (only [A-Za-z0-9._-] kept)."""
    return urllib.parse.quote_from_bytes(data, safe="")


def rfc2231_params(param, name, charset="utf-8", size=30):
    """RFC 2231 continuations `param*0*=charset''...; param*1*=...` of name,
    cut every `size` bytes of the encoded name (possibly inside a character)."""
    data = name.encode(charset)
    chunks = [data[i:i + size] for i in range(0, len(data), size)] or [b""]
    out = []
    for i, chunk in enumerate(chunks):
        prefix = f"{charset}''" if i == 0 else ""
        out.append(f"{param}*{i}*={prefix}{pct(chunk)}")
    return (";" + CRLF + "\t").join(out)


def rfc2047_b(text, charset="UTF-8"):
    """RFC 2047 B encoded word."""
    return f"=?{charset}?B?{base64.b64encode(text.encode(charset)).decode()}?="


def rfc2047_q(text, charset="ISO-8859-1"):
    """RFC 2047 Q encoded word ("_" for a space)."""
    out = []
    for byte in text.encode(charset):
        c = chr(byte)
        if c == " ":
            out.append("_")
        elif c.isascii() and (c.isalnum() or c in "-."):
            out.append(c)
        else:
            out.append(f"={byte:02X}")
    return f"=?{charset}?Q?{''.join(out)}?="
