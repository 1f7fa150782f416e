"""Whether a text can still become JSON: the test that lets an evaluation stop an answer once it is decided.

An arm scored only on JSON (json_valid, json_schema, exact_match and field_accuracy against JSON answers) scores 0
on every answer that does not parse, so once no continuation of the text generated so far could parse, further
tokens cannot change a score. The base model echoing a log line is decided at its second character; generating
its remaining 60 tokens cost the demo 40 s of its 46.

`can_become_json(text)` answers for `json.loads` as Python runs it: surrounding whitespace, NaN, Infinity and
-Infinity accepted, control characters refused inside strings, one value and nothing after it. It reads the text
once, left to right, keeping only the open containers and the state of the token being read.
"""

from __future__ import annotations

_WHITESPACE = " \t\n\r"
_ESCAPES = '"\\/bfnrtu'
_HEX = "0123456789abcdefABCDEF"
_DIGITS = "0123456789"
_LITERALS = ("true", "false", "null", "NaN", "Infinity")
# a number's states (see _number_step): sign, zero, int, dot, frac, e, esign, exp; these may end it
_NUMBER_ENDS = {"zero", "int", "frac", "exp"}


class _Reader:
    """The state of a left-to-right read: `expect` is what the next non-space character must be."""

    def __init__(self) -> None:
        self.stack: list[str] = []  # "{" or "[" for each open container
        self.expect = "value"  # value | value_or_close | key | key_or_close | colon | after | end
        self.token: str | None = None  # string | key | escape | hex | number | literal, while one is being read
        self.detail = ""  # the number's state, or the literal read so far
        self.escaped_in = ""  # inside an escape: the kind of string (string or key) it goes back to
        self.hex_owed = 0  # inside a \u escape: the hex digits still to come

    def feed(self, char: str) -> bool:
        """Take one character; False once no continuation can parse."""
        if self.token is not None:
            return self._in_token(char)
        if char in _WHITESPACE:
            return True
        return self._structural(char)

    def _structural(self, char: str) -> bool:
        expect = self.expect
        if expect in ("value", "value_or_close"):
            if expect == "value_or_close" and char == "]":
                return self._close("[")
            return self._value(char)
        if expect in ("key", "key_or_close"):
            if expect == "key_or_close" and char == "}":
                return self._close("{")
            if char == '"':
                self.token = "key"
                return True
            return False
        if expect == "colon":
            if char == ":":
                self.expect = "value"
                return True
            return False
        if expect == "after":
            return self._after_value(char)
        return False  # "end": only whitespace may follow the one value

    def _value(self, char: str) -> bool:
        if char in "{[":
            self.stack.append(char)
            self.expect = "key_or_close" if char == "{" else "value_or_close"
            return True
        if char == '"':
            self.token = "string"
            return True
        if char == "-" or char in _DIGITS:
            self.token, self.detail = "number", "sign" if char == "-" else "zero" if char == "0" else "int"
            return True
        if any(word.startswith(char) for word in _LITERALS):
            self.token, self.detail = "literal", char
            return self._literal_done_if_whole()
        return False

    def _after_value(self, char: str) -> bool:
        if not self.stack:
            return False
        top = self.stack[-1]
        if char == ",":
            self.expect = "key" if top == "{" else "value"
            return True
        return self._close(top) if char == ("}" if top == "{" else "]") else False

    def _close(self, opened: str) -> bool:
        if not self.stack or self.stack[-1] != opened:
            return False
        self.stack.pop()
        self._value_done()
        return True

    def _value_done(self) -> None:
        self.token, self.detail = None, ""
        self.expect = "after" if self.stack else "end"

    def _in_token(self, char: str) -> bool:
        if self.token in ("string", "key"):
            return self._in_string(char)
        if self.token == "escape":
            return self._in_escape(char)
        if self.token == "hex":
            return self._in_hex(char)
        if self.token == "number":
            return self._in_number(char)
        return self._in_literal(char)

    def _in_string(self, char: str) -> bool:
        if char == '"':
            if self.token == "key":
                self.token, self.expect = None, "colon"
            else:
                self._value_done()
            return True
        if char == "\\":
            self.escaped_in, self.token = self.token, "escape"
            return True
        return ord(char) >= 0x20  # json.loads refuses control characters inside strings

    def _in_escape(self, char: str) -> bool:
        if char not in _ESCAPES:
            return False
        if char == "u":
            self.token, self.hex_owed = "hex", 4
        else:
            self.token = self.escaped_in
        return True

    def _in_hex(self, char: str) -> bool:
        if char not in _HEX:
            return False
        self.hex_owed -= 1
        if self.hex_owed == 0:
            self.token = self.escaped_in
        return True

    def _in_number(self, char: str) -> bool:
        state = self.detail
        following = _number_step(state, char)
        if following is not None:
            self.detail = following
            return True
        if state == "sign" and char == "I":  # -Infinity
            self.token, self.detail = "literal", "I"
            return True
        if state not in _NUMBER_ENDS:
            return False
        self._value_done()
        return self.feed(char)  # the character after a number is read as structure

    def _in_literal(self, char: str) -> bool:
        word = self.detail + char
        if not any(literal.startswith(word) for literal in _LITERALS):
            return False
        self.detail = word
        return self._literal_done_if_whole()

    def _literal_done_if_whole(self) -> bool:
        if self.detail in _LITERALS:
            self._value_done()
        return True


def _number_step(state: str, char: str) -> str | None:
    """The number's next state after `char`, or None where `char` does not continue it."""
    if char in _DIGITS:
        return {"sign": "zero" if char == "0" else "int", "int": "int", "dot": "frac", "frac": "frac",
                "e": "exp", "esign": "exp", "exp": "exp"}.get(state)
    if char == "." and state in ("zero", "int"):
        return "dot"
    if char in "eE" and state in ("zero", "int", "frac"):
        return "e"
    if char in "+-" and state == "e":
        return "esign"
    return None


def can_become_json(text: str) -> bool:
    """Whether some continuation of `text` (nothing, or more characters) makes it parse with `json.loads`."""
    reader = _Reader()
    return all(reader.feed(char) for char in text)


__all__ = ["can_become_json"]
