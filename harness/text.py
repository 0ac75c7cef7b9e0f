"""A checkpoint's text side: its tokenizer (`tokenizer.json`, read by the `tokenizers` library),
its end-of-sequence token ids, and detokenization as tokens stream in.

    tokenizer = load_tokenizer(folder)                 # ConfigError names the fix
    ids = encode(tokenizer, "Explain tensor parallelism.")   # with BOS where the post-processor adds it
    stream = TextStream(tokenizer)
    print(stream.add(token), end="")                   # the new text; an incomplete character held back
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.config import ConfigError

TOKENIZER_FILE = "tokenizer.json"
NEEDS_TOKENIZER = "pass model.path=DIR of a checkpoint with tokenizer.json"
REPLACEMENT = "\ufffd"  # what a decoder gives for the bytes of a character not complete yet


def tokenizer_file(folder) -> Path:
    """`<folder>/tokenizer.json`, refused (one line naming the fix) where there is none."""
    if not folder:
        raise ConfigError(f"generating text needs the checkpoint's tokenizer: {NEEDS_TOKENIZER}")
    path = Path(str(folder)) / TOKENIZER_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} has no {TOKENIZER_FILE}; {NEEDS_TOKENIZER}")
    return path


def load_tokenizer(folder):
    """The checkpoint's tokenizers.Tokenizer."""
    from tokenizers import Tokenizer

    path = tokenizer_file(folder)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001  (a file the library cannot read: the user's to fix)
        text = " ".join(str(err).split())[:300]
        raise ConfigError(f"{path} cannot be read by the tokenizers library ({type(err).__name__}: {text}); "
                          f"{NEEDS_TOKENIZER}") from None


def encode(tokenizer, text: str) -> list[int]:
    """`text` as token ids, with the special tokens the tokenizer's post-processor adds (BOS)."""
    return list(tokenizer.encode(text, add_special_tokens=True).ids)


def decode(tokenizer, ids: list[int]) -> str:
    """`ids` as text, special tokens (BOS, EOS) left out."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} cannot be read ({err}); fix or remove it") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); fix or remove it") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object; fix or remove it")
    return raw


def eos_token_ids(folder, vocab_size: int) -> list[int]:
    """The checkpoint's end-of-sequence token id(s): `eos_token_id` (an int or a list of ints) of
    generation_config.json where it has one (as transformers' generate reads it), else of
    config.json; [] where neither has one."""
    for name in ("generation_config.json", "config.json"):
        path = Path(str(folder)) / name
        if not path.is_file():
            continue
        value = _read_json(path).get("eos_token_id")
        if value is None:
            continue
        ids = value if isinstance(value, list) else [value]
        bad = [v for v in ids if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < vocab_size]
        if bad:
            raise ConfigError(f"{path}: eos_token_id must be a token id in [0, {vocab_size}) or a list of them, "
                              f"got {value!r}; fix it, or pass ignore_eos=true")
        return list(dict.fromkeys(ids))
    return []


class TextStream:
    """Text of the tokens generated so far, handed out piece by piece: each `add` decodes every id
    so far and returns what is new. A trailing U+FFFD (the bytes of a character split over
    tokens) is held back until the character is complete, or until `finish`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = ""  # the text handed out so far

    def _new(self, text: str) -> str:
        # What was handed out cannot be taken back: where a decoder rewrites the end of its text
        # (rare), the text past the length handed out so far is what comes next.
        piece = text[len(self.shown):]
        if piece:
            self.shown = text
        return piece

    def add(self, token: int) -> str:
        """The text that `token` completes (may be "")."""
        self.ids.append(int(token))
        text = decode(self.tokenizer, self.ids)
        return self._new(text.rstrip(REPLACEMENT))

    def finish(self) -> str:
        """What is still held back (an incomplete character at the end, as U+FFFD)."""
        return self._new(decode(self.tokenizer, self.ids))

    @property
    def text(self) -> str:
        """The text of every token added (special tokens left out)."""
        return decode(self.tokenizer, self.ids)
