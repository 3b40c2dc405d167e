"""Size metrics of the `amc` package, for refactoring before/after notes: files over 400 lines,
the longest functions and the constructors with the most parameters."""
from __future__ import annotations

import ast
import pathlib
import sys


def main(root: str = "amc") -> None:
    files, funcs, inits = [], [], []
    for path in sorted(pathlib.Path(root).rglob("*.py")):
        text = path.read_text()
        files.append((len(text.splitlines()), str(path)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                funcs.append((length, f"{path}:{node.lineno} {node.name}"))
                if node.name == "__init__":
                    a = node.args
                    n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - 1
                    inits.append((n, f"{path}:{node.lineno}"))
    big = [f for f in files if f[0] > 400]
    print(f"files over 400 lines: {len(big)}")
    for n, p in sorted(big, reverse=True):
        print(f"  {n:5d} {p}")
    print("longest functions:")
    for n, p in sorted(funcs, reverse=True)[:5]:
        print(f"  {n:5d} {p}")
    print("largest constructors (parameters):")
    for n, p in sorted(inits, reverse=True)[:5]:
        print(f"  {n:5d} {p}")


if __name__ == "__main__":
    main(*sys.argv[1:])
