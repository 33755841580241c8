"""How the evaluation scripts hand over their numbers: printed, warned about when a network is random, and written
to --json."""
import sys

from utils.files import write_json


def report_results(text, results, *, json_path, smoke_tests):
    """Print `text`; warn on stderr that each of smoke_tests (what random weights made meaningless) is only a smoke
    test; write `results` to json_path when given."""
    print(text)
    for what in smoke_tests:
        print(f"WARNING: {what} only a smoke test", file=sys.stderr)
    if json_path:
        write_json(json_path, results, announce=True)
