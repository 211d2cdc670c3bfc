#!/usr/bin/env python3
"""Cap a fuzz corpus at a number of files, keeping as much coverage as fits.

    python3 fuzz/trim_corpus.py <target> [max files, default 199]

Run from the repository root after `cargo +nightly fuzz build <target>`.
libFuzzer's merge (what `cargo fuzz cmin` runs) keeps every input that adds
a feature, which for a parser-heavy target can be a few hundred files. This
asks the target's binary for each input's features (a merge into a scratch
directory with `-merge_control_file`), then keeps the hand-written seeds
(files whose name is not a 40-digit hash) and, greedily, the inputs that add
the most features not yet covered (the smaller on a tie), until nothing is
added or the cap is reached. Everything else is deleted from
fuzz/corpus/<target>/. Prints the share of features kept.
"""

import os
import re
import subprocess
import sys
import tempfile

HASH = re.compile(r"^[0-9a-f]{40}$")


def features(binary, corpus):
    """Each corpus file's features, as libFuzzer's merge reports them."""
    with tempfile.TemporaryDirectory() as scratch:
        control = os.path.join(scratch, "control")
        out = os.path.join(scratch, "out")
        os.mkdir(out)
        subprocess.run(
            [binary, "-merge=1", "-use_counters=0", f"-merge_control_file={control}", out, corpus],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        lines = open(control).read().split("\n")
    n = int(lines[0])
    files = lines[2 : 2 + n]
    ft = {}
    for line in lines[2 + n :]:
        if line.startswith("FT "):
            parts = line.split()
            ft[files[int(parts[1])]] = set(map(int, parts[2:]))
    return ft


def main():
    target = sys.argv[1]
    cap = int(sys.argv[2]) if len(sys.argv) > 2 else 199
    corpus = os.path.join("fuzz", "corpus", target)
    binary = os.path.join("fuzz", "target", "x86_64-unknown-linux-gnu", "release", target)
    ft = features(binary, corpus)
    everything = set().union(*ft.values()) if ft else set()
    size = {f: os.path.getsize(f) for f in ft}
    keep = [f for f in ft if not HASH.match(os.path.basename(f))]
    covered = set().union(*(ft[f] for f in keep)) if keep else set()
    while len(keep) < cap:
        best = max(
            (f for f in ft if f not in keep),
            key=lambda f: (len(ft[f] - covered), -size[f]),
            default=None,
        )
        if best is None or not ft[best] - covered:
            break
        keep.append(best)
        covered |= ft[best]
    kept = set(keep)
    for name in os.listdir(corpus):
        path = os.path.join(corpus, name)
        if path not in kept:
            os.remove(path)
    share = 100 * len(covered) / max(1, len(everything))
    print(
        f"{target}: kept {len(keep)} files, {sum(size[f] for f in keep)} bytes, "
        f"{len(covered)} of {len(everything)} features ({share:.1f}%)"
    )


if __name__ == "__main__":
    main()
