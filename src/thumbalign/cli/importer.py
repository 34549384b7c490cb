"""`thumbalign import`: a feedback export (Open WebUI, Langfuse, LangSmith, OpenAI, CSV/JSONL) to a training file."""

from __future__ import annotations

import json

from ..errors import ConfigError, DataError
from .options import finite_float


def add_parser(commands) -> None:
    imp = commands.add_parser(
        "import",
        help="turn a feedback export (Open WebUI, Langfuse, LangSmith, OpenAI, CSV/JSONL) into a training file",
        description="Read feedback exports (streamed) and write the canonical unpaired file (prompt, completion, "
                    "label) that train, inspect and eval take. Prints rows read, rows written per label, rows skipped "
                    "by reason, duplicates and conflicting labels.")
    imp.add_argument("sources", nargs="+", metavar="SOURCE_FILE",
                     help="export files; for Langfuse/LangSmith give the scores/feedback and the traces/runs files")
    imp.add_argument("--from", dest="source", required=True, choices=("openwebui", "langfuse", "langsmith", "openai",
                                                                      "generic"))
    imp.add_argument("-o", "--output", required=True, help="the JSONL file to write")
    imp.add_argument("--score-name", help="Langfuse: the score to use (needed when the export holds several)")
    imp.add_argument("--key", help="LangSmith: the feedback key to use (needed when the export holds several)")
    imp.add_argument("--threshold", type=finite_float, help="numeric scores: a score ≥ this is a thumbs-up")
    imp.add_argument("--label-map", help="raw label values to thumbs, e.g. 'good=1,bad=0' or 'up=1,down=0'")
    imp.add_argument("--prompt-field", default="prompt", help="generic: the prompt column (default: prompt)")
    imp.add_argument("--completion-field", default="completion", help="generic: the completion column")
    imp.add_argument("--label-field", default="label", help="generic: the label column")
    imp.add_argument("--keep-comments", action="store_true", help="carry free-text feedback along as 'comment'")
    imp.add_argument("--json", action="store_true", help="print the summary as JSON")
    imp.set_defaults(run=run)


def run(args, argv: list[str]) -> int:
    from ..data.importers import Options, run_import
    from ..data.records import parse_label

    label_map = {}
    for item in filter(None, (args.label_map or "").split(",")):
        raw, _, thumb = item.partition("=")
        try:
            label_map[raw.strip()] = parse_label(thumb.strip(), "--label-map", None)
        except DataError:
            raise ConfigError(f"--label-map: cannot read {item!r}; write raw=1 or raw=0 (or up/down)") from None
    options = Options(score_name=args.score_name, key=args.key, threshold=args.threshold, label_map=label_map,
                      prompt_field=args.prompt_field, completion_field=args.completion_field,
                      label_field=args.label_field, keep_comments=args.keep_comments)
    report = run_import(args.source, args.sources, args.output, options, progress=not args.json)
    print(json.dumps(report.as_dict(), indent=1, ensure_ascii=False) if args.json
          else f"{args.output}: {report.describe()}")
    return 0
