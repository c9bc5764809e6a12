"""The `dwjax` command: `dwjax [--no-verify-weights] COMMAND [args]`. Each command lives in its own module with
`main(argv) -> int`.

Global options (before COMMAND):
  --no-verify-weights   load weights whose sha256 does not match their directory's checksums.sha256 (or a
                        builtin's pinned hash): for weights edited on purpose. Sets DWJAX_NO_VERIFY_WEIGHTS=1 for
                        the command (and the processes it starts); see dwjax/weights/integrity.py.
"""
import importlib
import os
import sys

from dwjax.errors import UserError

COMMANDS = {
    "transcribe": ("dwjax.cli.transcribe", "transcribe audio files (short- and long-form, speculative)"),
    "make-demo-data": ("dwjax.cli.make_demo_data", "synthesise a demo speech dataset with flite/espeak-ng"),
    "pseudo-label": ("dwjax.cli.pseudo_label", "label a dataset with a teacher (sharded, resumable)"),
    "init-student": ("dwjax.cli.init_student", "make a student from a teacher's encoder and spaced decoder layers"),
    "distill": ("dwjax.cli.distill", "train a student on KL(teacher||student) + pseudo-label CE"),
    "evaluate": ("dwjax.cli.evaluate", "WER (short-form, long-form, noise) and speed of models"),
    "export": ("dwjax.cli.export", "write a model as transformers, CTranslate2 or OpenAI files"),
    "checkpoint-info": ("dwjax.cli.checkpoint_info", "list the checkpoints of a run"),
    "plan": ("dwjax.cli.plan", "compile steps for a topology on fake devices; print memory and FLOPs"),
    "report": ("dwjax.cli.report", "markdown table and plots from evaluation results"),
    "get-game-speech": ("dwjax.cli.get_game_speech", "real acted speech from two freeware games in Debian"),
}


NO_VERIFY_FLAG = "--no-verify-weights"
NO_VERIFY_ENV = "DWJAX_NO_VERIFY_WEIGHTS"          # dwjax.weights.integrity.ENV_NO_VERIFY


def usage() -> str:
    lines = ["usage: dwjax [--no-verify-weights] COMMAND [args]   (dwjax COMMAND --help for each)", "",
             "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "options (before COMMAND):",
              f"  {NO_VERIFY_FLAG:<20} load weights even when their sha256 does not match the directory's",
              f"  {'':<20} checksums.sha256 or a builtin's pinned hash (weights edited on purpose);",
              f"  {'':<20} the same as {NO_VERIFY_ENV}=1"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    no_verify = False
    while argv and argv[0] == NO_VERIFY_FLAG:
        no_verify, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dwjax: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    saved = os.environ.get(NO_VERIFY_ENV)
    if no_verify:
        os.environ[NO_VERIFY_ENV] = "1"               # child processes (multi-process runs) inherit it
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except UserError as e:
        print(f"dwjax {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dwjax {name}: interrupted", file=sys.stderr)
        return 130
    finally:
        if no_verify:                                  # main() called in-process (tests) leaves no trace
            if saved is None:
                os.environ.pop(NO_VERIFY_ENV, None)
            else:
                os.environ[NO_VERIFY_ENV] = saved


if __name__ == "__main__":
    sys.exit(main())
