"""Shell completion for the ``fewclip`` command: command names, then Hydra's completion of ``run``/``fit``/``demo``
overrides (config groups and their options, keys, values).

``eval "$(fewclip run -sc install=bash)"`` installs it (Hydra's flag, as in any Hydra app). Hydra's own script
cannot serve here: it registers ``fewclip`` and ``run`` as two commands and asks ``fewclip -sc query=bash``, where
``run`` is missing. This script asks ``fewclip run -sc query=bash`` with the command line in ``COMP_LINE``; the query
drops the sub-command from ``COMP_LINE`` and lets Hydra complete the overrides.
"""

from __future__ import annotations

import os
import re
import sys

COMMANDS = ("run", "fit", "demo", "predict", "add-class", "report", "data", "cache")
OVERRIDE_COMMANDS = ("run", "fit", "demo")  # the commands that take Hydra overrides
SHELLS = ("bash", "zsh")

BASH = r"""# fewclip completion: eval "$(fewclip run -sc install=bash)" (in ~/.bashrc to keep it)
_fewclip_complete()
{
    local cur="${COMP_WORDS[COMP_CWORD]}"
    if (( COMP_CWORD <= 1 )); then
        COMPREPLY=($(compgen -W "%(commands)s" -- "$cur"))
        return
    fi
    case "${COMP_WORDS[1]}" in
        %(override_commands)s)
            local choices
            choices=$(COMP_LINE="$COMP_LINE" COMP_POINT="$COMP_POINT" "${COMP_WORDS[0]}" run -sc query=bash 2>/dev/null)
            COMPREPLY=($(compgen -W "$choices" -- "$cur"))
            ;;
        data)
            COMPREPLY=($(compgen -W "check" -- "$cur"))
            ;;
        *)
            COMPREPLY=($(compgen -f -- "$cur"))
            ;;
    esac
}
# Overrides are key=value words: '=' must not split them (Hydra's own scripts do the same).
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _fewclip_complete fewclip
"""


def script(shell: str) -> str:
    """The completion script for ``shell`` (zsh runs the bash one through ``bashcompinit``, as Hydra does)."""
    text = BASH % {"commands": " ".join(COMMANDS), "override_commands": "|".join(OVERRIDE_COMMANDS)}
    if shell == "zsh":
        text = "autoload -Uz bashcompinit && bashcompinit\n" + text
    return text


def strip_command(line: str) -> str:
    """``fewclip run -m adapter=ti`` -> ``fewclip -m adapter=ti``: the line as Hydra's query expects it (the program,
    then the overrides); a trailing space (a new word) is kept."""
    commands = "|".join(OVERRIDE_COMMANDS)
    return re.sub(rf"^(\s*\S+)\s+(?:{commands})(?=\s|$)", r"\1", line, count=1)


def handle(args: list[str]) -> int | None:
    """``-sc install=SHELL`` / ``uninstall=SHELL``: print the script and return 0 (2 for an unsupported shell).
    ``-sc query=SHELL``: rewrite ``COMP_LINE`` for Hydra and return None (Hydra answers the query). Without ``-sc``:
    None."""
    if not any(a in ("-sc", "--shell-completion") for a in args):
        return None
    action = next((a for a in args if a.split("=", 1)[0] in ("install", "uninstall", "query")), None)
    verb, _, shell = (action or "").partition("=")
    if shell not in SHELLS:
        sys.stderr.write(f"fewclip: shell completion supports {', '.join(SHELLS)}; usage: "
                         f"eval \"$(fewclip run -sc install=bash)\" (got {action or 'no install=SHELL'})\n")
        return 2
    if verb == "install":
        sys.stdout.write(script(shell))
        return 0
    if verb == "uninstall":
        sys.stdout.write("complete -r fewclip 2>/dev/null\nunset -f _fewclip_complete\n")
        return 0
    os.environ["COMP_LINE"] = strip_command(os.environ.get("COMP_LINE", "fewclip "))
    return None
