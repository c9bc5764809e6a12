"""The `dwjax` command: `dwjax COMMAND [args]`. Each command lives in its own module with `main(argv) -> int`."""
import importlib
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
}


def usage() -> str:
    lines = ["usage: dwjax COMMAND [args]   (dwjax COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dwjax: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except UserError as e:
        print(f"dwjax {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dwjax {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
