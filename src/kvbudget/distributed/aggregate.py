"""One metrics page for many replicas: the samples of their Prometheus pages added up.

Counters and histograms add (requests, tokens, latency buckets of every replica); so do the
gauges of what each replica holds (live sessions, KV bytes, resident memory) and its rates (the
sum is the throughput of them all). Gauges that every replica reads from the one shared session
directory, or that describe a single latest request, take the largest value instead of a sum.
A replica that died takes its counts with it: the sums restart from the replicas that answer.
"""

from __future__ import annotations

SHARED_GAUGES = frozenset({"kvbudget_sessions_stored", "kvbudget_stored_bytes",
                           "kvbudget_last_request_tokens_per_second"})


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def aggregate(pages: list[str], extra: str = "") -> str:
    """The pages' samples summed (`SHARED_GAUGES`: the largest), in the first page's order, each
    metric with its HELP and TYPE lines; ``extra`` (the router's own metrics) appended."""
    comments: dict[str, list[str]] = {}  # metric name -> its HELP and TYPE lines
    values: dict[str, float] = {}  # sample (name and labels) -> value
    order: list[tuple[str, str]] = []  # ("#", metric name) or ("", sample), as first seen
    for page in pages:
        for line in page.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(maxsplit=3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    if parts[2] not in comments:
                        comments[parts[2]] = []
                        order.append(("#", parts[2]))
                    if line not in comments[parts[2]]:
                        comments[parts[2]].append(line)
                continue
            sample, _, value = line.rpartition(" ")
            number = float(value)
            if sample not in values:
                values[sample] = number
                order.append(("", sample))
            elif sample.split("{")[0] in SHARED_GAUGES:
                values[sample] = max(values[sample], number)
            else:
                values[sample] += number
    lines = [line for kind, what in order for line in (comments[what] if kind == "#" else
                                                           [f"{what} {_number(values[what])}"])]
    return "\n".join(lines) + "\n" + extra
