"""One user-error type and one place that prints a failed command (`llava_token_reduction.errors`)."""

import io

from llava_token_reduction.cli import CommandError
from llava_token_reduction.conversion.errors import ConversionError
from llava_token_reduction.errors import UserError, print_failure
from llava_token_reduction.tuning.common import DataError
from llava_token_reduction.tuning.train import TuningError


def test_the_old_error_names_are_the_one_user_error_type():
    assert CommandError is UserError
    for kind in (ConversionError, TuningError, DataError):
        assert issubclass(kind, UserError), kind
    assert issubclass(DataError, ValueError)  # as before


def test_print_failure_formats_user_and_unexpected_errors():
    out = io.StringIO()
    assert print_failure("tool", ConversionError("no  such\nfile"), file=out) == 1
    assert out.getvalue() == "tool: error: no such file\n"
    out = io.StringIO()
    print_failure("tool", KeyError("x"), file=out)
    assert out.getvalue().splitlines() == [
        "tool: error: KeyError: 'x'", "(run with --traceback for the full traceback)"
    ]
