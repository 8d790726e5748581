"""Reading a request's JSON header: whole, or for a large one with each flat `data` list of
numbers read in short steps, so other threads (the event loop among them) run between steps."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from noisyseg.serve.errors import BadRequest

# JSON bodies above this size have their flat `data` lists read in steps of about `_STEP_BYTES`:
# one json.loads of a 30 MB body holds the GIL for seconds, a step for a millisecond or two.
STEPPED_PARSE_BYTES = 1 << 20
_STEP_BYTES = 64 * 1024
_DATA_LIST = re.compile(rb'"data"\s*:\s*\[')
# Element types whose per-step arrays concatenate to what one np.array of the whole list gives.
_STEP_DTYPES = {np.dtype(np.int64), np.dtype(np.float64)}


def parse_json_object(raw: bytes | bytearray) -> dict[str, Any]:
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"request body is not valid JSON ({err})") from None
    except ValueError as err:  # an integer literal past Python's 4,300-digit conversion limit
        raise BadRequest(f"request body holds a number too long to read ({err})") from None
    except RecursionError:
        raise BadRequest("request body JSON is nested too deeply") from None
    if not isinstance(parsed, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(parsed).__name__}")
    return parsed


def parse_in_steps(raw: bytes | bytearray) -> dict[str, Any] | None:
    """A large request header with each flat `data` list of numbers read in short steps.

    The lists are cut out (a placeholder string in their place), the rest parsed as usual,
    and each list read a step at a time into one array, letting other threads run between
    steps. None whenever this does not apply cleanly (nested lists, strings in the data, a
    "data" list that is no input's, mixed element types): the caller then parses it whole.
    A `"data": [` cannot match inside a JSON string, whose quotes are all escaped.
    """
    pieces: list[bytes | bytearray] = []
    spans: dict[str, tuple[int, int]] = {}
    position = 0
    for match in _DATA_LIST.finditer(raw):
        start = match.end()
        end = raw.find(b"]", start)
        if start < position or end < 0 or any(raw.find(char, start, end) >= 0 for char in (b'"', b"[", b"{", b"}")):
            continue
        placeholder = f"\u0000noisyseg-data-{len(spans)}"
        pieces += [raw[position : start - 1], json.dumps(placeholder).encode()]
        spans[placeholder] = (start, end)
        position = end + 1
    if not spans:
        return None
    pieces.append(raw[position:])
    try:
        header = json.loads(b"".join(pieces))
    except (ValueError, RecursionError):
        return None
    inputs = header.get("inputs") if isinstance(header, dict) else None
    tensors = [item for item in inputs if isinstance(item, dict)] if isinstance(inputs, list) else []
    claimed = [tensor for tensor in tensors if isinstance(tensor.get("data"), str) and tensor["data"] in spans]
    if sorted(tensor["data"] for tensor in claimed) != sorted(spans):
        return None
    for tensor in claimed:
        array = _numbers_in_steps(raw, *spans[tensor["data"]])
        if array is None:
            return None
        tensor["data"] = array
    return header


def _numbers_in_steps(raw: bytes | bytearray, start: int, end: int) -> np.ndarray | None:
    """The flat JSON list `raw[start:end]` (between its brackets), parsed a step at a time."""
    steps: list[np.ndarray] = []
    while start <= end:
        comma = raw.find(b",", min(start + _STEP_BYTES, end), end)
        stop = end if comma < 0 else comma
        text = raw[start:stop]
        if not text.strip():
            if not steps and comma < 0:  # "[]"
                return np.array([])
            raise BadRequest("request body is not valid JSON (an empty element in a 'data' list)")
        try:
            steps.append(np.array(json.loads(b"[" + text + b"]")))
        except json.JSONDecodeError as err:
            raise BadRequest(f"request body is not valid JSON ({err.msg} in a 'data' list)") from None
        except ValueError as err:  # an integer past Python's 4,300-digit conversion limit
            raise BadRequest(f"request body holds a number too long to read ({err})") from None
        start = stop + 1
    dtypes = {step.dtype for step in steps}
    if len(dtypes) > 1 and not dtypes <= _STEP_DTYPES:
        return None
    return np.concatenate(steps)
