"""Execute a notebook on a limited kernel with nbclient and say what stopped it.

    python run_notebook.py [NOTEBOOK] [--kernel limited-python] [--timeout 120]

A cell stopped by a limit is reported with the error it shows in the notebook
(``TimeoutError: execution exceeded exec_timeout=...``) or, when the kernel itself was
killed (memory), with the reason the provisioner recorded, which nbclient's
``DeadKernelError("Kernel died")`` does not carry. Exit status 0 if every cell ran, 1 if
one failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, DeadKernelError

HERE = Path(__file__).parent


def shown_error(cell) -> str | None:
    """The error a cell shows in the notebook ("TimeoutError: ...").

    Read from the cell's outputs rather than from ``CellExecutionError.ename/evalue``:
    those come from the execute reply, which for an exec_timeout interrupt still says
    ``KeyboardInterrupt`` with an empty message.
    """
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            return f"{output['ename']}: {output['evalue']}"
    return None


def run(path: Path, kernel_name: str, timeout: float) -> int:
    nb = nbformat.read(path, as_version=4)
    # timeout: nbclient's own per-cell wall clock, a last resort above exec_timeout.
    client = NotebookClient(nb, kernel_name=kernel_name, timeout=timeout)
    running: dict[str, int] = {}
    exit_reason: list[str] = []

    def on_cell_execute(cell, cell_index):
        running["index"] = cell_index

    def on_notebook_error(notebook):
        # nbclient calls this before it drops the dead kernel's manager: the last moment
        # the provisioner's record of why the kernel died can be read.
        provisioner = client.km.provisioner if client.km is not None else None
        reason = getattr(provisioner, "exit_reason", None)
        if reason:
            exit_reason.append(reason)

    client.on_cell_execute = on_cell_execute
    client.on_notebook_error = on_notebook_error
    try:
        client.execute()
    except CellExecutionError as e:
        index = running.get("index")
        print(f"cell {index} failed: {shown_error(nb.cells[index]) or f'{e.ename}: {e.evalue}'}")
        return 1
    except DeadKernelError as e:
        why = exit_reason[0] if exit_reason else "no reason recorded (not a limited kernel?)"
        print(f"cell {running.get('index')}: {type(e).__name__}: {e}")
        print(f"  why (limited-provisioner): {why}")
        return 1
    print(f"{path.name}: all cells ran")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", nargs="?", type=Path, default=HERE / "runaway.ipynb")
    parser.add_argument("--kernel", default="limited-python", help="kernelspec name")
    parser.add_argument("--timeout", type=float, default=120, help="nbclient's per-cell timeout")
    args = parser.parse_args(argv)
    return run(args.notebook, args.kernel, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
