"""Attribute docstrings of config dataclasses (the string literal under each field), for --help and the docs."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: {field name: the string literal right under it}; a class made at run time
    (dataclasses.make_dataclass) gives its fields' docs as a `__field_docs__` dict.

    Read with the tokenizer, not `ast.parse`: CPython 3.11.7's AST constructor can fail with "recursion depth
    mismatch" once torch.compile has raised the recursion limit (fixed in 3.11.8), and --help must not."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        docs.update(klass.__dict__.get("__field_docs__", {}))  # a class built at run time (no source to parse)
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        docs.update(_attribute_docstrings(source))
    return docs


def _attribute_docstrings(class_source: str) -> dict[str, str]:
    """{name: doc} for each `name: type ...` line of the class body directly followed by a string-only line."""
    docs: dict[str, str] = {}
    depth, line, pending = 0, [], None
    for tok in tokenize.generate_tokens(io.StringIO(textwrap.dedent(class_source)).readline):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.NEWLINE:
            if depth == 1 and len(line) >= 2 and line[0].type == tokenize.NAME and line[1].string == ":":
                pending = line[0].string  # a field: `name: type [= default]`
            elif depth == 1 and len(line) == 1 and line[0].type == tokenize.STRING and pending:
                text = line[0].string
                quote = text[-3:] if text[-3:] in ('"""', "'''") else text[-1]
                body = text[text.index(quote) + len(quote):-len(quote)]
                docs[pending] = " ".join(body.split())
                pending = None
            else:
                pending = None
            line = []
        elif tok.type not in (tokenize.NL, tokenize.COMMENT):
            line.append(tok)
    return docs
