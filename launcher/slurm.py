"""Pure parsing of SLURM's compressed formats: host lists, tasks-per-node lists, job-derived ports.

Nothing here calls ``scontrol`` or reads ``os.environ``: the functions take the variable's
value (and its name, for error messages) and return plain Python values.
"""
from __future__ import annotations

import re

__all__ = ["expand_hostlist", "expand_tasks_per_node", "port_from_job_id"]

# [Note: SLURM-derived port]
# When MASTER_PORT is not set, every task of a step derives the same port from SLURM_JOB_ID
# so that no communication is needed to agree on it. The range 20000..29999 stays below the
# Linux ephemeral range (32768..60999), so the port is not already held by an outgoing
# connection; two jobs sharing a node collide only if their ids are equal modulo 10000.
_PORT_BASE = 20000
_PORT_SPAN = 10000

_TASKS_ITEM = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def _split_top_level(text: str, *, var: str) -> list[str]:
    """Split ``text`` on commas that are not inside brackets."""
    parts: list[str] = []
    depth = 0
    current = ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{var}={text!r} is not a valid host list: unmatched ']'")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth != 0:
        raise ValueError(f"{var}={text!r} is not a valid host list: unmatched '['")
    parts.append(current)
    return parts


def _expand_range(spec: str, *, var: str, text: str) -> list[str]:
    """Expand the inside of one bracket, e.g. ``01-03,07`` -> ``['01', '02', '03', '07']``."""
    values: list[str] = []
    for item in spec.split(","):
        low, sep, high = item.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"{var}={text!r} is not a valid host list: bad range {item!r}")
        if not sep:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"{var}={text!r} is not a valid host list: range {item!r} runs backwards")
        # Slurm keeps the zero padding of the lower bound: node[08-10] -> node08 node09 node10.
        width = len(low)
        values.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
    return values


def _expand_one(pattern: str, *, var: str, text: str) -> list[str]:
    """Expand one host pattern that may hold several bracket groups (their cartesian product)."""
    start = pattern.find("[")
    if start < 0:
        return [pattern]
    end = pattern.find("]", start)
    prefix, spec, rest = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    tails = _expand_one(rest, var=var, text=text)
    return [prefix + value + tail for value in _expand_range(spec, var=var, text=text) for tail in tails]


def expand_hostlist(text: str, *, var: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand a compressed SLURM host list into host names, in order.

    Args:
        text: the list, e.g. ``"node[01-03,07],login1"``.
        var: the variable the list came from, named in error messages.

    Returns:
        The host names, e.g. ``["node01", "node02", "node03", "node07", "login1"]``.

    Raises:
        ValueError: the list is empty or malformed (unmatched brackets, bad ranges).
    """
    if not text.strip():
        raise ValueError(f"{var} is empty: expected a host list such as 'node[01-02]'")
    hosts: list[str] = []
    for pattern in _split_top_level(text.strip(), var=var):
        if not pattern:
            raise ValueError(f"{var}={text!r} is not a valid host list: empty entry")
        hosts.extend(_expand_one(pattern, var=var, text=text))
    return hosts


def expand_tasks_per_node(text: str, *, var: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Expand SLURM's tasks-per-node format into one count per node.

    Args:
        text: the value, e.g. ``"4(x2),3"`` (two nodes with 4 tasks, then one with 3).
        var: the variable the value came from, named in error messages.

    Returns:
        The task count of each node in node order, e.g. ``[4, 4, 3]``.

    Raises:
        ValueError: the value does not follow the ``N`` / ``N(xM)`` comma-separated format.
    """
    counts: list[int] = []
    for item in text.strip().split(","):
        match = _TASKS_ITEM.match(item.strip())
        if match is None:
            raise ValueError(f"{var}={text!r} is not a tasks-per-node list like '4(x2),3': bad item {item!r}")
        count, repeat = int(match.group(1)), int(match.group(2) or 1)
        counts.extend([count] * repeat)
    return counts


def port_from_job_id(job_id: int) -> int:
    """The rendezvous port every task of a job derives from its id (see [Note: SLURM-derived port])."""
    return _PORT_BASE + job_id % _PORT_SPAN
