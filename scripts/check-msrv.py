#!/usr/bin/env python3
"""MSRV check without another toolchain: no dependency may need a newer Rust than ours.

Reads `cargo metadata` for the resolved graph with every feature, on every target
platform, dev-dependencies included (the lockfile's versions), and compares each
package's own `rust-version` with the `rust-version` in our Cargo.toml. Prints the
offenders, with the chain that pulls each one in, and exits 1 when there is any.
Packages that declare no `rust-version` cannot be checked and are only counted.

The other half of the check is clippy's `incompatible_msrv` lint (std APIs newer than
our `rust-version`), denied by `cargo clippy ... -D warnings` in scripts/test.sh.

Usage: scripts/check-msrv.py [extra `cargo metadata` arguments, e.g. --locked]
"""

import json
import subprocess
import sys
from collections import deque


def version(text):
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def show(v):
    return ".".join(str(p) for p in v)


def main():
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--all-features", *sys.argv[1:]],
            check=True,
            stdout=subprocess.PIPE,
        ).stdout
    )
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    members = set(meta["workspace_members"])

    ours = {}
    for member in members:
        p = packages[member]
        if not p.get("rust_version"):
            print(f"check-msrv: {p['name']} has no rust-version in Cargo.toml")
            return 1
        ours[member] = version(p["rust_version"])
    msrv = min(ours.values())

    # Breadth-first from our crates: the shortest chain to each package, and whether it
    # is reachable through normal/build edges (what a user of the crate compiles) or
    # only through dev-dependencies (what our tests compile).
    parent, user_facing = {}, set()
    for only_normal in (True, False):
        seen = set(members)
        queue = deque(members)
        while queue:
            here = queue.popleft()
            for dep in nodes[here]["deps"]:
                if only_normal and {k["kind"] for k in dep["dep_kinds"]} == {"dev"}:
                    continue
                if dep["pkg"] in seen:
                    continue
                seen.add(dep["pkg"])
                parent.setdefault(dep["pkg"], here)
                if only_normal:
                    user_facing.add(dep["pkg"])
                queue.append(dep["pkg"])

    def chain(pkg_id):
        names = []
        while pkg_id not in members:
            p = packages[pkg_id]
            names.append(f"{p['name']} {p['version']}")
            pkg_id = parent[pkg_id]
        names.append(packages[pkg_id]["name"])
        return " <- ".join(names)

    deps = [i for i in nodes if i not in members]
    declared = [(version(packages[i]["rust_version"]), i) for i in deps if packages[i].get("rust_version")]
    offenders = sorted(((v, i) for v, i in declared if v > msrv), reverse=True)
    highest = max(declared, default=None)

    print(
        f"check-msrv: rust-version {show(msrv)}; {len(deps)} dependencies, "
        f"{len(declared)} declare a rust-version, {len(deps) - len(declared)} do not"
    )
    if highest:
        p = packages[highest[1]]
        print(f"check-msrv: highest is {show(highest[0])} ({p['name']} {p['version']})")
    for v, i in offenders:
        kind = "" if i in user_facing else " [dev-dependency only]"
        print(f"  needs {show(v)} > {show(msrv)}: {chain(i)}{kind}")
    if offenders:
        print(
            f"check-msrv: FAILED: {len(offenders)} dependencies need a newer Rust: raise "
            "rust-version in Cargo.toml (and README's MSRV line), or pin an older "
            "version in Cargo.lock (cargo update -p NAME --precise VERSION)"
        )
        return 1
    print("check-msrv: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
