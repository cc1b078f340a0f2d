"""The compile option's checks, before anything loads."""

from __future__ import annotations

import pytest

from workbench.engines.compilation import check_compile
from workbench.errors import UnsupportedOptionError


def test_a_known_scope_is_taken_and_none_is_eager():
    assert check_compile({"compile": "layers"}) == "layers" and check_compile({}) is None


@pytest.mark.parametrize("options, message", [
    ({"compile": "fast"}, "compile 'fast' is not known: use 'layers' or 'model'"),
    ({"compile": "model", "quantization": "int8", "max_memory": "1GiB"},
     "compile cannot be combined with max_memory, quantization here"),
])
def test_a_compile_that_cannot_run_says_why(options, message):
    with pytest.raises(UnsupportedOptionError, match=message):
        check_compile(options)
