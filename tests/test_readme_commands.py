"""Every `vsa ...` command written in README.md and docs/*.md parses against the real CLI.

The commands are taken from the fenced code blocks: `\\` continuations joined, `NAME=value` lines and
`$NAME` expanded as the shell would (word splitting included), comments after `#` dropped, then split at
`|`, `&&`, `||`, `;` and `&`, redirections removed. Each `vsa` command (also `-m vsa` under torchrun or
python) is parsed with click's ``make_context`` on the typer-generated command, subcommand by subcommand,
with ``resilient_parsing=False``: an unknown or renamed option, a wrong positional or an extra argument
fails here. Nothing is run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SEPARATORS = {"|", "&&", "||", ";", "&"}
REDIRECTS = {">", ">>", "<", "2>", "2>>", "&>", ">&", "2>&1", "|&"}
ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def code_blocks(text: str) -> list[tuple[int, list[str]]]:
    """``(line number of the first line, lines)`` of each fenced code block."""
    blocks, cur, start = [], None, 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if cur is None:
                cur, start = [], n + 1
            else:
                blocks.append((start, cur))
                cur = None
        elif cur is not None:
            cur.append(line)
    return blocks


def logical_lines(lines: list[str], start: int) -> list[tuple[int, str]]:
    """Join `\\` continuations; a leading `$ ` prompt is dropped."""
    out, buf, first = [], "", None
    for n, line in enumerate(lines, start):
        s = line.rstrip()
        if first is None:
            first = n
            s = re.sub(r"^\s*\$ ", "", s)
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        out.append((first, buf + s))
        buf, first = "", None
    if buf:
        out.append((first, buf))
    return out


def expand(s: str, env: dict[str, str]) -> str:
    """`$NAME` / `${NAME}` replaced by its value (a placeholder word when unset); `$(...)` by a placeholder."""
    s = re.sub(r"\$\([^)]*\)", "X", s)
    return VAR.sub(lambda m: env.get(m.group(1) or m.group(2), "X"), s)


def tokens(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars="|&;<>")
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def vsa_commands(text: str, name: str) -> list[tuple[str, list[str]]]:
    """``(name:line, argv after 'vsa')`` of every vsa command in the code blocks of a Markdown ``text``."""
    found = []
    for start, lines in code_blocks(text):
        env: dict[str, str] = {}
        for n, line in logical_lines(lines, start):
            where = f"{name}:{n}"
            line = re.sub(r"\[(--?[^\[\]]*)\]", r"\1", line)  # an optional part written `[--beam 1]`
            try:
                toks = tokens(expand(line, env))
            except ValueError:  # not shell (unbalanced quotes in prose or output)
                continue
            cmds, cur = [], []
            for t in toks:
                if t in SEPARATORS:
                    cmds.append(cur)
                    cur = []
                else:
                    cur.append(t)
            cmds.append(cur)
            for cmd in cmds:
                words, skip = [], False
                for t in cmd:
                    if skip:
                        skip = False
                    elif t in REDIRECTS:
                        skip = t != "2>&1"
                    else:
                        words.append(t)
                while words and ASSIGN.match(words[0]):  # NAME=value [command]
                    var, value = ASSIGN.match(words.pop(0)).groups()
                    env[var] = value
                if words and (words[0] == "vsa" or words[0].endswith("/bin/vsa")):
                    argv = words[1:]
                elif "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == ["vsa"]:
                    argv = words[words.index("-m") + 2 :]
                else:
                    continue
                found.append((where, [w for w in argv if w != "..."]))  # `...`: "more arguments" in prose
    return found


def parse(argv: list[str]) -> None:
    """Parse ``vsa ARGV`` with the real CLI, down to the leaf command; raises click's UsageError."""
    import typer.core
    import typer.main

    from vsa.cli import app

    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("vsa", list(argv), resilient_parsing=False)
    while isinstance(cmd, typer.core.TyperGroup):
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            break
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        ctx = cmd.make_context(name, rest, parent=ctx, resilient_parsing=False)


ALL = [c for p in DOCS for c in vsa_commands(p.read_text(encoding="utf-8"), p.relative_to(ROOT).as_posix())]


def test_the_extractor_reads_shell_as_written():
    text = ("```\nD=../d.json\nW=\"--model whole-image --dataset $D\"\n"
            "vsa train-align $W -o a.pt   # the comment\n"
            "vsa regions imgs/ > r.jsonl && vsa embed r.jsonl \\\n   -o f.npz; vsa embed merge f*.npz -o all.npz\n"
            "vsa regions imgs/ | vsa embed -o \"my feats.npz\"\n"
            "torchrun --standalone -m vsa train-align ...\n"
            "vsa eval --split test [--beam 1]\n```\nvsa not-in-a-block\n")
    blocks = code_blocks(text)
    assert len(blocks) == 1 and blocks[0][0] == 2
    got = logical_lines(blocks[0][1], blocks[0][0])
    assert got[3] == (5, "vsa regions imgs/ > r.jsonl && vsa embed r.jsonl     -o f.npz; vsa embed merge f*.npz -o all.npz")
    found = vsa_commands(text, "x.md")
    assert [w for w, _ in found][:3] == ["x.md:4", "x.md:5", "x.md:5"]
    assert [a for _, a in found] == [["train-align", "--model", "whole-image", "--dataset", "../d.json", "-o", "a.pt"],
                    ["regions", "imgs/"], ["embed", "r.jsonl", "-o", "f.npz"], ["embed", "merge", "f*.npz", "-o", "all.npz"],
                    ["regions", "imgs/"], ["embed", "-o", "my feats.npz"], ["train-align"],
                    ["eval", "--split", "test", "--beam", "1"]]


def test_parse_catches_what_a_renamed_flag_or_wrong_positional_would_break():
    from typer._click.exceptions import UsageError

    parse(["search", "text", "-i", "photos.npz", "a dog on a beach"])
    parse(["embed", "work/regions.jsonl", "-o", "work/feats.npz", "--crop", "roi"])
    for bad in (["search", "text", "photos.npz", "a dog on a beach"],  # the index is -i, not a positional
                ["embed", "r.jsonl", "--output", "f.npz"],  # no such option
                ["score", "photo.jpg", "a dog", "extra"],  # one positional too many
                ["eval", "--top", "many"],  # not an eval option
                ["embed", "r.jsonl", "--batch-size", "eight"],  # not an int
                ["nosuch"]):
        with pytest.raises(UsageError):
            parse(bad)


def test_readme_and_docs_commands_parse():
    readme = [a for w, a in ALL if w.startswith("README.md")]
    assert len(readme) >= 20, f"only {len(readme)} vsa commands found in README.md: is the extractor broken?"
    bad = []
    for where, argv in ALL:
        try:
            parse(argv)
        except Exception as e:  # click's UsageError / BadParameter (and anything else is a failure too)
            bad.append(f"{where}: vsa {shlex.join(argv)}\n    {type(e).__name__}: {getattr(e, 'message', e)}")
    assert not bad, f"{len(bad)} of {len(ALL)} documented commands do not parse:\n" + "\n".join(bad)
