"""The per-module table of tests/MUTATION.md from mutmut's results in mutants/ (run from the checkout root).

Survivors and mutants without tests are sorted by the lists in MUTATION.md ("- `module` [tag] reason:
Name#N, #M, ..."), tags equivalent, cuda and killed later; any left over are printed as unclassified:
each needs a test, or a line in MUTATION.md saying why no test can tell it apart.

    python tests/mutation_score.py
"""
import collections
import json
import re
from pathlib import Path

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 36: "timeout", 24: "timeout",
          -24: "timeout", 152: "timeout", 255: "timeout", None: "not run"}  # mutmut's exit codes


def listed(md: Path) -> dict[str, str]:
    """mutmut's mutant name -> tag, from the survivor lists of MUTATION.md."""
    tags = {}
    for line in md.read_text().splitlines():
        m = re.match(r"- `([\w.]+)` \[([\w ]+)\] (.*)$", line.strip())
        if not m:
            continue
        module, tag, rest = m.groups()
        base = None
        for name, first, last in re.findall(r"([A-Za-z_][\w.]*)?#(\d+)(?: to #(\d+))?", rest):
            base = name or base
            if base is None:
                continue
            cls, _, fn = base.rpartition(".")
            for n in range(int(first), int(last or first) + 1):
                tags[f"{module}.{'xǁ' + cls + 'ǁ' + fn if cls else 'x_' + fn}__mutmut_{n}"] = tag
                if not cls:  # a method listed without its class (bench.fuse's Members)
                    tags[f"{module}.?{fn}__mutmut_{n}"] = tag
    return tags


def main() -> None:
    tags = listed(Path("tests/MUTATION.md"))
    rows, left = {}, []
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        module = ".".join(meta.relative_to("mutants").with_suffix("").with_suffix("").parts).removesuffix(".__init__")
        count = collections.Counter()
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            status = STATUS.get(code, "other")
            if status in ("survived", "no tests"):
                method = re.sub(r"^(.*)\.xǁ\w+ǁ(\w+)$", r"\1.?\2", name)
                tag = tags.get(name) or tags.get(method)
                if tag is None:
                    left.append(name)
                else:
                    status = tag
            count[status] += 1
        rows[module] = count
    print("| module | mutants | killed | timeout | killed by later tests | survived | no tests | equivalent "
          "| CUDA-only | not run | score |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    total = collections.Counter()
    for module, c in rows.items():
        total.update(c)
        n = sum(c.values())
        counted = n - c["not run"] - c["equivalent"] - c["cuda"]
        good = c["killed"] + c["timeout"] + c["killed later"]
        score = "-" if counted <= 0 else f"{100 * good / counted:.0f} %" + (" of those run" if c["not run"] else "")
        print(f"| {module} | {n} | {c['killed']} | {c['timeout']} | {c['killed later']} | {c['survived']} "
              f"| {c['no tests']} | {c['equivalent']} | {c['cuda']} | {c['not run']} | {score} |")
    counted = sum(total.values()) - total["not run"] - total["equivalent"] - total["cuda"]
    good = total["killed"] + total["timeout"] + total["killed later"]
    print(f"\nrun {sum(total.values()) - total['not run']} of {sum(total.values())}; equivalent {total['equivalent']}, "
          f"CUDA-only {total['cuda']}; killed {good} of the other {counted}"
          + (f" ({100 * good / counted:.1f} %)" if counted else ""))
    for name in left:
        print("unclassified:", name)


if __name__ == "__main__":
    main()
