"""Version strings, read one way everywhere: flags, sweep files, measurement sets, installed packages.

`parse_version` takes what a package index or `pip` shows — a release of up to four numbers with an
optional PEP 440 pre-, post- or development-release and local label ('4.40', '4.40.2',
'2.2.0+cu121', '5.0.0rc1', '0.43.0.dev0', 'v0.6.6') — and refuses anything else with one ValueError:
'5.x', '', 'abc', '4.40 beta'. A pre-release counts as its release (5.0.0rc1 → (5, 0, 0)): the
behaviours vramlab models change at releases.
Source: https://packaging.python.org/en/latest/specifications/version-specifiers/ (the public
version scheme; epochs are left out, no package modelled has one).
"""

import re

_VERSION = re.compile(r"""
    v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:\.\d+)?                     # release: major[.minor[.patch[.more]]]
    (?:[-_.]?(?:a|b|c|rc|alpha|beta|pre|preview)[-_.]?\d*)?      # pre-release
    (?:-\d+|[-_.]?(?:post|rev|r)[-_.]?\d*)?                      # post-release
    (?:[-_.]?dev[-_.]?\d*)?                                      # development release
    (?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?                          # local label (+cu121)
    """, re.VERBOSE | re.IGNORECASE | re.ASCII)
MAX_PART = 10**6  # no package's version number is this large


def parse_version(text):
    """(major, minor, patch) of a version string (see the module docstring); ValueError naming it otherwise."""
    m = _VERSION.fullmatch(text.strip()) if isinstance(text, str) else None
    if not m or any(g and int(g) > MAX_PART for g in m.groups()):
        raise ValueError(f"{text!r} is not a version (like 4.40.2)")
    return tuple(int(g) if g else 0 for g in m.groups())


def is_version(text):
    """Whether parse_version reads `text`."""
    try:
        parse_version(text)
    except ValueError:
        return False
    return True
