"""Mutation testing of the core modules, on demand (not in CI): how many small planted bugs the tests catch.

    python scripts/mutation.py                      # every mutant of every core module (hours on 2 cores)
    python scripts/mutation.py --minutes 60         # the same, stopped after an hour; run it again to go on
    python scripts/mutation.py optim generate       # some modules, by short name
    python scripts/mutation.py --sample 40          # 40 mutants drawn per module (seeded): an estimate in ~40 min
    python scripts/mutation.py --retry              # the last run's missed mutants again, after adding tests
    python scripts/mutation.py --report             # the table of the last run, without running
    python scripts/mutation.py trainer --outside    # the survivors against the tests that start processes

mutmut (the `mutation` extra) writes a mutated copy of the package under `mutants/`, and for each mutant runs the
tests that reach the mutated function (from the `[tool.mutmut]` test selection in pyproject.toml). This script runs
it, then prints per module the mutants killed and survived and the score (killed / all), and every survivor with its
diff, except those listed in scripts/mutation_equivalent.toml as equivalent (a change no test could see), which are
counted and shown with their reason.

A run over every mutant goes on where the last one stopped (`--minutes`, Ctrl-C, a closed session): mutmut keeps each
verdict in mutants/ as it comes, and this script passes it only the mutants still without one. A verdict is dropped
when the function it mutated changes (mutmut hashes each function), not when the tests change: `--retry` reruns the
missed mutants against the tests as they are now.

mutmut runs each mutant in-process, so tests that start processes (torchrun, a killed run) are left out of its
selection, and mutants only they can see (DDP, FSDP, resuming after SIGKILL) survive there. `--outside` writes each
remaining survivor into the source file in turn, runs those tests, and puts the file back byte for byte; a
mutant they catch counts as killed ("killed outside").
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = Path(__file__).with_name("mutation_equivalent.toml")
# short name (the file's) -> module path under src/, from the one list mutmut mutates: [tool.mutmut] only_mutate
CORE = {
    Path(path).stem: path.removeprefix("src/")
    for path in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]
}
KILLED = {"killed", "timeout", "segfault", "caught by type check", "killed outside"}
UNCHECKED = {"not checked", "check was interrupted by user"}  # no verdict: a resumed run checks these
# The tests the [tool.mutmut] selection leaves out because they start processes; `--outside` runs them.
OUTSIDE_TESTS = ["tests/test_distributed.py", "tests/test_kill_resume.py"]
OUTSIDE = ROOT / "mutants" / "outside.json"  # {mutant name: "killed outside" | "survived outside"}
SAMPLE = ROOT / "mutants" / "sample.json"  # the mutants a --sample run drew, for --report
# mutmut's own first steps of a run: copy the package to mutants/ and write each module's mutants (no tests run)
GENERATE = (
    "import os; from mutmut.__main__ import copy_also_copy_files, copy_src_dir, create_mutants, setup_source_paths;"
    "os.makedirs('mutants', exist_ok=True); copy_src_dir(); copy_also_copy_files(); setup_source_paths();"
    "create_mutants(os.cpu_count() or 1)"
)


def draw(modules: list[str], n: int, seed: int) -> dict[str, list[str]]:
    """`n` mutants per module, drawn at random (seeded) from all of its mutants."""
    generate()
    rng = random.Random(seed)
    sample = {}
    for m in modules:
        names = sorted(results(CORE[m]))
        sample[m] = sorted(rng.sample(names, min(n, len(names))))
    SAMPLE.write_text(json.dumps(sample, indent=1))
    return sample


def generate() -> None:
    """mutmut's mutants of every core module, written again for the functions that changed since (their verdicts
    dropped), the others' verdicts kept."""
    subprocess.run([sys.executable, "-c", GENERATE], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def run(names: list[str], children: int, minutes: float | None = None) -> int:
    """mutmut over the mutants `names` (globs allowed; none: every mutant), stopped after `minutes` if given."""
    # One thread per test process: the children share the cores, and oversubscribed torch crawls.
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *names]
    print("+", " ".join(cmd[:6]), f"... ({len(names)} names)" if names else "", flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        return proc.wait(timeout=minutes * 60 if minutes else None)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        # mutmut stops its workers on SIGINT; verdicts already in stay, the interrupted ones are run next time.
        print(f"\nstopping mutmut{f' after {minutes:g} minutes' if minutes else ''}", flush=True)
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def pending(modules: list[str]) -> list[str]:
    """The mutants of `modules` without a verdict yet: never run, or stopped while running."""
    return [n for m in modules for n, s in results(CORE[m]).items() if s in UNCHECKED]


def interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95% interval of a proportion k/n: how far a sampled score may be from the full run's."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def results(path: str) -> dict[str, str]:
    """{mutant name: status} of one module from mutmut's record of the last run."""
    from mutmut.stats import status_by_exit_code

    meta = ROOT / "mutants" / "src" / f"{path}.meta"
    if not meta.is_file():
        return {}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    outside = json.loads(OUTSIDE.read_text()) if OUTSIDE.is_file() else {}
    return {name: outside.get(name) or status_by_exit_code[code] for name, code in codes.items()}


def _function(tree: ast.Module, name: str, cls: str | None = None) -> ast.FunctionDef:
    """The function `name` at the top level of `tree`, or in its class `cls`."""
    body = tree.body
    if cls is not None:
        body = next(c.body for c in body if isinstance(c, ast.ClassDef) and c.name == cls)
    return next(f for f in body if isinstance(f, ast.FunctionDef) and f.name == name)


def with_mutant(name: str) -> tuple[Path, str]:
    """(source file, its text with mutant `name` in place of the original function). mutmut keeps each mutant
    as a whole function in mutants/, beside the original: `x_f__mutmut_3` for function f, `xǁCǁf__mutmut_3` for
    method C.f."""
    module, key = name.split(".x", 1)
    key = "x" + key
    stem = key.rsplit("__mutmut_", 1)[0]
    cls, original = stem.split("ǁ")[1:] if stem.startswith("xǁ") else (None, stem.removeprefix("x_"))
    source = ROOT / "src" / (module.replace(".", "/") + ".py")
    mutated_file = (ROOT / "mutants" / "src" / source.relative_to(ROOT / "src")).read_text()
    tree, text = ast.parse(mutated_file), source.read_text()
    lines, mutated_lines = text.splitlines(keepends=True), mutated_file.splitlines(keepends=True)

    def body(rename: str) -> list[str]:
        node = _function(tree, rename, cls)
        block = mutated_lines[node.lineno - 1 : node.end_lineno]
        block[0] = block[0].replace(f"def {rename}(", f"def {original}(", 1)
        return block

    target = _function(ast.parse(text), original, cls)
    if body(f"{stem}__mutmut_orig") != lines[target.lineno - 1 : target.end_lineno]:
        raise SystemExit(f"{source} changed since mutmut's run ({original} differs): run the mutants again first")
    return source, "".join(lines[: target.lineno - 1] + body(key) + lines[target.end_lineno :])


def run_outside(names: list[str]) -> None:
    """Each mutant in `names` against OUTSIDE_TESTS, written into its source file and put back after."""
    outside = json.loads(OUTSIDE.read_text()) if OUTSIDE.is_file() else {}
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-o", "addopts=", "-p", "no:cacheprovider", *OUTSIDE_TESTS]
    for i, name in enumerate(names, 1):
        source, mutated = with_mutant(name)
        original = source.read_bytes()
        try:
            source.write_text(mutated)
            code = subprocess.call(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            source.write_bytes(original)
        outside[name] = "killed outside" if code == 1 else "survived outside"
        print(f"[{i}/{len(names)}] {name}: {outside[name]}", flush=True)
        OUTSIDE.write_text(json.dumps(outside, indent=1))


def missed(modules: list[str], sample: dict[str, list[str]] | None) -> list[str]:
    """The last run's (or sample's) mutants of `modules` that no test killed, unchecked ones included."""
    names = []
    for m in modules:
        status = results(CORE[m])
        # A run over every mutant that was stopped leaves some unchecked: resuming it checks those, not --retry.
        names += [n for n in (sample[m] if sample else status) if status.get(n) not in KILLED | UNCHECKED]
    return names


def diff(name: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "show", name], cwd=ROOT, capture_output=True, text=True, check=False
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith(("+", "-")) and line[:3] not in {"+++", "---"}]
    return "\n".join(f"      {line}" for line in lines)


def report(modules: list[str], show_diffs: bool, sample: dict[str, list[str]] | None) -> float:
    """The table per module; the score is killed / checked (a stopped run's unchecked mutants are counted apart)."""
    equivalent = tomllib.loads(EQUIVALENT.read_text()) if EQUIVALENT.is_file() else {}
    rows, survivors, listed = [], [], []
    for m in modules:
        status = results(CORE[m])
        if sample is not None:
            status = {name: status.get(name, "not checked") for name in sample.get(m, [])}
        checked = {n: s for n, s in status.items() if s not in UNCHECKED}
        killed = sum(s in KILLED for s in checked.values())
        missed = [n for n, s in checked.items() if s not in KILLED]
        equiv = [n for n in missed if n in equivalent]
        survivors += [(n, status[n]) for n in missed if n not in equivalent]
        listed += [(n, equivalent[n]) for n in equiv]
        rows.append((m, len(status), len(checked), killed, len(missed) - len(equiv), len(equiv)))
    head = f"{'module':<12}{'mutants':>9}{'checked':>9}{'killed':>8}{'missed':>8}{'equiv.':>8}{'score':>8}"
    print(f"\n{head}{'without equiv.':>16}")
    totals = ("all", *(sum(r[i] for r in rows) for i in range(1, 6)))
    for m, total, checked, killed, missed, equiv in [*rows, totals]:
        score = f"{killed / checked:.1%}" if checked else "-"
        real = f"{killed / (checked - equiv):.1%}" if checked > equiv else "-"
        print(f"{m:<12}{total:>9}{checked:>9}{killed:>8}{missed:>8}{equiv:>8}{score:>8}{real:>16}")
    _, total, checked, killed, _, equiv = totals
    overall = killed / max(checked, 1)
    if sample is not None:
        low, high = interval(killed, checked)
        print(f"\na sample of {checked} mutants: the score of all of them is in [{low:.1%}, {high:.1%}] (95%)")
    print(f"score = killed / checked, the {equiv} equivalent mutants counted as missed; without equiv.: left out.")
    if checked < total:
        again = "a run over every mutant goes on with them" if sample is None else "the sample was stopped early"
        print(f"{total - checked} of {total} mutants not checked yet: {again}.")
    if listed:
        print("\nequivalent (scripts/mutation_equivalent.toml):")
        for name, reason in listed:
            print(f"  {name}: {reason}")
    if survivors:
        print(f"\n{len(survivors)} mutants no test caught:")
        for name, status in survivors:
            print(f"  {name} ({status})")
            if show_diffs:
                print(diff(name))
    return overall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", choices=[[], *CORE], metavar="module", help=f"of {', '.join(CORE)}")
    parser.add_argument("--report", action="store_true", help="print the last run's results without running")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1, help="test processes at once")
    parser.add_argument("--sample", type=int, metavar="N", help="run N mutants per module, drawn at random")
    parser.add_argument("--seed", type=int, default=0, help="of the --sample draw")
    parser.add_argument("--retry", action="store_true", help="rerun the missed, not equivalent mutants")
    parser.add_argument("--outside", action="store_true",
                        help="run the last run's survivors against the tests that start processes")  # fmt: skip
    parser.add_argument("--minutes", type=float, help="stop after this long; run again to go on")
    parser.add_argument("--no-diffs", action="store_true", help="list surviving mutants without their diffs")
    args = parser.parse_args()
    try:
        import mutmut  # noqa: F401
    except ImportError:
        sys.exit("mutation testing needs mutmut: pip install -e '.[mutation]'")
    modules = args.modules or list(CORE)
    sample = None
    if args.sample:
        sample = draw(modules, args.sample, args.seed)
    elif (args.report or args.retry or args.outside) and SAMPLE.is_file():
        sample = json.loads(SAMPLE.read_text())
    equivalent = tomllib.loads(EQUIVALENT.read_text()) if EQUIVALENT.is_file() else {}
    if args.outside:
        run_outside([n for n in missed(modules, sample) if n not in equivalent])
    elif args.retry:  # the last run's missed mutants again, against the tests as they are now; not the equivalent
        names = [n for n in missed(modules, sample) if n not in equivalent]
        if names:
            run(names, args.max_children, args.minutes)
    elif args.sample:  # the draw just made (a sample read back from its file is only reported or retried)
        run([n for m in modules for n in sample[m]], args.max_children, args.minutes)
    elif not args.report:  # every mutant of `modules`: those without a verdict yet
        SAMPLE.unlink(missing_ok=True)
        generate()
        names = pending(modules)
        if names:
            run(names, args.max_children, args.minutes)
        else:
            print("every mutant of these modules has a verdict (--retry checks the missed ones again)")
    report(modules, show_diffs=not args.no_diffs, sample=sample)


if __name__ == "__main__":
    main()
