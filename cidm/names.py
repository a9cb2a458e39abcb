"""The naming rules, in one place: concept names, library names, concept tokens and the `<…>` markers of prompts.

- A name (a concept's or a library's) is NFC-normalised, then holds letters and combining marks of any script,
  digits, '_', '-', '.' and spaces: `my dog`, `café`, `日本の犬`. Names become file and folder names, so a name
  made on Linux must work on Windows and macOS: at most MAX_NAME_LENGTH characters, no '..', no '.' first, no '.'
  or space last, no space first, and not a device name Windows reserves (CON, NUL, COM1, LPT1, …, with or without
  an extension).
- A token is `<word>`: the same characters without spaces, plus '#'. Automatic tokens are `<name#1> <name#2>`
  (`automatic_tokens`): no name holds '#', so no concept is ever refused because an automatic token took its
  name (`dog2` next to `dog`). Tasks keep the tokens they stored (before the '#': `<dog1> <dog2>`).
- Names, tokens and prompt markers compare by `name_key`: NFC, ignoring case, runs of spaces as one. A prompt
  names a concept as `<name>` spelled in any case, spaces included (`<My Dog>` names `my dog`), and a token as
  itself in any case (`MARKER_PATTERN` finds both).
"""

from __future__ import annotations

import re
import unicodedata

from .errors import CIDMInputError

MAX_NAME_LENGTH = 64
NAME_PUNCTUATION = "_-."
TOKEN_ONLY = "#"  # a token may hold it and a name may not: what keeps automatic tokens apart from names
WINDOWS_DEVICE_NAMES = frozenset(["CON", "PRN", "AUX", "NUL", *(f"{port}{n}" for port in ("COM", "LPT")
                                                                  for n in range(1, 10))])
# A concept token as written in a prompt: '<', no whitespace, '>' (stored tokens of any age match it).
TOKEN_PATTERN = re.compile(r"<[^<>\s]+>")
# A marker in a prompt: a token, or a concept name with spaces between its words (`<my dog>`).
MARKER_PATTERN = re.compile(r"<[^<>\s]+(?: +[^<>\s]+)*>")


def name_key(text: str) -> str:
    """How names, tokens and markers compare: NFC-normalised, runs of whitespace as one space, case-folded."""
    return " ".join(unicodedata.normalize("NFC", text).split()).casefold()


def _allowed(char: str, extra: str) -> bool:
    return unicodedata.category(char)[0] in "LM" or unicodedata.category(char) == "Nd" or char in extra


def validate_name(name: str, input_name: str) -> str:
    """Check a library or concept name, which becomes part of a path; returns it NFC-normalised.

    Raises:
        CIDMInputError: `input_name`, when the name is empty, longer than MAX_NAME_LENGTH, holds '..', starts
            with '.' or a space, ends with '.' or a space, holds other characters than letters, marks and digits
            of any script, '_', '-', '.' and spaces, or is a device name Windows reserves.
    """
    if not isinstance(name, str) or not name:
        raise CIDMInputError(input_name, "must not be empty")
    name = unicodedata.normalize("NFC", name)
    if len(name) > MAX_NAME_LENGTH:
        raise CIDMInputError(input_name, f"{name!r} is longer than {MAX_NAME_LENGTH} characters")
    wrong = sorted({char for char in name if not _allowed(char, NAME_PUNCTUATION + " ")})
    if wrong:
        raise CIDMInputError(input_name, f"{name!r} holds {''.join(wrong)!r}; a name may hold letters and digits "
                                         "of any script, '_', '-', '.' and spaces")
    if ".." in name or name.startswith((".", " ")) or name.endswith((".", " ")):
        raise CIDMInputError(input_name, f"{name!r} must not hold '..', start with '.' or a space, or end with '.' "
                                         "or a space (Windows drops a trailing '.' or space from folder names)")
    if name.split(".")[0].rstrip(" ").upper() in WINDOWS_DEVICE_NAMES:
        raise CIDMInputError(input_name, f"{name!r} is a device name on Windows, which cannot hold a file or folder "
                                         f"of that name; choose another (e.g. '{name}_1')")
    return name


def validate_tokens(tokens: list[str], concept: str | None = None, input_name: str = "tokens") -> list[str]:
    """Check the tokens of `concept` such as "<dog1>": bracketed letters and digits of any script, '_', '-', '.'
    and '#', unique by `name_key`, none spelling the concept's own `<name>` (which in a prompt stands for all its
    tokens); returns them NFC-normalised.

    Raises:
        CIDMInputError: `input_name`, saying which token is wrong.
    """
    tokens = [unicodedata.normalize("NFC", token) if isinstance(token, str) else token for token in tokens]
    if not tokens:
        raise CIDMInputError(input_name, "at least one token is required")
    seen = set()
    for token in tokens:
        if not isinstance(token, str) or len(token) < 3 or not (token.startswith("<") and token.endswith(">")):
            raise CIDMInputError(input_name, f"{token!r} must look like <name1>: '<', at least one character, '>'")
        if any(char.isspace() for char in token):
            raise CIDMInputError(input_name, f"{token!r} must not contain spaces")
        if not all(_allowed(char, NAME_PUNCTUATION + TOKEN_ONLY) for char in token[1:-1]):
            raise CIDMInputError(input_name, f"{token!r} may hold letters and digits of any script, '_', '-', '.' "
                                             "and '#' between '<' and '>'")
        if name_key(token) in seen:
            raise CIDMInputError(input_name, f"{token!r} is listed twice (tokens are compared ignoring case)")
        if concept is not None and name_key(token) == name_key(f"<{concept}>"):
            raise CIDMInputError(input_name, f"{token} is the concept's own name (<{concept}> in a prompt stands for "
                                             f"all its tokens); choose another token (e.g. <{concept}#1>)")
        seen.add(name_key(token))
    return tokens


def automatic_tokens(concept: str) -> list[str]:
    """The two tokens of a concept trained without explicit tokens: `<dog#1> <dog#2>` (spaces become '_')."""
    stem = "_".join(concept.split())
    return [f"<{stem}{TOKEN_ONLY}{n}>" for n in (1, 2)]


def were_automatic(tokens: list[str], concept: str) -> bool:
    """Whether a task's stored `tokens` are `concept`'s automatic tokens, as `automatic_tokens` makes them or as
    the pack made them before the '#' (`<dog1> <dog2>`)."""
    stem = "_".join(concept.split())
    schemes = (automatic_tokens(concept), [f"<{stem}{n}>" for n in (1, 2)])
    return [name_key(token) for token in tokens] in [[name_key(token) for token in scheme] for scheme in schemes]
