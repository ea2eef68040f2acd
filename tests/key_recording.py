"""A config mapping that records every key the library reads (issue #15, item 3).

``RecordingDict(cfg, reads)`` behaves as the plain dict ``cfg``; each lookup by key
(``cfg[k]``, ``cfg.get(k)``, ``k in cfg``, ``setdefault``, ``pop``) adds the dotted key to the
set ``reads``, and a nested dict comes back wrapped the same way (``cfg["dataset"]["name"]``
records ``dataset.name``). Iterating the whole mapping (hashing, logging it as parameters,
validating it) is not a read of any one key and is not recorded. Copies (``copy.deepcopy``,
pickling) are plain dicts: the lock's sanitised copy does not count as reads, and nothing of
this class reaches a checkpoint."""
from __future__ import annotations

import copy
import fnmatch

import yaml


class RecordingDict(dict):
    def __init__(self, data: dict, reads: set, prefix: str = ""):
        super().__init__(data)
        self._reads, self._prefix = reads, prefix

    def _note(self, key) -> None:
        self._reads.add(f"{self._prefix}{key}")

    def _wrapped(self, key, value):
        if isinstance(value, dict) and not isinstance(value, RecordingDict):
            value = RecordingDict(value, self._reads, f"{self._prefix}{key}.")
            dict.__setitem__(self, key, value)
        return value

    def __getitem__(self, key):
        self._note(key)
        return self._wrapped(key, dict.__getitem__(self, key))

    def get(self, key, default=None):
        self._note(key)
        return self._wrapped(key, dict.__getitem__(self, key)) if dict.__contains__(self, key) else default

    def __contains__(self, key) -> bool:
        self._note(key)
        return dict.__contains__(self, key)

    def setdefault(self, key, default=None):
        self._note(key)
        return self._wrapped(key, dict.setdefault(self, key, default))

    def pop(self, key, *default):
        self._note(key)
        return dict.pop(self, key, *default)

    def plain(self) -> dict:
        return {k: v.plain() if isinstance(v, RecordingDict) else v for k, v in dict.items(self)}

    def __deepcopy__(self, memo):
        return copy.deepcopy(self.plain(), memo)

    def __copy__(self):
        return dict(self.plain())

    def __reduce_ex__(self, protocol):
        return dict, (self.plain(),)


# what the run writes as YAML (its effective config) is the plain mapping
yaml.SafeDumper.add_representer(RecordingDict, lambda dumper, data: dumper.represent_dict(data.plain()))


def unread_keys(specs: dict, reads: set) -> list[str]:
    """Keys of ``specs`` (wildcards allowed) that no recorded read matches; reading a key's
    parent (``teacher1`` for ``teacher1.name``) does not count."""
    return sorted(key for key in specs
                  if key not in reads and not ("*" in key and any(fnmatch.fnmatchcase(r, key) for r in reads)))
