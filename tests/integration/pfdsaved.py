"""Reading what popfetchd saved: the message folders of a save directory."""

import dataclasses
import json
import re
from pathlib import Path

FOLDER_RE = re.compile(r"^(\d{8}T\d{6}Z)-([0-9a-f]{12})(?:-[2-9]|-[1-9][0-9]+)?$")  # -N: a name taken already


@dataclasses.dataclass
class SavedMessage:
    """One message folder in a save directory."""
    path: Path
    received: str          # the YYYYMMDDTHHMMSSZ part of the name
    hash12: str            # the hash part of the name
    eml: bytes             # message.eml (None if absent)
    meta: dict             # meta.json (None if absent)

    @property
    def uidl(self):
        return self.meta.get("uidl") if self.meta else None


def read_saved_messages(save_dir):
    """Every message folder in save_dir (excluding .tmp), sorted by name.
    A folder whose name does not have the contract's form fails the test."""
    save_dir = Path(save_dir)
    if not save_dir.exists():
        return []
    out = []
    for entry in sorted(save_dir.iterdir()):
        if entry.name == ".tmp":
            continue
        m = FOLDER_RE.match(entry.name)
        assert m and entry.is_dir(), f"unexpected entry in save_directory: {entry}"
        eml = (entry / "message.eml").read_bytes() if (entry / "message.eml").exists() else None
        meta = json.loads((entry / "meta.json").read_text()) if (entry / "meta.json").exists() else None
        out.append(SavedMessage(entry, m.group(1), m.group(2), eml, meta))
    return out
