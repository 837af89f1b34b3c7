"""Where a process's time goes, from a py-spy flat profile (`py-spy record --format raw`, as
`bench/serve.py --profile` writes): per process and thread, the sample count, then the frames
with the most samples of their own (self) and with the most samples beneath them (inclusive).

Run: `python bench/pyspy_summary.py PROFILE [--top N] > SUMMARY.txt`.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict


def summarize(lines: list[str], top: int) -> str:
    samples: Counter[str] = Counter()
    own: defaultdict[str, Counter[str]] = defaultdict(Counter)
    beneath: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        # py-spy --subprocesses: "process P:cmd;[process C:cmd;]thread (T): name;frames..."
        at = next(i for i, f in enumerate(frames) if f.startswith("thread"))
        # the innermost process (a command line may itself hold ";")
        process = ";".join(frames[:at]).rpartition("process ")[2].split(":", 1)[-1]
        where = process.strip('"')[:80] + " / " + re.sub(r" \(\d+\)", "", frames[at])
        n = int(count)
        samples[where] += n
        rest = frames[at + 1 :]
        if rest:
            own[where][rest[-1]] += n
            for frame in set(rest):
                beneath[where][frame] += n
    out = []
    for where, n in samples.most_common():
        out.append(f"== {where}: {n} samples")
        for title, table in (("self", own[where]), ("inclusive", beneath[where])):
            out.append(f"  {title}:")
            out += [f"    {c:6d} {c / n:6.1%}  {f}" for f, c in table.most_common(top)]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    with open(args.profile) as f:
        print(summarize(f.readlines(), args.top))


if __name__ == "__main__":
    main()
