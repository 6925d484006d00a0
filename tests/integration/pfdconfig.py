"""Configuration files for popfetchd's integration tests: ConfDir (what
`-c DIR` reads) and the writer of its files.

The files are written as JSON: JSON is YAML (a subset of YAML 1.2 that
libyaml reads too), so no YAML emitter of our own is needed. Every file
written here may hold an inline secret and is mode 600.
"""

import dataclasses
import json
from pathlib import Path


def to_yaml(mapping):
    """A dict as a YAML document, written as JSON (indented, UTF-8 as is:
    libyaml does not join JSON's surrogate-pair escapes)."""
    return json.dumps(mapping, indent=2, ensure_ascii=False, default=str) + "\n"


@dataclasses.dataclass
class ConfDir:
    """A popfetchd configuration directory (what `-c DIR` reads)."""
    path: Path
    state_directory: Path
    files: dict = dataclasses.field(default_factory=dict)   # id -> Path

    @property
    def main(self):
        return self.path / "popfetchd.yaml"

    def __str__(self):
        return str(self.path)

    def __fspath__(self):
        return str(self.path)

    def write_main(self, settings):
        """Write popfetchd.yaml (state_directory is always set)."""
        data = {"state_directory": str(self.state_directory), **(settings or {})}
        return write_secret(self.main, to_yaml(data))

    def add(self, config, filename=None):
        """Write conf.d/ID.yaml (or `filename`) from a dict; returns its path."""
        path = self.path / "conf.d" / (filename or f"{config['id']}.yaml")
        self.files[config.get("id", path.stem)] = path
        return write_secret(path, to_yaml(config))

    def write_raw(self, filename, text, mode=0o600):
        """Write any file under conf.d/ (for invalid YAML and the like)."""
        path = self.path / "conf.d" / filename
        path.write_text(text)
        path.chmod(mode)
        return path


def write_secret(path, text):
    """Write text to path (parents created), mode 600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


def config_with(base, overrides):
    """base updated with overrides; a value of None removes the key."""
    cfg = dict(base)
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}
